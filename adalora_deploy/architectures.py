"""The architectures we support, in one table: what each model family needs from training to export.

Every question the code asks about an architecture (where its decoder layers are, which modules AdaLoRA
adapts by default, whether the fast ONNX path builds it, what the generic path must handle) is answered
here, by ``config.model_type``. Anything not in the table is refused before any work
(:func:`architecture_for`), in one line naming the architecture and what is supported; encoders are
refused as such, since only causal language models are trained today.

The README's "Architectures" table is :func:`support_table` (a test keeps the two equal).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from adalora_deploy.errors import ArtifactError

__all__ = [
    "ARCHITECTURES",
    "ENCODER_MODEL_TYPES",
    "Architecture",
    "UnsupportedArchitectureError",
    "architecture_for",
    "check_model_folder",
    "conv1d_as_linear",
    "decoder_layers",
    "default_target_modules",
    "linear_features",
    "refuse_fresh_weights",
    "support_table",
]

logger = logging.getLogger(__name__)


class UnsupportedArchitectureError(ArtifactError):
    """A model folder of an architecture we do not train or export (exit 2, nothing written)."""


@dataclass(frozen=True)
class Architecture:
    """What one decoder family needs.

    Attributes:
        family: the name users know it by (README table).
        model_types: ``config.model_type`` values of this family.
        layers: dotted path, from the ``*ForCausalLM`` model, of the ``nn.ModuleList`` of decoder layers
            (GPTQ quantizes them one at a time).
        target_modules: AdaLoRA's default ``target_modules`` (PEFT's choice for the family where it has one).
        linear: the layer type of the projections: ``"Linear"`` or ``"Conv1D"`` (GPT-2: weight ``(in, out)``).
        quirks: what the generic export must reproduce (masks, norms, fused projections).
        fast_path: whether :mod:`adalora_deploy.export.fastpath` builds the graph directly (else the
            dynamo exporter traces it).
    """

    family: str
    model_types: tuple[str, ...]
    layers: str
    target_modules: tuple[str, ...]
    linear: str
    quirks: str
    fast_path: bool = False


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("Llama", ("llama",), "model.layers", ("q_proj", "v_proj"), "Linear",
                 "RoPE, grouped-query attention", fast_path=True),
    Architecture("Mistral", ("mistral",), "model.layers", ("q_proj", "v_proj"), "Linear",
                 "sliding-window attention (GQA's local window; onnxruntime >= 1.32 for a window)", fast_path=True),
    Architecture("Qwen2 / Qwen2.5", ("qwen2",), "model.layers", ("q_proj", "v_proj"), "Linear",
                 "q/k/v bias, sliding layers with use_sliding_window", fast_path=True),
    Architecture("Qwen3", ("qwen3",), "model.layers", ("q_proj", "v_proj"), "Linear", "RMSNorm on q and k",
                 fast_path=True),
    Architecture("Phi-3", ("phi3",), "model.layers", ("qkv_proj",), "Linear",
                 "fused qkv_proj and gate_up_proj (adapted as one module), partial rotary; longrope: generic",
                 fast_path=True),
    Architecture("Gemma", ("gemma",), "model.layers", ("q_proj", "v_proj"), "Linear",
                 "embedding scale, (1 + w) RMSNorm, GeLU (tanh)", fast_path=True),
    Architecture("Gemma2", ("gemma2",), "model.layers", ("q_proj", "v_proj"), "Linear",
                 "alternating sliding-window layers, attention and logit soft-capping, norms after attention and MLP",
                 fast_path=True),
    Architecture("Gemma3", ("gemma3_text",), "model.layers", ("q_proj", "v_proj"), "Linear",
                 "alternating sliding-window layers, q/k norm, a second RoPE base for local layers", fast_path=True),
    Architecture("GPT-2", ("gpt2",), "transformer.h", ("c_attn",), "Conv1D",
                 "Conv1D (weight stored (in, out)), fused c_attn, learned positions"),
    Architecture("GPT-NeoX", ("gpt_neox",), "gpt_neox.layers", ("query_key_value",), "Linear",
                 "fused query_key_value, partial rotary, parallel residual"),
)

ENCODER_MODEL_TYPES: Mapping[str, str] = {
    "bert": "BERT",
    "roberta": "RoBERTa",
    "xlm-roberta": "XLM-RoBERTa",
    "deberta": "DeBERTa",
    "deberta-v2": "DeBERTa-v2",
    "distilbert": "DistilBERT",
    "electra": "ELECTRA",
    "albert": "ALBERT",
    "modernbert": "ModernBERT",
}
"""Encoder-only model types: refused with a message that says classification is not supported yet."""

_BY_MODEL_TYPE = {model_type: arch for arch in ARCHITECTURES for model_type in arch.model_types}


def _supported() -> str:
    return ", ".join(arch.family for arch in ARCHITECTURES)


def architecture_for(model_type: str | None, where: str = "the model") -> Architecture:
    """The table entry of ``model_type``.

    Raises:
        UnsupportedArchitectureError: an encoder or an architecture not in the table; one line naming
            it and listing what is supported.
    """
    if model_type in ENCODER_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"{where} is a {ENCODER_MODEL_TYPES[model_type]} encoder (model_type {model_type!r}): sequence "
            f"classification is not supported yet; supported are causal language models: {_supported()}")
    if model_type not in _BY_MODEL_TYPE:
        raise UnsupportedArchitectureError(
            f"{where} has model_type {model_type!r}, which is not supported; supported causal language "
            f"models: {_supported()}")
    return _BY_MODEL_TYPE[model_type]


def check_model_folder(folder: str | Path) -> Architecture:
    """The architecture of a Hugging Face model folder, from its ``config.json``, before anything is loaded.

    Raises:
        ArtifactError: no readable config.json.
        UnsupportedArchitectureError: an encoder or an architecture not in the table.
    """
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ArtifactError(f"{path}: cannot read the model's config ({error})") from None
    if not isinstance(config, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    return architecture_for(config.get("model_type"), f"model folder {folder}")


def refuse_fresh_weights(folder: str | Path, loading_info: Mapping[str, list[str]]) -> None:
    """Refuse a model that transformers completed with freshly initialised weights.

    ``from_pretrained(..., output_loading_info=True)`` reports the parameters absent from the checkpoint
    (``missing_keys``); training such a model would fit an adapter to random weights.

    Raises:
        ArtifactError: some weights were missing, naming the first ones.
    """
    missing = sorted(loading_info.get("missing_keys", ()))
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ArtifactError(f"model folder {folder}: the checkpoint lacks {shown}; transformers would initialise "
                            "them at random, so it is not loaded (is this the right model class and folder?)")


def default_target_modules(model_type: str | None) -> list[str]:
    """AdaLoRA's default ``target_modules`` for ``model_type`` (see :class:`Architecture`)."""
    return list(architecture_for(model_type).target_modules)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, layers)``: the decoder layer list of a causal LM, found through the table.

    Raises:
        UnsupportedArchitectureError: the architecture is not in the table, or its layer list is not
            where the table says.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = architecture_for(model_type, type(model).__name__)
    try:
        layers = model.get_submodule(arch.layers)
    except AttributeError:
        layers = None
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} ({arch.family}) has no decoder layer list at {arch.layers}")
    return arch.layers, layers


def _is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a transformers ``Conv1D``; None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if _is_conv1d(module):
        in_features, out_features = module.weight.shape  # Conv1D stores (in, out): y = x @ W + b
        return in_features, out_features
    return None


def conv1d_as_linear(root: nn.Module) -> list[str]:
    """Replace every transformers ``Conv1D`` under ``root`` by the ``nn.Linear`` computing the same map.

    GPT-2's projections store ``W`` as ``(in, out)``; the ``nn.Linear`` gets ``W.T`` and the same bias, so
    GPTQ (which solves ``(out, in)`` weights) and :class:`~adalora_deploy.gptq.QuantLinear` apply unchanged.

    Returns:
        The names (relative to ``root``) of the replaced modules.
    """
    replaced = []
    for name, module in list(root.named_modules()):
        if name and _is_conv1d(module):
            in_features, out_features = module.weight.shape
            linear = nn.Linear(in_features, out_features, bias=module.bias is not None,
                               device=module.weight.device, dtype=module.weight.dtype)
            linear.weight.data.copy_(module.weight.detach().t())
            if module.bias is not None:
                linear.bias.data.copy_(module.bias.detach())
            linear.requires_grad_(module.weight.requires_grad)
            root.set_submodule(name, linear)
            replaced.append(name)
    return replaced


def support_table() -> str:
    """Markdown table of :data:`ARCHITECTURES` (the README's "Architectures")."""
    rows = ["| family | `model_type` | default `target_modules` | export builder | what the export handles |",
            "|---|---|---|---|---|"]
    for arch in ARCHITECTURES:
        types = ", ".join(f"`{t}`" for t in arch.model_types)
        builder = "fast path" if arch.fast_path else "generic (dynamo)"
        rows.append(f"| {arch.family} | {types} | {', '.join(arch.target_modules)} | {builder} | {arch.quirks} |")
    rows.append("")
    rows.append(f"Encoders ({', '.join(sorted(set(ENCODER_MODEL_TYPES.values())))}) and every other architecture "
                "are refused before any work, in one line.")
    return "\n".join(rows)
