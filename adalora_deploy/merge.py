"""Merging an AdaLoRA adapter into its base: ``W = dequant(W0) + ΔW`` written as a plain float model.

::

    base folder ──► load_base_model (float / bnb nf4, fp4, int8 / gptq)
                         │
    adapter folder ──► load_adapter (compacted to the rank pattern)
                         │
                    merge_into_dense:  every AdaLoraLinear  -> Linear(dequant(W0) + P'(Λ'Q') scale)
                                       every other quantized linear -> Linear(dequant(W0))
                         │
                    save_merged_model: fresh float model from config.json (quantization_config removed),
                                       safetensors + tokenizer files, written to a temporary folder and
                                       swapped into place
                         │ (optional)
                    re-quantize the merged float model with RTN or GPTQ (:mod:`adalora_deploy.gptq`)
                    and report what that costs: weight SQNR per layer, logits max-abs / cosine

PEFT refuses to merge into bnb or GPTQ bases (peft#959); here the base's own backend dequantizes the
weight it computes with (:mod:`adalora_deploy.backends`), so the merged float model computes what the
quantized base + adapter computed, up to the base kernel's own arithmetic. GPT-2's Conv1D stores its
weight ``(in, out)``, so it receives ``ΔW^T``.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from adalora_deploy.adapters import find_adapters, replace_module
from adalora_deploy.artifacts import ArtifactError, atomic_dir, copy_tokenizer_files
from adalora_deploy.backends import backend_for, is_supported
from adalora_deploy.data import BUILTIN_SAMPLE, calibration_blocks
from adalora_deploy.gptq.checkpoint import save_gptq_model
from adalora_deploy.gptq.driver import quantize_model
from adalora_deploy.layer import AdaLoraLinear
from adalora_deploy.metrics import row_metrics, sqnr_db
from adalora_deploy.models import load_tokenizer, load_trained_model, resolve_quantization
from adalora_deploy.quantization import GPTQ_METHODS, GPTQMethod

__all__ = [
    "LayerMerge",
    "LayerRequantization",
    "MergeReport",
    "RequantizationReport",
    "merge_adapter",
    "merge_into_dense",
    "requantize_merged",
    "save_merged_model",
]

logger = logging.getLogger(__name__)

RequantizeMethod = GPTQMethod


_EVAL_SEQUENCES = 4
_EVAL_SEQ_LEN = 64


@dataclass(frozen=True)
class LayerMerge:
    """One linear of the merged model.

    Attributes:
        name: module name.
        base_kind: what the base was (``dense``, ``dense-conv1d``, ``bnb-nf4``, ``bnb-int8``, ``gptq-4bit-g32``...).
        rank: the adapter's rank merged in (0: no adapter, only dequantized).
        shape: ``(d_out, d_in)``.
        delta_norm: ``||ΔW||_F`` added (0 for dequantized-only layers).
    """

    name: str
    base_kind: str
    rank: int
    shape: tuple[int, int]
    delta_norm: float


@dataclass(frozen=True)
class LayerRequantization:
    """Error re-quantization adds to one merged linear.

    Attributes:
        name: module name.
        sqnr_db: weight SQNR, ``10 log10(||W||^2 / ||W - Wq||^2)`` of the merged float weight W and its
            re-quantized Wq.
        output_sqnr_db: the layer's output SQNR on the calibration activations (what GPTQ minimizes;
            from :class:`adalora_deploy.gptq.driver.LayerQuantization`).
    """

    name: str
    sqnr_db: float
    output_sqnr_db: float


@dataclass(frozen=True)
class RequantizationReport:
    """What re-quantizing the merged model costs.

    Attributes:
        method: ``"gptq"`` or ``"rtn"``.
        bits: bits per weight.
        group_size: input channels per group (-1: one group per row).
        layers: weight SQNR per re-quantized linear.
        logits_max_abs: max |logits_float - logits_requantized| over the evaluation sequences.
        logits_cosine: lowest per-token cosine similarity between the two logits.
        num_sequences: evaluation sequences (from the calibration text).
    """

    method: str
    bits: int
    group_size: int
    layers: tuple[LayerRequantization, ...]
    logits_max_abs: float
    logits_cosine: float
    num_sequences: int

    @property
    def worst_sqnr_db(self) -> float:
        """Lowest per-layer weight SQNR (dB)."""
        return min(layer.sqnr_db for layer in self.layers)


@dataclass(frozen=True)
class MergeReport:
    """What :func:`merge_adapter` wrote.

    Attributes:
        output_dir: the merged model folder.
        base_quantization: how the base was loaded (``none``, ``bnb-nf4``, ...).
        layers: every linear that was changed (adapter merged and/or dequantized), in module order.
        requantization: the re-quantization error report, when re-quantized.
    """

    output_dir: Path
    base_quantization: str
    layers: tuple[LayerMerge, ...]
    requantization: RequantizationReport | None = None

    def format_table(self) -> str:
        """A plain-text table: one row per changed linear, then the re-quantization error per layer if any."""
        width = max([len("module")] + [len(layer.name) for layer in self.layers])
        kind_width = max([len("base")] + [len(layer.base_kind) for layer in self.layers])
        lines = [f"{'module':<{width}}  {'base':<{kind_width}}  {'rank':>4}  {'shape':>11}  {'|dW|_F':>9}"]
        for layer in self.layers:
            shape = f"{layer.shape[0]}x{layer.shape[1]}"
            lines.append(f"{layer.name:<{width}}  {layer.base_kind:<{kind_width}}  {layer.rank:>4}  {shape:>11}  "
                         f"{layer.delta_norm:>9.4f}")
        if self.requantization is not None:
            r = self.requantization
            group = "all" if r.group_size == -1 else r.group_size
            width = max([len("re-quantized")] + [len(layer.name) for layer in r.layers])
            lines.append("")
            lines.append(f"{'re-quantized':<{width}}  {'weight SQNR dB':>14}  {'output SQNR dB':>14}")
            for layer in r.layers:
                lines.append(f"{layer.name:<{width}}  {layer.sqnr_db:>14.2f}  {layer.output_sqnr_db:>14.2f}")
            lines.append(f"{r.method} {r.bits}-bit group {group}: worst weight SQNR {r.worst_sqnr_db:.2f} dB; "
                         f"logits vs merged float on {r.num_sequences} sequences: max abs {r.logits_max_abs:.4g}, "
                         f"min cosine {r.logits_cosine:.6f}")
        return "\n".join(lines)


# --- in memory --------------------------------------------------------------------------------------


def _is_conv1d(module: nn.Module) -> bool:
    return backend_for(module).name == "dense-conv1d"


def _dense_from(base: nn.Module, weight: torch.Tensor, dtype: torch.dtype | None) -> nn.Module:
    """A float module computing ``x @ weight.T + bias`` in the base's layout; ``weight`` is ``(out, in)``."""
    backend = backend_for(base)
    bias = backend.bias(base)
    if _is_conv1d(base):
        merged = copy.deepcopy(base)
        if dtype is not None:
            merged = merged.to(dtype)
        with torch.no_grad():
            merged.weight.copy_(weight.t().to(merged.weight.dtype))
        merged.requires_grad_(False)
        return merged
    if dtype is None:
        dtype = base.weight.dtype if backend.name == "dense" else torch.float32
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.to(dtype))
        if bias is not None:
            linear.bias.copy_(bias.to(device=weight.device, dtype=dtype))
    linear.requires_grad_(False)
    return linear


@torch.no_grad()
def merge_into_dense(model: nn.Module, dtype: torch.dtype | None = None) -> tuple[LayerMerge, ...]:
    """Fold every adapter into its base and dequantize every other quantized linear, in place.

    Each :class:`AdaLoraLinear` becomes a plain ``nn.Linear`` (or ``Conv1D``) holding
    ``dequant(W0) + ΔW`` with ``ΔW = P' (Λ' * Q') * scale`` of the live triplets; each remaining bnb or
    GPTQ linear becomes an ``nn.Linear`` holding its dequantized weight. Afterwards the model holds no
    adapter and no quantized layer.

    Args:
        model: a model with AdaLoRA adapters (from :func:`inject_adapters` or :func:`load_adapter`).
        dtype: dtype of the new weights; None keeps a dense base's dtype and uses float32 for quantized bases.

    Returns:
        One entry per changed linear, in module order.
    """
    rows = []
    for name, layer in find_adapters(model).items():
        base = layer.base_layer
        kind = layer.backend.describe(base)
        delta = layer.delta_weight()
        dequantized = layer.backend.dequantize(base).float()
        weight = dequantized + delta.to(dequantized.device)
        replace_module(model, name, _dense_from(base, weight, dtype))
        rows.append(LayerMerge(name=name, base_kind=kind, rank=layer.live_rank,
                               shape=(layer.out_features, layer.in_features),
                               delta_norm=float(torch.linalg.matrix_norm(delta))))
    for name, module in list(model.named_modules()):
        if not name or not is_supported(module) or isinstance(module, AdaLoraLinear):
            continue
        backend = backend_for(module)
        if backend.name.startswith("dense"):
            continue
        weight = backend.dequantize(module).float()
        replace_module(model, name, _dense_from(module, weight, dtype))
        rows.append(LayerMerge(name=name, base_kind=backend.describe(module), rank=0,
                               shape=tuple(weight.shape), delta_norm=0.0))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return tuple(sorted(rows, key=lambda row: order.get(row.name, math.inf)))


def _float_config(model: nn.Module):
    config = copy.deepcopy(model.config)
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    return config


def save_merged_model(model: nn.Module, folder: str | Path, tokenizer_source: str | Path | None = None) -> Path:
    """Write a merged model (no adapters, no quantized layers) as a plain Hugging Face folder.

    A fresh float model is built from the model's config without ``quantization_config`` and given the
    merged state dict (strictly: every key must match), then saved with safetensors; tokenizer files are
    copied from ``tokenizer_source``. The folder is written under a temporary name and swapped in whole.

    Raises:
        ArtifactError: the model still holds adapters or quantized layers, or its state does not fit a
            plain model of its config.
    """
    if find_adapters(model):
        raise ArtifactError("the model still has AdaLoRA adapters; call merge_into_dense first")
    leftover = [name for name, m in model.named_modules()
                if name and is_supported(m) and not backend_for(m).name.startswith("dense")]
    if leftover:
        raise ArtifactError(f"the model still has quantized layers (e.g. {leftover[0]}); call merge_into_dense first")
    fresh = _plain_copy(model)
    folder = Path(folder)
    with atomic_dir(folder) as temp:
        fresh.save_pretrained(temp, safe_serialization=True)
        if tokenizer_source is not None:
            copy_tokenizer_files(tokenizer_source, temp)
    return folder


@torch.no_grad()
def requantize_merged(model: nn.Module, calibration: torch.Tensor, *, method: RequantizeMethod = "gptq",
                      bits: int = 4, group_size: int = 128, evaluation: torch.Tensor | None = None) -> RequantizationReport:
    """Re-quantize a merged float model in place with RTN or GPTQ and measure the error it adds.

    Args:
        model: a merged float causal LM of the Llama family (``model.model.layers``).
        calibration: int64 token ids ``(n, seq_len)`` for GPTQ's Hessians.
        method: ``"gptq"`` or ``"rtn"``.
        bits: bits per weight.
        group_size: input channels per group, -1 for one group per row.
        evaluation: token ids for the logits comparison; None uses the first few calibration sequences.

    Returns:
        Weight SQNR per re-quantized linear and logits max-abs / min cosine against the float model.

    Raises:
        QuantizationError: bad settings or an unsupported model (from :mod:`adalora_deploy.gptq`).
    """
    if evaluation is None:
        evaluation = calibration[:_EVAL_SEQUENCES]
    device = next(model.parameters()).device
    float_weights = {name: m.weight.detach().float().clone() for name, m in model.named_modules()
                     if type(m) is nn.Linear}
    reference = model(input_ids=evaluation.to(device)).logits
    result = quantize_model(model, calibration, method=method, bits=bits, group_size=group_size)
    layers = []
    for row in result.layers:
        quantized = backend_for(model.get_submodule(row.name)).dequantize(model.get_submodule(row.name))
        layers.append(LayerRequantization(name=row.name, sqnr_db=sqnr_db(float_weights[row.name], quantized),
                                          output_sqnr_db=row.sqnr_db))
    requantized = model(input_ids=evaluation.to(device)).logits
    logits = row_metrics(reference, requantized, logits=True)
    max_abs, cosine = logits.max_abs, logits.cosine_min
    report = RequantizationReport(method=method, bits=bits, group_size=group_size, layers=tuple(layers),
                                  logits_max_abs=max_abs, logits_cosine=cosine, num_sequences=int(evaluation.shape[0]))
    logger.info("re-quantized %d linears (%s %d-bit): worst weight SQNR %.2f dB, logits max abs %.4g, min cosine %.6f",
                len(layers), method, bits, report.worst_sqnr_db, max_abs, cosine)
    return report


# --- end to end -------------------------------------------------------------------------------------


def merge_adapter(base: str | Path, adapter: str | Path, output: str | Path, *, quantization: str = "auto",
                  double_quant: bool | None = None, force: bool = False,
                  requantize: RequantizeMethod | None = None, bits: int = 4, group_size: int = 128,
                  calibration: str | Path | None = None, calibration_seq_len: int = _EVAL_SEQ_LEN,
                  calibration_samples: int = 32, device: str = "cpu") -> MergeReport:
    """Load ``base`` (as ``quantization``), apply ``adapter``, merge and write a plain model folder.

    Args:
        base: local Hugging Face model folder (a GPTQ folder when ``quantization="gptq"``).
        adapter: AdaLoRA adapter folder (ours or PEFT's).
        output: merged model folder to write (replaced whole, atomically).
        quantization: how the base is loaded: ``auto`` (a GPTQ folder is ``gptq``; else what the training
            run recorded in ``run.json`` beside the adapter; else ``none``), ``none``, ``bnb-nf4``,
            ``bnb-fp4``, ``bnb-int8`` or ``gptq``. The adapter must be applied to the base it was trained on:
            a choice that contradicts the run record is refused unless ``force``.
        double_quant: bnb 4-bit double quantization (None: from the run record).
        force: accept a ``quantization``/``double_quant`` that contradicts the run record.
        requantize: ``"gptq"`` or ``"rtn"`` to write a GPTQ checkpoint of the merged model instead of
            float weights; None writes float weights.
        bits: re-quantization bits.
        group_size: re-quantization group size (-1: one group per row).
        calibration: text file (.txt/.jsonl) for GPTQ calibration and the error report; None uses the
            packaged sample text.
        calibration_seq_len: tokens per calibration sequence.
        calibration_samples: calibration sequences, at most.
        device: ``cpu``, ``cuda`` or ``auto``.

    Returns:
        The per-layer merge table and, when re-quantized, the error it adds.

    Raises:
        ArtifactError: unreadable folders.
        ConfigError: a quantization that contradicts the training run record (without ``force``).
        AdapterMismatchError: the adapter was trained for another base.
        QuantizationError: bad re-quantization settings.
    """
    base = Path(base)
    output = Path(output)
    quantization, double_quant = resolve_quantization(base, adapter, quantization, double_quant, force=force)
    model = load_trained_model(base, adapter, quantization=quantization, double_quant=double_quant, device=device)
    rows = merge_into_dense(model)
    if requantize is None:
        save_merged_model(model, output, tokenizer_source=base)
        report = MergeReport(output_dir=output, base_quantization=quantization, layers=rows)
    else:
        if requantize not in GPTQ_METHODS:
            raise ValueError(f"requantize must be 'gptq' or 'rtn', got {requantize!r}")
        model = _plain_copy(model)
        tokenizer = load_tokenizer(str(base))
        blocks = calibration_blocks(calibration or BUILTIN_SAMPLE, tokenizer, calibration_seq_len, calibration_samples)
        requant = requantize_merged(model, blocks, method=requantize, bits=bits, group_size=group_size)
        save_gptq_model(model, output, tokenizer_source=base, overwrite=True)
        report = MergeReport(output_dir=output, base_quantization=quantization, layers=rows, requantization=requant)
    logger.info("merged %d linears into %s", len(rows), output)
    return report


def _plain_copy(model: nn.Module) -> nn.Module:
    """The merged model rebuilt as a plain float model (drops bnb's quantizer hooks and config)."""
    from transformers import AutoModelForCausalLM

    config = _float_config(model)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    try:
        fresh.load_state_dict(model.state_dict(), strict=True)
    except RuntimeError as error:
        raise ArtifactError(f"merged weights do not fit a plain {type(fresh).__name__}: {error}") from None
    device = next(model.parameters()).device
    return fresh.to(device).eval()
