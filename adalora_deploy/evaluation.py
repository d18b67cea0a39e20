"""What a user sees of a model: task accuracy, perplexity and next-token agreement, on torch or on a graph.

Two inputs are scored the same way:

- the job's held-out examples (:func:`evaluate_examples`: tokenized exactly as training tokenizes them):
  held-out loss per label token (what training minimizes) and, for classification tasks
  (``task.choices``), choice accuracy: at the last prompt position the highest logit among the choices'
  first tokens must be the token the example's completion starts with;
- an eval file (:func:`evaluate`, ``check --eval FILE``; format below).

Every function takes a *logits function* ``(input_ids, attention_mask) -> logits`` (numpy, left-padded
batches, position ids from the mask as transformers' ``generate`` makes them), so the same code scores
a torch model (:func:`torch_logits`) and an exported ONNX graph (:func:`graph_logits`, any object with
``DecoderSession.step``) and the two results can be compared number for number.

Eval file (``--eval FILE``), JSON Lines; two kinds of line, in any mix::

    {"prompt": "Review: a gorgeous, witty film\\nSentiment:", "choices": [" negative", " positive"], "label": 1}
    {"text": "Any passage of text; scored for perplexity."}

- Task lines: the model's answer is the choice whose first token has the largest next-token logit after
  the prompt (the choices' first tokens must differ); accuracy = fraction of answers equal to ``label``
  (0-based index into ``choices``). This is how the sentiment task is scored: logit of " positive" vs
  " negative".
- Perplexity: ``exp`` of the mean next-token negative log-likelihood over the ``text`` lines, or, when the
  file has none, over the task lines written out as the prompt's tokens followed by the correct choice's;
  texts (and prompts) are cut to :data:`MAX_TEXT_TOKENS` tokens.

Agreement text (:func:`agreement_ids`): a few hundred token positions of real text, for comparing the
next-token distributions of two models position by position. Default: the packaged held-out passage
(``adalora_deploy/assets/heldout.txt``, never used for training or calibration).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from adalora_deploy.errors import DataError

__all__ = [
    "AGREEMENT_POSITIONS",
    "AGREEMENT_SEQ_LEN",
    "HELDOUT_TEXT",
    "MAX_TEXT_TOKENS",
    "EvalResult",
    "EvalSet",
    "HeldOutResult",
    "LogitsFn",
    "TailLogitsFn",
    "TaskExample",
    "agreement_ids",
    "batched_logits",
    "choice_tokens",
    "evaluate",
    "evaluate_examples",
    "graph_logits",
    "left_pad",
    "read_eval_file",
    "torch_logits",
]

LogitsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``(input_ids int64 [batch, seq], attention_mask int64 [batch, seq]) -> logits float32 [batch, seq, vocab]``."""
TailLogitsFn = Callable[..., np.ndarray]
"""A :data:`LogitsFn` that also takes ``last=k``: the logits of the last ``k`` positions only, ``[batch, k, vocab]``
(:func:`torch_logits`, :func:`graph_logits`); :func:`evaluate_examples` asks for the positions its labels need."""

HELDOUT_TEXT = Path(str(resources.files("adalora_deploy") / "assets" / "heldout.txt"))
"""Packaged English passage kept out of every training and calibration default."""
AGREEMENT_POSITIONS = 512
"""Token positions compared by default: the standard error of a top-1 agreement near 0.95 is then
sqrt(0.95 * 0.05 / 512) = 0.01, small beside the 0.05 of disagreement the lossy tier allows."""
AGREEMENT_SEQ_LEN = 128
"""Tokens per agreement row (each row is an independent window; a long row would only cost memory)."""
MAX_TEXT_TOKENS = 256
"""Perplexity texts are cut to this many tokens."""
IGNORE = -100
"""Label of a position that is not scored (prompt and padding), as in training."""


@dataclass(frozen=True)
class TaskExample:
    """One multiple-choice question: answered by the next-token logits of each choice's first token."""

    prompt: str
    choices: tuple[str, ...]
    label: int
    """Index of the correct choice."""


@dataclass(frozen=True)
class EvalSet:
    """The content of an eval file."""

    tasks: tuple[TaskExample, ...]
    texts: tuple[str, ...]
    """Perplexity texts (``text`` lines; the labelled task lines when there are none)."""
    source: str = ""

    @property
    def perplexity_texts(self) -> tuple[str, ...]:
        """The ``text`` lines, else the task lines written out (prompt + correct choice)."""
        return self.texts or tuple(t.prompt + t.choices[t.label] for t in self.tasks)


@dataclass(frozen=True)
class EvalResult:
    """Accuracy and perplexity of one model on one :class:`EvalSet`."""

    accuracy: float | None
    """Fraction of task lines answered correctly (``None`` without task lines)."""
    answers: tuple[int, ...]
    """The chosen index of every task line, in file order."""
    perplexity: float
    num_tokens: int
    """Next-token predictions the perplexity averages over."""

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "examples": len(self.answers), "perplexity": self.perplexity,
                "tokens": self.num_tokens}


@dataclass(frozen=True)
class HeldOutResult:
    """Held-out loss and choice accuracy of one model on the job's held-out examples."""

    loss: float
    """Mean negative log-likelihood per label token (nats)."""
    accuracy: float | None
    """Fraction of examples whose highest choice logit is the true choice (None without choices)."""
    examples: int
    tokens: int
    """Label tokens the loss averages over."""
    answers: tuple[int, ...] = ()
    """The chosen choice (index into the choices) of every example, in order (empty without choices)."""
    labels: tuple[int, ...] = ()
    """The true choice of every example (-1: its completion starts with none of the choices' tokens)."""

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "perplexity": self.perplexity, "accuracy": self.accuracy,
                "examples": self.examples, "tokens": self.tokens, "answers": list(self.answers),
                "labels": list(self.labels)}


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


def read_eval_file(path: str | Path) -> EvalSet:
    """Parse an eval file (format in the module docstring).

    Raises:
        DataError: a missing file or a malformed line (the message names the line).
    """
    # lazy: adalora_deploy.data imports torch; graph evaluation (the job, serving) stays torch-free
    from adalora_deploy.data.sources import jsonl_lines

    path = Path(path)
    if not path.is_file():
        raise DataError(f"eval file not found: {path}")
    tasks: list[TaskExample] = []
    texts: list[str] = []
    for number, record in jsonl_lines(path):
        where = f"{path}:{number}"
        if "prompt" in record:
            prompt, choices, label = record.get("prompt"), record.get("choices"), record.get("label")
            if not isinstance(prompt, str) or not isinstance(choices, list) or len(choices) < 2 \
                    or not all(isinstance(c, str) and c for c in choices):
                raise DataError(f'{where}: a task line needs "prompt" (string) and "choices" (two or more '
                                'non-empty strings)')
            if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
                raise DataError(f'{where}: "label" must be the index of the correct choice (0..{len(choices) - 1})')
            tasks.append(TaskExample(prompt, tuple(choices), label))
        elif isinstance(record.get("text"), str):
            texts.append(record["text"])
        else:
            raise DataError(f'{where}: expected a task line ("prompt", "choices", "label") or a "text" line')
    if not tasks and not texts:
        raise DataError(f"{path} holds no task or text line")
    return EvalSet(tasks=tuple(tasks), texts=tuple(texts), source=str(path))


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """int64 ``input_ids`` and ``attention_mask`` ``[len(rows), longest]``, rows aligned to the right."""
    width = max(len(row) for row in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = row
            mask[i, width - len(row):] = 1
    return ids, mask


def torch_logits(model: Any) -> TailLogitsFn:
    """The logits function of a transformers causal LM (no cache; position ids from the mask). With ``last=k``
    the lm_head runs on the last ``k`` positions only (transformers' ``logits_to_keep``: the same numbers there)."""
    import torch

    def run(input_ids: np.ndarray, attention_mask: np.ndarray, last: int | None = None) -> np.ndarray:
        device = next(model.parameters()).device
        ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64)).to(device)
        mask = torch.from_numpy(np.asarray(attention_mask, dtype=np.int64)).to(device)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        keep = {} if last is None else {"logits_to_keep": int(last)}
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **keep)
        finally:
            model.train(training)
        logits = out.logits.float().cpu().numpy()
        return logits if last is None else logits[:, -int(last):]

    return run


def graph_logits(decoder: Any, adapter: dict[str, np.ndarray] | None = None) -> TailLogitsFn:
    """The logits function of an exported graph (a :class:`adalora_deploy.export.runtime.session.DecoderSession`);
    ``last=k`` slices the last ``k`` positions of the graph's logits (it computes them all)."""

    def run(input_ids: np.ndarray, attention_mask: np.ndarray, last: int | None = None) -> np.ndarray:
        logits = np.asarray(decoder.step(input_ids, attention_mask, None, adapter).logits, dtype=np.float32)
        return logits if last is None else logits[:, -int(last):]

    return run


def batched_logits(logits: LogitsFn, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                   batch_size: int = 4) -> np.ndarray:
    """``logits`` over rows in batches of ``batch_size`` (bounds activation memory), concatenated."""
    if attention_mask is None:
        attention_mask = np.ones_like(input_ids)
    parts = [logits(input_ids[i:i + batch_size], attention_mask[i:i + batch_size])
             for i in range(0, len(input_ids), batch_size)]
    return np.concatenate(parts, axis=0)


def _pad_id(tokenizer: Any) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def _choice_token(tokenizer: Any, choice: str) -> int:
    ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DataError(f"choice {choice!r} tokenizes to nothing")
    return int(ids[0])


def _log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``log softmax(logits)[..., target]`` in float64, rows ``[n, vocab]``."""
    x = logits.astype(np.float64)
    top = x.max(-1, keepdims=True)
    log_z = np.log(np.exp(x - top).sum(-1)) + top[:, 0]
    return x[np.arange(len(x)), targets] - log_z


def evaluate(logits: LogitsFn, tokenizer: Any, eval_set: EvalSet, *, batch_size: int = 8) -> EvalResult:
    """Task accuracy and perplexity of one model (scoring rules in the module docstring).

    Each task line costs one forward pass over ``prompt + choices[label]`` (tokenized separately, then
    joined): the logits at the prompt's last token answer the question, and the whole row's next-token
    log-likelihoods feed the perplexity when the file has no ``text`` lines.

    Raises:
        DataError: two choices of a task line share their first token.
    """
    pad = _pad_id(tokenizer)
    answers: list[int] = []
    nll, count = 0.0, 0
    tasks = eval_set.tasks
    for start in range(0, len(tasks), batch_size):
        chunk = tasks[start:start + batch_size]
        prompts = [tokenizer(t.prompt, add_special_tokens=False)["input_ids"][-MAX_TEXT_TOKENS:] for t in chunk]
        golds = [tokenizer(t.choices[t.label], add_special_tokens=False)["input_ids"] for t in chunk]
        ids, mask = left_pad([p + g for p, g in zip(prompts, golds)], pad)
        out = logits(ids, mask)
        for row, (task, gold) in enumerate(zip(chunk, golds)):
            tokens = [_choice_token(tokenizer, c) for c in task.choices]
            if len(set(tokens)) != len(tokens):
                raise DataError(f"the choices {list(task.choices)} share a first token; make them start differently")
            answers.append(int(np.argmax(out[row, ids.shape[1] - len(gold) - 1, tokens])))
        if not eval_set.texts:
            step_nll, step_count = _nll(out, ids, mask)
            nll, count = nll + step_nll, count + step_count
    accuracy = (sum(a == t.label for a, t in zip(answers, tasks)) / len(tasks)) if tasks else None

    for start in range(0, len(eval_set.texts), batch_size):
        rows = [tokenizer(text, add_special_tokens=False)["input_ids"][:MAX_TEXT_TOKENS]
                for text in eval_set.texts[start:start + batch_size]]
        rows = [row for row in rows if len(row) >= 2]
        if rows:
            ids, mask = left_pad(rows, pad)
            step_nll, step_count = _nll(logits(ids, mask), ids, mask)
            nll, count = nll + step_nll, count + step_count
    perplexity = math.exp(nll / count) if count else math.nan
    return EvalResult(accuracy=accuracy, answers=tuple(answers), perplexity=perplexity, num_tokens=count)


def _nll(out: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over the non-pad positions of a left-padded batch."""
    predict = mask[:, :-1].astype(bool) & mask[:, 1:].astype(bool)
    return -float(_log_softmax_at(out[:, :-1][predict], ids[:, 1:][predict]).sum()), int(predict.sum())


def agreement_ids(tokenizer: Any, text: str | Path | None = None, *, positions: int = AGREEMENT_POSITIONS,
                  seq_len: int = AGREEMENT_SEQ_LEN) -> np.ndarray:
    """int64 ``[rows, seq_len]`` windows of real text, about ``positions`` tokens in all.

    Args:
        tokenizer: the model's tokenizer.
        text: a ``.txt``/``.jsonl`` file (``text`` lines) or an eval file (its texts, else its task lines
            written out); ``None``: the packaged held-out passage.
        positions: token positions wanted (fewer when the text is shorter).
        seq_len: tokens per row (shorter rows when the text is short).

    Raises:
        DataError: an unreadable file, or fewer than 2 tokens of text.
    """
    # lazy: adalora_deploy.data imports torch; graph evaluation (the job, serving) stays torch-free
    from adalora_deploy.data import read_texts

    if text is None:
        documents = [HELDOUT_TEXT.read_text(encoding="utf-8")]
    else:
        try:
            documents = list(read_texts(text))
        except DataError:
            documents = list(read_eval_file(text).perplexity_texts)
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for document in documents:
        ids.extend(tokenizer(document, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(int(eos))
        if len(ids) >= positions:
            break
    ids = ids[:positions]
    if len(ids) < 2:
        raise DataError(f"{text or HELDOUT_TEXT} has fewer than 2 tokens")
    seq_len = min(seq_len, len(ids))
    rows = len(ids) // seq_len
    return np.asarray(ids[: rows * seq_len], dtype=np.int64).reshape(rows, seq_len)


def evaluate_examples(logits: TailLogitsFn, examples: Sequence[Any], *, choices: Sequence[int] | None = None,
                      pad_id: int = 0, batch_size: int = 8) -> HeldOutResult:
    """Held-out loss and, with ``choices`` (first tokens, from :func:`choice_tokens`), choice accuracy.

    Rows are left-padded, so every example's labels (its completion) are its last tokens: the logits are asked
    for the positions from the one before the batch's earliest label on (``last``), which spares the lm_head
    most of the prompt (SmolLM2's 49152-token head: 45 -> 36 s for the job's 200 examples in torch).

    Args:
        logits: the model (:func:`torch_logits`, :func:`graph_logits`).
        examples: :class:`adalora_deploy.data.Example` s (ids and labels as training made them).
        choices: token id of each choice; an example's true choice is the one its first label token is.
        pad_id: left-padding id (masked out).
        batch_size: examples per forward pass.
    """
    if not examples:
        raise DataError("no held-out examples to evaluate on (set data.eval_size or data.eval)")
    tokens = None if choices is None else np.asarray(choices)
    total, count, correct = 0.0, 0, 0
    answers: list[int] = []
    truth: list[int] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        ids, mask = left_pad([e.input_ids for e in chunk], pad_id)
        labels, _ = left_pad([e.labels for e in chunk], IGNORE)
        seq = labels.shape[1]
        labelled = labels != IGNORE
        # positions seq - tail .. seq - 2 predict every label (a row without labels asks for nothing of its own)
        tail = min(seq, seq - int(labelled.argmax(-1)[labelled.any(-1)].min(initial=seq)) + 1)
        shifted = np.asarray(logits(ids, mask, last=tail), dtype=np.float32)[:, :-1]
        target = labels[:, seq - tail + 1:]
        keep = target != IGNORE
        total -= float(_log_softmax_at(shifted[keep], target[keep]).sum())
        count += int(keep.sum())
        if tokens is not None:
            first = keep.argmax(-1)  # position predicting each row's first label token
            rows = np.arange(len(chunk))
            chosen = shifted[rows, first][:, tokens].argmax(-1)
            answers += chosen.tolist()
            truth += [int(np.flatnonzero(tokens == token)[0]) if token in tokens else -1
                      for token in target[rows, first].tolist()]
            correct += int((tokens[chosen] == target[rows, first]).sum())
    accuracy = None if tokens is None else correct / len(examples)
    return HeldOutResult(loss=total / max(count, 1), accuracy=accuracy, examples=len(examples), tokens=count,
                         answers=tuple(answers), labels=tuple(truth))
