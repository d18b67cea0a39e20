"""Training, evaluation and calibration data: files as users have them, tokenized with loss masks, batched.

- :mod:`.sources`: where data comes from (a path, ``builtin:sample``, ``package:DIST/PATH``) and reading
  ``.txt`` / ``.jsonl`` / ``.csv`` / ``.parquet`` files into records.
- :mod:`.text`: plain text cut into fixed-length token blocks (calibration, and the ``text`` format).
- :mod:`.examples`: records -> token ids and labels, with the loss on completions / assistant turns only.
- :mod:`.batches`: deterministic packed or padded batches, a pure function of (seed, batch index).
"""

from __future__ import annotations

from adalora_deploy.errors import DataError

from .batches import ExampleBatches
from .examples import (
    Example,
    TrainingData,
    build_training_data,
    render_records,
    tokenize_records,
)
from .sources import BUILTIN_SAMPLE, read_records, resolve_source
from .text import BlockBatches, blocks_from_texts, calibration_blocks, read_texts, token_blocks

__all__ = [
    "BUILTIN_SAMPLE",
    "BlockBatches",
    "DataError",
    "Example",
    "ExampleBatches",
    "TrainingData",
    "blocks_from_texts",
    "calibration_blocks",
    "build_training_data",
    "read_records",
    "read_texts",
    "render_records",
    "resolve_source",
    "token_blocks",
    "tokenize_records",
]
