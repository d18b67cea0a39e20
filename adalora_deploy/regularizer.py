"""The orthogonal regularizer R(P, Q) over all adapters (AdaLoRA Eq. 4), PEFT's form by default."""

from __future__ import annotations

import torch

from adalora_deploy import functional as F
from adalora_deploy.adapters import AdapterSet

__all__ = ["orthogonal_regularizer"]


def orthogonal_regularizer(adapters: AdapterSet, form: str = "peft") -> torch.Tensor:
    """``mean over the 2n matrices of ||C - I||_F`` (form ``"peft"``) or the paper's sum of squares.

    ``C = Q Q^T`` for each Q and ``P^T P`` for each P. Layers compacted to rank 0 have no matrices and
    are left out of the count, as PEFT skips empty tensors.
    """
    if form not in ("peft", "paper"):
        raise ValueError(f"regularizer form must be 'peft' or 'paper', got {form!r}")
    layers = [layer for layer in adapters.values() if layer.rank > 0]
    if not layers:
        return torch.zeros(())
    total = sum(F.orthogonal_penalty(layer.lora_A, layer.lora_B, squared=form == "paper") for layer in layers)
    return total / (2 * len(layers)) if form == "peft" else total
