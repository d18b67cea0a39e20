"""Serving a sequence-classification export with onnxruntime alone (no torch, no transformers).

The graph takes ``input_ids`` and ``attention_mask`` [batch, seq] (int64, right-padded) and returns
``logits`` [batch, num_labels]; the label names come from the export's ``export.json`` (``labels``), the
tokenizer from its ``tokenizer.json`` (the ``tokenizers`` library, as the model was trained: special tokens
added, cut to the model's positions). Scores are the softmax of the logits, computed in numpy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from adalora_deploy.errors import ArtifactError

from ..contract import ATTENTION_MASK, INPUT_IDS, LOGITS, MANIFEST_FILE, MODEL_FILE
from .session import create_session
from .tokenizer import TextTokenizer

__all__ = ["ClassifierSession", "is_classifier_export", "softmax"]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (float64 arithmetic, float32 result)."""
    shifted = np.asarray(logits, dtype=np.float64) - np.max(logits, axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)


def _manifest(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ArtifactError(f"{folder / MANIFEST_FILE}: cannot read the export's manifest ({error})") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{folder / MANIFEST_FILE}: expected a JSON object")
    return data


def is_classifier_export(folder: str | os.PathLike) -> bool:
    """Whether an export folder holds a sequence classifier (``task: classification`` in ``export.json``)."""
    path = Path(folder) / MANIFEST_FILE
    return path.is_file() and _manifest(Path(folder)).get("task") == "classification"


class ClassifierSession:
    """A classification export loaded for inference.

    Args:
        folder: the export folder (``model.onnx``, ``export.json``, tokenizer files).
        provider: onnxruntime provider.
        max_length: tokens kept per text (default: the model's ``max_position_embeddings``, at most 512).
    """

    def __init__(self, folder: str | os.PathLike, *, provider: str = "cpu", max_length: int | None = None,
                 intra_op_threads: int | None = None) -> None:
        self.folder = Path(folder)
        manifest = _manifest(self.folder)
        labels = manifest.get("labels")
        if manifest.get("task") != "classification" or not isinstance(labels, list) or not labels:
            raise ArtifactError(f"{self.folder} is not a sequence-classification export (export.json has no labels)")
        self.labels: tuple[str, ...] = tuple(str(label) for label in labels)
        self.session = create_session(self.folder / MODEL_FILE, provider=provider, intra_op_threads=intra_op_threads)
        self._tokenizer: TextTokenizer | None = None
        config = json.loads((self.folder / "config.json").read_text(encoding="utf-8")) \
            if (self.folder / "config.json").is_file() else {}
        positions = int(config.get("max_position_embeddings") or 512)
        if config.get("model_type") == "roberta":
            positions -= int(config.get("pad_token_id") or 0) + 1
        self.max_length = max_length or min(positions, 512)
        self.pad_id = int(config.get("pad_token_id") or 0)

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            self._tokenizer = TextTokenizer.from_folder(self.folder)
        return self._tokenizer

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """``logits`` [batch, num_labels] of int64 ``input_ids`` / ``attention_mask`` [batch, seq]."""
        out = self.session.run([LOGITS], {INPUT_IDS: np.asarray(input_ids, dtype=np.int64),
                                          ATTENTION_MASK: np.asarray(attention_mask, dtype=np.int64)})
        return np.asarray(out[0], dtype=np.float32)

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded int64 ids and mask of ``texts`` (special tokens added, cut to :attr:`max_length`)."""
        rows = [self.tokenizer.encode(text)[: self.max_length] for text in texts]
        width = max(1, max(len(row) for row in rows))
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
            mask[i, :len(row)] = 1
        return ids, mask

    def predict(self, texts: Sequence[str]) -> list[list[dict[str, Any]]]:
        """For each text, every label with its softmax score, highest first (text-embeddings-inference's
        ``/predict`` answer)."""
        if not texts:
            return []
        scores = softmax(self.logits(*self.encode(texts)))
        return [[{"label": self.labels[j], "score": float(row[j])} for j in np.argsort(-row, kind="stable")]
                for row in scores]
