"""The architectures we support, in one table: what each model family needs from training to export.

Every question the code asks about an architecture (where its decoder layers are, which modules AdaLoRA
adapts by default, whether the fast ONNX path builds it, what the generic path must handle) is answered
here, by ``config.model_type``. Encoders (:data:`ENCODERS`) are trained for sequence classification only
(``task: classification``). Anything not in the tables, an encoder without ``task: classification`` or a
decoder with it, is refused before any work (:func:`architecture_for`, :func:`encoder_for`,
:func:`check_model_folder`), in one line naming the architecture and what is supported.

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
    "CLASSIFICATION",
    "ENCODERS",
    "ENCODER_MODEL_TYPES",
    "Architecture",
    "Encoder",
    "UnsupportedArchitectureError",
    "architecture_for",
    "check_model_folder",
    "conv1d_as_linear",
    "decoder_layers",
    "default_target_modules",
    "encoder_for",
    "read_model_type",
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
"""Encoder-only model types we recognise (those not in :data:`ENCODERS` are refused by name)."""

CLASSIFICATION = "classification"
"""The ``task.kind`` that trains an encoder as a sequence classifier."""


@dataclass(frozen=True)
class Encoder:
    """What one encoder family needs for sequence classification.

    Attributes:
        family: the name users know it by (README table).
        model_types: ``config.model_type`` values of this family.
        layers: dotted path, from the ``*ForSequenceClassification`` model, of the encoder layer list.
        target_modules: AdaLoRA's default ``target_modules`` (PEFT's choice for the family).
        modules_to_save: the head modules trained in full and saved with the adapter (PEFT's
            ``modules_to_save``); they are the only weights allowed to be missing from a base checkpoint.
        quirks: what the export handles.
    """

    family: str
    model_types: tuple[str, ...]
    layers: str
    target_modules: tuple[str, ...]
    modules_to_save: tuple[str, ...]
    quirks: str


ENCODERS: tuple[Encoder, ...] = (
    Encoder("BERT", ("bert",), "bert.encoder.layer", ("query", "value"), ("classifier",),
            "token_type_ids fed as zeros inside the graph, [CLS] pooler"),
    Encoder("RoBERTa", ("roberta",), "roberta.encoder.layer", ("query", "value"), ("classifier",),
            "positions offset past the padding id, two-layer head"),
    Encoder("DeBERTa-v2", ("deberta-v2",), "deberta.encoder.layer", ("query_proj", "value_proj"),
            ("pooler", "classifier"), "disentangled relative-position attention; pooler trained with the head"),
)
"""Encoders trained for sequence classification (``task: classification``)."""

_ENCODER_BY_MODEL_TYPE = {model_type: enc for enc in ENCODERS for model_type in enc.model_types}

_BY_MODEL_TYPE = {model_type: arch for arch in ARCHITECTURES for model_type in arch.model_types}


def _supported() -> str:
    return ", ".join(arch.family for arch in ARCHITECTURES)


def _supported_encoders() -> str:
    return ", ".join(enc.family for enc in ENCODERS)


def architecture_for(model_type: str | None, where: str = "the model") -> Architecture:
    """The table entry of ``model_type`` (a causal LM).

    Raises:
        UnsupportedArchitectureError: an encoder or an architecture not in the table; one line naming
            it and listing what is supported.
    """
    if model_type in ENCODER_MODEL_TYPES:
        if model_type in _ENCODER_BY_MODEL_TYPE:
            raise UnsupportedArchitectureError(
                f"{where} is a {ENCODER_MODEL_TYPES[model_type]} encoder (model_type {model_type!r}): encoders are "
                f"trained for sequence classification only; set task: classification (supported causal language "
                f"models: {_supported()})")
        raise UnsupportedArchitectureError(
            f"{where} is a {ENCODER_MODEL_TYPES[model_type]} encoder (model_type {model_type!r}), which is not "
            f"supported; supported encoders (task: classification): {_supported_encoders()}; causal language "
            f"models: {_supported()}")
    if model_type not in _BY_MODEL_TYPE:
        raise UnsupportedArchitectureError(
            f"{where} has model_type {model_type!r}, which is not supported; supported causal language "
            f"models: {_supported()}")
    return _BY_MODEL_TYPE[model_type]


def encoder_for(model_type: str | None, where: str = "the model") -> Encoder:
    """The :data:`ENCODERS` entry of ``model_type`` (``task: classification``).

    Raises:
        UnsupportedArchitectureError: a decoder, an encoder not in the table or an unknown architecture.
    """
    if model_type in _ENCODER_BY_MODEL_TYPE:
        return _ENCODER_BY_MODEL_TYPE[model_type]
    if model_type in _BY_MODEL_TYPE:
        raise UnsupportedArchitectureError(
            f"{where} is a {_BY_MODEL_TYPE[model_type].family} causal language model (model_type {model_type!r}): "
            f"task: classification needs an encoder: {_supported_encoders()}")
    what = (f"a {ENCODER_MODEL_TYPES[model_type]} encoder (model_type {model_type!r})" if model_type in
            ENCODER_MODEL_TYPES else f"model_type {model_type!r}")
    raise UnsupportedArchitectureError(f"{where} has {what}, which is not supported for task: classification; "
                                       f"supported encoders: {_supported_encoders()}")


def read_model_type(folder: str | Path) -> str | None:
    """``model_type`` from a model folder's ``config.json``.

    Raises:
        ArtifactError: no readable config.json.
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ArtifactError(f"model folder {folder} has no config.json (expected a local Hugging Face model folder)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ArtifactError(f"{path}: cannot read the model's config ({error})") from None
    if not isinstance(config, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    return config.get("model_type")


def check_model_folder(folder: str | Path, task: str | None = "causal-lm") -> Architecture | Encoder:
    """The architecture of a Hugging Face model folder, from its ``config.json``, before anything is loaded.

    Args:
        task: ``causal-lm`` (a decoder of :data:`ARCHITECTURES`), ``classification`` (an encoder of
            :data:`ENCODERS`) or ``None`` (either: reading a tokenizer).

    Raises:
        ArtifactError: no readable config.json.
        UnsupportedArchitectureError: an architecture not supported for ``task``.
    """
    model_type = read_model_type(folder)
    where = f"model folder {folder}"
    if task == CLASSIFICATION or (task is None and model_type in _ENCODER_BY_MODEL_TYPE):
        return encoder_for(model_type, where)
    return architecture_for(model_type, where)


def refuse_fresh_weights(folder: str | Path, loading_info: Mapping[str, list[str]],
                         allowed: tuple[str, ...] = ()) -> None:
    """Refuse a model that transformers completed with freshly initialised weights.

    ``from_pretrained(..., output_loading_info=True)`` reports the parameters absent from the checkpoint
    (``missing_keys``); training such a model would fit an adapter to random weights.

    Raises:
        ArtifactError: some weights were missing, naming the first ones.
    """
    missing = sorted(key for key in loading_info.get("missing_keys", ())
                     if not any(key == module or key.startswith(module + ".") for module in allowed))
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ArtifactError(f"model folder {folder}: the checkpoint lacks {shown}; transformers would initialise "
                            "them at random, so it is not loaded (is this the right model class and folder?)")


def default_target_modules(model_type: str | None) -> list[str]:
    """AdaLoRA's default ``target_modules`` for ``model_type`` (see :class:`Architecture`, :class:`Encoder`)."""
    if model_type in _ENCODER_BY_MODEL_TYPE:
        return list(_ENCODER_BY_MODEL_TYPE[model_type].target_modules)
    return list(architecture_for(model_type).target_modules)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, layers)``: the decoder layer list of a causal LM, found through the table.

    Raises:
        UnsupportedArchitectureError: the architecture is not in the table, or its layer list is not
            where the table says.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = (_ENCODER_BY_MODEL_TYPE[model_type] if model_type in _ENCODER_BY_MODEL_TYPE
            else architecture_for(model_type, type(model).__name__))
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
    rows.append("Encoders, for sequence classification (`task: classification`; the head trained in full as PEFT's "
                "`modules_to_save`):")
    rows.append("")
    rows.append("| family | `model_type` | default `target_modules` | `modules_to_save` | export builder | "
                "what the export handles |")
    rows.append("|---|---|---|---|---|---|")
    for enc in ENCODERS:
        types = ", ".join(f"`{t}`" for t in enc.model_types)
        rows.append(f"| {enc.family} | {types} | {', '.join(enc.target_modules)} | {', '.join(enc.modules_to_save)} "
                    f"| generic (dynamo) | {enc.quirks} |")
    rows.append("")
    others = sorted(set(ENCODER_MODEL_TYPES.values()) - {enc.family for enc in ENCODERS})
    rows.append(f"Other encoders ({', '.join(others)}), an encoder without `task: classification`, a causal LM with "
                "it, and every other architecture are refused before any work, in one line.")
    return "\n".join(rows)
