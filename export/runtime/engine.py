"""The serving engine: one thread that runs every request through continuously batched decoding, and the
adapters a served export answers to (``.onnx_adapter`` files, one model id each).

::

    submit() (any thread) ──► pending queue ──► engine thread, each turn:
        1. admit pending requests (per model id, up to max_batch_size rows per batch): their prompts run
           in prefills of at most max_prefill_tokens tokens and join that model's DecodeBatch (each
           prefill streams its requests' first tokens right away)
        2. one decoding step for every model's batch (round robin): one token per running request
    events ──► each request's callback (called on the engine thread; the server hops them onto asyncio)

Each request keeps its own rows of the KV cache (its own sampler, random stream and stop strings), so
concurrent requests never share state; requests for different adapters run in different batches because an
adapter is a per-run input of the graph. onnxruntime runs one graph at a time here: on CPU its intra-op
threads already use every core, and batching is what makes concurrent clients cheap.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from adalora_deploy.errors import ArtifactError, UserError

from ..contract import ADAPTER_FILE, ADAPTER_SUFFIX
from .generation import DecodeBatch, GenerationRequest, Row, SamplingParams, TextGenerator, TokenEvent, check_prompt

__all__ = ["Engine", "ServedModel", "Ticket", "served_models"]

logger = logging.getLogger(__name__)

_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""Model ids (file stems): no path separators, nothing hidden, so an id can never name a file elsewhere."""

DEFAULT_MAX_PREFILL_TOKENS = 128
"""Prompt tokens per prefill run. On CPU a prefill costs about its token count whether prompts run together or
not (SmolLM2-135M int4, 1 thread: 8 chat prompts of ~40 tokens in one run took 6.6x one prompt), so smaller
runs let the first requests stream sooner: mean time to first token falls while the last one's stays put.
Pending prefills still run before the next decoding step."""

EventCallback = Callable[[TokenEvent | BaseException], None]


@dataclass(frozen=True)
class ServedModel:
    """A model id the server answers to: the export itself, or the export with one adapter active."""

    id: str
    adapter: Path | None
    """The ``.onnx_adapter`` file (``None``: the graph as exported; its rank-0 defaults for adapter inputs)."""


def _check_adapter(path: Path, generator: TextGenerator) -> None:
    """Every parameter of the file must be an adapter input of the graph, with the graph's widths."""
    import onnxruntime as ort

    try:
        parameters = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    except Exception as error:  # onnxruntime raises RuntimeError/Fail for unreadable files
        raise ArtifactError(f"{path} is not an onnxruntime adapter file ({error})") from None
    inputs = {i.name: i.shape for i in generator.decoder.session.get_inputs()}
    inputs.update({i.name: i.shape for i in generator.decoder.session.get_overridable_initializers()})
    for name, value in parameters.items():
        if name not in generator.decoder.adapter_names:
            raise ArtifactError(f"{path}: parameter {name!r} is not an adapter input of this graph; make the file "
                                "with `adalora-deploy adapter-file ... --export EXPORT_DIR`")
        fixed = 0 if name.endswith(".lora_A") else 1  # A [in, r], B [r, out]: the width that is not the rank
        want, got = inputs[name][fixed], value.shape()[fixed]
        if isinstance(want, int) and want != got:
            raise ArtifactError(f"{path}: {name} has width {got}, the graph's input has {want}: this adapter was "
                                "made for another base")


def served_models(export_dir: str | os.PathLike, generator: TextGenerator, *, adapters_dir: str | os.PathLike | None = None,
                  name: str | None = None) -> dict[str, ServedModel]:
    """The model ids of a served export: the export itself (``name``, default the folder's name) and, when the
    graph has adapter inputs, one id per ``.onnx_adapter`` file (its stem) in the export folder and in
    ``adapters_dir``.

    Files are found by listing the folders, never by joining a requested name to a path, and a file whose
    real path lies outside its folder (a symlink out) is refused, so a request cannot reach other files.

    Raises:
        ArtifactError: ``adapters_dir`` is missing, given for a graph without adapter inputs, holds an invalid
            or foreign adapter file, or two files give the same id.
    """
    folder = Path(export_dir)
    base = name or folder.resolve().name
    if not _MODEL_ID.match(base):
        raise ArtifactError(f"model name {base!r}: use letters, digits, '.', '_' or '-' (pass --model-name)")
    models = {base: ServedModel(base, None)}
    has_inputs = bool(generator.decoder.adapter_names)
    if adapters_dir is not None and not has_inputs:
        raise ArtifactError(f"{folder} was exported without --adapter-inputs: its adapter is baked into the graph, "
                            "so --adapters cannot switch it; export with --mode separate --adapter-inputs")
    if not has_inputs:
        return models
    if not generator.decoder.adapter_optional:
        del models[base]  # adapter inputs without defaults: every run needs an adapter
    candidates = [folder / ADAPTER_FILE] if (folder / ADAPTER_FILE).is_file() else []
    if adapters_dir is not None:
        directory = Path(adapters_dir)
        if not directory.is_dir():
            raise ArtifactError(f"--adapters {directory}: not a folder")
        candidates += sorted(p for p in directory.iterdir() if p.name.endswith(ADAPTER_SUFFIX))
    for path in candidates:
        stem = path.name[:-len(ADAPTER_SUFFIX)]
        if not _MODEL_ID.match(stem):
            logger.warning("skipping %s: an adapter's file name must be a model id (letters, digits, . _ -)", path)
            continue
        if not path.resolve().is_relative_to(path.parent.resolve()):
            raise ArtifactError(f"{path} points outside its folder; copy the adapter file into the folder instead")
        if stem in models:
            raise ArtifactError(f"two models would be called {stem!r} ({models[stem].adapter or folder}, {path}); "
                                "rename one of the files")
        _check_adapter(path, generator)
        models[stem] = ServedModel(stem, path.resolve())
    return models


class Ticket:
    """One submitted request (its rows); :meth:`Engine.cancel` stops it."""

    def __init__(self, model: str, requests: Sequence[GenerationRequest], callback: EventCallback) -> None:
        self.model = model
        self.requests = list(requests)
        self.callback = callback
        self.rows: list[Row] = []
        self.cancelled = False


class Engine:
    """Continuous batching over one export for many concurrent requests.

    Args:
        generator: the export's graph, tokenizer and limits.
        models: model id -> what it runs (:func:`served_models`).
        max_batch_size: rows decoded together per model (more requests wait for a free row).
        max_prefill_tokens: prompt tokens per prefill run (:data:`DEFAULT_MAX_PREFILL_TOKENS`).
    """

    def __init__(self, generator: TextGenerator, models: Mapping[str, ServedModel], *, max_batch_size: int = 8,
                 max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS) -> None:
        if max_batch_size < 1 or max_prefill_tokens < 1:
            raise UserError(f"--max-batch-size {max_batch_size}, --max-prefill-tokens {max_prefill_tokens}: "
                            "both must be >= 1")
        self.generator = generator
        self.models = dict(models)
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self._batches: dict[str, DecodeBatch] = {}
        self._loras: dict[str, object] = {}
        self._pending: collections.deque[Ticket] = collections.deque()
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ids = itertools.count()
        self.steps = 0
        """Decoding steps run (all batches), for logs and tests."""
        self.max_rows_seen = 0
        """The largest number of rows one step decoded together."""
        self.max_prefill_rows = 0
        """The largest number of rows one prefill ran together."""

    def _batch(self, model: str) -> DecodeBatch:
        if model not in self._batches:
            adapter = self.models[model].adapter
            run_options = None
            if adapter is not None:
                import onnxruntime as ort

                lora = ort.LoraAdapter()
                lora.Load(str(adapter))
                run_options = ort.RunOptions()
                run_options.add_active_adapter(lora)
                self._loras[model] = lora  # RunOptions does not own the adapter: keep it alive
            self._batches[model] = self.generator.batch(run_options=run_options)
        return self._batches[model]

    def start(self) -> None:
        """Start the engine thread (a tiny warm-up run first, so the first request pays no allocation cost)."""
        if self._thread is not None:
            return
        for model in self.models:
            self._batch(model)
        warm_up = self._batch(next(iter(self.models)))
        warm_up.add([GenerationRequest((self.generator.limits.pad_token_id,), SamplingParams(max_new_tokens=2))],
                    lambda event: None)
        while len(warm_up):
            warm_up.step()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="adalora-deploy-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread; pending and running requests get a ``cancelled`` end."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, model: str, requests: Sequence[GenerationRequest], callback: EventCallback) -> Ticket:
        """Queue requests (rows of one API call) for ``model``; ``callback`` gets every event, on the engine
        thread, then nothing after each row's final event (or one exception if the run failed).

        Raises:
            KeyError: an unknown model id (the server checks first).
            GenerationError: a prompt that does not fit.
        """
        if model not in self.models:
            raise KeyError(model)
        for request in requests:
            check_prompt(request.prompt, self.generator.limits)
        ticket = Ticket(model, requests, callback)
        with self._condition:
            if self._stopping or self._thread is None:
                raise RuntimeError("the engine is not running")
            self._pending.append(ticket)
            self._condition.notify_all()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop a request: removed from the queue, or its rows leave their batch at the next step."""
        with self._condition:
            ticket.cancelled = True
            for row in ticket.rows:
                row.cancelled = True

    @property
    def busy(self) -> bool:
        return bool(self._pending) or any(len(b) for b in self._batches.values())

    def _admit(self) -> None:
        """Move pending tickets into their model's batch while rows are free (a ticket joins whole), in prefill
        runs of at most ``max_prefill_tokens`` prompt tokens each (at least one ticket per run); every run
        streams its requests' first tokens as soon as it ends."""
        with self._condition:
            admitted: dict[str, list[Ticket]] = collections.defaultdict(list)
            waiting: collections.deque[Ticket] = collections.deque()
            while self._pending:
                ticket = self._pending.popleft()
                if ticket.cancelled:
                    continue
                batch = self._batch(ticket.model)
                used = len(batch) + sum(len(t.requests) for t in admitted[ticket.model])
                if used and used + len(ticket.requests) > self.max_batch_size:
                    waiting.append(ticket)
                else:
                    admitted[ticket.model].append(ticket)
            self._pending = waiting
        for model, tickets in admitted.items():
            group: list[Ticket] = []
            for ticket in tickets:
                tokens = sum(len(r.prompt) for t in group for r in t.requests)
                if group and tokens + sum(len(r.prompt) for r in ticket.requests) > self.max_prefill_tokens:
                    self._prefill(model, group)
                    group = []
                group.append(ticket)
            self._prefill(model, group)

    def _prefill(self, model: str, tickets: list[Ticket]) -> None:
        requests = [r for t in tickets for r in t.requests]
        sinks = [t.callback for t in tickets for _ in t.requests]
        self.max_prefill_rows = max(self.max_prefill_rows, len(requests))
        try:
            rows = self._batch(model).add(requests, sinks)
        except Exception as error:  # a failed run must not take the other requests down (the batch is intact)
            logger.exception("prefill failed")
            for ticket in tickets:
                ticket.callback(error)
            return
        owners = [t for t in tickets for _ in t.requests]
        for row, owner in zip(rows, owners):
            owner.rows.append(row)
            row.cancelled = row.cancelled or owner.cancelled

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._stopping and not self.busy:
                    self._condition.wait()
                if self._stopping:
                    break
            self._admit()
            for model, batch in list(self._batches.items()):
                if not len(batch):
                    continue
                rows = list(batch.rows)
                self.max_rows_seen = max(self.max_rows_seen, len(rows))
                self.steps += 1  # before the step: its final events may reach a client before it returns
                try:
                    batch.step()
                except Exception as error:  # drop this batch (rebuilt empty on next use), tell its requests
                    logger.exception("decoding step failed")
                    self._batches.pop(model)
                    for ticket in {id(r.sink): r.sink for r in rows if not r.cancelled}.values():
                        ticket(error)
        self._cancel_all()

    def _cancel_all(self) -> None:
        with self._condition:
            tickets = list(self._pending)
            self._pending.clear()
        for ticket in tickets:
            for request in ticket.requests:
                ticket.callback(TokenEvent(request.request_id, None, "", "cancelled", len(request.prompt), 0))
        for batch in self._batches.values():
            for row in batch.rows:
                if not row.cancelled:
                    row.sink(row.output.end("cancelled"))
        self._batches.clear()

