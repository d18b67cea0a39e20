"""Teacher-forced parity: an int8-activation graph against the model that was trained on that arithmetic.

A graph whose MatMulNBits run at accuracy_level 4 rounds every quantized linear's input to int8 codes. Two
correct fp32 evaluations of the layers in between (torch and onnxruntime) differ by a few ulps, an input
within those ulps of a rounding boundary gets another code, and the difference grows through the layers
(docs/ONNX.md, "int8 activations are not reproducible"): compared free-running, such a graph differs from
the model it was trained as by as much as that model differs from itself under an 8-ulp perturbation. So
the comparison that can hold it to the exact tier feeds both sides the same codes::

    graph (onnxruntime, every quantized op's input also a graph output)
      ├─ input x_i of quantized op i ──► torch: layer i's base computes on the graph's x_i (pre-hook)
      │                                        (every other op of torch runs on torch's own values)
      └─ logits, and each x_i           ◄─► torch's own x_i (computed from the forced layers before it), logits

Each segment between two int8 roundings (a base layer's int8 product, its LoRA branch, norms, attention,
the residual stream) is then a continuous fp32 function evaluated twice, and every compared tensor must lie
within the exact tier's fp32 reassociation bound (:class:`~export.judge.parity.ExactScale`); greedy tokens must
be the same (torch's argmax on the graph's path). A graph that quantizes any input differently (another
block length, fp32 where training rounded, int8 where it did not, other weights) moves that op's output by
whole activation steps, and the next compared input misses the bound by orders of magnitude.

Runs on prefill rows (MLAS's M > 1 path) and on incremental decode steps (M = 1, the decode path).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import onnx
import torch
from onnx import helper
from torch import nn

from adalora_deploy.errors import ExportError

from ..build.graph import DecoderWrapper, adapter_input_names
from ..build.modules import NBitsLinear
from ..contract import ATTENTION_MASK, FUSED_LINEARS, INPUT_IDS, LOGITS
from ..runtime.session import DecoderSession, adapter_feeds, create_session
from .parity import ExactScale, OutputParity, ParityReport, compare_outputs

__all__ = ["ForcedPoint", "forced_parity", "forced_points"]

logger = logging.getLogger(__name__)

QUANTIZED_OP = "MatMulNBits"
"""The graph ops whose input a trained quantized layer (our GPTQ ``QuantLinear``) reads."""
_ROWS_PER_RUN = 4
"""Held-out rows per forward pass (bounds the captured activations' memory)."""


@dataclass(frozen=True)
class ForcedPoint:
    """One quantized op of the graph and the trained layers that read the same input."""

    tensor: str
    """The graph tensor the op quantizes (before an act-order Gather, which torch's layer applies itself)."""
    label: str
    """The op's weights' name in the graph (``model.layers.0.self_attn.qkv_proj``, ``lm_head``)."""
    layers: tuple[str, ...]
    """Module paths in the trained model of the quantized layers computing on ``tensor``."""


def _quantized_layer(module: nn.Module) -> nn.Module:
    """The quantized base of an adapted layer (a trained layer's ``base_layer``, a twin branch's ``base``), or
    the layer itself."""
    for name in ("base_layer", "base"):
        base = getattr(module, name, None)
        if isinstance(base, nn.Module):
            return base
    return module


def _is_quantized(layer: nn.Module) -> bool:
    """A trained GPTQ layer (``QuantLinear``) or a twin's MatMulNBits layer."""
    return hasattr(layer, "activation_block") or isinstance(layer, NBitsLinear)


def forced_points(graph: onnx.ModelProto, model: nn.Module) -> list[ForcedPoint]:
    """Every quantized op of ``graph`` mapped to the layers of ``model`` that read its input.

    Raises:
        ExportError: an op whose weights name no quantized layer of ``model`` (a graph of another model).
    """
    modules = dict(model.named_modules())
    producers = {out: node for node in graph.graph.node for out in node.output}
    points = []
    downs = []  # 8-bit down products of LoRA branches: they read their layer's input, forced with the layer's
    for node in graph.graph.node:
        if node.op_type != QUANTIZED_OP:
            continue
        label = node.input[1].removesuffix(".qweight")
        if label.endswith(".lora_A"):
            downs.append((node, _unpermuted(node.input[0], producers)))
            continue
        path = label.removesuffix(".base")
        parent, _, leaf = path.rpartition(".")
        if path in modules:
            layers = (path,)
        elif leaf in FUSED_LINEARS and all(f"{parent}.{m}" in modules for m in FUSED_LINEARS[leaf]):
            layers = tuple(f"{parent}.{m}" for m in FUSED_LINEARS[leaf])
        else:
            raise ExportError(f"{node.name}: its weights {node.input[1]!r} name no layer of the trained model; "
                              "is this graph an export of that model?")
        for layer in layers:
            if not _is_quantized(_quantized_layer(modules[layer])):
                raise ExportError(f"{node.name}: {layer} is {type(_quantized_layer(modules[layer])).__name__}, not a "
                                  "quantized layer the graph's MatMulNBits could reproduce")
        points.append(ForcedPoint(tensor=_unpermuted(node.input[0], producers), label=label, layers=layers))
    forced = {p.tensor for p in points}
    for node, tensor in downs:
        if tensor not in forced:
            raise ExportError(f"{node.name}: a branch's 8-bit down product reads {tensor!r}, which no base layer of "
                              "the trained model reads; is this graph an export of that model?")
    return points


def _unpermuted(tensor: str, producers: Mapping[str, onnx.NodeProto]) -> str:
    """The tensor a quantized op reads, before an act-order Gather (torch's layer gathers its input itself)."""
    gather = producers.get(tensor)
    if gather is not None and gather.op_type == "Gather" and gather.input[1].endswith(".perm"):
        return gather.input[0]
    return tensor


@contextlib.contextmanager
def _capturing_session(model_path: Path, points: list[ForcedPoint], provider: str) -> Iterator[object]:
    """The graph with every point's tensor as an extra output, in onnxruntime."""
    graph = onnx.load(str(model_path))
    outputs = {o.name for o in graph.graph.output}
    for tensor in dict.fromkeys(p.tensor for p in points):
        if tensor not in outputs:
            graph.graph.output.append(helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    with tempfile.TemporaryDirectory(prefix="adalora-forced-") as folder:
        path = Path(folder) / "forced.onnx"
        onnx.save(graph, str(path), save_as_external_data=True, location="forced.onnx.data")
        del graph
        yield create_session(path, provider=provider)


class _Forcer:
    """Pre-hooks that replace each trained quantized layer's input with the graph's, recording torch's own.

    The hook sits on the adapted layer (base and LoRA branch), not on its base alone: a branch whose down product
    rounds the input to int8 codes (``adapter.down_weights: int8``) must round the graph's input as the graph's
    down node does; an fp32 branch on the forced input only computes closer to the graph."""

    def __init__(self, model: nn.Module, points: list[ForcedPoint]) -> None:
        modules = dict(model.named_modules())
        self._handles = []
        self.graph: dict[str, np.ndarray] = {}
        self.torch: dict[str, np.ndarray] = {}
        for point in points:
            for layer in point.layers:
                self._handles.append(modules[layer].register_forward_pre_hook(self._hook(point)))

    def _hook(self, point: ForcedPoint):
        def replace(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            self.torch.setdefault(point.label, x.detach().float().numpy())
            forced = torch.from_numpy(self.graph[point.tensor]).reshape(x.shape).to(x.dtype)
            return (forced, *args[1:])
        return replace

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _merge(parts: list[OutputParity], rows: list[int]) -> OutputParity:
    """Metrics of one output over several runs (worst case, row-weighted means)."""
    weights = np.asarray(rows, dtype=np.float64) / max(sum(rows), 1)

    def mean(values):
        return None if values[0] is None else float(np.dot(weights, values))

    return OutputParity(
        name=parts[0].name,
        max_abs=max(p.max_abs for p in parts), mean_abs=mean([p.mean_abs for p in parts]),
        cosine_min=min(p.cosine_min for p in parts), cosine_mean=mean([p.cosine_mean for p in parts]),
        top1_agreement=mean([p.top1_agreement for p in parts]), mean_kl=mean([p.mean_kl for p in parts]),
        tolerance=None if parts[0].tolerance is None else max(p.tolerance for p in parts))


def forced_parity(
    model: nn.Module,
    model_path: str | Path,
    text_ids: np.ndarray,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    decode_steps: int = 12,
    scale: ExactScale | None = None,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    provider: str = "cpu",
) -> ParityReport:
    """The graph at ``model_path`` against ``model`` (the trained model), teacher-forced at every quantized op.

    Args:
        model: the trained model (its int8-activation layers as in training), or the graph's torch twin; eval,
            on CPU.
        model_path: the exported decoder graph.
        text_ids: int64 ``[rows, seq]`` held-out text, compared as prompts (M > 1 kernels).
        prompt_ids, prompt_mask: a left-padded prompt batch, then ``decode_steps`` greedy steps of the graph
            (M = 1 kernels), each compared.
        scale: the exact tier's width and depth (default: from ``model.config``).
        factors: module name -> (A, B) of an adapter-inputs graph's twin (also fed to the graph).
        provider: onnxruntime provider.

    Returns:
        A report at the exact tier: outputs ``prefill/<op>`` and ``decode/<op>`` (the input of each quantized
        op, named by its weights) and ``prefill/logits``, ``decode/logits``; greedy tokens compared.
    """
    scale = scale or ExactScale.of(model)
    model_path = Path(model_path)
    points = forced_points(onnx.load(str(model_path), load_external_data=False), model)
    if not points:
        raise ExportError(f"{model_path}: no quantized op to force (teacher forcing is for int8-activation graphs)")
    wrapper = DecoderWrapper(model).eval()
    feeds = adapter_feeds(factors) if factors else {}
    lora = tuple(torch.from_numpy(feeds[name]) for name in adapter_input_names(model)) if feeds else ()
    forcer = _Forcer(model, points)
    results: dict[str, list[OutputParity]] = {}
    rows: dict[str, list[int]] = {}
    failures: list[str] = []
    try:
        with _capturing_session(model_path, points, provider) as session:
            decoder = DecoderSession(session)
            captured = list(dict.fromkeys(p.tensor for p in points))
            present = [o for o in decoder.output_names if o not in (LOGITS, *captured)]
            names = [LOGITS, *present, *captured]

            def run(ids: np.ndarray, mask: np.ndarray, past: tuple[np.ndarray, ...] | None):
                inputs = {INPUT_IDS: ids.astype(np.int64), ATTENTION_MASK: mask.astype(np.int64)}
                inputs.update(zip(decoder.past_names, decoder.empty_past(len(ids)) if past is None else past))
                out = session.run(names, {**inputs, **feeds})
                forcer.graph = dict(zip(captured, out[1 + len(present):]))
                return out[0], tuple(out[1:1 + len(present)])

            def forward(ids: np.ndarray, mask: np.ndarray, past: tuple[torch.Tensor, ...] | None):
                forcer.torch = {}
                ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
                with torch.no_grad():
                    out = wrapper(ids_t, mask_t, wrapper.empty_past(len(ids)) if past is None else past, lora)
                return out[0].float().numpy(), out[1:]

            def compare(phase: str, graph_logits: np.ndarray, torch_logits: np.ndarray, valid: np.ndarray) -> None:
                reference = {f"{phase}/{LOGITS}": torch_logits}
                candidate = {f"{phase}/{LOGITS}": graph_logits}
                for point in points:
                    reference[f"{phase}/{point.label}"] = forcer.torch[point.label]
                    candidate[f"{phase}/{point.label}"] = forcer.graph[point.tensor].reshape(
                        forcer.torch[point.label].shape)
                report = compare_outputs(reference, candidate, tier="exact", scale=scale,
                                         valid={name: valid for name in reference}, logits_name=f"{phase}/{LOGITS}")
                count = int(valid.sum())
                for output in report.outputs:
                    results.setdefault(output.name, []).append(output)
                    rows.setdefault(output.name, []).append(count)

            for start in range(0, len(text_ids), _ROWS_PER_RUN):
                ids = np.ascontiguousarray(text_ids[start:start + _ROWS_PER_RUN])
                mask = np.ones_like(ids)
                graph_logits, _ = run(ids, mask, None)
                torch_logits, _ = forward(ids, mask, None)
                compare("prefill", graph_logits, torch_logits, mask.astype(bool))

            ids, mask = prompt_ids.numpy().astype(np.int64), prompt_mask.numpy().astype(np.int64)
            graph_past = torch_past = None
            chosen, argmax = [], []
            for step in range(decode_steps + 1):
                graph_logits, graph_past = run(ids, mask, graph_past)
                torch_logits, torch_past = forward(ids, mask, torch_past)
                compare("prefill" if step == 0 else "decode", graph_logits, torch_logits,
                        mask[:, -ids.shape[1]:].astype(bool))
                token = graph_logits[:, -1].argmax(-1)
                chosen.append(token)
                argmax.append(torch_logits[:, -1].argmax(-1))
                ids = token[:, None].astype(np.int64)
                mask = np.concatenate([mask, np.ones((len(ids), 1), np.int64)], axis=1)
    finally:
        forcer.remove()
    outputs = []
    for name, parts in results.items():
        merged = _merge(parts, rows[name])
        outputs.append(merged)
        if not np.isfinite(merged.max_abs):
            failures.append(f"{name}: non-finite values")
        elif merged.max_abs > merged.tolerance:
            failures.append(f"{name}: max abs {merged.max_abs:.3g} > {merged.tolerance:.3g} (fp32 reassociation bound "
                            f"for K={scale.accumulation}, L={scale.depth}, teacher-forced)")
    tokens_equal = bool(np.array_equal(np.stack(chosen), np.stack(argmax)))
    if not tokens_equal:
        failures.append(f"greedy tokens differ on the graph's path: graph {np.stack(chosen).T.tolist()} vs the "
                        f"trained model's argmax {np.stack(argmax).T.tolist()}")
    return ParityReport(tier="exact", outputs=tuple(outputs), tokens_equal=tokens_equal, failures=tuple(failures))
