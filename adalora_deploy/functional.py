"""Pure tensor math of AdaLoRA (Zhang et al., ICLR 2023, arXiv:2303.10512). The only place it is written.

Notation (shapes for one adapted layer, r = current rank, init_r = rank it started with):

    Q = lora_A  (r, d_in)     right singular vectors
    Λ = lora_E  (r, 1)        singular values
    P = lora_B  (d_out, r)    left singular vectors

    ΔW = P @ (Λ * Q) * scale,   scale = lora_alpha / (init_r + 1e-5)         (Eq. 3)

Everything here is a function of tensors and numbers: no modules, no names, no state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "RANKNUM_EPS",
    "adapter_delta",
    "adapter_output",
    "adapter_scale",
    "budget_at",
    "element_scores",
    "final_step",
    "lora_factors",
    "orthogonal_penalty",
    "select_top",
    "slice_triplets",
    "triplet_scores",
    "update_sensitivity",
]

RANKNUM_EPS = 1e-5
"""PEFT adds this to ranknum before dividing; kept so checkpoints load with identical outputs."""


def adapter_scale(lora_alpha: float, init_r: int) -> float:
    """``lora_alpha / (init_r + 1e-5)``: fixed for the whole run and after compaction (docs/ALGORITHM.md)."""
    return lora_alpha / (init_r + RANKNUM_EPS)


def adapter_output(x: torch.Tensor, lora_A: torch.Tensor, lora_E: torch.Tensor, lora_B: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """The adapter branch ``x @ (Q * Λ)^T @ P^T * scale`` (Eq. 3), ``(..., d_in) -> (..., d_out)``.

    Dropout, if any, is applied to ``x`` by the caller.
    """
    return (x @ (lora_A * lora_E).T @ lora_B.T) * scale


def adapter_delta(lora_A: torch.Tensor, lora_E: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """``ΔW = P @ (Λ * Q) * scale``, shape ``(d_out, d_in)``."""
    return (lora_B @ (lora_A * lora_E)) * scale


def lora_factors(lora_A: torch.Tensor, lora_E: torch.Tensor, lora_B: torch.Tensor,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same ΔW as a standard LoRA with scaling 1: ``(A, B) = (Λ * Q, P * scale)``; ``ΔW = B @ A``."""
    return lora_A * lora_E, lora_B * scale


def slice_triplets(lora_A: torch.Tensor, lora_E: torch.Tensor, lora_B: torch.Tensor,
                   keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the triplets where ``keep`` (bool, (r,)) is true: ``Q[keep], Λ[keep], P[:, keep]``."""
    keep = keep.to(device=lora_A.device, dtype=torch.bool).view(-1)
    return lora_A[keep], lora_E[keep], lora_B[:, keep]


def orthogonal_penalty(lora_A: torch.Tensor, lora_B: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """``||Q Q^T - I||_F + ||P^T P - I||_F`` for one layer (the paper's R(P, Q), Eq. 4).

    PEFT's form (default) is the unsquared Frobenius norm; ``squared=True`` gives the paper's.
    The caller averages (PEFT) or sums (paper) over the 2n matrices.
    """
    total = lora_A.new_zeros(())
    for gram in (lora_A @ lora_A.T, lora_B.T @ lora_B):
        identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        norm = torch.linalg.matrix_norm(gram - identity, ord="fro")
        total = total + (norm * norm if squared else norm)
    return total


@torch.no_grad()
def update_sensitivity(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                       exp_avg_ipt: Sequence[torch.Tensor], exp_avg_unc: Sequence[torch.Tensor],
                       beta1: float, beta2: float) -> None:
    """Sensitivity smoothing and uncertainty (Eq. 9-11), in place, for every element of every tensor.

        I  = |w * grad(w)|
        Ī <- β1 Ī + (1 - β1) I
        Ū <- β2 Ū + (1 - β2) |I - Ī|        (with the freshly updated Ī)

    Uses ``torch._foreach_*`` so one call covers all layers' P, Λ and Q at once.
    """
    ipt = torch._foreach_mul(list(params), list(grads))
    torch._foreach_abs_(ipt)
    # Ī <- Ī + (1 - β1)(I - Ī) is the same EMA in one pass; then I is reused in place for |I - Ī|.
    torch._foreach_lerp_(list(exp_avg_ipt), ipt, 1.0 - beta1)
    torch._foreach_sub_(ipt, list(exp_avg_ipt))
    torch._foreach_abs_(ipt)
    torch._foreach_lerp_(list(exp_avg_unc), ipt, 1.0 - beta2)


def element_scores(exp_avg_ipt: torch.Tensor, exp_avg_unc: torch.Tensor) -> torch.Tensor:
    """``s(w) = Ī(w) * Ū(w)`` (Eq. 12): a product, not a sum."""
    return exp_avg_ipt * exp_avg_unc


def triplet_scores(score_A: torch.Tensor, score_E: torch.Tensor, score_B: torch.Tensor) -> torch.Tensor:
    """Score of each triplet (Eq. 13): ``s(Λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)``.

    Args:
        score_A: element scores of Q, ``(r, d_in)``.
        score_E: element scores of Λ, ``(r, 1)``.
        score_B: element scores of P, ``(d_out, r)``.

    Returns:
        ``(r,)``.
    """
    return score_E.view(-1) + score_A.mean(dim=1) + score_B.mean(dim=0)


def budget_at(step: int, *, init_budget: int, target_budget: int, tinit: int, tfinal: int, total_step: int,
              schedule: str = "cubic") -> int:
    """Global budget b(t) of the cubic schedule (Eq. 14, with the ``t - tinit`` numerator PEFT uses).

        t <= tinit              : b0
        tinit < t < T - tfinal  : int((b0 - bT) * (1 - (t - tinit) / (T - tfinal - tinit))^3 + bT)
        t >= final step         : bT

    The final step (:func:`final_step`) is ``T - tfinal``, or ``T - 1`` when tfinal is 0 (PEFT never
    reaches ``t == T`` and saves an adapter that is not at the target budget; we end the budget phase on
    the last step).
    ``schedule="linear"`` replaces the cube by the first power (an option, not AdaLoRA's default).
    """
    if schedule not in ("cubic", "linear"):
        raise ValueError(f"schedule must be 'cubic' or 'linear', got {schedule!r}")
    if step >= final_step(tfinal, total_step):
        return target_budget  # checked first: with tfinal = 0 and tinit = T - 1 the final step ends warm-up
    if step <= tinit:
        return init_budget
    progress = 1.0 - (step - tinit) / (total_step - tfinal - tinit)
    power = 3 if schedule == "cubic" else 1
    return int((init_budget - target_budget) * progress**power + target_budget)


def final_step(tfinal: int, total_step: int) -> int:
    """The optimizer step at which the rank pattern is frozen at the target budget."""
    return total_step - max(tfinal, 1)


def select_top(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """Boolean mask keeping exactly ``budget`` entries of ``scores`` (1-D), the highest first.

    Ties are broken by position (earlier wins), so the count is exact where PEFT's ``kthvalue`` + ``<=``
    masks every tied entry, and all-zero scores keep ``budget`` triplets instead of none. NaN counts as
    the lowest score so it can never pin a triplet.
    """
    if not 0 <= budget <= scores.numel():
        raise ValueError(f"budget {budget} outside [0, {scores.numel()}]")
    clean = torch.nan_to_num(scores.detach().float(), nan=-math.inf)
    order = torch.sort(clean, descending=True, stable=True).indices
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[order[:budget]] = True
    return keep
