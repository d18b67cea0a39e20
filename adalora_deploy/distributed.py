"""More than one process: our training loop under ``torchrun`` (DDP), and what the allocator needs from it.

AdaLoRA's importance scores are products of each element and its gradient (Eq. 9-12), so they must be
computed from the gradient of the *global* batch. Under DDP the gradients are all-reduced (averaged)
during ``backward()``; ``optimizer.step()`` and then ``allocator.update_and_allocate(step)`` run on every
rank with identical gradients and identical parameters, so every rank computes the same scores and keeps
the same triplets (selection is deterministic, ties broken by position). No extra communication is needed,
and a 2-process run with ``batch_size`` B per process equals a 1-process run with batch size 2B (the same
rows per optimizer step; padded data weights each rank's token mean equally, packed text exactly).

Sharded parameters are another matter: FSDP and DeepSpeed ZeRO-2/3 give each rank a shard of P, Λ, Q or
of their gradients, while the allocator needs whole triplets (Λ_i with row i of Q and column i of P) and
their full gradients on one rank to rank them globally. That would need a gather of every adapter
tensor and its gradient per step; it is not supported, and :func:`refuse_sharding` says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from adalora_deploy.errors import ConfigError

__all__ = ["ProcessGroup", "process_group", "refuse_sharding"]


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0 writes files, logs and draws progress bars."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (so every rank stops together)."""
        if self.world == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0])
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def mean(self, value: float) -> float:
        """Mean of ``value`` over the ranks."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(tensor)
        return float(tensor.item()) / self.world


def process_group(device: torch.device | None = None) -> ProcessGroup:
    """The process group ``torchrun`` set up (``WORLD_SIZE`` > 1), initialized here if needed (gloo on CPU,
    nccl on CUDA); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return ProcessGroup()
    if not torch.distributed.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not torch.distributed.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return ProcessGroup(rank=torch.distributed.get_rank(), world=torch.distributed.get_world_size())


def refuse_sharding(args) -> None:
    """Raise a clear :class:`ConfigError` for Trainer arguments that shard adapter parameters or gradients.

    Args:
        args: ``transformers.TrainingArguments``.
    """
    fsdp = getattr(args, "fsdp", None)
    if fsdp:
        raise ConfigError("FSDP shards the adapters' P, Λ, Q across ranks, but AdaLoRA's rank allocator must rank "
                          "whole triplets with their full gradients on every rank; train with DDP (torchrun "
                          "without --fsdp): the adapters are small, so replicating them costs little")
    deepspeed = getattr(args, "deepspeed", None)
    if deepspeed:
        import json

        config = deepspeed if isinstance(deepspeed, dict) else json.loads(open(deepspeed, encoding="utf-8").read())
        stage = int((config.get("zero_optimization") or {}).get("stage", 0))
        if stage >= 2:
            raise ConfigError(f"DeepSpeed ZeRO stage {stage} partitions gradients{' and parameters' if stage == 3 else ''}"
                              ", but AdaLoRA's rank allocator reads every adapter element's full gradient after the "
                              "step; use ZeRO stage 0 or 1, or DDP")
