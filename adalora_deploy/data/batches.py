"""Deterministic batches of examples: packed blocks or right-padded rows, a pure function of (seed, index).

A resumed run draws exactly the batches the uninterrupted run would have drawn, with no sampler state
to save: the order of each epoch is a permutation seeded by ``(seed, epoch)``.

    packed   every example's ids (and labels) joined into one stream, cut into blocks of seq_len tokens
             (raw text; the trailing partial block is dropped)
    padded   one example per row, right-padded to the longest row of the batch; padding has label -100
             and attention mask 0 (instruction data: each row is one prompt and its completion)
"""

from __future__ import annotations

from typing import Sequence

import torch

from adalora_deploy.errors import DataError

from .examples import IGNORE, Example

__all__ = ["ExampleBatches", "collate"]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``examples`` into ``input_ids``, ``attention_mask`` and ``labels`` (int64 ``[rows, longest]``)."""
    longest = max(len(example.input_ids) for example in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class ExampleBatches:
    """Batches of ``batch_size`` rows; ``batch(i)`` depends only on (seed, i).

    Args:
        examples: the training examples.
        batch_size: rows per batch.
        seed: seeds each epoch's order.
        seq_len: block length when packing.
        pad_id: padding token id (padded rows).
        packing: join examples into blocks of ``seq_len`` (raw text) instead of padding one per row.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int, *, seq_len: int, pad_id: int,
                 packing: bool) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if packing:
            ids = [token for example in examples for token in example.input_ids]
            labels = [label for example in examples for label in example.labels]
            count = len(ids) // seq_len
            if count == 0:
                raise DataError(f"the data has {len(ids)} tokens, fewer than one block of seq_len={seq_len}")
            self.rows = [Example(tuple(ids[i * seq_len:(i + 1) * seq_len]), tuple(labels[i * seq_len:(i + 1) * seq_len]))
                         for i in range(count)]
        else:
            self.rows = list(examples)
        if not self.rows:
            raise DataError("no training examples")
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self._orders: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        """Rows in one epoch."""
        return len(self.rows)

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.rows), generator=generator)}
        return self._orders[epoch]

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """Batch number ``index`` (0-based, over all epochs): ``input_ids``, ``attention_mask``, ``labels``."""
        n = len(self.rows)
        positions = range(index * self.batch_size, (index + 1) * self.batch_size)
        return collate([self.rows[int(self._order(p // n)[p % n])] for p in positions], self.pad_id)
