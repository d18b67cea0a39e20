"""Compaction: slice adapters to the triplets that survived (ALGORITHM.md, Compaction).

    Q' = Q[keep, :]    Λ' = Λ[keep]    P' = P[:, keep]    scale unchanged (alpha / (init_r + 1e-5))
"""

from __future__ import annotations

import torch

from adalora_deploy.adapters import AdapterSet

__all__ = ["compact_in_place", "compact_optimizer_state"]

# Which dimension of each factor indexes the rank.
_RANK_DIM = {"lora_A": 0, "lora_E": 0, "lora_B": 1}


@torch.no_grad()
def compact_optimizer_state(optimizer: torch.optim.Optimizer, old: torch.nn.Parameter, new: torch.nn.Parameter,
                            index: torch.Tensor, rank_dim: int) -> None:
    """Re-point ``optimizer`` from ``old`` to ``new`` and slice ``old``'s state to the kept ranks.

    Every state tensor shaped like the parameter (Adam's moments) is sliced with ``index`` along
    ``rank_dim``; scalars (Adam's step) are kept. The optimizer then continues exactly where the masked
    run would: the kept entries' moments are the same numbers.
    """
    for group in optimizer.param_groups:
        for position, parameter in enumerate(group["params"]):
            if parameter is old:
                group["params"][position] = new
    state = optimizer.state.pop(old, None)
    if state is None:
        return
    sliced = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == old.shape:
            value = value.index_select(rank_dim, index.to(value.device)).contiguous()
        sliced[key] = value
    optimizer.state[new] = sliced


def compact_in_place(adapters: AdapterSet, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Slice every layer to its ``rank_mask`` in place; re-point ``optimizer`` (if given) to the new tensors.

    Returns:
        The rank of each layer after compaction.
    """
    for layer in adapters.values():
        if layer.is_compacted:
            continue
        old = {name: getattr(layer, name) for name in _RANK_DIM}
        index = layer.compact_()
        if optimizer is not None:
            for name, rank_dim in _RANK_DIM.items():
                compact_optimizer_state(optimizer, old[name], getattr(layer, name), index, rank_dim)
    return {name: layer.rank for name, layer in adapters.items()}
