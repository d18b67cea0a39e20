"""Turning a source model into the torch twin of its ONNX graph (``convert_for_export``).

::

    source model (base with its own kernels + AdaLoRA layers, compacted)
          ┌──────────────┴───────────────────────────┐
        merged                                     separate
    merge_into_dense: W = dequant(W0) + ΔW         each base layer -> its kind's twin (export.build.kinds);
      fp32       plain MatMul (exact)              rank r > 0: LowRankBranch, A = Λ'Q' [r, in],
      fp16       whole model in fp16 (lossy)       B = P' scale [out, r]; rank 0: no branch, no node
      int4/int8  MatMulNBits, accuracy 4           --adapter-inputs: A/B graph inputs with a symbolic
                 (smallest, fastest on CPU),       rank (rank-0 defaults) + adapter.onnx_adapter
                 re-quantized by GPTQ on
                 calibration text (default) or
                 round-to-nearest

What each base kind's graph computes is written once, in its :mod:`adalora_deploy.export.build.kinds` file.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal, get_args

import onnx
import torch
from onnx import numpy_helper
from torch import nn

from adalora_deploy import functional as F
from adalora_deploy.adapters import find_adapters
from adalora_deploy.backends import backend_for, is_supported
from adalora_deploy.gptq.linear import QuantLinear
from adalora_deploy.errors import ExportError
from adalora_deploy.gptq.driver import quantize_model
from adalora_deploy.gptq.int8_compute import WEIGHT_ZERO_POINT, weight_codes
from adalora_deploy.merge import merge_into_dense

from .kinds import (
    BRANCH,
    INT8_DOWN_BRANCH,
    SERVING_ACCURACY_LEVEL,
    Arithmetic,
    SourceTier,
    Tier,
    kind_for_quantization,
    twin_of,
)
from ..contract import FUSED_LINEARS
from .modules import LowRankBranch, NBitsLinear, default_zero_points, swap_module

__all__ = [
    "MERGED_NBITS_BLOCK",
    "Conversion",
    "Mode",
    "Requantize",
    "Weights",
    "adapter_factors",
    "base_kind",
    "convert_for_export",
    "describe",
    "validate_options",
]

Mode = Literal["merged", "separate"]
Weights = Literal["fp32", "fp16", "int4", "int8"]
Requantize = Literal["gptq", "rtn"]

MERGED_NBITS_BLOCK = 32
"""Block size of ``merged --weights int4/int8`` (onnxruntime's own quantizer default; 1.32 CPU accepts 16..256)."""

TABLE_KEPT = ("; the base's GPTQ lm_head (and the tied embedding reading it) kept as trained, not re-quantized, "
              "its logits at accuracy_level 0")
"""What merged int4/int8 adds when the base's token table was quantized (``quantize --tables``)."""

MERGED_WEIGHTS: dict[str, Arithmetic] = {
    "fp16": Arithmetic("fp16 graph of dequant(W0) + ΔW (lossy)", "lossy", "lossy"),
}
"""Merged graphs whose weights are re-encoded without re-quantization, whatever the base kind was."""


def _merged_nbits(weights: str, requantize: str) -> Arithmetic:
    how = ("GPTQ on calibration text (error-compensating)" if requantize == "gptq" else "round-to-nearest")
    return Arithmetic(f"MatMulNBits {weights} of dequant(W0) + ΔW re-quantized by {how}, asymmetric, block "
                      f"{MERGED_NBITS_BLOCK}, accuracy_level {SERVING_ACCURACY_LEVEL} (lossy)", "lossy", "lossy")


@dataclass(frozen=True)
class Conversion:
    """What :func:`convert_for_export` did to a model."""

    ranks: dict[str, int]
    """Surviving rank per adapted module."""
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """Module -> ``(A [r, in], B [out, r])`` (scaling folded), every adapted module (rank 0 ones too)."""
    base_kind: str
    """The quantized base kinds as the backends describe them (``dense`` when none)."""
    arithmetic: Arithmetic
    """What the graph computes and how it is judged."""
    requantization: dict[str, Any] | None = None
    """Merged int4/int8: method, bits, block, calibration sequences and the worst layer output SQNR."""

    @property
    def tier(self) -> Tier:
        return self.arithmetic.tier

    @property
    def source_tier(self) -> SourceTier:
        return self.arithmetic.source_tier


def describe(quantization: str, mode: str, weights: str = "fp32", serving: bool = False,
             requantize: str = "gptq", activations: str = "fp32", down_weights: str = "fp32") -> Arithmetic:
    """The arithmetic of one export configuration (from the base kind's plug-in or the merged weights').

    ``activations``: how the base's quantized linears computed in training (``int8``: the GPTQ kind's
    accuracy_level-4 arithmetic, see :func:`trained_activations`); ``down_weights``: how the adapter's
    down-projections did (``int8``: separate mode's branch is :data:`INT8_DOWN_BRANCH`)."""
    kind = kind_for_quantization(quantization)
    branch = INT8_DOWN_BRANCH if down_weights == "int8" else BRANCH
    if activations == "int8" and not (mode == "merged" and weights in ("int4", "int8", "fp16")):
        base = kind.int8_trained(mode=mode)
        return dataclasses.replace(base, text=base.text + branch) if mode == "separate" else base
    if mode == "merged":
        if weights in ("int4", "int8"):
            return _merged_nbits(weights, requantize)
        return MERGED_WEIGHTS[weights] if weights in MERGED_WEIGHTS else kind.merged()
    base = kind.separate(serving=serving)
    return dataclasses.replace(base, text=base.text + branch)


def trained_activations(model: nn.Module) -> str:
    """``int8`` when the source model's GPTQ linears compute with int8 activations (``model.activations``)."""
    return "int8" if any(getattr(m, "activation_block", None) is not None for m in model.modules()) else "fp32"


def base_kind(model: nn.Module) -> str:
    """The quantized base kinds in ``model`` as the backends describe them (``dense`` when none)."""
    found: list[str] = []
    for module in model.modules():
        if is_supported(module):
            kind = backend_for(module).describe(module)
            if not kind.startswith("dense") and kind not in found:
                found.append(kind)
    return "+".join(found) if found else "dense"


@torch.no_grad()
def adapter_factors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module -> ``(A [r, in], B [out, r])`` fp32 of every AdaLoRA layer: ``A = Λ'Q'``, ``B = P' scale`` over the
    surviving triplets (:func:`adalora_deploy.functional.lora_factors`), so ``ΔW = B @ A``; rank-0 modules
    give ``[0, in]`` / ``[out, 0]``."""
    factors = {}
    for name, layer in find_adapters(model).items():
        Q, E, P = layer.live_factors()
        A, B = F.lora_factors(Q.float(), E.float(), P.float(), layer.scale)
        factors[name] = (A.detach().clone(), B.detach().clone())
    return factors


@torch.no_grad()
def convert_for_export(model: nn.Module, *, quantization: str, mode: Mode = "separate", weights: Weights = "fp32",
                       serving: bool = False, adapter_inputs: bool = False, requantize: Requantize = "gptq",
                       calibration: torch.Tensor | None = None, nbits_from: str | os.PathLike | None = None,
                       ) -> Conversion:
    """Turn a source model (from :func:`~adalora_deploy.export.build.source.load_source_model`) into the torch twin of its ONNX graph, in place.

    No forward pass runs here before the base layers are read (bnb 4-bit statistics must be read before any
    eval forward); GPTQ re-quantization runs forwards on the merged fp32 model only. Old layers are dropped
    as their replacements go in, so peak memory stays near one model.

    Args:
        requantize: merged int4/int8: ``gptq`` (error-compensating, needs ``calibration``) or ``rtn``.
        calibration: int64 token ids ``(n, seq_len)`` for GPTQ's Hessians.
        nbits_from: merged int4/int8: take the MatMulNBits integers from this exported graph instead of
            quantizing (the twin ``check`` rebuilds without re-running GPTQ).

    Raises:
        ExportError: an unsupported combination (see :func:`export_model`).
    """
    validate_options(mode, weights, serving, adapter_inputs, requantize)
    adapters = find_adapters(model)
    if not adapters:
        raise ExportError("the adapter injected no AdaLoRA layer into the base")
    kinds_found = base_kind(model)
    ranks = {name: layer.live_rank for name, layer in adapters.items()}
    factors = adapter_factors(model)
    down_weights = "int8" if any(layer.down_weights == "int8" for layer in adapters.values()) else "fp32"
    if down_weights == "int8" and adapter_inputs:
        raise ExportError("--adapter-inputs feeds fp32 factors, and this adapter was trained with an 8-bit "
                          "down-projection (adapter.down_weights: int8); export it without --adapter-inputs")
    arithmetic = describe(quantization, mode, weights, serving, requantize, trained_activations(model), down_weights)
    requantization = None
    if mode == "merged":
        table = _quantized_table(model)
        merge_into_dense(model, dtype=torch.float32)
        if weights == "fp16":
            # transformers refuses .to(dtype) on a model loaded through bitsandbytes, even once merged
            nn.Module.to(model, torch.float16)
        elif weights in ("int4", "int8"):
            bits = 4 if weights == "int4" else 8
            if nbits_from is not None:
                nbits_from_graph(model, nbits_from)
            elif requantize == "gptq":
                requantization = _gptq_requantize(model, calibration, bits)
            else:
                for name, module in list(model.named_modules()):
                    if type(module) is nn.Linear and name != "lm_head" and not name.endswith(".lm_head"):
                        swap_module(model, name, NBitsLinear.from_float(
                            module.weight, module.bias, bits=bits, block_size=MERGED_NBITS_BLOCK,
                            accuracy_level=SERVING_ACCURACY_LEVEL))
                requantization = {"method": "rtn", "bits": bits, "block_size": MERGED_NBITS_BLOCK}
            if table is not None:
                # the base's int4 table is already what the graph wants: kept, not dequantized and re-quantized, and
                # multiplied exactly (accuracy_level 0): int8 activations on the logits cost top-1 agreement (merged
                # int8 on SmolLM2: 0.953 with the table exact, 0.930 at accuracy_level 4). A twin rebuilt from the
                # graph (nbits_from) already holds the graph's own copy of it.
                if type(model.lm_head) is nn.Linear:
                    swap_module(model, "lm_head", NBitsLinear.from_gptq(table, accuracy_level=0))
                arithmetic = dataclasses.replace(arithmetic, text=arithmetic.text + TABLE_KEPT)
        elif table is not None:
            _tie_equal_tables(model)
    else:
        for name, layer in adapters.items():
            base = twin_of(layer.base_layer, serving=serving)
            in_features, out_features = layer.in_features, layer.out_features
            if adapter_inputs:
                new = LowRankBranch(base, factors_as_inputs=True, in_features=in_features, out_features=out_features)
            elif ranks[name] > 0:
                A, B = factors[name]
                down = _int8_down(layer, A) if layer.down_weights == "int8" else None
                new = LowRankBranch(base, A, B, in_features=in_features, out_features=out_features, down=down)
            else:
                new = base
            swap_module(model, name, new)
        for name, module in list(model.named_modules()):
            twin = twin_of(module, serving=serving) if name else module
            if twin is not module:
                swap_module(model, name, twin)
    model.eval()
    return Conversion(ranks=ranks, factors=factors, base_kind=kinds_found, arithmetic=arithmetic,
                      requantization=requantization)


def _int8_down(layer: nn.Module, A: torch.Tensor) -> NBitsLinear:
    """The down product of an adapter trained with ``down_weights: int8``: ``A = Λ'Q'`` on the 8-bit grid its
    forward used (:func:`~adalora_deploy.gptq.int8_compute.weight_codes`), in the base's blocks and channel
    order, multiplied at accuracy_level 4 on the same int8 activation codes as the base."""
    block, perm = layer.down_layout()
    q, scales = weight_codes(A, block, perm)
    zeros = torch.full(scales.shape, WEIGHT_ZERO_POINT, dtype=torch.int32)
    return NBitsLinear.from_integers(q, zeros, scales, bits=8, block_size=block, perm=perm,
                                     accuracy_level=SERVING_ACCURACY_LEVEL)


def _quantized_table(model: nn.Module) -> QuantLinear | None:
    """The base's GPTQ lm_head (``quantize --tables``) when no adapter sits on it, else None."""
    head = getattr(model, "lm_head", None)
    return head if isinstance(head, QuantLinear) else None


def _tie_equal_tables(model: nn.Module) -> None:
    """Merged fp32/fp16 of a base with a quantized table: its embedding holds exactly the lm_head's dequantized rows
    (``quantize --tables`` unties them in the checkpoint), so the merged model ties them again and the graph
    holds one fp32 table, not two."""
    embed = model.get_input_embeddings()
    head = model.lm_head
    if type(head) is nn.Linear and head.bias is None and embed.weight.shape == head.weight.shape \
            and torch.equal(embed.weight, head.weight):
        head.weight = embed.weight


def _gptq_requantize(model: nn.Module, calibration: torch.Tensor | None, bits: int) -> dict[str, Any]:
    """GPTQ (asymmetric, groups of :data:`MERGED_NBITS_BLOCK`) of every decoder linear of a merged fp32 model,
    each packed exactly into an :class:`NBitsLinear` at the serving accuracy level."""
    if calibration is None:
        raise ExportError("GPTQ re-quantization needs calibration text (--calibration FILE)")
    report = quantize_model(model, calibration, method="gptq", bits=bits, group_size=MERGED_NBITS_BLOCK, sym=False,
                            checkpoint_format="gptq_v2")
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            swap_module(model, name, NBitsLinear.from_gptq(module, accuracy_level=SERVING_ACCURACY_LEVEL))
    return {"method": "gptq", "bits": bits, "block_size": MERGED_NBITS_BLOCK, "samples": int(calibration.shape[0]),
            "seq_len": int(calibration.shape[1]), "worst_output_sqnr_db": round(report.worst_sqnr_db, 3),
            "seconds": round(report.seconds, 1)}



def _graph_linears(model: nn.Module, scope: str) -> list[tuple[str, nn.Linear]] | None:
    """The ``nn.Linear`` s of ``model`` a MatMulNBits node computes: its own module (dynamo graphs name
    initializers ``model.<module>``; the fast path ``<module>``) or, for a fused node, its parts."""
    for name in (scope, scope.removeprefix("model.")):
        parent, _, leaf = name.rpartition(".")
        names = [f"{parent}.{part}" for part in FUSED_LINEARS[leaf]] if leaf in FUSED_LINEARS else [name]
        try:
            linears = [(n, model.get_submodule(n)) for n in names]
        except AttributeError:
            continue
        if all(type(linear) is nn.Linear for _, linear in linears):
            return linears
    return None


@torch.no_grad()
def nbits_from_graph(model: nn.Module, model_path: str | os.PathLike) -> int:
    """Swap each ``nn.Linear`` that the graph computes with a MatMulNBits node for an :class:`NBitsLinear`
    holding that node's own integers, scales and zero points (bias and input order from the model). A fused
    node (the fast path's q/k/v and gate/up) is split back along N into its linears; left-out zero points
    are MatMulNBits' default.

    Returns:
        The number of layers swapped.

    Raises:
        ExportError: a MatMulNBits node whose module is not a linear of ``model``.
    """
    graph = onnx.load(str(model_path)).graph
    initializers = {init.name: init for init in graph.initializer}
    swapped = 0
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            continue
        qweight_name = node.input[1]
        linears = _graph_linears(model, qweight_name.removesuffix(".qweight"))
        if linears is None or qweight_name not in initializers:
            raise ExportError(f"{model_path}: MatMulNBits node {node.name} ({qweight_name}) has no matching linear "
                              "in the merged model; was this graph exported from this base and adapter?")
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        bits, n = int(attributes.get("bits", 4)), int(attributes["N"])
        qweight = torch.from_numpy(numpy_helper.to_array(initializers[qweight_name]).copy())
        scales = torch.from_numpy(numpy_helper.to_array(initializers[node.input[2]]).copy()).reshape(n, -1)
        has_zeros = len(node.input) > 3 and node.input[3]
        zeros = (torch.from_numpy(numpy_helper.to_array(initializers[node.input[3]]).copy()).reshape(n, -1)
                 if has_zeros else default_zero_points(n, qweight.shape[1], bits))
        sizes = [linear.out_features for _, linear in linears]
        for (name, linear), q, s, z in zip(linears, qweight.split(sizes), scales.split(sizes), zeros.split(sizes)):
            swap_module(model, name, NBitsLinear(
                q.clone(), s.clone(), z.clone(), in_features=int(attributes["K"]), out_features=linear.out_features,
                bits=bits, block_size=int(attributes["block_size"]), bias=linear.bias,
                accuracy_level=int(attributes.get("accuracy_level", 0))))
            swapped += 1
    return swapped


def validate_options(mode: str, weights: str, serving: bool, adapter_inputs: bool, requantize: str = "gptq") -> None:
    if mode not in get_args(Mode):
        raise ExportError(f"--mode {mode!r}: choose merged or separate")
    if weights not in get_args(Weights):
        raise ExportError(f"--weights {weights!r}: choose one of {', '.join(get_args(Weights))}")
    if mode == "separate" and weights != "fp32":
        raise ExportError(f"--weights {weights} applies to --mode merged; in separate mode the base keeps its own "
                          "quantized weights (add --serving for the fast int8-activation kernels)")
    if mode == "merged" and serving:
        raise ExportError("--serving applies to --mode separate; for a fast merged graph use --weights int4 or int8")
    if requantize not in get_args(Requantize):
        raise ExportError(f"--requantize {requantize!r}: choose gptq or rtn")
    if mode == "merged" and adapter_inputs:
        raise ExportError("--adapter-inputs needs --mode separate (a merged graph has no adapter branch to feed)")
