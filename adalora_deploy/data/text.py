"""Plain text cut into fixed-length token blocks: calibration data, and training on raw text.

Batches are a pure function of (seed, batch index), so a resumed run draws exactly the batches the
uninterrupted run would have drawn, with no sampler state to save.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from adalora_deploy.errors import DataError

from .sources import read_records, resolve_source

__all__ = ["BlockBatches", "blocks_from_texts", "calibration_blocks", "read_texts", "token_blocks"]

logger = logging.getLogger(__name__)


def read_texts(path: str | Path) -> list[str]:
    """Documents of a data file: the whole ``.txt`` file, or the ``"text"`` field of each record.

    ``builtin:sample`` reads the packaged sample text; ``package:DIST/PATH`` a file of an installed package.
    """
    texts = []
    for number, record in enumerate(read_records(path), start=1):
        if not isinstance(record.get("text"), str):
            raise DataError(f'{resolve_source(path)}:{number}: each record must have a string "text" field '
                            f"(has {', '.join(map(str, record)) or 'no fields'})")
        texts.append(record["text"])
    return texts


def blocks_from_texts(texts: list[str], tokenizer, seq_len: int, where: str = "the data") -> torch.Tensor:
    """Tokenize documents, join them with EOS, cut into blocks.

    Returns:
        int64 tensor ``(num_blocks, seq_len)``; the trailing partial block is dropped.
    """
    if seq_len < 2:
        raise DataError(f"seq_len must be >= 2, got {seq_len}")
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    num_blocks = len(ids) // seq_len
    if num_blocks == 0:
        raise DataError(f"{where} has {len(ids)} tokens, fewer than one block of seq_len={seq_len}")
    return torch.tensor(ids[: num_blocks * seq_len], dtype=torch.long).view(num_blocks, seq_len)


def token_blocks(path: str | Path, tokenizer, seq_len: int) -> torch.Tensor:
    """The documents of a data file (:func:`read_texts`) as token blocks (:func:`blocks_from_texts`)."""
    return blocks_from_texts(read_texts(path), tokenizer, seq_len, where=str(path))


def calibration_blocks(source: str | Path | Sequence[str], tokenizer, seq_len: int, samples: int) -> torch.Tensor:
    """Quantization calibration: at most ``samples`` token blocks ``(n, seq_len)``, int64.

    Args:
        source: a data file (:func:`read_texts`) or the documents themselves.
        tokenizer: the model's tokenizer.
        seq_len: tokens per block.
        samples: blocks wanted; fewer (logged) when the text is short.

    Raises:
        DataError: unreadable data, or text shorter than one block.
    """
    if isinstance(source, (str, Path)):
        texts, where = read_texts(source), str(source)
    else:
        texts, where = list(source), "the calibration text"
    blocks = blocks_from_texts(texts, tokenizer, seq_len, where=where)
    if blocks.shape[0] < samples:
        logger.warning("%s gives %d samples of %d tokens, fewer than the %d asked for; using all", where,
                       blocks.shape[0], seq_len, samples)
    return blocks[:samples]


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
