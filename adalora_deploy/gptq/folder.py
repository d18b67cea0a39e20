"""Quantizing a float model folder to a GPTQ model folder: load, quantize decoder layer by layer, save.

The one place this pipeline is written; ``adalora-deploy quantize`` and the job's ``prepare`` stage call it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from adalora_deploy.errors import GPTQFormatError, QuantizationError
from adalora_deploy.gptq.checkpoint import save_gptq_model
from adalora_deploy.gptq.driver import QuantizationReport, quantize_model

__all__ = ["FolderQuantization", "quantize_folder"]


@dataclass(frozen=True)
class FolderQuantization:
    """What :func:`quantize_folder` did.

    Attributes:
        report: per-layer errors and the quantization's time split.
        load_seconds: reading the float model.
        save_seconds: writing the GPTQ folder.
    """

    report: QuantizationReport
    load_seconds: float
    save_seconds: float


def quantize_folder(model_dir: str | Path, output: str | Path, calibration: torch.Tensor | None, *,
                    overwrite: bool = False, **settings) -> FolderQuantization:
    """Quantize the float causal LM in ``model_dir`` and write it, with its tokenizer, to ``output``.

    Args:
        model_dir: a local Hugging Face model folder (float weights).
        output: the GPTQ model folder to write.
        calibration: int64 token ids ``(n, seq_len)`` (:func:`adalora_deploy.data.calibration_blocks`);
            None for round-to-nearest without error measurement.
        overwrite: replace an existing ``output``.
        settings: :func:`adalora_deploy.gptq.driver.quantize_model`'s options (method, bits, group_size...).

    Raises:
        QuantizationError: an unreadable model folder, bad settings, or a checkpoint that cannot be written.
    """
    from transformers import AutoModelForCausalLM  # lazy: transformers costs seconds to import

    model_dir = Path(model_dir)
    started = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError) as error:
        raise QuantizationError(f"MODEL_DIR {model_dir}: cannot load model/tokenizer ({error})") from None
    load_seconds = time.perf_counter() - started
    report = quantize_model(model, calibration, **settings)
    started = time.perf_counter()
    try:
        save_gptq_model(model, output, tokenizer_source=model_dir, overwrite=overwrite)
    except GPTQFormatError as error:
        raise QuantizationError(str(error)) from None
    return FolderQuantization(report=report, load_seconds=load_seconds, save_seconds=time.perf_counter() - started)
