"""The rank allocator: importance scores, the global budget schedule and masking (AdaLoRA, Sec. 3.2-3.3).

Call it once per optimizer step, after ``optimizer.step()`` and before ``optimizer.zero_grad()``::

    loss.backward() -> optimizer.step() -> allocator.update_and_allocate(step) -> optimizer.zero_grad()

Per step t (0-based optimizer steps, T = total_step, F = the final step, T - tfinal or T - 1 if tfinal = 0):

    t <  T - tfinal : update Ī, Ū of every element of every P, Λ, Q (skipped, with a warning, when a
                      gradient is not finite)
    tinit < t < F   : if t % deltaT == 0, keep the top b(t) triplets across ALL layers, zero Λ of the rest
    t == F          : keep the top bT, freeze the rank pattern, free the EMAs (and compact, if configured)
    t >  F          : re-apply the frozen mask

The EMAs live in flat lists aligned with ``AdapterSet.parameters()`` and are updated with ``torch._foreach``
kernels, so the allocator costs a handful of fused kernels per step however many layers there are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from adalora_deploy import functional as F
from adalora_deploy.adapters import AdapterSet
from adalora_deploy.config import AdaLoraConfig

__all__ = ["AllocationStep", "RankAllocator"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AllocationStep:
    """What the allocator did at one optimizer step."""

    step: int
    budget: int
    """b(t) of the schedule."""
    masked: bool
    """Whether a new mask was selected at this step."""
    live: int
    """Triplets alive after this step, summed over layers."""
    skipped_update: bool = False
    """The sensitivity update was skipped (non-finite gradients)."""
    final: bool = False
    """This step froze the rank pattern."""


class RankAllocator:
    """Adaptive budget allocation over the adapters of one model.

    Args:
        adapters: the adapted layers (from :func:`inject_adapters` or :func:`find_adapters`).
        config: the AdaLoRA config (schedule, betas, ranks).
    """

    def __init__(self, adapters: AdapterSet, config: AdaLoraConfig):
        if not adapters:
            raise ValueError("no adapters to allocate ranks for")
        self.adapters = adapters
        self.config = config
        self.init_budget = len(adapters) * config.init_r
        self.target_budget = len(adapters) * config.target_r
        self.final_step = F.final_step(config.tfinal, config.total_step)
        self.exp_avg_ipt: list[torch.Tensor] = []
        self.exp_avg_unc: list[torch.Tensor] = []
        self.frozen = False
        self.last_step = -1
        self.skipped_steps: list[int] = []
        self.live = self._count_live()
        """Triplets alive across all layers; changes only when a mask is selected."""
        self._reset_ema()

    def _reset_ema(self) -> None:
        params = self.adapters.parameters()
        self.exp_avg_ipt = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        self.exp_avg_unc = [torch.zeros_like(p, dtype=torch.float32) for p in params]

    def budget(self, step: int) -> int:
        """b(t) of the configured schedule."""
        c = self.config
        return F.budget_at(step, init_budget=self.init_budget, target_budget=self.target_budget, tinit=c.tinit,
                           tfinal=c.tfinal, total_step=c.total_step, schedule=c.schedule)

    @torch.no_grad()
    def update_and_allocate(self, step: int) -> AllocationStep:
        """Update the importance of every element, then mask to the budget of ``step`` (see module doc)."""
        if step <= self.last_step:
            raise ValueError(f"allocator steps must increase: got {step} after {self.last_step}")
        self.last_step = step
        c = self.config
        budget = self.budget(step)
        skipped = False
        if step < c.total_step - c.tfinal and not self.frozen:
            skipped = not self._update_importance()
            if skipped:
                self.skipped_steps.append(step)
                logger.warning("step %d: non-finite adapter gradients; importance update skipped", step)
        if self.frozen:
            self._replay()
            return AllocationStep(step, budget, masked=False, live=self.live, skipped_update=skipped)
        if step == self.final_step:
            self._mask_to(self.target_budget)
            self.frozen = True
            self.exp_avg_ipt, self.exp_avg_unc = [], []
            return AllocationStep(step, self.target_budget, masked=True, live=self.live, skipped_update=skipped,
                                  final=True)
        if step > c.tinit and step % c.deltaT == 0:
            self._mask_to(budget)
            return AllocationStep(step, budget, masked=True, live=self.live, skipped_update=skipped)
        return AllocationStep(step, budget, masked=False, live=self.live, skipped_update=skipped)

    def _update_importance(self) -> bool:
        params = self.adapters.parameters()
        if all(p.grad is None for p in params):
            raise RuntimeError(
                "update_and_allocate found no adapter gradients: call it after optimizer.step() and before "
                "optimizer.zero_grad() (with transformers.Trainer: on_optimizer_step, not on_step_end)")
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        norms = torch._foreach_norm(grads)
        if not bool(torch.isfinite(torch.stack(norms)).all()):
            return False
        F.update_sensitivity([p.float() for p in params], [g.float() for g in grads], self.exp_avg_ipt,
                             self.exp_avg_unc, self.config.beta1, self.config.beta2)
        return True

    def scores(self) -> torch.Tensor:
        """Triplet scores of all layers, ``(n_layers, init_r)`` (Eq. 13)."""
        element = torch._foreach_mul(self.exp_avg_ipt, self.exp_avg_unc)
        rows = [F.triplet_scores(element[3 * i], element[3 * i + 1], element[3 * i + 2])
                for i in range(len(self.adapters))]
        return torch.stack(rows)

    def _mask_to(self, budget: int) -> None:
        scores = self.scores()
        keep = F.select_top(scores.view(-1), budget).view(scores.shape)
        for row, layer in zip(keep, self.adapters.values()):
            layer.apply_mask(row)
        self.live = budget  # select_top keeps exactly ``budget`` triplets

    def _replay(self) -> None:
        for layer in self.adapters.values():
            if not layer.is_compacted:
                layer.lora_E.masked_fill_(~layer.rank_mask.view(-1, 1), 0.0)

    def _count_live(self) -> int:
        # One device sync for all layers (not one .item() per layer).
        return int(torch.stack([layer.rank_mask.sum() for layer in self.adapters.values()]).sum())

    def state_dict(self) -> dict:
        """Everything needed to resume: EMAs, step, frozen flag (the masks live in the layers' buffers)."""
        return {
            "exp_avg_ipt": [t.clone() for t in self.exp_avg_ipt],
            "exp_avg_unc": [t.clone() for t in self.exp_avg_unc],
            "last_step": self.last_step,
            "frozen": self.frozen,
            "skipped_steps": list(self.skipped_steps),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the EMA shapes must match the adapters'."""
        params = self.adapters.parameters()
        if state["exp_avg_ipt"] and [tuple(t.shape) for t in state["exp_avg_ipt"]] != [tuple(p.shape) for p in params]:
            raise ValueError("allocator state does not match these adapters (different layers or ranks)")
        device = params[0].device
        self.exp_avg_ipt = [t.to(device) for t in state["exp_avg_ipt"]]
        self.exp_avg_unc = [t.to(device) for t in state["exp_avg_unc"]]
        self.last_step = int(state["last_step"])
        self.frozen = bool(state["frozen"])
        self.skipped_steps = list(state.get("skipped_steps", []))
        self.live = self._count_live()
