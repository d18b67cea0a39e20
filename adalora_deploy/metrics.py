"""Error metrics: how far an approximation (quantized weight, merged model, ONNX graph) is from a reference.

The one place these are written; quantization reports, merge reports and parity checks all call them.

- :func:`sqnr_db`, :func:`relative_output_error`: signal-to-quantization-noise of a weight or a layer's output.
- :func:`row_metrics`: per-row (per-token) max/mean abs, cosine, top-1 agreement and KL of two outputs.

Inputs may be torch tensors or numpy arrays; everything is computed in float64 with numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["RowMetrics", "db_from_relative", "log_softmax", "relative_output_error", "row_metrics", "sqnr_db"]


def as_float64(value: Any) -> np.ndarray:
    """A torch tensor (any device/dtype) or array-like as a float64 numpy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


def db_from_relative(relative_mse: float) -> float:
    """``-10 log10(relative_mse)`` in dB (inf when the error is 0)."""
    if relative_mse <= 0:
        return math.inf
    return -10.0 * math.log10(relative_mse)


def sqnr_db(reference: Any, approx: Any) -> float:
    """``10 log10(||ref||^2 / ||ref - approx||^2)`` in dB (inf when identical)."""
    reference, approx = as_float64(reference), as_float64(approx)
    noise = float(np.square(reference - approx).sum())
    signal = float(np.square(reference).sum())
    return db_from_relative(noise / signal) if signal > 0 else (math.inf if noise == 0 else -math.inf)


def relative_output_error(weight: Any, quantized: Any, hessian: Any) -> float:
    """``||X (W - Wq)^T||^2 / ||X W^T||^2`` from ``H ∝ X^T X``, as ``tr(D H D^T) / tr(W H W^T)``.

    Args:
        weight: float ``(out, in)``.
        quantized: its approximation ``(out, in)``.
        hessian: ``(in, in)``, proportional to ``X^T X`` of the layer's inputs.
    """
    w, h = as_float64(weight), as_float64(hessian)
    diff = w - as_float64(quantized)
    signal = float(((w @ h) * w).sum())
    noise = float(((diff @ h) * diff).sum())
    if signal <= 0:
        return 0.0 if noise <= 0 else math.inf
    return max(noise, 0.0) / signal


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis, float64."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@dataclass(frozen=True)
class RowMetrics:
    """Distance between two ``(rows, width)`` outputs, row = one token position."""

    max_abs: float
    mean_abs: float
    cosine_min: float
    """Smallest per-row cosine similarity."""
    cosine_mean: float
    top1_agreement: float | None
    """Logits only: fraction of rows with the same argmax."""
    mean_kl: float | None
    """Logits only: mean KL(softmax(reference) || softmax(candidate)) per row, nats."""


def row_metrics(reference: Any, candidate: Any, *, logits: bool) -> RowMetrics:
    """Per-row metrics of ``candidate`` against ``reference`` (same shape ``(..., width)``).

    Two all-zero rows count as cosine 1; a zero row against a non-zero one as cosine 0.
    """
    ref, cand = as_float64(reference), as_float64(candidate)
    ref, cand = ref.reshape(-1, ref.shape[-1]), cand.reshape(-1, cand.shape[-1])
    diff = np.abs(ref - cand)
    norms = np.linalg.norm(ref, axis=-1) * np.linalg.norm(cand, axis=-1)
    dots = (ref * cand).sum(-1)
    identical = diff.max(-1, initial=0) == 0
    cosine = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where(identical, 1.0, 0.0))
    top1 = kl = None
    if logits and len(ref):
        top1 = float((ref.argmax(-1) == cand.argmax(-1)).mean())
        log_p, log_q = log_softmax(ref), log_softmax(cand)
        kl = float((np.exp(log_p) * (log_p - log_q)).sum(-1).mean())
    empty = not diff.size
    return RowMetrics(
        max_abs=0.0 if empty else float(diff.max()),
        mean_abs=0.0 if empty else float(diff.mean()),
        cosine_min=float(cosine.min()) if len(cosine) else 1.0,
        cosine_mean=float(cosine.mean()) if len(cosine) else 1.0,
        top1_agreement=top1,
        mean_kl=kl,
    )
