"""Loading a base model in each supported kind: float, bitsandbytes NF4/FP4/LLM.int8, GPTQ.

bitsandbytes goes through transformers' ``BitsAndBytesConfig`` (its CPU backend works on bitsandbytes
>= 0.45); GPTQ folders load through our own pure-torch layer (:mod:`adalora_deploy.gptq.linear`).
``builtin:tiny-llama`` names the embedded default model, written to a folder on first use.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import torch

from adalora_deploy.architectures import CLASSIFICATION, Encoder, check_model_folder, refuse_fresh_weights
from adalora_deploy.backends.bnb import pin_bnb4_arithmetic
from adalora_deploy.config import ModelConfig
from adalora_deploy.errors import ArtifactError, ConfigError
from adalora_deploy.gptq.checkpoint import load_gptq_model
from adalora_deploy.gptq.linear import quant_linears
from adalora_deploy.peft_format import load_adapter, read_adapter_config, read_labels
from adalora_deploy.quantization import QUANTIZATIONS, bnb_4bit_type, family, is_bnb, is_gptq_folder

__all__ = [
    "load_base_model",
    "load_trained_model",
    "load_tokenizer",
    "read_run_record",
    "resolve_device",
    "resolve_quantization",
]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``auto`` means CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ArtifactError(f"model.device = {device!r} but CUDA is not available here; use 'auto' or 'cpu'")
    return torch.device(device)


def _check_folder(path: str, task: str | None = "causal-lm") -> Path:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ArtifactError(f"model folder {folder} has no config.json (expected a local Hugging Face model folder)")
    check_model_folder(folder, task)  # an architecture not supported for the task is refused before anything loads
    return folder


def load_tokenizer(path: str):
    """The tokenizer saved in a model folder (local files only)."""
    from transformers import AutoTokenizer

    folder = _check_folder(path, task=None)
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ArtifactError(f"cannot load a tokenizer from {folder} ({error})") from None


@contextlib.contextmanager
def _quiet_load_report():
    """transformers' loading warnings (the multi-line LOAD REPORT of missing weights) silenced: :func:`refuse_fresh_weights` refuses
    them in one line, and a classifier's fresh head (its ``modules_to_save``) is expected."""
    quieted = [logging.getLogger(name) for name in ("transformers", "transformers.modeling_utils")]
    levels = [each.level for each in quieted]
    for each in quieted:
        each.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for each, level in zip(quieted, levels):
            each.setLevel(level)


def load_base_model(config: ModelConfig, labels: tuple[str, ...] | None = None) -> torch.nn.Module:
    """Load the base model described by ``config``, frozen, in eval mode.

    Args:
        labels: load an encoder as a sequence classifier with these labels (``num_labels``, ``id2label`` and
            ``label2id`` in its config); its head (the encoder's ``modules_to_save``) is the only part that may
            be missing from the checkpoint, and it stays in float on a quantized base. None: a causal LM.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

    folder = _check_folder(config.path, CLASSIFICATION if labels is not None else "causal-lm")
    head: tuple[str, ...] = ()
    if labels is not None:
        encoder = check_model_folder(folder, CLASSIFICATION)
        assert isinstance(encoder, Encoder)
        head = encoder.modules_to_save
        if config.quantization == "gptq":
            raise ConfigError("model.quantization = 'gptq': not supported for task: classification yet; use none, "
                              "bnb-nf4, bnb-fp4 or bnb-int8")
    device = resolve_device(config.device)
    dtype = _DTYPES[config.dtype]
    if config.quantization == "gptq":
        model = load_gptq_model(folder, dtype=dtype, device=device)
    else:
        kwargs: dict = {"dtype": dtype, "local_files_only": True}
        if is_bnb(config.quantization):
            skip = {"llm_int8_skip_modules": list(head)} if head else {}  # the head is trained in full, in float
            if family(config.quantization) == "bnb-8bit":
                quant = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(config.int8_threshold), **skip)
            else:
                quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=bnb_4bit_type(config.quantization),
                                           bnb_4bit_use_double_quant=config.double_quant,
                                           bnb_4bit_compute_dtype=dtype, **skip)
            kwargs.update(quantization_config=quant, device_map={"": str(device)})
        if labels is not None:
            kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                          label2id={label: i for i, label in enumerate(labels)})
        auto = AutoModelForSequenceClassification if labels is not None else AutoModelForCausalLM
        try:
            with _quiet_load_report():
                model, loading_info = auto.from_pretrained(folder, output_loading_info=True, **kwargs)
        except (OSError, ValueError) as error:
            what = "a sequence classifier" if labels is not None else "a causal LM"
            raise ArtifactError(f"cannot load {what} from {folder} ({error})") from None
        refuse_fresh_weights(folder, loading_info, allowed=head)
        if not is_bnb(config.quantization):
            model = model.to(device)
    if family(config.quantization) == "bnb-4bit":
        pin_bnb4_arithmetic(model)
    if config.activations == "int8":
        for layer in quant_linears(model).values():
            layer.use_int8_activations()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    logger.info("loaded %s base from %s on %s (%s activations)", config.quantization, folder, device,
                config.activations)
    return model.eval()


def load_trained_model(base: str | os.PathLike, adapter: str | os.PathLike, *, quantization: str,
                       double_quant: bool = False, device: str = "cpu") -> torch.nn.Module:
    """The base loaded as ``quantization`` with the trained adapter injected (compacted), frozen, eval.

    bnb 4-bit layers compute as in training (see :func:`adalora_deploy.backends.bnb.pin_bnb4_arithmetic`).
    ``quantization`` and ``double_quant`` usually come from :func:`resolve_quantization`.

    Raises:
        ArtifactError: unreadable folders.
        AdapterMismatchError: the adapter was trained for another base.
    """
    # int8 activations (model.activations) are part of what was trained on a GPTQ base: the run record says, and
    # without one (an adapter folder copied elsewhere) an adapter with 8-bit down-projections implies them
    activations = "fp32"
    if quantization == "gptq":
        implied = "int8" if read_adapter_config(adapter).down_weights == "int8" else "fp32"
        activations = read_run_record(adapter).get("activations", implied)
    model = load_base_model(ModelConfig(path=str(base), quantization=quantization, double_quant=double_quant,
                                        device=device, activations=activations), labels=read_labels(adapter))
    load_adapter(model, adapter)
    return model.eval()


RUN_RECORD = "run.json"
"""The training run's record, written beside its ``adapter/`` folder (see :func:`adalora_deploy.training.train`)."""


def read_run_record(adapter: str | os.PathLike) -> dict:
    """The ``model`` section of the training run record beside an adapter folder (``{}`` when absent).

    A PEFT adapter or one copied elsewhere has no record; a malformed record counts as absent.
    """
    path = Path(adapter).parent / RUN_RECORD
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data.get("model", {}) if isinstance(data, dict) and isinstance(data.get("model"), dict) else {}


def resolve_quantization(base: str | os.PathLike, adapter: str | os.PathLike, quantization: str = "auto",
                         double_quant: bool | None = None, *, force: bool = False) -> tuple[str, bool]:
    """How to load ``base`` for ``adapter``: ``(quantization, double_quant)``, checked against the run record.

    ``auto``: ``gptq`` when the base folder is a GPTQ checkpoint; else what the training run recorded
    (``run.json`` beside the adapter folder); else ``none``. ``double_quant=None`` likewise. An explicit
    choice that contradicts the record (folding a bnb-nf4-trained adapter into dense weights it never saw,
    say) is refused unless ``force``.

    Raises:
        ConfigError: an unknown quantization, or one that contradicts the run record without ``force``.
    """
    choices = ("auto", *QUANTIZATIONS)
    if quantization not in choices:
        raise ConfigError(f"--quantization {quantization!r}: choose one of {', '.join(choices)}")
    record = read_run_record(adapter)
    recorded = "gptq" if is_gptq_folder(base) else record.get("quantization")
    recorded = recorded if recorded in QUANTIZATIONS else None
    if quantization == "auto":
        quantization = recorded or "none"
    elif recorded is not None and quantization != recorded and not force:
        raise ConfigError(
            f"--quantization {quantization}: the adapter {adapter} was trained on a {recorded} base "
            f"({'the base folder is a GPTQ checkpoint' if recorded == 'gptq' else RUN_RECORD + ' beside it'}); "
            f"drop --quantization (or pass {recorded}) to load the base as in training, or add --force"
        )
    recorded_double = record.get("double_quant") if is_bnb(quantization) else None
    if double_quant is None:
        double_quant = bool(recorded_double) if recorded_double is not None else False
    elif recorded_double is not None and bool(double_quant) != bool(recorded_double) and not force:
        raise ConfigError(f"--double-quant {double_quant}: the adapter {adapter} was trained with double_quant = "
                          f"{recorded_double}; drop the option or add --force")
    return quantization, bool(double_quant)
