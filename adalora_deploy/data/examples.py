"""Records -> token ids and labels, with the loss where the format says it belongs.

Three formats (``data.format``; ``auto`` picks by the record's fields, or by the templates given):

    text               {"text": ...}                        loss on every token (+ EOS)
    prompt_completion  {"prompt": ..., "completion": ...}   loss on the completion (+ EOS) only
    messages           {"messages": [{"role", "content"}]}  the tokenizer's chat template; loss on the
                                                             assistant turns only

Records from CSV/parquet or with other field names are turned into these with ``data.where`` (keep rows
whose fields equal the given values), ``data.map`` (replace field values, e.g. ``0 -> negative``) and the
templates ``data.text`` / ``data.prompt`` / ``data.completion`` (Python format strings over the record's
fields). With ``data.chat`` a prompt/completion pair becomes a user/assistant exchange rendered with the
chat template (and ``data.system`` as the system message).

Labels are ``-100`` (ignored by the loss) wherever no loss belongs. Examples longer than ``seq_len`` lose
prompt tokens from the left, so the completion survives whole; an example whose last completion does not
fit beside at least one prompt token is dropped and counted (training on a fragment of an answer without
its question teaches the wrong thing), and no example left is an error.
"""

from __future__ import annotations

import logging
import random
import string
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

from adalora_deploy.errors import DataError

from .sources import read_records

__all__ = ["IGNORE", "Example", "TrainingData", "build_training_data", "render_records", "tokenize_records"]

logger = logging.getLogger(__name__)

IGNORE = -100
"""Label of tokens that carry no loss (transformers' and PyTorch's ``ignore_index``)."""
Format = Literal["text", "prompt_completion", "messages"]


@dataclass(frozen=True)
class Example:
    """One tokenized example."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    """Same length; :data:`IGNORE` where no loss belongs."""

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


@dataclass(frozen=True)
class TrainingData:
    """A run's examples: what it trains on and what it holds out."""

    format: Format
    train: tuple[Example, ...]
    eval: tuple[Example, ...]
    """Held-out examples (empty when the config holds none out)."""
    eval_records: tuple[dict[str, Any], ...]
    """The held-out records as rendered (``prompt``/``completion``, ``messages`` or ``text``), for task evaluation."""
    dropped: int
    """Examples dropped because truncation to ``seq_len`` left no label token."""


def _fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _fill(template: str, record: Mapping[str, Any], where: str) -> str:
    try:
        return template.format_map(record)
    except KeyError as error:
        raise DataError(f"{where}: the template {template!r} uses the field {error.args[0]!r}, which the record lacks "
                        f"(fields: {', '.join(map(str, record))})") from None
    except (ValueError, IndexError) as error:
        raise DataError(f"{where}: the template {template!r} is not a valid format string ({error})") from None


def _matches(record: Mapping[str, Any], where: Mapping[str, Any]) -> bool:
    return all(str(record.get(key)) == str(value) for key, value in where.items())


def render_records(records: Sequence[Mapping[str, Any]], *, format: str = "auto", where: Mapping[str, Any] | None = None,
                   value_map: Mapping[str, Mapping[Any, Any]] | None = None, text: str | None = None,
                   prompt: str | None = None, completion: str | None = None, chat: bool = False,
                   system: str | None = None, source: str = "data") -> tuple[Format, list[dict[str, Any]]]:
    """Filter, map and template raw records into one of the three formats.

    Returns:
        ``(format, rendered)``: each rendered record has ``text``, or ``prompt``+``completion``, or ``messages``.

    Raises:
        DataError: no record left, a record the format cannot read, or a template field that is missing.
    """
    where = dict(where or {})
    value_map = {key: {str(k): v for k, v in mapping.items()} for key, mapping in (value_map or {}).items()}
    kept = [r for r in records if _matches(r, where)] if where else list(records)
    if not kept:
        raise DataError(f"{source}: no record has {where}" if where else f"{source}: no records")
    if format == "auto":
        if text is not None:
            format = "text"
        elif prompt is not None or completion is not None:
            format = "prompt_completion"
        else:
            first = kept[0]
            format = ("messages" if "messages" in first else "prompt_completion" if {"prompt", "completion"} <= set(first)
                      else "text" if "text" in first else "")
            if not format:
                raise DataError(f"{source}: records have fields {', '.join(map(str, first))}; expected text, prompt + "
                                "completion, or messages (or set data.prompt / data.completion / data.text templates)")
    rendered = []
    for number, raw in enumerate(kept, start=1):
        record = {key: value_map[key].get(str(value), value) if key in value_map else value for key, value in raw.items()}
        at = f"{source}: record {number}"
        if format == "text":
            value = _fill(text, record, at) if text is not None else record.get("text")
            if not isinstance(value, str):
                raise DataError(f'{at}: needs a string "text" field (or a data.text template)')
            rendered.append({"text": value})
        elif format == "prompt_completion":
            p = _fill(prompt, record, at) if prompt is not None else record.get("prompt")
            c = _fill(completion, record, at) if completion is not None else record.get("completion")
            if not isinstance(p, str) or not isinstance(c, str):
                raise DataError(f'{at}: needs string "prompt" and "completion" fields (or data.prompt / '
                                "data.completion templates)")
            if chat:
                messages = ([{"role": "system", "content": system}] if system else []) + [
                    {"role": "user", "content": p}, {"role": "assistant", "content": c}]
                rendered.append({"prompt": p, "completion": c, "messages": messages})
            else:
                rendered.append({"prompt": p, "completion": c})
        elif format == "messages":
            messages = record.get("messages")
            if (not isinstance(messages, list) or not messages
                    or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                               for m in messages)):
                raise DataError(f'{at}: "messages" must be a non-empty list of {{"role", "content"}} objects')
            if not any(m["role"] == "assistant" for m in messages):
                raise DataError(f"{at}: no assistant turn, so nothing to learn from")
            rendered.append({"messages": messages})
        else:
            raise DataError(f"{source}: unknown data.format {format!r}; use auto, text, prompt_completion or messages")
    return format, rendered  # type: ignore[return-value]


def _chat_ids(tokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                        return_dict=False)
    return list(ids)


def _messages_example(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and labels that keep only the assistant turns."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("the messages format (and data.chat) needs a tokenizer with a chat template; this one has none")
    ids = _chat_ids(tokenizer, messages, False)
    labels = [IGNORE] * len(ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _chat_ids(tokenizer, messages[:index], True)
        through = _chat_ids(tokenizer, messages[: index + 1], False)
        if ids[: len(through)] != through or through[: len(prefix)] != prefix:
            raise DataError("the chat template does not render conversations prefix by prefix; cannot find the "
                            "assistant turns to train on")
        labels[len(prefix): len(through)] = through[len(prefix):]
    return ids, labels


def _last_labelled_run(labels: Sequence[int]) -> int | None:
    """Index where the last run of labelled tokens starts (None when no token is labelled)."""
    end = len(labels)
    while end and labels[end - 1] == IGNORE:
        end -= 1
    if not end:
        return None
    start = end
    while start and labels[start - 1] != IGNORE:
        start -= 1
    return start


def tokenize_records(rendered: Sequence[Mapping[str, Any]], format: Format, tokenizer,
                     seq_len: int) -> tuple[list[Example], int]:
    """Token ids and labels of rendered records (see the module docstring); returns ``(examples, dropped)``."""
    eos = tokenizer.eos_token_id
    examples, dropped = [], 0
    for record in rendered:
        if format == "text":
            ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            labels = list(ids)
        elif "messages" in record:
            ids, labels = _messages_example(tokenizer, record["messages"])
        else:
            prompt = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
            completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
            completion = completion + ([eos] if eos is not None else [])
            ids, labels = prompt + completion, [IGNORE] * len(prompt) + completion
        if format != "text" and len(ids) > seq_len:
            # Keep the end: the last completion (assistant turn) is what the example teaches. If it does not
            # fit with at least one token of its prompt, the example cannot be learned from: drop it.
            last = _last_labelled_run(labels)
            if last is None or len(ids) - last >= seq_len:
                dropped += 1
                continue
            ids, labels = ids[-seq_len:], labels[-seq_len:]
        example = Example(tuple(ids), tuple(labels))
        if example.trained_tokens == 0:
            dropped += 1
            continue
        examples.append(example)
    return examples, dropped


def build_training_data(data, tokenizer, *, seq_len: int, seed: int) -> TrainingData:
    """Read, render, split and tokenize a run's data (``data`` is a :class:`adalora_deploy.config.DataConfig`).

    The held-out set is ``data.eval`` when given, else ``data.eval_size`` records drawn from the training
    file with the run's seed (disjoint from what is trained on). ``data.limit`` keeps that many training records.

    Raises:
        DataError: unreadable files, records the format cannot use, or no example left after truncation.
    """
    options = dict(format=data.format, where=data.where, value_map=data.map, text=data.text, prompt=data.prompt,
                   completion=data.completion, chat=data.chat, system=data.system)
    format, train_records = render_records(read_records(data.train), source=str(data.train), **options)
    order = list(range(len(train_records)))
    random.Random(seed).shuffle(order)
    if data.eval is not None:
        _, eval_records = render_records(read_records(data.eval), source=str(data.eval), **options)
    elif data.eval_size and format != "text":
        if data.eval_size >= len(train_records):
            raise DataError(f"data.eval_size = {data.eval_size} leaves nothing to train on ({len(train_records)} records)")
        eval_records = [train_records[i] for i in order[: data.eval_size]]
        order = order[data.eval_size:]
    else:
        eval_records = []
    if format == "text":
        kept = train_records  # documents stay in file order; blocks are shuffled by the batches
    else:
        kept = [train_records[i] for i in order][: data.limit]
    train, dropped = tokenize_records(kept, format, tokenizer, seq_len)
    held_out, _ = tokenize_records(eval_records, format, tokenizer, seq_len)
    if format == "text" and data.eval_size and data.eval is None:
        train, held_out = _split_text_blocks(train, data.eval_size, seq_len)
    if not train:
        raise DataError(f"{data.train}: no example fits in train.seq_len = {seq_len} tokens with its completion whole "
                        f"({dropped} dropped); raise train.seq_len or shorten the completions")
    if dropped:
        logger.warning("%d of %d examples dropped: their completion does not fit in seq_len=%d with its prompt",
                       dropped, len(kept), seq_len)
    return TrainingData(format=format, train=tuple(train), eval=tuple(held_out),
                        eval_records=tuple(eval_records), dropped=dropped)


def _split_text_blocks(examples: list[Example], eval_blocks: int, seq_len: int) -> tuple[list[Example], list[Example]]:
    """Raw text: hold out the last ``eval_blocks`` blocks of ``seq_len`` tokens of the joined documents."""
    ids = [token for example in examples for token in example.input_ids]
    blocks = [tuple(ids[i:i + seq_len]) for i in range(0, len(ids) - seq_len + 1, seq_len)]
    if eval_blocks >= len(blocks):
        raise DataError(f"data.eval_size = {eval_blocks} blocks leaves nothing to train on ({len(blocks)} blocks of "
                        f"{seq_len} tokens)")
    cut = len(blocks) - eval_blocks
    return ([Example(b, b) for b in blocks[:cut]], [Example(b, b) for b in blocks[cut:]])
