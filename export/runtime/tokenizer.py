"""The export folder's tokenizer without transformers: ``tokenizer.json`` through the Rust ``tokenizers``
library, chat templates rendered with jinja2 the way transformers renders them.

Serving installs only onnxruntime, ``tokenizers``, jinja2 and the HTTP framework, so this module imports
neither torch nor transformers. What it reproduces from transformers (a test compares both on the same
folders):

* ``encode(text)`` = ``AutoTokenizer(text).input_ids``: the post-processor in ``tokenizer.json`` adds the
  special tokens (BOS) exactly as the fast tokenizer does.
* ``render_chat(messages)`` = ``apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``:
  a sandboxed jinja2 environment with ``trim_blocks``/``lstrip_blocks``, the ``tojson`` filter,
  ``raise_exception``/``strftime_now`` globals and the special tokens as variables; the rendered text is
  then encoded without special tokens (the template writes them).
* ``decode(ids)`` skips special tokens, as OpenAI-style text output does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

from adalora_deploy.errors import ArtifactError, UserError, require

__all__ = ["ChatTemplateError", "IncrementalDetokenizer", "TextTokenizer"]

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(UserError, ValueError):
    """Messages the chat template refuses (its own ``raise_exception``), or a folder without a template."""


def _token_text(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string or ``{"content": ...}``."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{path} is not valid JSON ({error})") from None
    return data if isinstance(data, dict) else {}


def _find_chat_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    """transformers 5 writes ``chat_template.jinja``; older folders keep it in tokenizer_config.json (a string,
    or a list of named templates of which ``default`` is used) or in ``chat_template.json``."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template") or _read_json(folder / "chat_template.json").get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, Mapping)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _compile_template(source: str):
    """A jinja2 template in the environment transformers uses for chat templates (sandboxed: templates
    shipped with model folders are untrusted code)."""
    jinja2 = require("jinja2", "serve", "rendering chat templates")
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker): rendered as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which would change what the model reads
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[GenerationBlock, loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return environment.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as error:
        raise ArtifactError(f"the chat template does not parse: {error}") from None


@dataclass(frozen=True)
class _Specials:
    tokens: dict[str, str]
    """``bos_token`` ... ``pad_token`` -> their text (the variables a chat template sees)."""
    ids: frozenset[int]
    """Ids of every special (and added special) token: skipped when decoding."""


class TextTokenizer:
    """The tokenizer of an export (or model) folder: encode, decode, chat template.

    Args:
        tokenizer: a ``tokenizers.Tokenizer``.
        special_tokens: ``bos_token``/``eos_token``/... -> text, from tokenizer_config.json.
        chat_template: jinja2 source, or ``None`` when the folder has none.
    """

    def __init__(self, tokenizer, *, special_tokens: Mapping[str, str], chat_template: str | None) -> None:
        self.tokenizer = tokenizer
        self.special_tokens = dict(special_tokens)
        self.chat_template = chat_template
        self._template = _compile_template(chat_template) if chat_template else None
        added = tokenizer.get_added_tokens_decoder()
        ids = {i for i, token in added.items() if token.special}
        ids |= {i for text in self.special_tokens.values() if (i := tokenizer.token_to_id(text)) is not None}
        self.special_ids = frozenset(ids)
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> TextTokenizer:
        """Read ``tokenizer.json``, ``tokenizer_config.json`` (and ``special_tokens_map.json``, the chat template).

        Raises:
            ArtifactError: no ``tokenizer.json`` (slow-only tokenizers are not supported without transformers).
            MissingDependencyError: ``tokenizers`` is not installed.
        """
        folder = Path(folder)
        tokenizers = require("tokenizers", "serve", "tokenizing text without transformers")
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ArtifactError(f"{folder} has no tokenizer.json (the fast tokenizer file); save the model's tokenizer "
                                "with a transformers fast tokenizer and re-export")
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # the Rust library raises a bare Exception for malformed files
            raise ArtifactError(f"{path} cannot be read by tokenizers: {error}") from None
        config = _read_json(folder / "tokenizer_config.json")
        specials = {}
        for source in (_read_json(folder / "special_tokens_map.json"), config):
            for key in _SPECIAL_TOKEN_KEYS:
                if (text := _token_text(source.get(key))) is not None:
                    specials[key] = text
        return cls(tokenizer, special_tokens=specials, chat_template=_find_chat_template(folder, config))

    def token_id(self, text: str) -> int | None:
        """The id of one token's text (``None`` if it is not a single token)."""
        return self.tokenizer.token_to_id(text)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` applies the post-processor (BOS), as transformers does."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (special tokens skipped by default)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """The chat template applied to ``messages`` (``[{"role": ..., "content": ...}, ...]``).

        Raises:
            ChatTemplateError: the folder has no chat template, or the template rejects the messages.
        """
        if self._template is None:
            raise ChatTemplateError("this model has no chat template (no chat_template.jinja and none in "
                                    "tokenizer_config.json): send plain prompts instead")
        import jinja2

        try:
            return self._template.render(messages=[dict(m) for m in messages],
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.exceptions.TemplateError as error:
            raise ChatTemplateError(f"the chat template rejected the messages: {error}") from None

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat (no special tokens added: the template writes them)."""
        return self.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt),
                           add_special_tokens=False)

    def detokenizer(self) -> IncrementalDetokenizer:
        """A fresh streaming decoder for one sequence of generated tokens."""
        return IncrementalDetokenizer(self)


class IncrementalDetokenizer:
    """Text deltas of a growing token sequence, each complete UTF-8 (byte-level tokens that split a character
    are held until the character is whole).

    Decodes a short window (from a few tokens before the last emitted position) instead of the whole
    sequence each step, so streaming costs O(1) per token; the concatenated deltas equal
    ``decode(all tokens)`` (a test checks it on multi-byte text).
    """

    _CONTEXT = 6
    """Tokens decoded before the first unemitted one, so merges across the boundary (leading spaces of
    SentencePiece pieces, multi-token characters) decode as in the full sequence."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        """Start of the decoding window."""
        self._read = 0
        """Tokens whose text has been emitted."""

    def push(self, token_id: int) -> str:
        """Add one token; returns the text it completes (possibly empty)."""
        self._ids.append(int(token_id))
        decode = self._tokenizer.decode
        emitted = decode(self._ids[self._prefix:self._read])
        full = decode(self._ids[self._prefix:])
        if len(full) <= len(emitted) or full.endswith("\ufffd") or not full.startswith(emitted):
            return ""
        self._read = len(self._ids)
        self._prefix = max(0, self._read - self._CONTEXT)
        return full[len(emitted):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end), as decode would show it."""
        decode = self._tokenizer.decode
        emitted = decode(self._ids[self._prefix:self._read])
        full = decode(self._ids[self._prefix:])
        self._read = len(self._ids)
        return full[len(emitted):] if full.startswith(emitted) else ""
