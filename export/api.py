"""``adalora-deploy export``: a base (float, bnb NF4/FP4/LLM.int8, GPTQ) plus an AdaLoRA adapter as one ONNX graph.

::

    base folder ──► load_base_model (none / bnb-nf4 / bnb-fp4 / bnb-int8 / gptq)
                         │
    adapter folder ──► load_adapter (compacted to each module's surviving rank)
                         │
          ┌──────────────┴───────────────────────────┐
        merged                                     separate
    merge_into_dense: W = dequant(W0) + ΔW         base kept quantized, swapped for its ONNX twin;
      fp32       plain MatMul (exact)              rank r > 0: LowRankBranch, A = Λ'Q' [r, in],
      fp16       whole model in fp16 (lossy)       B = P' scale [out, r]; rank 0: no branch, no node
      int4/int8  MatMulNBits RTN, accuracy 4       --adapter-inputs: A/B graph inputs with a symbolic
                 (smallest, fastest on CPU)        rank (rank-0 defaults) + adapter.onnx_adapter
          └──────────────┬───────────────────────────┘
    export_decoder (onnx.checker + shape inference) in a temporary folder + config.json, tokenizer
    files, export.json; the folder is swapped into ``--output`` whole

Separate mode, base kind -> ONNX (``serving=False`` reproduces the arithmetic training used; ``serving=True``
picks onnxruntime's fast int8-activation kernels, judged by the lossy tier):

=============  ===================================================  ==========================================
base           exact (default)                                      serving
=============  ===================================================  ==========================================
none           MatMul (fp32)                                        MatMul (fp32), unchanged
bnb-nf4/fp4    MatMulBnb4: bnb's bytes, fp32 dequantize + matmul    MatMulNBits int4 (RTN of the dequantized
               (bnb's train-mode / generic CPU arithmetic)          weight), accuracy_level 4
bnb-int8       MatMulInteger emulation of LLM.int8's eval forward   MatMulNBits 8-bit (code = CB + 128),
               (fp16 activations, outlier columns in float)         accuracy_level 4
gptq 2/4/8     MatMulNBits, exact repack, accuracy_level 0 (fp32    MatMulNBits, same weights, accuracy_level 4
               product of the dequantized weight); act-order as a
               Gather permuting K
=============  ===================================================  ==========================================

GPTQ's own torch kernel rounds the dequantized weight to fp16 (<= 2^-11 relative): the exported graph is
exact against the swapped torch model and compared with the QuantLinear model at the lossy tier.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, get_args

import torch
from torch import nn

from .graph import DEFAULT_OPSET, ExportError

__all__ = [
    "ADAPTER_FILE",
    "MANIFEST_FILE",
    "Conversion",
    "ExportManifest",
    "Mode",
    "Quantization",
    "Weights",
    "adapter_factors",
    "adapters_bypassed",
    "convert_for_export",
    "export_model",
    "load_source_model",
    "pin_bnb4_arithmetic",
    "read_manifest",
    "resolve_quantization",
    "sha256_file",
    "write_adapter_file",
    "write_onnx_adapter",
]

logger = logging.getLogger(__name__)

Mode = Literal["merged", "separate"]
Weights = Literal["fp32", "fp16", "int4", "int8"]
Quantization = Literal["auto", "none", "bnb-nf4", "bnb-fp4", "bnb-int8", "gptq"]
Tier = Literal["exact", "lossy"]
SourceTier = Literal["exact", "lossy", "report"]

MANIFEST_FILE = "export.json"
ADAPTER_FILE = "adapter.onnx_adapter"
MANIFEST_VERSION = 1
MERGED_NBITS_BLOCK = 32
"""Block size of ``merged --weights int4/int8`` (onnxruntime's own quantizer default; 1.32 CPU accepts 16..256)."""
EXTERNAL_DATA_MIN_BYTES = 32 << 20
"""Above this many weight bytes ``export_model`` stores them in ``model.onnx.data``. Serializing an inline
protobuf costs about 4x the weights in memory (measured: a 243 MB model peaked 1.5 GB above the loaded
model), external data about 1.3x (+325 MB), which keeps the export within twice the model's size."""
SERVING_ACCURACY_LEVEL = 4
"""MatMulNBits accuracy_level of serving graphs: int8 activations (5-8x faster on CPU than level 0, lossy)."""

_ADAPTER_OPS = ("MatMul",)


@dataclass(frozen=True)
class ExportManifest:
    """``export.json``: what an export folder holds and which arithmetic its graph reproduces."""

    mode: str
    """``merged`` or ``separate``."""
    weights: str
    """Merged: ``fp32``/``fp16``/``int4``/``int8``; separate: ``fp32`` (the base keeps its own quantization)."""
    serving: bool
    """Separate mode: fast lossy kernels (accuracy_level 4) instead of the exact arithmetic."""
    adapter_inputs: bool
    """Adapter factors are graph inputs (symbolic rank) and ``adapter.onnx_adapter`` holds this adapter's."""
    quantization: str
    """How the base was loaded: ``none``, ``bnb-nf4``, ``bnb-fp4``, ``bnb-int8``, ``gptq``."""
    double_quant: bool
    """bnb 4-bit double quantization of the statistics."""
    base_kind: str
    """The base layers' kind as the backends describe them (e.g. ``gptq-4bit-g32-act``, ``bnb-nf4-dq``)."""
    base_path: str
    adapter_path: str
    arithmetic: str
    """What the graph computes, in words (which torch arithmetic it reproduces)."""
    tier: str
    """Parity tier of the graph against the torch model rebuilt with the same conversion."""
    source_tier: str
    """Parity tier of the graph against the source model (adapter on the base with its own torch kernel);
    ``report`` when the export re-quantizes weights (merged int4/int8, bnb 4-bit serving): the error is
    measured and written, but judged only against the twin (``tier``), as ``merge --requantize`` reports it."""
    ranks: dict[str, int]
    """Surviving rank of every adapted module (0: no branch in separate mode)."""
    adapter_matmuls: int
    """MatMul nodes of adapter branches (2 per module with rank > 0 in separate mode, 0 when merged)."""
    quantized_ops: dict[str, int]
    """Quantized-arithmetic node counts (``com.microsoft::*``, ``MatMulInteger``)."""
    op_counts: dict[str, int]
    """Every node count by op."""
    adapter_input_names: tuple[str, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    opset: int
    files: dict[str, str]
    """File name -> sha256 of every file in the folder but ``export.json`` (and ``parity.json``)."""
    sizes: dict[str, int]
    """File name -> bytes."""
    versions: dict[str, str]
    """torch, transformers, onnx, onnxruntime, adalora_deploy (and bitsandbytes when installed)."""
    format_version: int = MANIFEST_VERSION
    output_dir: str = field(default="", compare=False)
    """Where the folder was read from or written to (not stored)."""

    @property
    def graph_bytes(self) -> int:
        """Bytes of ``model.onnx`` plus its external data."""
        return sum(size for name, size in self.sizes.items() if name.startswith("model.onnx"))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("output_dir")
        for key in ("adapter_input_names", "input_names", "output_names"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], output_dir: str | os.PathLike = "") -> ExportManifest:
        from adalora_deploy.artifacts import ArtifactError

        names = {f.name for f in dataclasses.fields(cls)} - {"output_dir"}
        missing = sorted(names - set(data) - {"format_version"})
        if missing:
            raise ArtifactError(f"{Path(output_dir) / MANIFEST_FILE}: missing keys {missing}; re-export the folder")
        values = {k: data[k] for k in names if k in data}
        for key in ("adapter_input_names", "input_names", "output_names"):
            values[key] = tuple(values[key])
        return cls(**values, output_dir=str(output_dir))


def read_manifest(export_dir: str | os.PathLike) -> ExportManifest:
    """Read ``export.json`` of an export folder.

    Raises:
        ArtifactError: the folder or its manifest is missing or malformed.
    """
    from adalora_deploy.artifacts import read_json_object

    folder = Path(export_dir)
    return ExportManifest.from_dict(read_json_object(folder, MANIFEST_FILE, "export"), folder)


# --- loading ----------------------------------------------------------------------------------------------


def _run_record(adapter: Path) -> dict:
    """The training run record (``run.json`` beside the adapter folder), if any."""
    path = adapter.parent / "run.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data.get("model", {}) if isinstance(data, dict) and isinstance(data.get("model"), dict) else {}


def resolve_quantization(base: str | os.PathLike, adapter: str | os.PathLike, quantization: str = "auto",
                         double_quant: bool | None = None) -> tuple[str, bool]:
    """``(quantization, double_quant)`` with ``auto`` resolved.

    ``auto``: ``gptq`` when the base folder is a GPTQ checkpoint; else what the training run recorded
    (``run.json`` beside the adapter folder); else ``none``. ``double_quant=None`` likewise.

    Raises:
        ExportError: an unknown quantization.
    """
    if quantization not in get_args(Quantization):
        raise ExportError(f"--quantization {quantization!r}: choose one of {', '.join(get_args(Quantization))}")
    record = _run_record(Path(adapter))
    if quantization == "auto":
        config_path = Path(base) / "config.json"
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            method = config.get("quantization_config", {}).get("quant_method")
        except (OSError, ValueError, AttributeError):
            method = None
        if method == "gptq":
            quantization = "gptq"
        else:
            quantization = str(record.get("quantization", "none"))
            if quantization not in get_args(Quantization):
                quantization = "none"
    if double_quant is None:
        double_quant = bool(record.get("double_quant", False)) if quantization.startswith("bnb-") else False
    return quantization, bool(double_quant)


def pin_bnb4_arithmetic(model: nn.Module) -> None:
    """Make every bitsandbytes ``Linear4bit`` compute as in training (fp32 dequantize, then matmul).

    On CPUs with AVX512-BF16, bnb's first eval no-grad forward repacks the weight in place and rounds its
    absmax to bfloat16; training (and the exported MatMulBnb4) use the fp32 statistics.
    """
    for module in model.modules():
        if type(module).__module__.startswith("bitsandbytes") and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_source_model(base: str | os.PathLike, adapter: str | os.PathLike, *, quantization: str,
                      double_quant: bool = False) -> nn.Module:
    """The base loaded as ``quantization`` with the adapter injected (compacted), frozen, eval, on CPU.

    bnb 4-bit layers are pinned to the training arithmetic (see :func:`pin_bnb4_arithmetic`).
    """
    from adalora_deploy.checkpoint import load_adapter
    from adalora_deploy.config import ModelConfig
    from adalora_deploy.models import load_base_model

    model = load_base_model(ModelConfig(path=str(base), quantization=quantization, double_quant=double_quant,
                                        device="cpu"))
    pin_bnb4_arithmetic(model)
    load_adapter(model, adapter)
    return model.eval()


# --- conversion ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conversion:
    """What :func:`convert_for_export` did to a model."""

    ranks: dict[str, int]
    """Surviving rank per adapted module."""
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """Module -> ``(A [r, in], B [out, r])`` (scaling folded), every adapted module (rank 0 ones too)."""
    base_kind: str
    arithmetic: str
    tier: Tier
    source_tier: SourceTier


def _bnb_class(module: nn.Module) -> str | None:
    if not type(module).__module__.startswith("bitsandbytes"):
        return None
    names = {cls.__name__ for cls in type(module).__mro__}
    return "Linear4bit" if "Linear4bit" in names else "Linear8bitLt" if "Linear8bitLt" in names else None


def _is_gptq(module: nn.Module) -> bool:
    from adalora_deploy.backends.gptq import QuantLinear

    return isinstance(module, QuantLinear)


def _export_base(module: nn.Module, *, serving: bool) -> nn.Module:
    """The export-friendly twin of one base linear (see the module docstring's table)."""
    from .modules import Int8EmulationLinear, NBitsLinear

    kind = _bnb_class(module)
    if kind == "Linear4bit":
        if serving:
            return NBitsLinear.from_bnb_4bit(module, accuracy_level=SERVING_ACCURACY_LEVEL)
        from .modules import Bnb4Linear

        return Bnb4Linear.from_bnb(module)
    if kind == "Linear8bitLt":
        if serving:
            return NBitsLinear.from_bnb_int8(module, accuracy_level=SERVING_ACCURACY_LEVEL)
        return Int8EmulationLinear.from_bnb(module)
    if _is_gptq(module):
        try:
            return NBitsLinear.from_gptq(module, accuracy_level=SERVING_ACCURACY_LEVEL if serving else 0)
        except ValueError as error:
            raise ExportError(f"{error}; export with --mode merged instead") from None
    return module


def _base_kind(model: nn.Module) -> str:
    """The quantized base kinds in ``model`` as the backends describe them (``dense`` when none)."""
    from adalora_deploy.backends import backend_for, is_supported

    kinds: list[str] = []
    for module in model.modules():
        if is_supported(module):
            kind = backend_for(module).describe(module)
            if not kind.startswith("dense") and kind not in kinds:
                kinds.append(kind)
    return "+".join(kinds) if kinds else "dense"


def _describe(quantization: str, mode: str, weights: str, serving: bool) -> tuple[str, Tier, SourceTier]:
    """``(arithmetic, tier, source_tier)`` of one export configuration."""
    if mode == "merged":
        if weights == "fp16":
            return "fp16 graph of dequant(W0) + ΔW (lossy)", "lossy", "lossy"
        if weights in ("int4", "int8"):
            return (f"MatMulNBits {weights} round-to-nearest of dequant(W0) + ΔW (block {MERGED_NBITS_BLOCK}), "
                    f"accuracy_level {SERVING_ACCURACY_LEVEL} (lossy; re-quantization error vs the source is "
                    "reported, not judged)"), "lossy", "report"
        text = "fp32 MatMul of dequant(W0) + ΔW"
        if quantization == "bnb-int8":
            return (text + "; does not reproduce LLM.int8's int8 activations (lossy against the bnb model)",
                    "exact", "lossy")
        if quantization.startswith("bnb-"):
            return (text + "; reproduces bnb Linear4bit's fp32 dequantize-then-matmul (training arithmetic)",
                    "exact", "exact")
        if quantization == "gptq":
            return text + "; reproduces QuantLinear's exact fp32 dequantized weight", "exact", "exact"
        return text + "; reproduces the fp32 adapted model up to summation order", "exact", "exact"
    branch = " + fp32 low-rank branch x·Aᵀ·Bᵀ per module with rank > 0"
    if quantization in ("bnb-nf4", "bnb-fp4"):
        if serving:
            return ("MatMulNBits int4 RTN of the dequantized bnb weight, accuracy_level 4" + branch + " (lossy; "
                    "re-quantization error vs the source is reported, not judged)", "lossy", "report")
        return "MatMulBnb4 (bnb's bytes, fp32 dequantize + matmul = bnb training arithmetic)" + branch, "exact", "exact"
    if quantization == "bnb-int8":
        if serving:
            return ("MatMulNBits 8-bit (code CB + 128, scale SCB/127), accuracy_level 4" + branch + " (lossy)",
                    "lossy", "lossy")
        return ("MatMulInteger emulation of LLM.int8's eval forward (fp16 activations, row int8 quantization, "
                "outlier columns in float)" + branch), "exact", "exact"
    if quantization == "gptq":
        if serving:
            return "MatMulNBits (GPTQ repacked), accuracy_level 4" + branch + " (lossy)", "lossy", "lossy"
        return ("MatMulNBits (GPTQ repacked exactly, act-order as a K permutation), accuracy_level 0: the exact "
                "fp32 product s·(q - z) that QuantLinear computes with" + branch, "exact", "exact")
    return "fp32 MatMul" + branch, "exact", "exact"


@torch.no_grad()
def adapter_factors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module -> ``(A [r, in], B [out, r])`` fp32 of every AdaLoRA layer: ``A = Λ'Q'``, ``B = P' scale`` over the
    surviving triplets (:func:`adalora_deploy.functional.lora_factors`), so ``ΔW = B @ A``; rank-0 modules
    give ``[0, in]`` / ``[out, 0]``."""
    from adalora_deploy import functional as F
    from adalora_deploy.adapters import find_adapters

    factors = {}
    for name, layer in find_adapters(model).items():
        Q, E, P = layer.live_factors()
        A, B = F.lora_factors(Q.float(), E.float(), P.float(), layer.scale)
        factors[name] = (A.detach().clone(), B.detach().clone())
    return factors


@torch.no_grad()
def convert_for_export(model: nn.Module, *, quantization: str, mode: Mode = "separate", weights: Weights = "fp32",
                       serving: bool = False, adapter_inputs: bool = False) -> Conversion:
    """Turn a source model (from :func:`load_source_model`) into the torch twin of its ONNX graph, in place.

    No forward pass runs here (bnb 4-bit statistics must be read before any eval forward). Old layers are
    dropped as their replacements go in, so peak memory stays near one model.

    Raises:
        ExportError: an unsupported combination (see :func:`export_model`).
    """
    from adalora_deploy.adapters import find_adapters
    from .modules import LowRankBranch, NBitsLinear, swap_module

    _validate(mode, weights, serving, adapter_inputs)
    adapters = find_adapters(model)
    if not adapters:
        raise ExportError("the adapter injected no AdaLoRA layer into the base")
    base_kind = _base_kind(model)
    ranks = {name: layer.live_rank for name, layer in adapters.items()}
    factors = adapter_factors(model)
    arithmetic, tier, source_tier = _describe(quantization, mode, weights, serving)
    if mode == "merged":
        from adalora_deploy.merge import merge_into_dense

        merge_into_dense(model, dtype=torch.float32)
        if weights == "fp16":
            # transformers refuses .to(dtype) on a model loaded through bitsandbytes, even once merged
            nn.Module.to(model, torch.float16)
        elif weights in ("int4", "int8"):
            bits = 4 if weights == "int4" else 8
            for name, module in list(model.named_modules()):
                if type(module) is nn.Linear and name != "lm_head" and not name.endswith(".lm_head"):
                    swap_module(model, name, NBitsLinear.from_float(
                        module.weight, module.bias, bits=bits, block_size=MERGED_NBITS_BLOCK,
                        accuracy_level=SERVING_ACCURACY_LEVEL))
    else:
        for name, layer in adapters.items():
            base = _export_base(layer.base_layer, serving=serving)
            in_features, out_features = layer.in_features, layer.out_features
            if adapter_inputs:
                new = LowRankBranch(base, factors_as_inputs=True, in_features=in_features, out_features=out_features)
            elif ranks[name] > 0:
                A, B = factors[name]
                new = LowRankBranch(base, A, B, in_features=in_features, out_features=out_features)
            else:
                new = base
            swap_module(model, name, new)
        for name, module in list(model.named_modules()):
            if name and (_bnb_class(module) or _is_gptq(module)):
                swap_module(model, name, _export_base(module, serving=serving))
    model.eval()
    return Conversion(ranks=ranks, factors=factors, base_kind=base_kind, arithmetic=arithmetic, tier=tier,
                      source_tier=source_tier)


def _validate(mode: str, weights: str, serving: bool, adapter_inputs: bool) -> None:
    if mode not in get_args(Mode):
        raise ExportError(f"--mode {mode!r}: choose merged or separate")
    if weights not in get_args(Weights):
        raise ExportError(f"--weights {weights!r}: choose one of {', '.join(get_args(Weights))}")
    if mode == "separate" and weights != "fp32":
        raise ExportError(f"--weights {weights} applies to --mode merged; in separate mode the base keeps its own "
                          "quantized weights (add --serving for the fast int8-activation kernels)")
    if mode == "merged" and serving:
        raise ExportError("--serving applies to --mode separate; for a fast merged graph use --weights int4 or int8")
    if mode == "merged" and adapter_inputs:
        raise ExportError("--adapter-inputs needs --mode separate (a merged graph has no adapter branch to feed)")


# --- files --------------------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_onnx_adapter(path: str | os.PathLike, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                       *, adapter_version: int = 1, model_version: int = 1) -> Path:
    """Write factors (module -> ``(A [r, in], B [out, r])``) as an onnxruntime ``.onnx_adapter`` file.

    Parameters are named like the graph inputs (``<module>.lora_A`` [in, r], ``<module>.lora_B`` [r, out]);
    load with ``onnxruntime.LoraAdapter().Load(path)`` and activate with ``RunOptions.add_active_adapter``.
    """
    import onnxruntime as ort

    from adalora_deploy.artifacts import atomic_file
    from .runtime import adapter_feeds

    arrays = adapter_feeds(factors)
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(adapter_version)
    adapter.set_model_version(model_version)
    adapter.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()})
    path = Path(path)
    with atomic_file(path) as temp:
        adapter.export_adapter(str(temp))
    return path


def write_adapter_file(adapter: str | os.PathLike, export_dir: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Turn any AdaLoRA adapter for the same base into an ``.onnx_adapter`` for an adapter-inputs graph.

    Only the adapter folder is read (no base model): each module's surviving factors become
    ``<module>.lora_A`` / ``.lora_B``; graph modules the adapter does not adapt (or prunes to rank 0) get
    rank-0 factors, so their branch adds nothing.

    Raises:
        ExportError: the export has no adapter inputs, or the adapter adapts a module the graph has no
            branch for, or a factor's width differs from the graph input's.
    """
    import onnx

    from adalora_deploy.compaction import read_compact_adapter

    manifest = read_manifest(export_dir)
    if not manifest.adapter_inputs:
        raise ExportError(f"{export_dir} was exported without --adapter-inputs; its adapter is baked into the graph")
    proto = onnx.load(str(Path(export_dir) / "model.onnx"), load_external_data=False)
    widths = {i.name: [d.dim_value or None for d in i.type.tensor_type.shape.dim] for i in proto.graph.input
              if i.name in manifest.adapter_input_names}
    modules = sorted({name.rsplit(".", 1)[0] for name in manifest.adapter_input_names})
    compact = read_compact_adapter(adapter)
    extra = [layer.name for layer in compact.layers if layer.name not in modules and layer.rank > 0]
    if extra:
        raise ExportError(f"adapter {adapter} adapts {extra[0]}, which has no branch in {export_dir} "
                          f"({len(extra)} such modules); export a graph whose adapter covers them")
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    by_name = {layer.name: layer for layer in compact.layers}
    for name in modules:
        in_features, _ = widths[f"{name}.lora_A"]
        _, out_features = widths[f"{name}.lora_B"]
        layer = by_name.get(name)
        if layer is None or layer.rank == 0:
            factors[name] = (torch.zeros(0, in_features), torch.zeros(out_features, 0))
            continue
        A, B = layer.lora_factors()
        if (A.shape[1], B.shape[0]) != (in_features, out_features):
            raise ExportError(f"adapter {adapter}: {name} is {B.shape[0]}x{A.shape[1]}, the graph's branch is "
                              f"{out_features}x{in_features}: this adapter was trained for another base")
        factors[name] = (A, B)
    return write_onnx_adapter(output, factors)


def _versions() -> dict[str, str]:
    import importlib.metadata

    versions = {}
    for name in ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "bitsandbytes"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    import adalora_deploy

    versions["adalora_deploy"] = adalora_deploy.__version__
    return versions


def _adapter_matmuls(model_path: Path, branch_modules: list[str]) -> int:
    """MatMul nodes whose name scope is exactly a branch module (not its ``base``)."""
    import onnx

    prefixes = {f"/{name.replace('.', '/')}/" for name in branch_modules}
    graph = onnx.load(str(model_path), load_external_data=False).graph
    count = 0
    for node in graph.node:
        if node.op_type in _ADAPTER_OPS and node.domain in ("", "ai.onnx"):
            scope = node.name.rsplit("/", 1)[0] + "/"
            count += scope in prefixes
    return count


def _add_default_adapter_inputs(model_path: Path, names: tuple[str, ...]) -> None:
    """Give every adapter input a rank-0 default initializer (``[in, 0]`` / ``[0, out]``).

    onnxruntime then treats them as overridable initializers: a run without adapter feeds computes the
    base model, and an ``.onnx_adapter`` activated with ``RunOptions.add_active_adapter`` overrides them
    (onnxruntime only lets adapters replace inputs that have such defaults).
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(model_path), load_external_data=False)
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    for name in names:
        size = shapes[name][0] if name.endswith(".lora_A") else shapes[name][1]
        shape = (size, 0) if name.endswith(".lora_A") else (0, size)
        proto.graph.initializer.append(numpy_helper.from_array(np.zeros(shape, np.float32), name))
    onnx.save(proto, str(model_path))
    onnx.checker.check_model(str(model_path))


def _write_config(model: nn.Module, folder: Path) -> None:
    config = model.config.to_dict()
    for key in ("quantization_config", "_pre_quantization_dtype"):
        config.pop(key, None)
    from adalora_deploy.artifacts import write_json

    write_json(folder / "config.json", config)


def export_model(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    *,
    output: str | os.PathLike,
    mode: Mode = "separate",
    weights: Weights = "fp32",
    quantization: Quantization = "auto",
    double_quant: bool | None = None,
    adapter_inputs: bool = False,
    serving: bool = False,
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
) -> ExportManifest:
    """Export ``base`` + ``adapter`` as one KV-cache ONNX decoding graph with its manifest.

    Args:
        base: local Hugging Face model folder (a GPTQ folder for ``gptq``).
        adapter: AdaLoRA adapter folder (ours or PEFT's), trained on this base.
        output: export folder; built under a temporary name and swapped in whole.
        mode: ``merged`` (ΔW folded into the dequantized base) or ``separate`` (quantized base + branch).
        weights: merged only: ``fp32`` (exact), ``fp16``, ``int4``/``int8`` (MatMulNBits, accuracy_level 4).
        quantization: how to load the base; ``auto`` detects GPTQ folders and reads the training run record.
        double_quant: bnb 4-bit double quantization (``None``: from the training run record, else False).
        adapter_inputs: separate only: factors as graph inputs + ``adapter.onnx_adapter``.
        serving: separate only: fast lossy kernels (MatMulNBits accuracy_level 4) instead of exact ones.
        opset: default-domain opset.
        external_data: weights in ``model.onnx.data`` (``None``: above :data:`EXTERNAL_DATA_MIN_BYTES`, which
            bounds the export's peak memory near 1.3x the model).

    Returns:
        The manifest written to ``output/export.json``.

    Raises:
        ExportError: a bad option combination or a failed export step.
        ArtifactError, AdapterMismatchError: unreadable folders or an adapter for another base.
    """
    from adalora_deploy.artifacts import atomic_dir, copy_tokenizer_files, write_json
    from .graph import export_decoder

    _validate(mode, weights, serving, adapter_inputs)
    base, adapter, output = Path(base), Path(adapter), Path(output)
    quantization, double_quant = resolve_quantization(base, adapter, quantization, double_quant)
    logger.info("exporting %s base %s + adapter %s (%s, %s)", quantization, base, adapter, mode, weights)
    model = load_source_model(base, adapter, quantization=quantization, double_quant=double_quant)
    conversion = convert_for_export(model, quantization=quantization, mode=mode, weights=weights, serving=serving,
                                    adapter_inputs=adapter_inputs)
    if external_data is None:
        size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        external_data = size > EXTERNAL_DATA_MIN_BYTES
    with atomic_dir(output) as temp:
        result = export_decoder(model, temp, opset=opset, external_data=external_data)
        _write_config(model, temp)
        copy_tokenizer_files(base, temp)
        if adapter_inputs:
            _add_default_adapter_inputs(result.model_path, result.adapter_input_names)
            write_onnx_adapter(temp / ADAPTER_FILE, conversion.factors)
        branches = [n for n, r in conversion.ranks.items() if mode == "separate" and (r > 0 or adapter_inputs)]
        del model
        files = sorted(p.name for p in temp.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
        manifest = ExportManifest(
            mode=mode, weights=weights, serving=serving, adapter_inputs=adapter_inputs, quantization=quantization,
            double_quant=double_quant, base_kind=conversion.base_kind, base_path=str(base.resolve()),
            adapter_path=str(adapter.resolve()), arithmetic=conversion.arithmetic, tier=conversion.tier,
            source_tier=conversion.source_tier, ranks=dict(conversion.ranks),
            adapter_matmuls=_adapter_matmuls(result.model_path, branches),
            quantized_ops={op: n for op, n in result.op_counts.items()
                           if op.startswith("com.microsoft::") or op == "MatMulInteger"},
            op_counts=dict(result.op_counts), adapter_input_names=result.adapter_input_names,
            input_names=result.input_names, output_names=result.output_names, opset=result.opset,
            files={name: sha256_file(temp / name) for name in files},
            sizes={name: (temp / name).stat().st_size for name in files}, versions=_versions(),
        )
        write_json(temp / MANIFEST_FILE, manifest.to_dict())
    logger.info("wrote %s: %s, %d adapter MatMuls, %s", output, conversion.arithmetic, manifest.adapter_matmuls,
                manifest.quantized_ops or "no quantized ops")
    return dataclasses.replace(manifest, output_dir=str(output))


@contextlib.contextmanager
def adapters_bypassed(model: nn.Module) -> Iterator[None]:
    """Within the block every :class:`AdaLoraLinear` of ``model`` is replaced by its base layer."""
    from adalora_deploy.adapters import find_adapters
    from .modules import swap_module

    layers = dict(find_adapters(model).items())
    for name, layer in layers.items():
        swap_module(model, name, layer.base_layer)
    try:
        yield
    finally:
        for name, layer in layers.items():
            swap_module(model, name, layer)
