"""Sequence classification (``task: classification``): labelled data, encoding, and accuracy on torch or a graph.

The records are read, filtered (``data.where``) and mapped (``data.map``) as for a causal LM
(:func:`adalora_deploy.data.render_records`); each gives a text (``data.text``, a template; default the
``text`` field) and a label (the ``task.label`` field). The labels are the distinct label values of the
training records, sorted: their order is the logits' order, recorded with the adapter and the export.

Every scoring function takes a *classifier logits function* ``(input_ids, attention_mask) -> logits
[batch, num_labels]`` (numpy, right-padded batches), so a torch model (:func:`torch_classifier_logits`) and an
exported graph are scored by the same code.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from adalora_deploy.data import read_records, render_records
from adalora_deploy.errors import DataError

__all__ = [
    "ClassifierLogitsFn",
    "LabelledData",
    "build_labelled_data",
    "classifier_accuracy",
    "encode_texts",
    "softmax",
    "torch_classifier_logits",
]

ClassifierLogitsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class LabelledData:
    """Texts and label indices of the training and held-out records."""

    labels: tuple[str, ...]
    train_texts: tuple[str, ...]
    train_labels: tuple[int, ...]
    eval_texts: tuple[str, ...]
    eval_labels: tuple[int, ...]

    def eval_records(self) -> list[dict[str, str]]:
        """The held-out records as ``{"text", "label"}`` (written beside a job's run)."""
        return [{"text": t, "label": self.labels[y]} for t, y in zip(self.eval_texts, self.eval_labels)]


def _texts_and_labels(data, label_field: str, reference: str) -> tuple[list[str], list[str]]:
    template = data.text if data.text is not None else "{text}"
    _, rendered = render_records(read_records(reference), format="prompt_completion", where=data.where,
                                 value_map=data.map, prompt=template, completion="{" + label_field + "}",
                                 source=str(reference))
    return [r["prompt"] for r in rendered], [r["completion"] for r in rendered]


def build_labelled_data(data, label_field: str, seed: int) -> LabelledData:
    """Read and split a classification run's records (``data`` is a :class:`adalora_deploy.config.DataConfig`).

    The held-out set is ``data.eval`` when given, else ``data.eval_size`` records drawn with ``seed``;
    ``data.limit`` keeps that many training records.

    Raises:
        DataError: unreadable files, a record without the text or label field, fewer than two labels, or a
            held-out label the training records do not have.
    """
    texts, names = _texts_and_labels(data, label_field, data.train)
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    if data.eval is not None:
        eval_texts, eval_names = _texts_and_labels(data, label_field, data.eval)
    elif data.eval_size:
        if data.eval_size >= len(texts):
            raise DataError(f"data.eval_size = {data.eval_size} leaves nothing to train on ({len(texts)} records)")
        eval_texts, eval_names = [texts[i] for i in order[:data.eval_size]], [names[i] for i in order[:data.eval_size]]
        order = order[data.eval_size:]
    else:
        eval_texts, eval_names = [], []
    order = order[:data.limit]
    train_texts, train_names = [texts[i] for i in order], [names[i] for i in order]
    labels = tuple(sorted(set(train_names)))
    if len(labels) < 2:
        raise DataError(f"{data.train}: the training records have {len(labels)} distinct value(s) of "
                        f"{label_field!r} ({', '.join(labels)}); a classifier needs at least two")
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted(set(eval_names) - set(labels))
    if unknown:
        raise DataError(f"held-out records have label(s) {', '.join(unknown)} that no training record has")
    return LabelledData(labels=labels, train_texts=tuple(train_texts), train_labels=tuple(index[n] for n in train_names),
                        eval_texts=tuple(eval_texts), eval_labels=tuple(index[n] for n in eval_names))


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """int64 ``input_ids`` and ``attention_mask`` of ``texts`` (a transformers tokenizer), right-padded to the
    longest, cut to ``max_length`` tokens."""
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, padding_side="right",
                        return_tensors="np")
    return (np.asarray(encoded["input_ids"], dtype=np.int64), np.asarray(encoded["attention_mask"], dtype=np.int64))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float64 then float32."""
    shifted = np.asarray(logits, dtype=np.float64) - np.max(logits, axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)


def torch_classifier_logits(model: Any) -> ClassifierLogitsFn:
    """The classifier logits function of a transformers ``*ForSequenceClassification`` model (eval mode)."""
    import torch

    def run(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        device = next(model.parameters()).device
        ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64)).to(device)
        mask = torch.from_numpy(np.asarray(attention_mask, dtype=np.int64)).to(device)
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=mask)
        finally:
            model.train(training)
        return out.logits.float().cpu().numpy()

    return run


def classifier_accuracy(logits: ClassifierLogitsFn, tokenizer: Any, texts: Sequence[str], labels: Sequence[int], *,
                        max_length: int, batch_size: int = 16) -> dict[str, Any]:
    """Accuracy and mean cross-entropy of ``logits`` on labelled texts, with the predictions.

    Returns:
        ``{"accuracy", "loss", "examples", "predictions"}``.
    """
    if not texts:
        raise DataError("no held-out records to score (set data.eval_size or data.eval)")
    predictions, losses = [], []
    for start in range(0, len(texts), batch_size):
        ids, mask = encode_texts(tokenizer, texts[start:start + batch_size], max_length)
        out = np.asarray(logits(ids, mask), dtype=np.float64)
        targets = np.asarray(labels[start:start + batch_size])
        shifted = out - out.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        losses.extend((-log_probs[np.arange(len(targets)), targets]).tolist())
        predictions.extend(out.argmax(axis=-1).tolist())
    correct = sum(int(p == y) for p, y in zip(predictions, labels))
    return {"accuracy": correct / len(texts), "loss": float(np.mean(losses)), "examples": len(texts),
            "predictions": predictions}
