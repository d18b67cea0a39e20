"""Parity metrics and tiers on hand-made tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from adalora_deploy.export.parity import (
    EXACT_MAX_ABS,
    LOSSY_MIN_COSINE,
    ParityError,
    compare_outputs,
    decoder_valid_masks,
)


def _logits(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2, 4, 10)).astype(np.float32) * 3


def test_identical_outputs_pass_both_tiers():
    logits = _logits()
    for tier in ("exact", "lossy"):
        report = compare_outputs({"logits": torch.from_numpy(logits)}, {"logits": logits.copy()}, tier=tier,
                                 reference_tokens=np.array([[1, 2]]), candidate_tokens=np.array([[1, 2]]))
        assert report.passed and report.tokens_equal
        metrics = report["logits"]
        assert metrics.max_abs == 0 and metrics.top1_agreement == 1.0 and abs(metrics.mean_kl) < 1e-12
        assert metrics.cosine_min == pytest.approx(1.0)


def test_all_failures_are_collected_then_raised():
    logits = _logits()
    noisy = logits + np.random.default_rng(1).normal(size=logits.shape).astype(np.float32) * 3
    report = compare_outputs({"logits": logits, "present.0.key": logits, "gone": logits},
                             {"logits": noisy, "present.0.key": logits + 1.0}, tier="exact",
                             reference_tokens=np.array([[1, 2]]), candidate_tokens=np.array([[1, 3]]))
    assert not report.passed and report.tokens_equal is False
    text = "\n".join(report.failures)
    assert "logits: max abs" in text and "present.0.key: max abs" in text and "gone: missing" in text
    assert "greedy tokens differ" in text
    with pytest.raises(ParityError, match="4 parity failure"):
        report.raise_for_failures()


def test_lossy_tier_ignores_small_elementwise_error_but_not_distribution_shift():
    logits = _logits()
    slightly = logits + 1e-2  # constant shift: softmax unchanged, max abs 1e-2 >> exact tolerance
    assert compare_outputs({"logits": logits}, {"logits": slightly}, tier="lossy").passed
    assert not compare_outputs({"logits": logits}, {"logits": slightly}, tier="exact").passed
    shuffled = logits[..., ::-1].copy()
    report = compare_outputs({"logits": logits}, {"logits": shuffled}, tier="lossy")
    assert report["logits"].cosine_min < LOSSY_MIN_COSINE
    assert {f.split(":")[1].split()[0] for f in report.failures} >= {"min", "top-1", "mean"}


def test_valid_mask_excludes_pad_rows():
    logits = _logits()
    broken = logits.copy()
    broken[1, 0] = 1e3  # a pad query row: undefined, never read
    mask = np.array([[1, 1, 1, 1], [0, 1, 1, 1]])
    valid = decoder_valid_masks(mask, seq_len=4, num_layers=1)
    assert set(valid) == {"logits", "present.0.key", "present.0.value"}
    assert compare_outputs({"logits": logits}, {"logits": broken}, valid=valid).passed
    assert compare_outputs({"logits": logits}, {"logits": broken + 0}, valid=None)["logits"].max_abs > EXACT_MAX_ABS
