"""Text generation with the KV-cache decoding graph: sampling, stop strings, streaming, batches that rows join
and leave between steps. numpy and onnxruntime only (no torch).

::

    prompts ──► DecodeBatch.add: the new rows' prompts run as one left-padded batch (the prefill); each row
                picks its first token; their KV caches are left-padded to the running batch's length and
                concatenated to it (mask 0 on the padding, so positions and attention are unchanged)
             ──► DecodeBatch.step: one graph run for every running row (one new token each); finished rows
                are sliced out and columns no row attends to are trimmed
    per row: TokenSampler (repetition penalty -> temperature -> top-k -> top-p -> draw, transformers' order)
             TextStream (incremental detokenization, stop strings held back until they cannot match)
             log-probabilities when asked (:mod:`.logprobs`: of the raw logits, before the sampler's transforms):
             the prompt's from the prefill's logits, each new token's from its step's; a row that only scores
             its prompt (``max_new_tokens`` 0) ends after the prefill, never decodes and never joins the batch

The same :class:`DecodeBatch` serves ``adalora-deploy generate`` (all prompts join at once) and the server's
engine (requests join as they arrive). A row's tokens depend only on its own prompt, parameters and seed:
padding adds masked positions whose attention weight is exactly 0, so batched greedy output equals the
single-prompt output (tests check it).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, Mapping, Sequence

import numpy as np

from adalora_deploy.artifacts import read_json
from adalora_deploy.errors import ArtifactError, UserError

from ..contract import MODEL_FILE
from .logprobs import TokenLogprob, prompt_logprobs, token_logprob
from .session import DecoderSession, create_session
from .tokenizer import TextTokenizer

__all__ = [
    "Completion",
    "DecodeBatch",
    "GenerationError",
    "GenerationRequest",
    "collect",
    "ModelLimits",
    "SamplingParams",
    "TextGenerator",
    "RequestOutput",
    "Row",
    "TextStream",
    "TokenEvent",
    "TokenSampler",
    "check_prompt",
    "model_limits",
    "repetition_penalty",
    "top_k_filter",
    "top_p_filter",
]

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled"]


class GenerationError(UserError, ValueError):
    """A generation request that cannot run: bad sampling parameters or a prompt that does not fit."""


@dataclass(frozen=True)
class SamplingParams:
    """How to choose tokens and when to stop (the knobs of transformers' ``generate`` and OpenAI's API)."""

    max_new_tokens: int = 128
    """Tokens to generate at most (fewer when EOS, a stop string or the context length comes first); 0 only
    with ``prompt_logprobs`` (score the prompt, generate nothing)."""
    temperature: float = 0.0
    """0: greedy (argmax); > 0: sample from softmax(logits / temperature)."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0: all)."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of most likely tokens whose probability reaches top_p (1: all)."""
    repetition_penalty: float = 1.0
    """CTRL's penalty on every token already in the prompt or the output (1: none; > 1 discourages)."""
    seed: int | None = None
    """Seed of this request's random stream (``None``: fresh entropy)."""
    stop: tuple[str, ...] = ()
    """Strings that end the output; the text stops before the first one (which is not returned)."""
    logprobs: int | None = None
    """Log-probability of each generated token and of this many most likely alternatives (None: none)."""
    prompt_logprobs: int | None = None
    """Log-probabilities of the prompt's tokens (the first has none) with this many alternatives (None: none)."""

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 1 or (self.max_new_tokens == 0 and self.prompt_logprobs is not None),
             "max_new_tokens", self.max_new_tokens, "an integer >= 1 (0 only when scoring the prompt)"),
            (self.logprobs is None or self.logprobs >= 0, "logprobs", self.logprobs, "None or an integer >= 0"),
            (self.prompt_logprobs is None or self.prompt_logprobs >= 0, "prompt_logprobs", self.prompt_logprobs,
             "None or an integer >= 0"),
            (np.isfinite(self.temperature) and self.temperature >= 0, "temperature", self.temperature,
             "a number >= 0 (0 = greedy)"),
            (self.top_k >= 0, "top_k", self.top_k, "an integer >= 0 (0 = off)"),
            (0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]"),
            (np.isfinite(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
             self.repetition_penalty, "a number > 0 (1 = off)"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", list(self.stop), "non-empty strings"),
        ]
        for ok, name, value, rule in checks:
            if not ok:
                raise GenerationError(f"{name}={value!r}: must be {rule}")
        if not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature 0 or top_k 1."""
        return self.temperature == 0 or self.top_k == 1


# --- logits processing (numpy, one row [vocab]) --------------------------------------------------------------


def repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL's repetition penalty (Keskar et al. 2019), as transformers' ``RepetitionPenaltyLogitsProcessor``:
    for every token already seen, a positive logit is divided by ``penalty`` and a negative one multiplied.

    Args:
        logits: [vocab].
        seen: bool [vocab], the tokens of the prompt and the output so far.
    """
    if penalty == 1.0:
        return logits
    chosen = logits[seen]
    out = logits.copy()
    out[seen] = np.where(chosen < 0, chosen * penalty, chosen / penalty)
    return out


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Logits below the k-th largest set to -inf (ties with the k-th kept), as ``TopKLogitsWarper``."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits < kth, -np.inf, logits)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filtering, as ``TopPLogitsWarper``: in ascending order, tokens whose cumulative probability is
    <= 1 - p are set to -inf; the most likely token always stays."""
    if p >= 1.0:
        return logits
    order = np.argsort(logits, kind="stable")
    ordered = logits[order].astype(np.float64)
    probs = np.exp(ordered - ordered[-1])
    cumulative = np.cumsum(probs / probs.sum())
    remove = cumulative <= 1 - p
    remove[-1] = False
    out = logits.copy()
    out[order[remove]] = -np.inf
    return out


class TokenSampler:
    """Chooses one row's next token: repetition penalty, then argmax (greedy) or temperature, top-k, top-p
    and a draw from this row's own random stream (transformers' processor order)."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt: Sequence[int]) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.seen = np.zeros(vocab_size, dtype=bool)
        if params.repetition_penalty != 1.0:
            self.seen[np.asarray(prompt, dtype=np.int64)] = True

    def __call__(self, logits: np.ndarray) -> int:
        params = self.params
        logits = repetition_penalty(logits, self.seen, params.repetition_penalty)
        if params.greedy:
            token = int(np.argmax(logits))
        else:
            logits = top_p_filter(top_k_filter(logits / params.temperature, params.top_k), params.top_p)
            shifted = np.exp(logits.astype(np.float64) - logits.max())
            cumulative = np.cumsum(shifted)
            token = int(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right"))
            token = min(token, logits.shape[-1] - 1)
        self.seen[token] = True
        return token


# --- text ----------------------------------------------------------------------------------------------------


class TextStream:
    """One row's output text as deltas: incremental detokenization, then stop strings.

    A stop string may arrive split over several tokens, so the end of the text that could still begin one
    is held back; the text before the first complete stop string is all that is ever returned.
    """

    def __init__(self, tokenizer: TextTokenizer, stop: Sequence[str]) -> None:
        self._detokenizer = tokenizer.detokenizer()
        self._stop = tuple(stop)
        self._text = ""
        self._sent = 0
        self.stopped = False
        """A stop string was found; no more text will be returned."""

    @property
    def text(self) -> str:
        """The text returned so far."""
        return self._text[:self._sent]

    def push(self, token_id: int) -> str:
        """Add a generated token; returns the text that can be released (sets :attr:`stopped` on a stop string)."""
        if self.stopped:
            return ""
        return self._release(self._detokenizer.push(token_id), final=False)

    def finish(self) -> str:
        """The held-back rest at the end of generation (EOS or length)."""
        if self.stopped:
            return ""
        return self._release(self._detokenizer.flush(), final=True)

    def _release(self, delta: str, *, final: bool) -> str:
        self._text += delta
        if not self._stop:
            start, self._sent = self._sent, len(self._text)
            return self._text[start:]
        hits = [i for s in self._stop if (i := self._text.find(s, self._sent)) >= 0]
        if hits:
            end, self.stopped = min(hits), True
        elif final:
            end = len(self._text)
        else:
            end = len(self._text) - self._held_back()
        start, self._sent = self._sent, max(self._sent, end)
        if self.stopped:
            self._text = self._text[:self._sent]
        return self._text[start:self._sent]

    def _held_back(self) -> int:
        """Length of the longest unreleased suffix that is a proper prefix of a stop string."""
        tail = self._text[self._sent:]
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(tail)), longest, -1):
                if tail.endswith(stop[:size]):
                    longest = size
                    break
        return longest


# --- rows and batches -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenEvent:
    """One step of one request: a generated token and the text it releases, or the end."""

    request_id: int
    token_id: int | None
    """The generated token (``None`` on a final event that only flushes text)."""
    text: str
    """Text released by this token (may be empty while a character or a possible stop string is incomplete)."""
    finish_reason: FinishReason | None = None
    """Set on the request's last event: ``stop`` (EOS or a stop string), ``length`` (max_new_tokens or the
    context length), ``cancelled``."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    """Tokens generated so far (including this one)."""
    logprob: TokenLogprob | None = None
    """This token's log-probability (when ``SamplingParams.logprobs`` asks for it)."""
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    """On a request's first event, when ``SamplingParams.prompt_logprobs`` asks: one per prompt token."""


@dataclass(frozen=True)
class Completion:
    """A finished request."""

    text: str
    token_ids: tuple[int, ...]
    """Generated tokens (EOS included when it ended the output)."""
    finish_reason: FinishReason
    prompt_tokens: int


@dataclass(frozen=True)
class ModelLimits:
    """What the tokenizer and the graph's config say about generation."""

    eos_token_ids: frozenset[int]
    pad_token_id: int
    context_length: int
    """Positions the model was trained for (``max_position_embeddings``): prompt + output never exceed it."""
    vocab_size: int


def model_limits(folder: str | os.PathLike) -> ModelLimits:
    """EOS ids (generation_config.json, else config.json, as transformers' ``generate``), pad id, context length.

    Raises:
        ArtifactError: config.json is missing or unreadable.
    """
    folder = Path(folder)
    config = read_json(folder / "config.json")
    config = config.get("text_config", config) if "max_position_embeddings" not in config else config
    generation = read_json(folder / "generation_config.json") if (folder / "generation_config.json").is_file() else {}
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    eos_ids = frozenset(int(i) for i in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
    pad = generation.get("pad_token_id", config.get("pad_token_id"))
    pad = int(pad if pad is not None else min(eos_ids, default=0))
    context = int(config.get("max_position_embeddings") or config.get("n_positions") or 2048)
    return ModelLimits(eos_token_ids=eos_ids, pad_token_id=pad, context_length=context,
                       vocab_size=int(config["vocab_size"]))


def check_prompt(prompt: Sequence[int], limits: ModelLimits) -> None:
    """Raise :class:`GenerationError` when a prompt is empty, has ids outside the vocabulary, or leaves no
    room for a new token in the context."""
    if not prompt:
        raise GenerationError("the prompt is empty: send at least one token")
    if len(prompt) >= limits.context_length:
        raise GenerationError(f"the prompt has {len(prompt)} tokens; this model's context is {limits.context_length} "
                              "tokens, which must hold the prompt and at least one new token")
    if max(prompt) >= limits.vocab_size or min(prompt) < 0:
        raise GenerationError(f"prompt token ids must be in [0, {limits.vocab_size})")


@dataclass(frozen=True)
class GenerationRequest:
    """A prompt (token ids) and how to continue it."""

    prompt: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: int = 0


class RequestOutput:
    """One request's output as events: its text stream, token count and the rules that end it (EOS, a stop
    string, max_new_tokens, the context length). Shared by our loop and the onnxruntime-genai one."""

    def __init__(self, request: GenerationRequest, tokenizer: TextTokenizer, limits: ModelLimits) -> None:
        self.request = request
        self.limits = limits
        self.text = TextStream(tokenizer, request.params.stop)
        self.generated: list[int] = []
        self.finished = False

    def accept(self, token: int, logprob: TokenLogprob | None = None) -> TokenEvent:
        """Record a generated token; the event carries the released text, ``logprob`` and, at the end, the
        reason."""
        request, params = self.request, self.request.params
        self.generated.append(token)
        reason: FinishReason | None = None
        if token in self.limits.eos_token_ids:
            text, reason = self.text.finish(), "stop"
        else:
            text = self.text.push(token)
            if self.text.stopped:
                reason = "stop"
            elif (len(self.generated) >= params.max_new_tokens
                  or len(request.prompt) + len(self.generated) >= self.limits.context_length):
                text, reason = text + self.text.finish(), "length"
        self.finished = reason is not None
        return TokenEvent(request.request_id, token, text, reason, len(request.prompt), len(self.generated), logprob)

    def end(self, reason: FinishReason) -> TokenEvent:
        """Finish without a token (the runtime stopped early, or the request was cancelled)."""
        self.finished = True
        return TokenEvent(self.request.request_id, None, self.text.finish(), reason, len(self.request.prompt),
                          len(self.generated))


class Row:
    """One request inside a :class:`DecodeBatch`."""

    def __init__(self, request: GenerationRequest, tokenizer: TextTokenizer, limits: ModelLimits,
                 sink: Callable[[TokenEvent], None]) -> None:
        self.request = request
        self.sampler = TokenSampler(request.params, limits.vocab_size, request.prompt)
        self.output = RequestOutput(request, tokenizer, limits)
        self.sink = sink
        self.cancelled = False
        self.prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
        """Set by the prefill when asked for; travels on the row's first event."""

    @property
    def finished(self) -> bool:
        return self.output.finished or self.cancelled


class DecodeBatch:
    """Rows that decode together through one graph with the same adapter; rows join and leave between steps.

    State between steps: ``past`` (the KV cache, [rows, kv_heads, T, head_dim] per tensor), ``mask`` [rows, T]
    (0 on each row's left padding) and ``next_ids`` [rows] (each row's last chosen token, fed next).

    Args:
        decoder: the graph.
        tokenizer: for the text of each row.
        limits: EOS ids, context length, vocab.
        adapter: feeds for adapter inputs (graphs with adapter inputs and no defaults).
        run_options: ``onnxruntime.RunOptions`` (e.g. an active ``LoraAdapter``), passed to every run.
    """

    def __init__(self, decoder: DecoderSession, tokenizer: TextTokenizer, limits: ModelLimits, *,
                 adapter: Mapping[str, np.ndarray] | None = None, run_options=None) -> None:
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.limits = limits
        self.adapter = adapter
        self.run_options = run_options
        self.rows: list[Row] = []
        self.past: tuple[np.ndarray, ...] = ()
        self.mask = np.zeros((0, 0), np.int64)
        self.next_ids = np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, requests: Sequence[GenerationRequest],
            sink: Callable[[TokenEvent], None] | Sequence[Callable[[TokenEvent], None]]) -> list[Row]:
        """Prefill ``requests`` (one left-padded run), emit each one's first token, merge the unfinished ones.

        Args:
            requests: the joining requests.
            sink: receives every event of these rows (one for all, or one per request).

        Returns:
            The new rows (set a row's ``cancelled`` to drop it at the next step, without another event).
        """
        for request in requests:
            check_prompt(request.prompt, self.limits)
        sinks = [sink] * len(requests) if callable(sink) else list(sink)
        rows = [Row(r, self.tokenizer, self.limits, s) for r, s in zip(requests, sinks)]
        if not rows:
            return rows
        length = max(len(r.request.prompt) for r in rows)
        ids = np.full((len(rows), length), self.limits.pad_token_id, np.int64)
        mask = np.zeros((len(rows), length), np.int64)
        for i, row in enumerate(rows):
            prompt = row.request.prompt
            ids[i, length - len(prompt):] = prompt
            mask[i, length - len(prompt):] = 1
        out = self.decoder.step(ids, mask, None, self.adapter, self.run_options)
        for i, row in enumerate(rows):
            if (top := row.request.params.prompt_logprobs) is not None:
                row.prompt_logprobs = prompt_logprobs(out.logits[i, length - len(row.request.prompt):],
                                                      row.request.prompt, top)
        next_ids = self._choose(rows, out.logits[:, -1])
        keep = [i for i, row in enumerate(rows) if not row.finished]
        if len(keep) == len(rows):
            self._merge(rows, out.present, mask, next_ids)
        elif keep:  # rows that ended at their first token (or only scored their prompt) never join the batch
            index = np.asarray(keep, np.int64)
            start = int(mask[index].any(axis=0).argmax())  # columns that were padding for every kept row
            self._merge([rows[i] for i in keep], [p[index][:, :, start:] for p in out.present], mask[index][:, start:],
                        next_ids[index])
        self._drop_finished()
        return rows

    def step(self) -> None:
        """One new token for every running row."""
        if not self.rows:
            return
        mask = np.concatenate([self.mask, np.ones((len(self.rows), 1), np.int64)], axis=1)
        out = self.decoder.step(self.next_ids[:, None], mask, self.past, self.adapter, self.run_options)
        self.past, self.mask = out.present, mask
        self.next_ids = self._choose(self.rows, out.logits[:, -1])
        self._drop_finished()

    def _choose(self, rows: list[Row], logits: np.ndarray) -> np.ndarray:
        chosen = np.zeros(len(rows), np.int64)
        for i, row in enumerate(rows):
            if row.cancelled:
                continue
            params = row.request.params
            if params.max_new_tokens == 0:
                event = row.output.end("length")
            else:
                chosen[i] = token = row.sampler(logits[i])
                logprob = None if params.logprobs is None else token_logprob(logits[i], token, params.logprobs)
                event = row.output.accept(token, logprob)
            if row.prompt_logprobs is not None:
                event, row.prompt_logprobs = dataclasses.replace(event, prompt_logprobs=row.prompt_logprobs), None
            row.sink(event)
        return chosen

    def _merge(self, rows: list[Row], past: Sequence[np.ndarray], mask: np.ndarray, next_ids: np.ndarray) -> None:
        """Append rows with their own KV cache: both sides left-padded (mask 0) to the longer length."""
        if not self.rows:
            self.rows, self.past, self.mask, self.next_ids = list(rows), tuple(past), mask, next_ids
            return
        length = max(self.mask.shape[1], mask.shape[1])

        def pad(array: np.ndarray, axis: int) -> np.ndarray:
            missing = length - array.shape[axis]
            if missing == 0:
                return array
            widths = [(0, 0)] * array.ndim
            widths[axis] = (missing, 0)
            return np.pad(array, widths)

        self.past = tuple(np.concatenate([pad(a, 2), pad(b, 2)], axis=0) for a, b in zip(self.past, past))
        self.mask = np.concatenate([pad(self.mask, 1), pad(mask, 1)], axis=0)
        self.next_ids = np.concatenate([self.next_ids, next_ids])
        self.rows += rows

    def _drop_finished(self) -> None:
        keep = [i for i, row in enumerate(self.rows) if not row.finished]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.past, self.mask, self.next_ids = (), np.zeros((0, 0), np.int64), np.zeros(0, np.int64)
            return
        index = np.asarray(keep)
        mask = self.mask[index]
        start = int(mask.any(axis=0).argmax())  # columns before it are padding for every remaining row
        self.mask = np.ascontiguousarray(mask[:, start:])
        self.past = tuple(np.ascontiguousarray(p[index, :, start:]) for p in self.past)
        self.next_ids = self.next_ids[index]


# --- one-shot generation ---------------------------------------------------------------------------------------


class TextGenerator:
    """Generation from an export folder with our own decoding loop (``adalora-deploy generate``).

    Args:
        decoder: the graph's session.
        tokenizer: the folder's tokenizer.
        limits: from :func:`model_limits`.
    """

    def __init__(self, decoder: DecoderSession, tokenizer: TextTokenizer, limits: ModelLimits) -> None:
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.limits = limits

    @classmethod
    def from_export(cls, export_dir: str | os.PathLike, *, provider: str = "cpu",
                    intra_op_threads: int | None = None) -> TextGenerator:
        """Open ``model.onnx``, the tokenizer and the limits of an export folder."""
        folder = Path(export_dir)
        if not (folder / MODEL_FILE).is_file():
            raise ArtifactError(f"{folder} has no model.onnx: pass a folder written by `adalora-deploy export`")
        session = create_session(folder / MODEL_FILE, provider=provider, intra_op_threads=intra_op_threads)
        return cls(DecoderSession(session), TextTokenizer.from_folder(folder), model_limits(folder))

    def batch(self, **adapter) -> DecodeBatch:
        """An empty :class:`DecodeBatch` over this generator's graph (``adapter=``, ``run_options=``)."""
        return DecodeBatch(self.decoder, self.tokenizer, self.limits, **adapter)

    def stream(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams], *,
               adapter: Mapping[str, np.ndarray] | None = None, run_options=None) -> Iterator[TokenEvent]:
        """Generate for every prompt at once (a left-padded batch); yields events as tokens come.

        Args:
            prompts: token ids per prompt; event ``request_id`` is the prompt's index.
            params: one for all prompts, or one per prompt.
        """
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise GenerationError(f"{len(prompts)} prompts but {len(params)} sampling parameter sets")
        requests = [GenerationRequest(tuple(int(t) for t in p), q, i) for i, (p, q) in enumerate(zip(prompts, params))]
        events: list[TokenEvent] = []
        batch = self.batch(adapter=adapter, run_options=run_options)
        batch.add(requests, events.append)
        yield from events
        while len(batch):
            events.clear()
            batch.step()
            yield from events

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams], *,
                 adapter: Mapping[str, np.ndarray] | None = None, run_options=None) -> list[Completion]:
        """Like :meth:`stream`, collected into one :class:`Completion` per prompt."""
        return collect(self.stream(prompts, params, adapter=adapter, run_options=run_options), prompts)


def collect(events: Iterator[TokenEvent], prompts: Sequence[Sequence[int]]) -> list[Completion]:
    """Completions (in prompt order) from a stream of events whose ``request_id`` is the prompt index."""
    texts = [""] * len(prompts)
    tokens: list[list[int]] = [[] for _ in prompts]
    reasons: list[FinishReason | None] = [None] * len(prompts)
    for event in events:
        texts[event.request_id] += event.text
        if event.token_id is not None:
            tokens[event.request_id].append(event.token_id)
        if event.finish_reason is not None:
            reasons[event.request_id] = event.finish_reason
    return [Completion(text=t, token_ids=tuple(ids), finish_reason=r or "length", prompt_tokens=len(p))
            for t, ids, r, p in zip(texts, tokens, reasons, prompts)]
