"""Export a causal LM as one ONNX decoding graph with a KV cache (onnxruntime-genai / optimum naming).

Graph interface (``L`` layers, ``H`` kv heads, ``D`` head dim)::

    inputs   input_ids                     int64 [batch, seq]
             attention_mask                int64 [batch, total_seq]      total_seq = past_seq + seq
             past_key_values.{i}.key       fp32  [batch, H, past_seq, D]  (past_seq = 0 for the prompt)
             past_key_values.{i}.value     fp32  [batch, H, past_seq, D]
             <module>.lora_A               fp32  [in, rank_j]   only for adapter-input branches
             <module>.lora_B               fp32  [rank_j, out]
    outputs  logits                        fp32  [batch, seq, vocab]
             present.{i}.key / .value      fp32  [batch, H, total_seq, D]

Position ids come from the attention mask (``cumsum - 1``, pads set to 1, the last ``seq`` taken), which is
what transformers' ``generate`` does, so left padding works for the prompt and every later step.

The model is traced by ``torch.onnx.export(dynamo=True)`` through :class:`DecoderWrapper` (flat past
tensors in, a ``DynamicCache`` built inside, flat present tensors out), because transformers 5's
``DynamicCache`` is not a pytree and the TorchScript exporter fails on transformers' mask code.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Sequence

import onnx
import torch
from torch import nn

from adalora_deploy.errors import ExportError

from ..contract import ATTENTION_MASK, INPUT_IDS, LOGITS, MODEL_FILE, KVGeometry, adapter_input_name, kv_names
from .contrib import CUSTOM_TRANSLATION_TABLE
from .kinds import untwinned
from .modules import LowRankBranch

__all__ = [
    "ClassifierWrapper",
    "DEFAULT_OPSET",
    "DecoderWrapper",
    "ExportError",
    "ExportResult",
    "adapter_input_names",
    "export_classifier",
    "export_decoder",
]

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 20
"""The dynamo exporter's native opset; always passed explicitly (opset >= 21 only matters for blocked DQ)."""
EXTERNAL_DATA_THRESHOLD_BYTES = 1 << 30
"""Above this many parameter bytes the weights go to ``model.onnx.data`` (protobuf caps a file at 2 GiB)."""

# Sample sizes for tracing: all >= 2 and pairwise distinct so torch.export neither specializes a dynamic
# axis to 0/1 nor ties two axes together because their sample sizes happen to be equal.
_SAMPLE_BATCH = 2
_SAMPLE_SEQ = 3
_SAMPLE_PAST = 5
_SAMPLE_RANK = 7


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_decoder` wrote."""

    model_path: Path
    """The ``.onnx`` file."""
    external_data_path: Path | None
    """``model.onnx.data`` when weights are stored outside the protobuf, else ``None``."""
    input_names: tuple[str, ...]
    """Graph inputs in order: input_ids, attention_mask, past key/values, then adapter factors."""
    output_names: tuple[str, ...]
    """Graph outputs in order: logits, then present key/values."""
    adapter_input_names: tuple[str, ...]
    """The ``<module>.lora_A`` / ``<module>.lora_B`` inputs (empty when the adapter is baked in)."""
    op_counts: Mapping[str, int]
    """Node count per ``domain::op_type`` (``ai.onnx`` ops without the domain prefix)."""
    opset: int
    """The default-domain opset."""
    num_layers: int
    num_kv_heads: int
    head_dim: int


def _runtime_branches(model: nn.Module) -> list[tuple[str, LowRankBranch]]:
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, LowRankBranch) and module.factors_as_inputs]


def adapter_input_names(model: nn.Module) -> tuple[str, ...]:
    """Graph input names of the adapter factors, ``<module>.lora_A``, ``<module>.lora_B`` per runtime branch."""
    return tuple(adapter_input_name(name, part) for name, _ in _runtime_branches(model) for part in ("lora_A", "lora_B"))


class DecoderWrapper(nn.Module):
    """Flat-tensor decoding step around a transformers causal LM (the function the ONNX graph computes).

    ``forward(input_ids, attention_mask, past, lora)`` with ``past`` = (key_0, value_0, key_1, ...) and
    ``lora`` = (A_0 [in, r], B_0 [r, out], ...) for the adapter-input branches in module order; returns
    ``(logits, key_0', value_0', ...)``. Also the torch reference for parity checks.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        geometry = KVGeometry.of(model.config)
        self.num_layers, self.num_kv_heads, self.head_dim = geometry.num_layers, geometry.num_kv_heads, geometry.head_dim
        self._branches = [module for _, module in _runtime_branches(model)]

    def empty_past(self, batch: int) -> tuple[torch.Tensor, ...]:
        """Zero-length past tensors of a prompt step, in the model's float dtype."""
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)
        return tuple(torch.zeros(batch, self.num_kv_heads, 0, self.head_dim, dtype=dtype)
                     for _ in range(2 * self.num_layers))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        past: tuple[torch.Tensor, ...],
        lora: tuple[torch.Tensor, ...] = (),
    ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        if len(past) != 2 * self.num_layers or len(lora) != 2 * len(self._branches):
            raise ValueError(
                f"DecoderWrapper: expected {2 * self.num_layers} past tensors and {2 * len(self._branches)} "
                f"adapter tensors, got {len(past)} and {len(lora)}"
            )
        for j, branch in enumerate(self._branches):
            branch.set_factors(lora[2 * j], lora[2 * j + 1])
        try:
            # No config: every layer keeps its whole past (the graph's interface), sliding-window layers too;
            # the window is applied by the attention mask transformers builds from the model's config.
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
            mask = attention_mask.to(torch.int64)
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, -input_ids.shape[1]:]
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache,
                             use_cache=True)
        finally:
            for branch in self._branches:
                branch.set_factors(None, None)
        present: list[torch.Tensor] = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits.float(), *present)


def _sample_inputs(wrapper: DecoderWrapper, model: nn.Module):
    batch, seq, past_len = _SAMPLE_BATCH, _SAMPLE_SEQ, _SAMPLE_PAST
    generator = torch.Generator().manual_seed(0)
    vocab = KVGeometry.of(model.config).vocab
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, past_len + seq, dtype=torch.int64)
    attention_mask[1, :2] = 0  # left padding keeps the mask a real input
    kv_shape = (batch, wrapper.num_kv_heads, past_len, wrapper.head_dim)
    past = tuple(torch.randn(kv_shape, generator=generator, dtype=torch.float32).to(dtype)
                 for _ in range(2 * wrapper.num_layers))
    lora = []
    for _, branch in _runtime_branches(model):
        lora += [torch.randn(branch.in_features, _SAMPLE_RANK, generator=generator) * 0.01,
                 torch.randn(_SAMPLE_RANK, branch.out_features, generator=generator) * 0.01]
    return input_ids, attention_mask, past, tuple(lora)


def _dynamic_shapes(wrapper: DecoderWrapper, model: nn.Module):
    Dim = torch.export.Dim
    batch, seq, past_seq, total = Dim("batch"), Dim("seq"), Dim("past_seq"), Dim("total_seq")
    past = tuple({0: batch, 2: past_seq} for _ in range(2 * wrapper.num_layers))
    lora: list[dict] = []
    for j, _ in enumerate(_runtime_branches(model)):
        rank = Dim(f"rank_{j}")
        lora += [{1: rank}, {0: rank}]
    return ({0: batch, 1: seq}, {0: batch, 1: total}, past, tuple(lora))


def _rename_nodes(graph: onnx.GraphProto) -> None:
    """Deterministic node names ``/<module path>/<op>_<k>`` from the exporter's name-scope metadata."""
    counters: collections.Counter[str] = collections.Counter()
    for node in graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        parts = re.findall(r"'([^']*)'", scopes)
        module = ""
        for part in parts[:-1]:
            if part and not part.startswith("_empty_nn_module_stack"):
                module = part
        # the wrapper holds the LM as ``model``: strip it so paths read as the LM's own module names
        module = "" if module == "model" else module[len("model."):] if module.startswith("model.") else module
        prefix = f"/{module.replace('.', '/')}/" if module else "/"
        key = f"{prefix}{node.op_type}"
        node.name = f"{key}_{counters[key]}"
        counters[key] += 1


def _op_counts(graph: onnx.GraphProto) -> dict[str, int]:
    counts = collections.Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in graph.node
    )
    return dict(sorted(counts.items()))


def _check_traceable(model: nn.Module) -> None:
    problems = untwinned(model)
    if problems:
        raise ExportError("these layers must be swapped for export-friendly modules first:\n  " + "\n  ".join(problems))


def _write_program(program, output_dir: Path, filename: str, external_data: bool) -> tuple[Path, Path | None, onnx.ModelProto]:
    """Save an exported program into ``output_dir`` through a temporary folder: node names made deterministic,
    shapes inferred, ``onnx.checker`` passed, then moved into place (never a partial model)."""
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=output_dir))
    try:
        staged = staging / filename
        program.save(str(staged), external_data=external_data)
        proto = onnx.load(str(staged), load_external_data=False)
        _rename_nodes(proto.graph)
        proto = onnx.shape_inference.infer_shapes(proto)
        onnx.save(proto, str(staged))
        try:
            onnx.checker.check_model(str(staged))
        except onnx.checker.ValidationError as error:
            raise ExportError(f"onnx.checker rejected the exported graph: {error}") from error
        data_name = f"{filename}.data"
        data_path = None
        if (staging / data_name).exists():
            data_path = output_dir / data_name
            os.replace(staging / data_name, data_path)
        elif (output_dir / data_name).exists():
            (output_dir / data_name).unlink()  # a stale file from an earlier external-data export
        model_path = output_dir / filename
        os.replace(staged, model_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    return model_path, data_path, proto


def export_decoder(
    model: nn.Module,
    output_dir: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    filename: str = MODEL_FILE,
    external_data: bool | None = None,
) -> ExportResult:
    """Export ``model`` (a transformers causal LM, adapters and quantized bases already swapped for the
    modules in :mod:`export.build.modules`) as one KV-cache decoding graph.

    The files are written to a temporary folder inside ``output_dir``, checked (``onnx.checker``), shape
    inferred, then moved into place with ``os.replace``, so ``output_dir`` never holds a partial model.

    Args:
        model: the causal LM in eval mode. Adapter branches built with ``factors_as_inputs=True`` become
            graph inputs ``<module>.lora_A`` [in, rank] / ``<module>.lora_B`` [rank, out].
        output_dir: folder to write into (created if missing).
        opset: default-domain opset (``com.microsoft`` ops are version 1).
        filename: the model file name.
        external_data: store weights in ``<filename>.data``; ``None`` decides by size (> 1 GiB).

    Returns:
        An :class:`ExportResult`.

    Raises:
        ExportError: a bitsandbytes/GPTQ layer was not swapped, or tracing, translation or the ONNX checker
            failed.
    """
    _check_traceable(model)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    wrapper = DecoderWrapper(model).eval()
    past_names, present_names = kv_names(wrapper.num_layers)
    lora_names = list(adapter_input_names(model))
    input_names = [INPUT_IDS, ATTENTION_MASK, *past_names, *lora_names]
    output_names = [LOGITS, *present_names]
    if external_data is None:
        size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        external_data = size > EXTERNAL_DATA_THRESHOLD_BYTES
    samples = _sample_inputs(wrapper, model)
    dynamic_shapes = _dynamic_shapes(wrapper, model)
    if not lora_names:  # the exporter turns an empty tuple's spec into a list and then rejects it
        samples, dynamic_shapes = samples[:3], dynamic_shapes[:3]
    logger.info("exporting %s (%d layers, %d adapter inputs) at opset %d", type(model).__name__,
                wrapper.num_layers, len(lora_names), opset)
    try:
        model_path, data_path, proto = _trace_and_write(model, wrapper, samples, dynamic_shapes, input_names,
                                                        output_names, opset, output_dir, filename, external_data)
    finally:
        model.train(was_training)
    graph_inputs, graph_outputs = tuple(input_names), tuple(output_names)
    result = ExportResult(
        model_path=model_path,
        external_data_path=data_path,
        input_names=graph_inputs,
        output_names=graph_outputs,
        adapter_input_names=tuple(lora_names),
        op_counts=MappingProxyType(_op_counts(proto.graph)),
        opset=opset,
        num_layers=wrapper.num_layers,
        num_kv_heads=wrapper.num_kv_heads,
        head_dim=wrapper.head_dim,
    )
    logger.info("wrote %s (%d nodes)", model_path, sum(result.op_counts.values()))
    return result


def _trace_and_write(model: nn.Module, wrapper: nn.Module, samples: tuple, dynamic_shapes: tuple,
                     input_names: Sequence[str], output_names: Sequence[str], opset: int, output_dir: Path,
                     filename: str, external_data: bool) -> tuple[Path, Path | None, onnx.ModelProto]:
    """Trace ``wrapper`` with torch's dynamo exporter (our ops' translations included), write the graph (checked,
    then moved into place) and check that its inputs and outputs are the names asked for.

    Raises:
        ExportError: the exporter failed (its message, the model named) or the graph's I/O names differ.
    """
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # Each past tensor shares its batch/past_seq axis with the others; torch notes every reuse.
            warnings.filterwarnings("ignore", message=r".*axis name: .* will not be used")
            warnings.filterwarnings("ignore", message=r".*LeafSpec.* is deprecated", category=FutureWarning)
            program = torch.onnx.export(
                wrapper, samples, dynamo=True, opset_version=opset, input_names=list(input_names),
                output_names=list(output_names), dynamic_shapes=dynamic_shapes,
                custom_translation_table=CUSTOM_TRANSLATION_TABLE, verbose=False,
            )
    except Exception as error:  # the exporter raises many types; surface one with the step named
        raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: {error}") from error
    model_path, data_path, proto = _write_program(program, output_dir, filename, external_data)
    graph_inputs = tuple(i.name for i in proto.graph.input)
    graph_outputs = tuple(o.name for o in proto.graph.output)
    if graph_inputs != tuple(input_names) or graph_outputs != tuple(output_names):
        raise ExportError(f"exported graph has inputs {graph_inputs} / outputs {graph_outputs}, "
                          f"expected {tuple(input_names)} / {tuple(output_names)}")
    return model_path, data_path, proto


class ClassifierWrapper(nn.Module):
    """``(input_ids, attention_mask) -> logits [batch, num_labels]`` of a ``*ForSequenceClassification`` model;
    ``token_type_ids`` are left to the model, which fills zeros (one segment)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def export_classifier(
    model: nn.Module,
    output_dir: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    filename: str = MODEL_FILE,
    external_data: bool = False,
) -> ExportResult:
    """Export a sequence classifier (adapters and quantized bases already swapped for their twins) as one graph:
    inputs ``input_ids``, ``attention_mask`` [batch, seq] (int64), output ``logits`` [batch, num_labels]; no KV
    cache. Written as :func:`export_decoder` writes (checked, then moved into place).

    Raises:
        ExportError: an unswapped quantized layer, adapter inputs (not supported for classifiers), or a failed
            trace, translation or check.
    """
    _check_traceable(model)
    if _runtime_branches(model):
        raise ExportError("adapter inputs are not supported for classification exports; bake the adapter in")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    wrapper = ClassifierWrapper(model).eval()
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=_max_positions(model))
    generator = torch.Generator().manual_seed(0)
    vocab = int(model.config.vocab_size)
    samples = (torch.randint(0, vocab, (_SAMPLE_BATCH, 9), generator=generator),
               torch.tensor([[1] * 9, [1] * 6 + [0] * 3], dtype=torch.int64))
    graph_inputs, graph_outputs = (INPUT_IDS, ATTENTION_MASK), (LOGITS,)
    dynamic_shapes = ({0: batch, 1: seq}, {0: batch, 1: seq})
    try:
        model_path, data_path, proto = _trace_and_write(model, wrapper, samples, dynamic_shapes, graph_inputs,
                                                        graph_outputs, opset, output_dir, filename, external_data)
    finally:
        model.train(was_training)
    return ExportResult(model_path=model_path, external_data_path=data_path, input_names=graph_inputs,
                        output_names=graph_outputs, adapter_input_names=(),
                        op_counts=MappingProxyType(_op_counts(proto.graph)), opset=opset,
                        num_layers=int(model.config.num_hidden_layers), num_kv_heads=0, head_dim=0)


def _max_positions(model: nn.Module) -> int:
    """The longest sequence the encoder's position table holds (RoBERTa's starts past the padding id)."""
    config = model.config
    positions = int(getattr(config, "max_position_embeddings", 512) or 512)
    if config.model_type == "roberta":
        positions -= int(config.pad_token_id or 0) + 1
    return positions
