"""Task accuracy and held-out loss of a model, in torch or as an exported graph under onnxruntime.

One forward pass over each held-out example (prompt and completion, tokenized exactly as training
tokenizes them) answers both questions:

- **held-out loss**: mean negative log-likelihood per label token (the loss training minimizes; ``exp`` of
  it is the perplexity);
- **choice accuracy** (classification tasks, ``task.choices``): at the last prompt position, the highest
  logit among the first tokens of the choices (e.g. ``negative`` / ``positive``) must be the token the
  example's completion starts with.

:class:`TorchScorer` runs a transformers model; :class:`GraphScorer` runs an exported decoding graph through
:class:`adalora_deploy.export.runtime.DecoderSession` (numpy only). Rows are left padded, as generation
feeds prompts; positions come from the attention mask on both sides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from adalora_deploy.errors import DataError

__all__ = ["EvalResult", "GraphScorer", "Scorer", "TorchScorer", "choice_tokens", "evaluate"]

IGNORE = -100


class Scorer(Protocol):
    """What evaluation needs from a model: logits for left-padded token rows."""

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """``[batch, seq, vocab]`` float32 logits of int64 ``[batch, seq]`` ids (left padded)."""


@dataclass(frozen=True)
class EvalResult:
    """Scores of one model on the held-out examples."""

    loss: float
    """Mean negative log-likelihood per label token (nats)."""
    accuracy: float | None
    """Fraction of examples whose highest choice logit is the true choice (None without choices)."""
    examples: int
    tokens: int
    """Label tokens the loss averages over."""

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "perplexity": self.perplexity, "accuracy": self.accuracy,
                "examples": self.examples, "tokens": self.tokens}


def _chat_ids(tokenizer, messages: Sequence[Mapping[str, str]], generation_prompt: bool) -> list[int]:
    return list(tokenizer.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=generation_prompt,
                                              return_dict=False))


def _first_token(tokenizer, record: Mapping[str, Any], completion: str) -> int:
    """The first token of ``completion`` after ``record``'s prompt, tokenized as training tokenizes it."""
    if "messages" in record:
        history = record["messages"][:-1]
        prompt = _chat_ids(tokenizer, history, True)
        full = _chat_ids(tokenizer, [*history, {"role": "assistant", "content": completion}], False)
        return full[len(prompt)] if len(full) > len(prompt) else -1
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return ids[0] if ids else -1


def choice_tokens(records: Sequence[Mapping[str, Any]], choices: Sequence[str], tokenizer) -> tuple[int, ...]:
    """The first token of each choice, checked against held-out records rendered by
    :func:`adalora_deploy.data.render_records` (``prompt``/``completion``, plus ``messages`` for chat).

    Raises:
        DataError: not prompt/completion data, a completion that is not a choice, or choices whose first
            tokens coincide or depend on the prompt.
    """
    if not records:
        raise DataError("no held-out records to score the task on (set data.eval_size or data.eval)")
    firsts: tuple[int, ...] | None = None
    for number, record in enumerate(records, start=1):
        if "prompt" not in record or "completion" not in record:
            raise DataError("task.choices needs prompt/completion data (set data.prompt and data.completion)")
        if record["completion"] not in choices:
            raise DataError(f"held-out record {number}: completion {record['completion']!r} is not one of "
                            f"task.choices {list(choices)}")
        first = tuple(_first_token(tokenizer, record, choice) for choice in choices)
        if firsts is None:
            if len(set(first)) != len(first) or -1 in first:
                raise DataError(f"task.choices {list(choices)} must start with different tokens "
                                f"(first tokens {list(first)}); reword the choices")
            firsts = first
        elif first != firsts:
            raise DataError("the choices' first tokens depend on the prompt; end every prompt the same way so each "
                            "choice starts with one fixed token")
    return firsts


def _left_pad(rows: Sequence[Sequence[int]], fill: int) -> np.ndarray:
    longest = max(len(r) for r in rows)
    out = np.full((len(rows), longest), fill, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, longest - len(row):] = row
    return out


def evaluate(scorer: Scorer, examples: Sequence[Any], *, choices: Sequence[int] | None = None, pad_id: int = 0,
             batch_size: int = 8) -> EvalResult:
    """Held-out loss and, with ``choices`` (first tokens, from :func:`choice_tokens`), choice accuracy.

    Args:
        scorer: the model.
        examples: :class:`adalora_deploy.data.Example` s (ids and labels as training made them).
        choices: token id of each choice; an example's true choice is the one its first label token is.
        pad_id: left-padding id (masked out).
        batch_size: examples per forward pass.
    """
    if not examples:
        raise DataError("no held-out examples to evaluate on (set data.eval_size or data.eval)")
    tokens = None if choices is None else np.asarray(choices)
    total, count, correct = 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        ids = _left_pad([e.input_ids for e in chunk], pad_id)
        mask = _left_pad([[1] * len(e.input_ids) for e in chunk], 0)
        labels = _left_pad([e.labels for e in chunk], IGNORE)
        logits = scorer.logits(ids, mask).astype(np.float32)
        target, keep = labels[:, 1:], labels[:, 1:] != IGNORE
        shifted = logits[:, :-1]
        peak = shifted.max(-1, keepdims=True)
        log_norm = np.log(np.exp(shifted - peak).sum(-1)) + peak[..., 0]
        picked = np.take_along_axis(shifted, np.where(keep, target, 0)[..., None], -1)[..., 0]
        total += float((log_norm - picked)[keep].astype(np.float64).sum())
        count += int(keep.sum())
        if tokens is not None:
            first = keep.argmax(-1)  # position predicting each row's first label token
            rows = np.arange(len(chunk))
            predicted = tokens[shifted[rows, first][:, tokens].argmax(-1)]
            correct += int((predicted == target[rows, first]).sum())
    accuracy = None if tokens is None else correct / len(examples)
    return EvalResult(loss=total / max(count, 1), accuracy=accuracy, examples=len(examples), tokens=count)


class TorchScorer:
    """A transformers causal LM as a :class:`Scorer` (no grad, eval mode, positions from the mask)."""

    def __init__(self, model) -> None:
        self.model = model

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        import torch

        self.model.eval()
        device = next(self.model.parameters()).device
        ids = torch.from_numpy(input_ids).to(device)
        mask = torch.from_numpy(attention_mask).to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions)
        return out.logits.float().cpu().numpy()


class GraphScorer:
    """An exported decoding graph as a :class:`Scorer`: one prompt step with an empty KV cache."""

    def __init__(self, decoder, adapter: Mapping[str, np.ndarray] | None = None) -> None:
        self.decoder = decoder
        self.adapter = adapter

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.decoder.step(input_ids, attention_mask, None, self.adapter).logits
