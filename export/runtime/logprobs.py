"""Log-probabilities of tokens as OpenAI's API returns them: numpy only (no torch), shared by the server and the
in-process lm-evaluation-harness model.

What a value is: ``log_softmax`` of the graph's fp32 logits at that position, taken *before* any sampling
transform (repetition penalty, temperature, top-k, top-p), in float64 and reported as a Python float. So a
log-probability depends on the model and the text only, never on how the token was drawn, and for an exact
export it equals the trained model's ``log_softmax(logits)`` within the exact tier (twice the logits' bound:
``x_i - logsumexp(x)`` adds the error of one logit and of the log-sum-exp).

::

    logits [vocab] fp32 ──► log_softmax (float64) ──► TokenLogprob(token_id, logprob, top ((id, logprob) x k))
    prompt logits [L, vocab] ──► prompt_logprobs: position 0 None (nothing predicts it), then token i from
                                 the logits at i - 1

The response shapes (:class:`CompletionLogprobs`, :func:`chat_logprobs`) are OpenAI's:

- ``/v1/completions``: ``{"tokens": [str], "token_logprobs": [float | None], "top_logprobs": [{str: float} |
  None], "text_offset": [int]}``; ``top_logprobs`` holds the ``logprobs`` most likely tokens and the chosen one
  (as vLLM and OpenAI's legacy API: lm-evaluation-harness reads "is greedy" from it); ``text_offset`` is
  where each token's text starts in the choice's ``text`` (the prompt included when echoed);
- ``/v1/chat/completions``: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
  "logprob", "bytes"}]}]}`` with exactly ``top_logprobs`` alternatives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .tokenizer import TextTokenizer

__all__ = [
    "MAX_CHAT_TOP_LOGPROBS",
    "MAX_COMPLETION_LOGPROBS",
    "CompletionLogprobs",
    "TokenLogprob",
    "TokenTexts",
    "chat_logprobs",
    "log_softmax",
    "prompt_logprobs",
    "token_logprob",
]

MAX_COMPLETION_LOGPROBS = 5
"""OpenAI's limit on ``logprobs`` of ``/v1/completions``."""
MAX_CHAT_TOP_LOGPROBS = 20
"""OpenAI's limit on ``top_logprobs`` of ``/v1/chat/completions``."""


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the most likely alternatives at its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """(token id, log-probability) of the most likely tokens, most likely first (ties: lower id first)."""


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """``logits - logsumexp(logits)`` over the last axis, in float64 (shape kept)."""
    values = np.asarray(logits, dtype=np.float64)
    peak = values.max(axis=-1, keepdims=True)
    return values - (peak + np.log(np.exp(values - peak).sum(axis=-1, keepdims=True)))


def _top(logprobs: np.ndarray, k: int) -> tuple[tuple[int, float], ...]:
    """The k most likely (id, logprob) of one row [vocab], most likely first, ties by id."""
    if k <= 0:
        return ()
    k = min(k, logprobs.shape[-1])
    candidates = np.argpartition(-logprobs, k - 1)[:k]
    order = sorted(candidates.tolist(), key=lambda i: (-logprobs[i], i))
    return tuple((int(i), float(logprobs[i])) for i in order)


def token_logprob(logits: np.ndarray, token_id: int, top: int) -> TokenLogprob:
    """The log-probability of ``token_id`` under one position's logits [vocab] and its ``top`` alternatives."""
    logprobs = log_softmax(logits)
    return TokenLogprob(int(token_id), float(logprobs[token_id]), _top(logprobs, top))


def prompt_logprobs(logits: np.ndarray, prompt: Sequence[int], top: int) -> tuple[TokenLogprob | None, ...]:
    """Every prompt token's log-probability from the prefill's logits.

    Args:
        logits: [len(prompt), vocab], the logits at each prompt position (no padding).
        prompt: the prompt's token ids.
        top: alternatives per position.

    Returns:
        ``None`` for the first token (no position predicts it), then token ``i`` scored by the logits at ``i - 1``.
    """
    if len(prompt) < 2:
        return (None,) * len(prompt)
    logprobs = log_softmax(logits[: len(prompt) - 1])
    ids = np.asarray(prompt[1:], dtype=np.int64)
    chosen = logprobs[np.arange(len(ids)), ids]
    return (None,) + tuple(TokenLogprob(int(t), float(v), _top(row, top)) for t, v, row in zip(ids, chosen, logprobs))


class TokenTexts:
    """Each token's own text and bytes, as OpenAI shows tokens (cached per id).

    A byte-level BPE token (GPT-2/Llama-3/SmolLM2 style, ``Ġ`` for a space) maps to its exact bytes through the
    byte-level alphabet, so a token that holds half of a multi-byte character still has its real ``bytes``
    (its ``token`` text then shows U+FFFD, as OpenAI's does). Other tokenizers: the decoded text's UTF-8.
    """

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}
        self._byte_of = _byte_level_alphabet() if _is_byte_level(tokenizer) else None

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        """(text, bytes) of one token (special tokens as their own text, e.g. ``</s>``)."""
        if token_id not in self._cache:
            piece = self.tokenizer.tokenizer.id_to_token(token_id)
            raw: bytes | None = None
            if piece is not None and token_id not in self.tokenizer.special_ids and self._byte_of is not None \
                    and all(ch in self._byte_of for ch in piece):
                raw = bytes(self._byte_of[ch] for ch in piece)
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            if raw is None:
                raw = text.encode("utf-8")
            self._cache[token_id] = (text, raw)
        return self._cache[token_id]

    def text(self, token_id: int) -> str:
        return self(token_id)[0]


def _is_byte_level(tokenizer: TextTokenizer) -> bool:
    import json

    try:
        decoder = json.loads(tokenizer.tokenizer.to_str()).get("decoder") or {}
    except (ValueError, AttributeError):
        return False
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", []) or []]
    return "ByteLevel" in kinds


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's ``bytes_to_unicode`` inverted: the printable character standing for each byte -> the byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


class CompletionLogprobs:
    """The ``logprobs`` object of one ``/v1/completions`` choice, built whole or in pieces (streamed chunks):
    ``text_offset`` continues from piece to piece, counted in the text the tokens decode to (the prompt's first
    when it is echoed; special tokens such as BOS take no room), so it indexes the choice's ``text``.

    Args:
        texts: token texts.
    """

    def __init__(self, texts: TokenTexts) -> None:
        self.texts = texts
        self._detokenizer = texts.tokenizer.detokenizer()
        self._offset = 0

    def piece(self, token_ids: Sequence[int], entries: Sequence[TokenLogprob | None]) -> dict[str, Any]:
        """The object for the next tokens (``None`` entries: the first prompt token, which has no log-probability)."""
        tokens, offsets, top_logprobs = [], [], []
        for token_id, entry in zip(token_ids, entries):
            tokens.append(self.texts.text(token_id))
            offsets.append(self._offset)
            self._offset += len(self._detokenizer.push(token_id))
            if entry is None:
                top_logprobs.append(None)
                continue
            alternatives = {self.texts.text(i): v for i, v in entry.top}
            alternatives.setdefault(tokens[-1], entry.logprob)
            top_logprobs.append(alternatives)
        return {"tokens": tokens, "token_logprobs": [None if e is None else e.logprob for e in entries],
                "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(entries: Sequence[TokenLogprob], texts: TokenTexts) -> dict[str, Any]:
    """OpenAI's ``choices[i].logprobs`` of ``/v1/chat/completions``: ``{"content": [...]}``."""

    def item(token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = texts(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    return {"content": [item(e.token_id, e.logprob) | {"top_logprobs": [item(i, v) for i, v in e.top]}
                        for e in entries], "refusal": None}
