"""Training and calibration text: a ``.txt`` or ``.jsonl`` file cut into fixed-length token blocks.

Batches are a pure function of (seed, batch index), so a resumed run draws exactly the batches the
uninterrupted run would have drawn, with no sampler state to save.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from adalora_deploy.errors import DataError

__all__ = ["BUILTIN_SAMPLE", "DataError", "BlockBatches", "read_texts", "token_blocks"]


BUILTIN_SAMPLE = "builtin:sample"
"""Names the packaged sample text (:data:`adalora_deploy.demo.SAMPLE_TEXT`) wherever a data file is expected."""


def read_texts(path: str | Path) -> list[str]:
    """Documents of a ``.txt`` file (the whole file is one document) or a ``.jsonl`` file (``"text"`` of each line).

    ``builtin:sample`` reads the packaged sample text.
    """
    if str(path).startswith("builtin:"):
        if str(path) != BUILTIN_SAMPLE:
            raise DataError(f"unknown builtin data {str(path)!r}; the builtin is {BUILTIN_SAMPLE!r}")
        from adalora_deploy.demo import SAMPLE_TEXT

        path = SAMPLE_TEXT
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f'{path}:{number}: each line must be an object with a string "text" field')
            texts.append(record["text"])
        return texts
    raise DataError(f"data file must end in .txt or .jsonl, got {path.name}")


def token_blocks(path: str | Path, tokenizer, seq_len: int) -> torch.Tensor:
    """Tokenize every document, join them with EOS, cut into blocks.

    Returns:
        int64 tensor ``(num_blocks, seq_len)``; the trailing partial block is dropped.
    """
    if seq_len < 2:
        raise DataError(f"seq_len must be >= 2, got {seq_len}")
    ids: list[int] = []
    for text in read_texts(path):
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    num_blocks = len(ids) // seq_len
    if num_blocks == 0:
        raise DataError(f"{path} has {len(ids)} tokens, fewer than one block of seq_len={seq_len}")
    return torch.tensor(ids[: num_blocks * seq_len], dtype=torch.long).view(num_blocks, seq_len)


class BlockBatches:
    """Random batches of blocks, reshuffled each epoch; ``batch(i)`` depends only on (seed, i)."""

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.blocks = blocks
        self.batch_size = batch_size
        self.seed = seed
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.blocks), generator=generator)}
        return self._orders[epoch]

    def batch(self, index: int) -> torch.Tensor:
        """Blocks ``(batch_size, seq_len)`` of batch number ``index`` (0-based, over all epochs)."""
        n = len(self.blocks)
        positions = range(index * self.batch_size, (index + 1) * self.batch_size)
        rows = [self._order(p // n)[p % n] for p in positions]
        return self.blocks[torch.stack(rows)]
