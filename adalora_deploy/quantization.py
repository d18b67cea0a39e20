"""The quantization vocabulary: how a base is loaded, the families those fall into, the GPTQ methods.

Torch-free (the config reader and the CLI's light commands read it). Four words that were once all "kind"
are kept apart:

    quantization   how a base model is loaded: ``model.quantization``, ``--quantization`` (this module)
    family         what computes the base's linears: bnb 4-bit, bnb 8-bit, GPTQ or plain float (this module)
    backend name   which :class:`~adalora_deploy.backends.LinearBackend` reads one base layer
                   (``LinearBackend.name``: ``"dense"``, ``"bnb-4bit"``...); ``describe()`` gives the
                   layer's exact base kind (``"bnb-nf4-dq"``, ``"gptq-4bit-g128"``), which export manifests
                   record as ``base_kind``
    export kind    how an exported graph computes a base kind (``adalora_deploy.export.kinds``)

::

    quantization   family     loaded by
    none           none       transformers, float weights
    bnb-nf4        bnb-4bit   transformers + bitsandbytes Linear4bit (quant_type nf4)
    bnb-fp4        bnb-4bit   transformers + bitsandbytes Linear4bit (quant_type fp4)
    bnb-int8       bnb-8bit   transformers + bitsandbytes Linear8bitLt (LLM.int8)
    gptq           gptq       our GPTQ checkpoint reader (adalora_deploy.gptq)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal, get_args

__all__ = [
    "ACTIVATIONS",
    "FAMILIES",
    "GPTQ_METHODS",
    "QUANTIZATIONS",
    "GPTQMethod",
    "QuantizationFamily",
    "QuantizationKind",
    "bnb_4bit_type",
    "Activations",
    "family",
    "is_bnb",
    "is_gptq_folder",
]

QuantizationKind = Literal["none", "bnb-nf4", "bnb-fp4", "bnb-int8", "gptq"]
QUANTIZATIONS: tuple[str, ...] = get_args(QuantizationKind)
"""Every ``model.quantization`` a base can be loaded as."""

QuantizationFamily = Literal["none", "bnb-4bit", "bnb-8bit", "gptq"]
FAMILIES: dict[str, str] = {"none": "none", "bnb-nf4": "bnb-4bit", "bnb-fp4": "bnb-4bit", "bnb-int8": "bnb-8bit",
                            "gptq": "gptq"}
"""The family of each quantization."""

Activations = Literal["fp32", "int8"]
ACTIVATIONS: tuple[str, ...] = get_args(Activations)
"""How a GPTQ base's linears multiply in training (``model.activations``): fp32 activations (MatMulNBits
accuracy_level 0), or int8 activation blocks as onnxruntime's fast CPU kernels (accuracy_level 4)."""

GPTQMethod = Literal["gptq", "rtn"]
GPTQ_METHODS: tuple[str, ...] = get_args(GPTQMethod)
"""How a weight is quantized to the GPTQ format: the GPTQ solver, or round-to-nearest."""


def family(quantization: str) -> str:
    """The family of ``quantization`` (one of :data:`QUANTIZATIONS`); raises ValueError for another."""
    try:
        return FAMILIES[quantization]
    except KeyError:
        raise ValueError(f"unknown quantization {quantization!r}: choose one of {', '.join(QUANTIZATIONS)}") from None


def is_bnb(quantization: str) -> bool:
    """Whether bitsandbytes loads a base of this quantization (4-bit or 8-bit)."""
    return family(quantization) in ("bnb-4bit", "bnb-8bit")


def bnb_4bit_type(quantization: str) -> str:
    """bitsandbytes' ``quant_type`` (``"nf4"`` or ``"fp4"``) of a bnb 4-bit quantization."""
    if family(quantization) != "bnb-4bit":
        raise ValueError(f"{quantization!r} is not a bitsandbytes 4-bit quantization")
    return quantization.removeprefix("bnb-")


def is_gptq_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a GPTQ checkpoint (its config.json says ``quant_method: gptq``).

    An unreadable or malformed config counts as not GPTQ: whoever loads the folder reports that.
    """
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(quant, dict) and quant.get("quant_method") == "gptq"
