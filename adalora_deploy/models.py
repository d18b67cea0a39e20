"""Loading a base model in each supported kind: float, bitsandbytes NF4/FP4/LLM.int8, GPTQ.

bitsandbytes goes through transformers' ``BitsAndBytesConfig`` (its CPU backend works on bitsandbytes
>= 0.45); GPTQ folders load through our own pure-torch layer (:mod:`adalora_deploy.backends.gptq`).
``builtin:tiny-llama`` names the embedded default model, written to a folder on first use.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from adalora_deploy.artifacts import ArtifactError
from adalora_deploy.config import ModelConfig

__all__ = ["BUILTIN_MODELS", "load_base_model", "load_tokenizer", "materialize", "resolve_device"]

logger = logging.getLogger(__name__)

BUILTIN_MODELS = ("builtin:tiny-llama",)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``auto`` means CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ArtifactError(f"model.device = {device!r} but CUDA is not available here; use 'auto' or 'cpu'")
    return torch.device(device)


def materialize(path: str, workdir: str | Path) -> str:
    """Return a real folder for ``path``: builtin models are written under ``workdir/base-model``."""
    if not path.startswith("builtin:"):
        return path
    if path not in BUILTIN_MODELS:
        raise ArtifactError(f"model.path = {path!r}: unknown builtin model; known: {', '.join(BUILTIN_MODELS)}")
    from adalora_deploy.demo import write_tiny_llama

    folder = Path(workdir) / "base-model"
    if not (folder / "config.json").is_file():
        write_tiny_llama(folder)
    return str(folder)


def _check_folder(path: str) -> Path:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ArtifactError(f"model folder {folder} has no config.json (expected a local Hugging Face model folder)")
    return folder


def load_tokenizer(path: str):
    """The tokenizer saved in a model folder (local files only)."""
    from transformers import AutoTokenizer

    folder = _check_folder(path)
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ArtifactError(f"cannot load a tokenizer from {folder} ({error})") from None


def load_base_model(config: ModelConfig) -> torch.nn.Module:
    """Load the base model described by ``config``, frozen, in eval mode."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder = _check_folder(config.path)
    device = resolve_device(config.device)
    dtype = _DTYPES[config.dtype]
    if config.quantization == "gptq":
        from adalora_deploy.gptq.checkpoint import load_gptq_model

        model = load_gptq_model(folder, dtype=dtype, device=device)
    else:
        kwargs: dict = {"dtype": dtype, "local_files_only": True}
        if config.quantization.startswith("bnb-"):
            if config.quantization == "bnb-int8":
                quant = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(config.int8_threshold))
            else:
                quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=config.quantization[4:],
                                           bnb_4bit_use_double_quant=config.double_quant,
                                           bnb_4bit_compute_dtype=dtype)
            kwargs.update(quantization_config=quant, device_map={"": str(device)})
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        except (OSError, ValueError) as error:
            raise ArtifactError(f"cannot load a causal LM from {folder} ({error})") from None
        if not config.quantization.startswith("bnb-"):
            model = model.to(device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    logger.info("loaded %s base from %s on %s", config.quantization, folder, device)
    return model.eval()
