"""Compaction: slice adapters to the triplets that survived (docs/ALGORITHM.md, Compaction).

    Q' = Q[keep, :]    Λ' = Λ[keep]    P' = P[:, keep]    scale unchanged (alpha / (init_r + 1e-5))

The compacted adapter gives the masked adapter's output (up to float reassociation): a masked triplet
has Λ = 0 and contributes exactly nothing. A layer left with rank 0 has no adapter at all. Two output
formats, both loadable by ``peft.PeftModel.from_pretrained``::

    adalora   PEFT's AdaLoRA format, tensors at the surviving ranks, rank_pattern kept
    lora      PEFT's standard LoRA format with one rank per module and scaling 1:
                  lora_A = Λ' * Q'   (r_k, d_in)      lora_B = P' * scale   (d_out, r_k)
              rank_pattern = alpha_pattern = {re.escape(module): r_k}, so alpha_k / r_k = 1

Compaction also happens during training (``AdaLoraConfig.compact_in_training``): at the final allocation
step :func:`compact_in_place` slices the live layers and re-points the optimizer at the sliced tensors
with their Adam moments sliced the same way.

Equivalence with masked training (tests/test_compaction.py: tiny Llama, q_proj/v_proj, init_r 6 ->
target_r 2, 16 steps, final mask at step 10, AdamW lr 1e-2):

* ``orth_reg_weight = 0``: every loss equals the masked run's; measured bit-identical on CPU (the
  test allows 1e-6 for reassociation of the rank contraction on other kernels). Kept triplets see
  exactly the same gradients and Adam moments; masked ones contribute exactly nothing. Trainable
  parameters dropped 2712 -> 776 and Adam state 5424 -> 1552 numbers at the final step. Gradient
  clipping (``max_grad_norm``) breaks the identity: the masked run's norm includes masked Λ gradients.
* ``orth_reg_weight > 0``: the runs differ after the final step. The masked run keeps all init_r rows
  in ``Q Q^T - I`` and ``P^T P - I`` (masked P and Q rows still move, pulled by the regularizer), so the
  kept rows' gradients include cross terms with masked rows; after slicing those terms are gone (and a
  rank-0 layer leaves the mean's count). With γ = 0.5 the loss difference at steps 10-15 was 0, 0,
  2.5e-5, 1.4e-4, 7.5e-5, 4.8e-5 (losses ~5.5; the first update after compaction is step 11's):
  small, but not the same run.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from adalora_deploy.adapters import AdapterSet
from adalora_deploy.compacted import CompactAdapter, CompactLayer, from_adapters
from adalora_deploy.config import AdaLoraConfig
from adalora_deploy.peft_format import read_compact_adapter, write_adalora, write_lora

__all__ = [
    "CompactAdapter",
    "CompactFormat",
    "CompactLayer",
    "CompactionReport",
    "LayerCompaction",
    "compact_adapter",
    "compact_in_place",
    "compact_optimizer_state",
    "compaction_report",
    "from_adapters",
]

logger = logging.getLogger(__name__)

CompactFormat = Literal["adalora", "lora"]
FORMATS: tuple[str, ...] = ("adalora", "lora")

# Which dimension of each factor indexes the rank.
_RANK_DIM = {"lora_A": 0, "lora_E": 0, "lora_B": 1}


# --- in-training compaction -------------------------------------------------------------------------


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

    A layer whose mask keeps nothing ends with zero-size factors and adds nothing to its base's output.
    With ``orth_reg_weight = 0`` training continues exactly as masked training would (see module doc).

    Args:
        adapters: the adapted layers (already masked to their final rank pattern).
        optimizer: the optimizer over the adapters' parameters, or None.

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


# --- report -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerCompaction:
    """Ranks and sizes of one module before and after compaction.

    Attributes:
        name: module name.
        init_r: rank before (what the full adapter holds).
        rank: surviving rank r_k (0: the adapter is removed).
        shape: ``(d_out, d_in)``.
        params_before: ``init_r * (d_in + d_out + 1)`` (P, Λ, Q at init_r).
        params_after: ``r_k * (d_in + d_out + 1)`` (adalora) or ``r_k * (d_in + d_out)`` (lora).
        bytes_before: tensor bytes before, at the adapter's dtype.
        bytes_after: tensor bytes after.
    """

    name: str
    init_r: int
    rank: int
    shape: tuple[int, int]
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int


@dataclass(frozen=True)
class CompactionReport:
    """What :func:`compact_adapter` wrote.

    Attributes:
        format: ``"adalora"`` or ``"lora"``.
        output_dir: the written folder (None when only computed).
        layers: one entry per module, rank-0 modules included.
    """

    format: str
    output_dir: Path | None
    layers: tuple[LayerCompaction, ...]

    @property
    def params_before(self) -> int:
        """Adapter parameters at init_r."""
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        """Adapter parameters written."""
        return sum(layer.params_after for layer in self.layers)

    @property
    def bytes_before(self) -> int:
        """Tensor bytes at init_r."""
        return sum(layer.bytes_before for layer in self.layers)

    @property
    def bytes_after(self) -> int:
        """Tensor bytes written."""
        return sum(layer.bytes_after for layer in self.layers)

    @property
    def removed(self) -> tuple[str, ...]:
        """Modules left without an adapter (rank 0)."""
        return tuple(layer.name for layer in self.layers if layer.rank == 0)

    def format_table(self) -> str:
        """A plain-text table, one row per module, and a total."""
        width = max([len("module"), len("total")] + [len(layer.name) for layer in self.layers])
        header = (f"{'module':<{width}}  {'rank':>9}  {'params before':>13}  {'params after':>12}  "
                  f"{'bytes before':>12}  {'bytes after':>11}")
        lines = [header]
        for layer in self.layers:
            rank = f"{layer.rank}/{layer.init_r}"
            lines.append(f"{layer.name:<{width}}  {rank:>9}  {layer.params_before:>13}  {layer.params_after:>12}  "
                         f"{layer.bytes_before:>12}  {layer.bytes_after:>11}")
        kept = sum(layer.rank for layer in self.layers)
        total_r = sum(layer.init_r for layer in self.layers)
        lines.append(f"{'total':<{width}}  {f'{kept}/{total_r}':>9}  {self.params_before:>13}  {self.params_after:>12}  "
                     f"{self.bytes_before:>12}  {self.bytes_after:>11}")
        return "\n".join(lines)


def compaction_report(adapter: CompactAdapter, format: CompactFormat, output_dir: Path | None = None) -> CompactionReport:
    """Per-module ranks, parameter counts and tensor bytes of ``adapter`` written as ``format``."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    rows = []
    for layer in adapter.layers:
        d_in, d_out = layer.in_features, layer.out_features
        per_rank_after = d_in + d_out + (1 if format == "adalora" else 0)
        element = layer.lora_A.element_size()
        element_after = 4 if format == "lora" else element  # LoRA factors are written in float32
        before = layer.init_r * (d_in + d_out + 1)
        after = layer.rank * per_rank_after
        rows.append(LayerCompaction(name=layer.name, init_r=layer.init_r, rank=layer.rank, shape=(d_out, d_in),
                                    params_before=before, params_after=after, bytes_before=before * element,
                                    bytes_after=after * element_after))
    return CompactionReport(format=format, output_dir=output_dir, layers=tuple(rows))


def compact_adapter(source: str | Path | AdapterSet, output: str | Path, *, format: CompactFormat = "adalora",
                    config: AdaLoraConfig | None = None, fan_in_fan_out: bool | None = None) -> CompactionReport:
    """Slice an adapter to its surviving ranks and write it as ``format``.

    Args:
        source: an AdaLoRA adapter folder (ours or PEFT's) or an in-memory model's :class:`AdapterSet`.
        output: the folder to write (replaced whole, atomically).
        format: ``"adalora"`` (PEFT AdaLoRA, sliced) or ``"lora"`` (PEFT LoRA, per-module ranks, scaling 1).
        config: the AdaLoRA config; required for an :class:`AdapterSet`, ignored for a folder.
        fan_in_fan_out: override whether the base stores weights ``(in, out)``; None: from the folder's
            config or the in-memory base layers.

    Returns:
        The per-module table of ranks kept and sizes before/after.

    Raises:
        ArtifactError: unreadable adapter folder or an adapter whose every layer has rank 0.
        ValueError: an :class:`AdapterSet` without ``config``, or an unknown format.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if isinstance(source, Mapping):
        if config is None:
            raise ValueError("compact_adapter needs the AdaLoraConfig of an in-memory AdapterSet")
        adapter = from_adapters(source, config)
    else:
        adapter = read_compact_adapter(source)
    if fan_in_fan_out is not None:
        adapter = dataclasses.replace(adapter, fan_in_fan_out=fan_in_fan_out)
    output = Path(output)
    if format == "adalora":
        write_adalora(adapter, output)
    else:
        write_lora(adapter, output)
    report = compaction_report(adapter, format, output)
    logger.info("compacted %d modules to %d triplets (%s): %d -> %d parameters, %d removed", len(report.layers),
                sum(layer.rank for layer in report.layers), format, report.params_before, report.params_after,
                len(report.removed))
    return report

