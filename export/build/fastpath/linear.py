"""Linear lowering: each linear module of the twin (its base kind's torch twin, with or without a LoRA branch)
as ONNX nodes, alone or fused with its siblings along N; and the quantized tables (embedding / lm_head).

Which nodes a twin becomes is the twin's own ``lowering()`` (what the dynamo path emits too): a
``contrib.ContribNode`` (one contrib node) or a ``contrib.PatternNode`` (standard nodes written against
``contrib.PatternBuilder``, with static K and N here); whether siblings fuse along N is the twin's
``can_fuse_with``. This module knows no base kind: it adds what every kind shares (biases, fusing siblings
that read the same input, the LoRA branch)::

    nn.Linear             MatMul(W^T) [+ Add(bias)]
    ContribNode           [Gather(perm)] + the contrib node (e.g. MatMulNBits, MatMulBnb4) [+ Add(bias)]
    PatternNode           the pattern's nodes (e.g. kinds/bnb8.py's LLM.int8 emulation), bias included
    LowRankBranch         base (scope <m>/base) + MatMul(lora_A) + Gemm(lora_B, C = base) (scope <m>; fp16:
                          MatMul(lora_B) + Add); an adapter trained with down_weights: int8 has MatMulNBits
                          (8-bit lora_A, accuracy_level 4) for the MatMul
    fused siblings <g>    one base node (scope <g>: qkv_proj, gate_up_proj) + Split; two or more branches with
    (q/k/v, gate/up)      their factors in the graph: one branch of <g>.lora_A / <g>.lora_B (as LowRankBranch's)
                          before the Split (scope <g>); else each member's branch after it, as LowRankBranch. q/k/v
                          read by GroupQueryAttention's own rotary stay packed (no Split), one constant
                          branch or more joint

Why one branch per fused group: at batch 1 a branch costs mostly the bytes of its factors, read from memory every
token, and MLAS packs a down-projection factor into panels of 16 columns (a rank-4 factor reads as a rank-16
one). A q/k/v group with three branches becomes a MatMul and a Gemm instead of 3 MatMuls and 3 Gemms (fp16: 2
MatMuls and 1 Add instead of 6 and 3), and its down factor one set of panels instead of three, which outweighs the
zero blocks of its block-diagonal up factor (they add exact zeros). Adapter-inputs branches stay per member:
their factors are graph inputs named per module, with ranks known only per run.

Quantized tables are parameters of :func:`quantize_table` (bits, ``accuracy_level`` of the lm_head's
MatMulNBits, symmetric blocks): the embedding reads them through GatherBlockQuantized, the lm_head through
the table's own lowering (MatMulNBits), tied tables share one set of initializers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
from onnx import helper
from torch import nn

from adalora_deploy.errors import ExportError

from .. import contrib
from ..modules import LowRankBranch, NBitsLinear, joint_factors
from .graph import FastPathUnsupported, Graph, scope_of

__all__ = ["EMBEDDING_BLOCK", "LM_HEAD_ACCURACY_LEVEL", "Branch", "LinearEmitter", "QuantizedTable",
           "quantize_table", "table_initializers"]

MSFT = contrib.MSFT_DOMAIN
EMBEDDING_BLOCK = 32
"""Block size of quantized embeddings / lm_head (onnxruntime's quantizer and the genai builder default)."""
LM_HEAD_ACCURACY_LEVEL = 4
"""MatMulNBits accuracy_level of a quantized lm_head (int8 activations, as the genai builder's CPU int4)."""

QuantizedTable = Literal["int4", "int8"] | None


@dataclass(frozen=True)
class Branch:
    """A LoRA branch's factors: initializer names, or graph input names in adapter-inputs mode."""

    lora_A: str
    lora_B: str


class LinearEmitter:
    """Emits linear modules (and fused groups of them) as ONNX nodes."""

    def __init__(self, graph: Graph, adapter_inputs: dict[str, Branch]) -> None:
        self.g = graph
        self.adapter_inputs = adapter_inputs

    # x ─> [base] ─> y (+ branch, see _branch)
    def linear(self, module: nn.Module, x: str, path: str) -> str:
        if isinstance(module, LowRankBranch):
            base = self.linear(module.base, x, f"{path}.base")
            return self._branch(module, x, base, path)
        return self._base([module], x, path)

    # x ──> base ──────────────────────────────┐
    # └───> MatMul(lora_A [in, r]) ──> Gemm(lora_B [r, out], C) ──> y      (scope <path>; see _low_rank)
    def _branch(self, module: LowRankBranch, x: str, base: str, path: str) -> str:
        g, scope = self.g, scope_of(path)
        if module.factors_as_inputs:
            branch = self.adapter_inputs[path]
            a, b = branch.lora_A, branch.lora_B
            if g.float_type != np.float32:
                a = g.op1("Cast", [a], scope, to=helper.np_dtype_to_tensor_dtype(g.float_type))
                b = g.op1("Cast", [b], scope, to=helper.np_dtype_to_tensor_dtype(g.float_type))
        elif module.down is not None:
            return self._nbits_down([module.down], x, g.floats(f"{path}.lora_B", module.lora_B), base, path)
        else:
            a = g.floats(f"{path}.lora_A", module.lora_A)
            b = g.floats(f"{path}.lora_B", module.lora_B)
        return self._low_rank(x, a, b, base, scope)

    # x ─> [Gather(perm)] ─> MatMulNBits(8-bit A, accuracy_level 4) ─> Gemm(lora_B, C = base) ─> y
    def _nbits_down(self, downs: Sequence[NBitsLinear], x: str, lora_B: str, base: str, path: str) -> str:
        """A branch whose down product is 8-bit (``adapter.down_weights: int8``): one MatMulNBits over the members'
        quantized ``A`` (weights ``<path>.lora_A.*``, reading ``x`` as the base node does, so it rounds the same
        activation codes), then the up product as in :meth:`_low_rank`. At batch 1 it reads a quarter of the fp32
        factor's bytes and none of MLAS's 16-column padding."""
        g = self.g
        if g.float_type != np.float32:
            raise FastPathUnsupported("fast path: an 8-bit down-projection (MatMulNBits accuracy_level 4) is built "
                                      "for fp32 graphs only")
        down = self._contrib(list(downs), x, f"{path}.lora_A")
        return g.op1("Gemm", [down, lora_B, base], scope_of(path))

    # fp32: x ─> MatMul(lora_A) ─> Gemm(lora_B, C = base) ─> y      (rows are tokens: the fast path's x is 2-D)
    # else: x ─> MatMul(lora_A) ─> MatMul(lora_B) ─> Add(base) ─> y
    def _low_rank(self, x: str, lora_A: str, lora_B: str, base: str, scope: str) -> str:
        """``base + (x @ lora_A) @ lora_B``. In fp32 graphs the up-projection and the sum are one Gemm whose C
        is the base output (one node and one intermediate tensor a branch fewer: +2-4% decode on SmolLM2);
        onnxruntime's Gemm adds the product to C as the Add did (measured: bitwise equal logits on SmolLM2).
        fp16 graphs keep MatMul + Add: the product rounded to fp16, then the sum, as measured at the lossy tier."""
        g = self.g
        down = g.op1("MatMul", [x, lora_A], scope)
        if g.float_type == np.float32:
            return g.op1("Gemm", [down, lora_B, base], scope)
        return g.op1("Add", [base, g.op1("MatMul", [down, lora_B], scope)], scope)

    def group(self, modules: Sequence[tuple[str, nn.Module]], x: str, fused_path: str, fuse: bool, *,
              split: bool = True) -> list[str]:
        """Outputs of several linears that read the same ``x`` (q/k/v, gate/up).

        With ``fuse`` and compatible bases, the bases become one node whose output is split. Two or more
        members with constant factors (:func:`_joint`) then share one branch, added before the Split; otherwise
        each member's branch is added to its slice. Both are exact: the same sums as the unfused graph, the
        joint branch's off-diagonal blocks adding exact zeros (:func:`~..modules.joint_factors`)::

            x ─> fused base (N = sum N_i) ────────────────────┐
            └──> MatMul(lora_A [K, sum r_i]) ─> Gemm(lora_B [sum r_i, sum N_i], C) ─> Split ─> y_i   (joint)

            x ─> fused base (N = sum N_i) ─> Split ─> y_i [─> + branch_i(x) (_low_rank)]          (per member)

        Without ``split``, the fused output is returned whole (one name, the members' outputs concatenated
        along the last axis: GroupQueryAttention's packed q/k/v), a single constant branch then joint too (its
        zero columns cost less than a Split node); a group with adapter-inputs branches, or not fused, still
        returns one output per member.
        """
        members = [m for _, m in modules]
        bases = [(m.base if isinstance(m, LowRankBranch) else m) for m in members]
        if not (fuse and len(modules) > 1 and _fusable(bases)):
            parts = [self._base([b], x, f"{p}.base" if isinstance(m, LowRankBranch) else p)
                     for b, (p, m) in zip(bases, modules)]
            return self._member_branches(modules, x, parts)
        fused = self._base(bases, x, fused_path)
        joint = _joint(members, least=2 if split else 1)
        if joint:
            fused = self._joint_branch(members, x, fused, fused_path)
        if not split and (joint or not any(isinstance(m, LowRankBranch) for m in members)):
            return [fused]
        sizes = [int(b.out_features) for b in bases]
        parts = self.g.op("Split", [fused, self.g.const(sizes)], scope_of(fused_path), outputs=len(sizes), axis=-1)
        return parts if joint else self._member_branches(modules, x, parts)

    def _member_branches(self, modules: Sequence[tuple[str, nn.Module]], x: str, parts: Sequence[str]) -> list[str]:
        return [self._branch(m, x, part, p) if isinstance(m, LowRankBranch) else part
                for part, (p, m) in zip(parts, modules)]

    # x ──> fused base [.., sum N_i] ─────────────────────────┐
    # └───> MatMul(lora_A [in, sum r_i]) ──> Gemm(lora_B [sum r_i, sum N_i], C) ──> y
    #                                                               (scope <path>; fp16 as in _low_rank)
    def _joint_branch(self, members: Sequence[nn.Module], x: str, base: str, path: str) -> str:
        g, scope = self.g, scope_of(path)
        lora_A, lora_B = joint_factors(members)
        downs = [m.down for m in members if isinstance(m, LowRankBranch)]
        if any(d is not None for d in downs):
            if not all(d is not None for d in downs):
                raise ExportError(f"fast path: {path} mixes 8-bit and fp32 down-projections in one group")
            return self._nbits_down(downs, x, g.floats(f"{path}.lora_B", lora_B), base, path)
        return self._low_rank(x, g.floats(f"{path}.lora_A", lora_A), g.floats(f"{path}.lora_B", lora_B), base, scope)

    def _base(self, modules: Sequence[nn.Module], x: str, path: str) -> str:
        """One base node for ``modules`` concatenated along the output axis (one module: no concatenation)."""
        first = modules[0]
        if isinstance(first, LowRankBranch):  # a branch on a branch (not produced by convert_for_export)
            if len(modules) != 1:
                raise ExportError("fast path: cannot fuse nested LoRA branches")
            return self.linear(first, x, path)
        if type(first) is nn.Linear:
            return self._matmul(modules, x, path)
        lowering = getattr(first, "lowering", None)
        node = lowering() if callable(lowering) else None
        if isinstance(node, contrib.ContribNode):
            return self._contrib(modules, x, path)
        if isinstance(node, contrib.PatternNode):
            return self._pattern(modules, x, path)
        raise FastPathUnsupported(f"fast path: no ONNX mapping for {path} ({type(first).__name__})")

    def table(self, table: NBitsLinear, x: str, path: str) -> str:
        """A quantized table's lowering (the lm_head), its initializers shared with the embedding's
        (:func:`table_initializers`) when that emitted them first."""
        return self._contrib([table], x, path, shared=True)

    def _bias(self, modules: Sequence[nn.Module], y: str, path: str) -> str:
        biases = [getattr(m, "bias", None) for m in modules]
        if all(b is None for b in biases):
            return y
        parts = [torch.zeros(m.out_features) if b is None else b.detach().float() for m, b in zip(modules, biases)]
        bias = self.g.floats(f"{path}.bias", torch.cat(parts))
        return self.g.op1("Add", [y, bias], scope_of(path))

    # x ─> MatMul(W^T [K, N]) ─> [Add(bias)]
    def _matmul(self, modules: Sequence[nn.Linear], x: str, path: str) -> str:
        g = self.g
        weight = torch.cat([m.weight.detach() for m in modules], 0) if len(modules) > 1 else modules[0].weight.detach()
        w_t = g.floats(f"{path}.MatMul.weight", weight.T)
        return self._bias(modules, g.op1("MatMul", [x, w_t], scope_of(path)), path)

    # x ─> [Gather(perm, axis=-1)] ─> <op>(the twin's tensors, attributes) ─> [Add(bias)]
    def _contrib(self, modules: Sequence[nn.Module], x: str, path: str, *, shared: bool = False) -> str:
        """The twins' one contrib node (``lowering()``, the node the dynamo path emits too), fused along N;
        ``shared``: an initializer already in the graph under the same name is read, not written again."""
        g, scope = self.g, scope_of(path)
        node = contrib.ContribNode.along_n([m.lowering() for m in modules])
        if node.float32_only and g.float_type != np.float32:
            raise FastPathUnsupported(f"fast path: {node.op.op_type} is built for fp32 graphs only")
        if node.permutation is not None:
            x = g.op1("Gather", [x, g.initializer(f"{path}.perm", node.permutation)], scope, axis=-1)
        left_out = node.default_inputs()
        inputs = [x]
        for name, tensor in node.named_inputs():
            if name in left_out:
                continue
            full = f"{path}.{name}"
            keep_dtype = g.float_type == np.float32 or not tensor.is_floating_point()
            if shared and g.has(full):
                inputs.append(full)
            else:
                inputs.append(g.initializer(full, tensor) if keep_dtype else g.floats(full, tensor))
        y = g.op1(node.op.op_type, inputs, scope, domain=MSFT, **node.attribute_dict())
        return self._bias(modules, y, path)

    # x ─> the pattern's nodes (contrib.PatternBuilder with static K and N), bias included
    def _pattern(self, modules: Sequence[nn.Module], x: str, path: str) -> str:
        """The twins' node pattern (``lowering()``, shared with the dynamo path), fused along N."""
        g = self.g
        node = contrib.PatternNode.along_n([m.lowering() for m in modules])
        if node.float32_only and g.float_type != np.float32:
            raise FastPathUnsupported(f"fast path: {node.op.name} is built for fp32 graphs only")
        return node.op.pattern(_GraphBuilder(g, path, dict(node.named_inputs())), x, *node.attributes)


class _GraphBuilder:
    """``contrib.PatternBuilder`` on the fast path's node list: constants are shared initializers, the layer's
    tensors initializers ``<path>.<name>`` written on first use, K and N static."""

    def __init__(self, g: Graph, path: str, tensors: dict[str, torch.Tensor]) -> None:
        self.g, self.path, self.scope, self.tensors = g, path, scope_of(path), tensors
        self._names: dict[str, str] = {}

    def op(self, op_type: str, *inputs: str, **attributes) -> str:
        return self.g.op1(op_type, list(inputs), self.scope, **attributes)

    def ints(self, *values: int) -> str:
        return self.g.const(list(values))

    def float(self, value: float) -> str:
        return self.g.const(value, np.float32)

    def tensor(self, name: str) -> str:
        if name not in self._names:
            self._names[name] = self.g.initializer(f"{self.path}.{name}", self.tensors[name])
        return self._names[name]

    def rows(self, x: str, weight: str) -> tuple[str, str, str]:
        k, n = (int(d) for d in self.tensors[weight].shape)
        lead = self.op("Slice", self.op("Shape", x), self.ints(0), self.ints(-1))
        return lead, self.op("Reshape", x, self.ints(-1, k)), self.ints(n)


def _joint(members: Sequence[nn.Module], least: int = 2) -> bool:
    """Whether fused siblings' branches become one (:meth:`LinearEmitter.group`): none takes its factors as graph
    inputs, and at least ``least`` hold a rank > 0 (2 when the output is split: with one, a joint branch saves no
    node and multiplies zeros; 1 when it stays packed, where it saves the Split)."""
    branches = [m for m in members if isinstance(m, LowRankBranch)]
    if any(m.factors_as_inputs for m in branches):
        return False
    return sum(m.rank > 0 for m in branches) >= least


def _fusable(bases: Sequence[nn.Module]) -> bool:
    """Whether these base layers can be concatenated along N into one node with the same arithmetic: the same
    type and K, then a dense layer's dtype or the twin's own rule (``can_fuse_with``; none: never)."""
    first = bases[0]
    if any(type(b) is not type(first) for b in bases):
        return False
    if any(int(b.in_features) != int(first.in_features) for b in bases):
        return False
    if type(first) is nn.Linear:
        return all(b.weight.dtype == first.weight.dtype for b in bases)
    rule = getattr(first, "can_fuse_with", None)
    return bool(rule(bases[1:])) if callable(rule) else False


# --- quantized tables (embedding / lm_head) ---------------------------------------------------------------


def quantize_table(weight: torch.Tensor, kind: str, *, accuracy_level: int = LM_HEAD_ACCURACY_LEVEL,
                   symmetric: bool = False) -> NBitsLinear:
    """Round-to-nearest blocks of an embedding / lm_head table ``[vocab, hidden]`` as the fast path stores them.

    The same :class:`NBitsLinear` serves both uses: MatMulNBits reads it as the lm_head, and
    GatherBlockQuantized reads its rows (``qweight`` reshaped to ``[vocab, k_blocks * block_bytes]``) as
    the embedding; :meth:`NBitsLinear.dequantized_weight` is the table both compute with.
    """
    bits = {"int4": 4, "int8": 8}.get(kind)
    if bits is None:
        raise ExportError(f"fast path: quantization {kind!r} for embeddings / lm_head: choose int4 or int8")
    return NBitsLinear.from_float(weight, bits=bits, block_size=EMBEDDING_BLOCK, accuracy_level=accuracy_level,
                                  symmetric=symmetric)


def table_initializers(g: Graph, table: NBitsLinear, prefix: str) -> tuple[str, str, str | None]:
    """Initializer names of a quantized table, emitted on first use (the embedding and lm_head share them);
    no zero points when they all equal the ops' default ``2**(bits-1)`` (symmetric tables)."""
    zero_points = None if table.has_default_zero_points() else f"{prefix}.zero_points"
    names = (f"{prefix}.qweight", f"{prefix}.scales", zero_points)
    if not g.has(names[0]):
        g.initializer(names[0], table.qweight)
        if g.float_type == np.float32:
            g.initializer(names[1], table.scales)
        else:
            g.floats(names[1], table.scales)
        if zero_points:
            g.initializer(zero_points, table.zero_points)
    return names

