"""The graph's agreement with the model that was trained, on held-out text: what ``export`` records in
``export.json`` and what ``check`` judges first.

::

    held-out text (or fixed random ids without a tokenizer) ──► source model (torch) ──► reference logits
                                                           └──► graph (onnxruntime) ──► candidate logits
    compare_outputs(reference, candidate, tier) ──► ParityReport ──► export.json's ``agreement`` entry
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adalora_deploy.artifacts import ArtifactError
from adalora_deploy.evaluation import (AGREEMENT_POSITIONS, AGREEMENT_SEQ_LEN, agreement_ids, batched_logits,
                                       graph_logits, left_pad)
from adalora_deploy.models import load_tokenizer

from ..build.convert import trained_activations
from ..build.graph import DecoderWrapper
from ..build.source import load_source_model
from ..contract import LOGITS, MODEL_FILE
from ..runtime.session import DecoderSession, adapter_feeds, create_session
from .forced import forced_parity
from .parity import ExactScale, ParityReport, compare_outputs

__all__ = [
    "HELD_OUT_PROMPTS",
    "agreement_record",
    "export_tokenizer",
    "graph_held_out_logits",
    "held_out_batch",
    "held_out_ids",
    "measure_source_agreement",
    "prompt_logits",
    "source_agreement",
    "source_logits",
]

logger = logging.getLogger(__name__)

HELD_OUT_PROMPTS = (
    "Winter light fell across the harbour while the ferry",
    "A quiet index of",
)
"""Prompts for the greedy generations (not in the packaged training text); the second is shorter, so the
batch is left padded."""
_SOURCE_BATCH = 4
"""Rows of held-out text per forward pass (bounds activation memory on real models)."""


def held_out_batch(export_dir: Path, config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out prompts tokenized with the export's tokenizer, batch 2, left padded.

    Falls back to fixed random ids when the folder has no tokenizer.
    """
    pad = config.pad_token_id if config.pad_token_id is not None else (config.eos_token_id or 0)
    tokenizer = export_tokenizer(export_dir)
    if tokenizer is not None:
        rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in HELD_OUT_PROMPTS]
    else:
        generator = torch.Generator().manual_seed(0)
        rows = [torch.randint(0, config.vocab_size, (n,), generator=generator).tolist() for n in (20, 9)]
    ids, mask = left_pad(rows, int(pad))
    return torch.from_numpy(ids), torch.from_numpy(mask)


def export_tokenizer(folder: Path) -> Any | None:
    try:
        return load_tokenizer(str(folder))
    except ArtifactError as error:  # no or unreadable tokenizer: the check still runs on fixed ids
        logger.info("no usable tokenizer in %s (%s); checking on fixed random ids", folder, error)
        return None


def held_out_ids(folder: Path, config: Any, text: str | os.PathLike | None, positions: int) -> np.ndarray:
    """int64 ``[rows, seq]`` of real text (:func:`adalora_deploy.evaluation.agreement_ids`), or fixed random
    ids when the folder has no tokenizer."""
    tokenizer = export_tokenizer(folder)
    if tokenizer is not None:
        return agreement_ids(tokenizer, text, positions=positions)
    generator = np.random.default_rng(0)
    seq = min(AGREEMENT_SEQ_LEN, positions)
    return generator.integers(0, config.vocab_size, (max(positions // seq, 1), seq), dtype=np.int64)


def prompt_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    wrapper = DecoderWrapper(model).eval()
    with torch.no_grad():
        return wrapper(ids, mask, wrapper.empty_past(ids.shape[0]))[0].float()


def source_logits(model: nn.Module, ids: np.ndarray) -> np.ndarray:
    """The model's logits ``[rows, seq, vocab]`` on unpadded rows of held-out text, a few rows at a time."""
    parts = []
    for start in range(0, len(ids), _SOURCE_BATCH):
        rows = torch.from_numpy(ids[start:start + _SOURCE_BATCH])
        parts.append(prompt_logits(model, rows, torch.ones_like(rows)).numpy())
    return np.concatenate(parts, axis=0)


def graph_held_out_logits(decoder: Any, ids: np.ndarray, feeds: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """The graph's logits on the same rows as :func:`source_logits`."""
    return batched_logits(graph_logits(decoder, feeds), ids, batch_size=_SOURCE_BATCH)


def source_agreement(reference: np.ndarray, candidate: np.ndarray, *, tier: str, scale: Any) -> ParityReport:
    """Graph vs source logits on held-out text, judged at ``tier`` (``tier`` exact: the fp32 bound)."""
    return compare_outputs({LOGITS: reference}, {LOGITS: candidate}, tier=tier, scale=scale)


def agreement_record(report: ParityReport, positions: int, text: str | os.PathLike | None, *,
                     logits_name: str = LOGITS, method: str = "free-running") -> dict[str, Any]:
    """The ``agreement`` entry of ``export.json`` from a :func:`source_agreement` (or teacher-forced) report."""
    logits = report[logits_name]
    return {"text": str(text) if text is not None else "packaged held-out passage", "positions": positions,
            "tier": report.tier, "method": method, "top1": logits.top1_agreement, "mean_kl": logits.mean_kl,
            "max_abs": logits.max_abs, "tolerance": logits.tolerance, "passed": report.passed,
            "failures": list(report.failures)}


def measure_source_agreement(folder: Path, base: Path, adapter: Path, quantization: str, double_quant: bool,
                       conversion, text: str | os.PathLike | None, adapter_inputs: bool) -> dict:
    """Graph in ``folder`` vs a freshly loaded source model on held-out text: the manifest's ``agreement``."""
    source = load_source_model(base, adapter, quantization=quantization, double_quant=double_quant)
    ids = held_out_ids(folder, source.config, text, AGREEMENT_POSITIONS)
    scale = ExactScale.of(source.config)
    if conversion.source_tier == "exact" and trained_activations(source) == "int8":  # int8 codes: judged teacher-forced
        prompt_ids, prompt_mask = held_out_batch(folder, source.config)
        factors = conversion.factors if adapter_inputs else None
        report = forced_parity(source, folder / MODEL_FILE, ids, prompt_ids, prompt_mask, scale=scale, factors=factors)
        record = agreement_record(report, int(ids.size), text, logits_name=f"prefill/{LOGITS}", method="teacher-forced")
        logger.info("agreement with the source on %d held-out positions, teacher-forced at every int8 quantization: "
                    "max abs %.3g (exact tier: %s)", ids.size, record["max_abs"], "pass" if report.passed else "FAIL")
        return record
    reference = source_logits(source, ids)
    del source
    feeds = adapter_feeds(conversion.factors) if adapter_inputs else None
    decoder = DecoderSession(create_session(folder / MODEL_FILE))
    candidate = graph_held_out_logits(decoder, ids, feeds)
    report = source_agreement(reference, candidate, tier=conversion.source_tier, scale=scale)
    record = agreement_record(report, int(ids.size), text)
    logger.info("agreement with the source on %d held-out positions: top-1 %.4f, mean KL %.3g, max abs %.3g (%s tier: %s)",
                ids.size, record["top1"], record["mean_kl"], record["max_abs"], report.tier,
                "pass" if report.passed else "FAIL")
    return record

