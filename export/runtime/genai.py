"""onnxruntime-genai compatibility: ``genai_config.json`` for every export, and generation through
``og.Model`` / ``og.Generator`` / ``og.Adapters`` (the runtime Microsoft's own model builder targets).

Our graph already follows the builder's naming (``input_ids``, ``attention_mask``,
``past_key_values.%d.key``, ``present.%d.key``, ``logits``), so the config only describes it. Two things
differ from builder graphs and are said in the config:

* the graph returns presents that are ``past`` with the new positions concatenated (it is not a
  GroupQueryAttention graph that writes into a preallocated buffer), so ``past_present_share_buffer`` is
  false;
* positions come from ``attention_mask`` inside the graph, so there is no ``position_ids`` input.

Model ``type`` is genai's generic ``decoder``: the graph is self-contained, nothing model-specific is needed
from the runtime.

What genai 0.18 cannot do with our exports (measured, see tests/export/test_genai.py): batches of prompts of
different lengths. It feeds ``attention_mask`` as all ones, pad tokens included (``og.Generator.get_input``
shows it), so a left-padded row attends to its padding and continues differently from the same prompt alone.
:class:`GenaiGenerator` therefore batches only prompts of equal length and runs the others one group after
another; our own loop (:mod:`.generation`) takes explicit masks and batches anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from adalora_deploy.artifacts import read_json, write_json
from adalora_deploy.errors import ArtifactError, require

from ..contract import (ATTENTION_MASK, GENAI_CONFIG_FILE, INPUT_IDS, LOGITS, MODEL_FILE, PAST_PREFIX,
                        PRESENT_PREFIX, KVGeometry)
from .generation import (GenerationRequest, ModelLimits, RequestOutput, SamplingParams, TokenEvent, check_prompt,
                         model_limits)
from .tokenizer import TextTokenizer

__all__ = ["GenaiGenerator", "genai_config", "write_genai_config"]


def genai_config(config: Mapping[str, Any], *, limits: ModelLimits, filename: str = MODEL_FILE,
                 share_buffer: bool = False) -> dict[str, Any]:
    """onnxruntime-genai's ``genai_config.json`` for one of our decoding graphs.

    Args:
        config: the export's ``config.json`` (a transformers config as a dict; ``text_config`` for
            multimodal wrappers).
        limits: EOS, pad, context length and vocab (:func:`~.generation.model_limits`).
        filename: the graph file in the folder.
        share_buffer: the graph appends to a preallocated KV buffer in place (fast-path graphs, whose
            every present comes from GroupQueryAttention); og then binds past and present to one buffer.
    """
    text = config.get("text_config", config) if "num_hidden_layers" not in config and "n_layer" not in config else config
    geometry = KVGeometry.of(config)
    eos = sorted(limits.eos_token_ids)
    bos = text.get("bos_token_id", config.get("bos_token_id"))
    return {
        "model": {
            "bos_token_id": int(bos) if bos is not None else limits.pad_token_id,
            "context_length": limits.context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": geometry.head_dim,
                "hidden_size": geometry.hidden,
                "inputs": {"input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK,
                           "past_key_names": f"{PAST_PREFIX}%d.key", "past_value_names": f"{PAST_PREFIX}%d.value"},
                "outputs": {"logits": LOGITS, "present_key_names": f"{PRESENT_PREFIX}%d.key",
                            "present_value_names": f"{PRESENT_PREFIX}%d.value"},
                "num_attention_heads": geometry.num_heads,
                "num_hidden_layers": geometry.num_layers,
                "num_key_value_heads": geometry.num_kv_heads,
            },
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": limits.pad_token_id,
            "type": "decoder",
            "vocab_size": limits.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": limits.context_length, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": share_buffer, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def write_genai_config(folder: str | os.PathLike, *, filename: str = MODEL_FILE, share_buffer: bool = False) -> Path:
    """Write ``genai_config.json`` into an export folder from its ``config.json`` (and generation_config.json)."""
    folder = Path(folder)
    path = folder / GENAI_CONFIG_FILE
    write_json(path, genai_config(read_json(folder / "config.json"), limits=model_limits(folder), filename=filename,
                                  share_buffer=share_buffer))
    return path


class GenaiGenerator:
    """Generation through onnxruntime-genai: ``og.Model`` loads the export folder, ``og.Generator`` runs the
    search (greedy or sampling with og's own top-k/top-p/temperature/repetition penalty/seed, EOS, padding),
    ``og.Adapters`` activates ``.onnx_adapter`` files. Tokenization and stop strings are ours (the same
    :class:`~.generation.TextStream` as our loop), so text is identical for identical tokens.

    Args:
        export_dir: an export folder with ``genai_config.json``.
    """

    def __init__(self, export_dir: str | os.PathLike) -> None:
        self.og = require("onnxruntime_genai", "genai", "generating with onnxruntime-genai")
        folder = Path(export_dir)
        if not (folder / GENAI_CONFIG_FILE).is_file():
            raise ArtifactError(f"{folder} has no {GENAI_CONFIG_FILE}; exports made before it existed can be "
                                "re-exported, or use the default onnxruntime engine")
        self.folder = folder
        self.model = self.og.Model(str(folder))
        self.tokenizer = TextTokenizer.from_folder(folder)
        self.limits = model_limits(folder)
        self._adapters = None
        self._loaded: dict[str, str] = {}

    def load_adapter(self, path: str | os.PathLike) -> str:
        """Load an ``.onnx_adapter`` once (``og.Adapters``); returns the name to pass to :meth:`stream`."""
        key = str(Path(path).resolve())
        if key not in self._loaded:
            if self._adapters is None:
                self._adapters = self.og.Adapters(self.model)
            name = f"adapter{len(self._loaded)}"
            self._adapters.load(key, name)
            self._loaded[key] = name
        return self._loaded[key]

    def stream(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
               adapter: str | None = None) -> Iterator[TokenEvent]:
        """Generate for every prompt; prompts of equal length run as one og batch, groups one after another.

        Args:
            prompts: token ids per prompt; event ``request_id`` is the prompt index.
            params: one set for all prompts (og has one set of search options per generator).
            adapter: a name from :meth:`load_adapter`.
        """
        prompts = [tuple(int(t) for t in p) for p in prompts]
        for prompt in prompts:
            check_prompt(prompt, self.limits)
        groups: dict[int, list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(len(prompt), []).append(i)
        for length, indices in groups.items():
            yield from self._stream_batch([GenerationRequest(prompts[i], params, i) for i in indices], adapter)

    def _stream_batch(self, requests: list[GenerationRequest], adapter: str | None) -> Iterator[TokenEvent]:
        og = self.og
        params, length = requests[0].params, len(requests[0].prompt)
        generator_params = og.GeneratorParams(self.model)
        options = dict(batch_size=len(requests), max_length=min(self.limits.context_length, length + params.max_new_tokens),
                       do_sample=not params.greedy, top_k=params.top_k or self.limits.vocab_size, top_p=params.top_p,
                       temperature=params.temperature or 1.0, repetition_penalty=params.repetition_penalty)
        if params.seed is not None:
            options["random_seed"] = params.seed
        generator_params.set_search_options(**options)
        generator = og.Generator(self.model, generator_params)
        if adapter is not None:
            generator.set_active_adapter(self._adapters, adapter)
        generator.append_tokens(np.array([r.prompt for r in requests], dtype=np.int32))
        outputs = [RequestOutput(r, self.tokenizer, self.limits) for r in requests]
        while not all(o.finished for o in outputs) and not generator.is_done():
            generator.generate_next_token()
            for output, token in zip(outputs, generator.get_next_tokens().tolist()):
                if not output.finished:
                    yield output.accept(int(token))
        for output in outputs:  # og ended the batch first
            if not output.finished:
                yield output.end("length")
