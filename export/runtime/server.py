"""An OpenAI-compatible HTTP server for an export folder (FastAPI + uvicorn, onnxruntime only).

A sequence-classification export (``export.json`` task ``classification``) is served instead by
:func:`create_classifier_app`: text-embeddings-inference's ``POST /predict``.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true`` as
server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``), ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /health``. ``model`` selects the adapter per request
(:func:`~.engine.served_models`). Requests run on :class:`~.engine.Engine` (continuous batching).

Errors use OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``:

=====  =============================================================================================
400    malformed JSON, unknown or invalid fields, a prompt longer than the context, max_tokens over the
       limit or beyond the context, a chat the template rejects, more completions (prompts x n) than
       ``max_completions_per_request``
401    missing or wrong API key (when the server has one)
404    unknown model id, unknown path
405    wrong method
408    body not received within ``body_timeout_s`` (a client trickling its body)
413    body larger than ``max_body_bytes``
500    a failed graph run (the message says so; other requests go on)
=====  =============================================================================================

Sampling follows OpenAI's defaults (``temperature`` 1, ``top_p`` 1; ``temperature: 0`` is greedy); two
extensions other OpenAI-compatible servers also accept, ``top_k`` and ``repetition_penalty``, go in the body
(``extra_body`` in the openai client).

Log-probabilities (:mod:`.logprobs`): ``/v1/completions`` takes ``logprobs`` (0-5 alternatives) and ``echo``
(the prompt's tokens and their log-probabilities first; with ``max_tokens: 0`` the prompt is only scored: one
prefill, no decoding step, and such requests batch like any other); ``/v1/chat/completions`` takes
``logprobs: true`` and ``top_logprobs`` (0-20). Values are ``log_softmax`` of the graph's fp32 logits before
any sampling transform. Fields that change nothing here (``store``, ``metadata``, ``user``, ``service_tier``,
``parallel_tool_calls``, ``response_format`` of type ``text``) are accepted and ignored; OpenAI fields that
would change the output and are not implemented are refused with 400 "... is not supported".
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Literal, Sequence

from adalora_deploy.errors import UserError, require

from .classifier import ClassifierSession, is_classifier_export
from .engine import DEFAULT_MAX_PREFILL_TOKENS, Engine, ServedModel, served_models
from .generation import GenerationError, GenerationRequest, SamplingParams, TextGenerator, TokenEvent
from .logprobs import MAX_CHAT_TOP_LOGPROBS, MAX_COMPLETION_LOGPROBS, CompletionLogprobs, TokenLogprob, TokenTexts, \
    chat_logprobs

__all__ = ["ServerSettings", "create_app", "create_classifier_app", "serve"]

logger = logging.getLogger(__name__)

_fastapi = require("fastapi", "serve", "the OpenAI-compatible server")
require("uvicorn", "serve", "the OpenAI-compatible server")
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

MAX_STOP_STRINGS = 4
"""OpenAI's limit on ``stop``."""
MAX_CHOICES = 16
"""Largest ``n`` (choices per prompt) accepted."""


@dataclass(frozen=True)
class ServerSettings:
    """How the server runs (the ``serve`` command's options)."""

    host: str = "127.0.0.1"
    """Loopback by default: nothing outside this machine can connect unless asked for."""
    port: int = 8000
    api_key: str | None = None
    """When set, every ``/v1`` request needs ``Authorization: Bearer <api_key>``."""
    max_tokens_limit: int = 2048
    """Largest ``max_tokens`` a request may ask for (also the chat default, capped by the context)."""
    max_batch_size: int = 8
    """Requests decoded together per model (more wait for a free row)."""
    max_body_bytes: int = 1 << 20
    """Request bodies above this are refused with 413."""
    body_timeout_s: float = 30.0
    """A request body not received in full within this many seconds is refused with 408."""
    max_completions_per_request: int = MAX_CHOICES
    """Largest number of rows (prompts x ``n``) one request may ask for: a request joins the engine whole, so
    without it one body listing thousands of prompts fills memory and holds every other request back."""
    max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS
    """Prompt tokens per prefill run (see :data:`~.engine.DEFAULT_MAX_PREFILL_TOKENS`)."""
    model_name: str | None = None
    """Id of the export itself (default: the folder's name)."""


# --- OpenAI errors ---------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content={
            "error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}})


def _validation_error(error: RequestValidationError) -> APIError:
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', first.get('msg'))})",
                        code="invalid_json")
    if kind == "extra_forbidden":
        return APIError(400, f"unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    if kind == "missing":
        return APIError(400, f"missing required parameter: {param}", param=param, code="missing_required_parameter")
    if not location:  # the body itself is not an object (a list, a number...)
        return APIError(400, "the body must be a JSON object with the request's fields", code="invalid_json")
    return APIError(400, f"invalid value for {param}: {first.get('msg')}", param=param, code="invalid_value")


# --- request bodies (unknown fields refused) ------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


def _unsupported(name: str, detail: str = "") -> APIError:
    return APIError(400, f"{name} is not supported by this server{detail}", param=name, code="unsupported_parameter")


class _Sampling(_Body):
    """Fields shared by both endpoints."""

    model: str
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    top_k: int | None = Field(default=None, ge=0)
    """Extension (vLLM and others): sample among the k most likely tokens."""
    repetition_penalty: float | None = Field(default=None, gt=0)
    """Extension (vLLM and others): CTRL's penalty on tokens already present."""
    # accepted and ignored: they change nothing in what this server computes
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    """Only ``{"type": "text"}`` (what the server does anyway); JSON modes are refused."""

    def check_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise _unsupported(name, "; use repetition_penalty")
        if self.logit_bias:
            raise _unsupported("logit_bias")
        if self.response_format is not None and self.response_format.type != "text":
            raise _unsupported("response_format", f" with type {self.response_format.type!r} (only 'text')")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise APIError(400, f"stop: at most {MAX_STOP_STRINGS} non-empty strings", param="stop",
                           code="invalid_value")

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)
    """0 only with ``echo``: score the prompt, generate nothing."""
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    """An earlier assistant turn's tool calls, rendered by templates that support them."""
    tool_call_id: str | None = None
    """Which call a ``tool`` message answers."""
    refusal: str | None = None

    def as_template_message(self) -> dict[str, Any]:
        content = self.content if isinstance(self.content, str) or self.content is None else \
            "".join(part.text for part in self.content)
        role = "system" if self.role == "developer" else self.role  # OpenAI's newer name for system messages
        message: dict[str, Any] = {"role": role, "content": content or ""}
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        return message


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)
    # refused unless harmless (no tools offered, none forced): they would change the output
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    web_search_options: dict[str, Any] | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        harmless = {"tools": [], "tool_choice": "none", "functions": [], "function_call": "none",
                    "modalities": ["text"]}
        for name in ("tools", "tool_choice", "functions", "function_call", "modalities", "audio", "prediction",
                     "reasoning_effort", "web_search_options"):
            value = getattr(self, name)
            if value is not None and value != harmless.get(name):
                raise _unsupported(name)
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")


# --- the service: requests -> engine rows -> OpenAI responses ------------------------------------------------


class _Events:
    """Events of one API call, hopped from the engine thread onto the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()

    def __call__(self, event: TokenEvent | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


@dataclass
class _Choice:
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()


class Service:
    """What the endpoints share: the engine, the tokenizer, limits, model ids, settings."""

    def __init__(self, engine: Engine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.tokenizer = engine.generator.tokenizer
        self.limits = engine.generator.limits
        self.token_texts = TokenTexts(self.tokenizer)
        self.created = int(time.time())

    def model(self, name: str) -> ServedModel:
        if name not in self.engine.models:
            known = ", ".join(sorted(self.engine.models))
            raise APIError(404, f"the model {name!r} does not exist; this server has: {known}", param="model",
                           code="model_not_found")
        return self.engine.models[name]

    def params(self, body: _Sampling, max_tokens: int | None, prompts: Sequence[Sequence[int]],
               default_max: bool, *, logprobs: int | None = None,
               prompt_logprobs: int | None = None) -> list[SamplingParams]:
        """One SamplingParams per row (prompt x n), after the OpenAI limits are checked."""
        body.check_unsupported()
        if max_tokens == 0 and prompt_logprobs is None:
            raise APIError(400, "max_tokens 0 generates nothing; send echo: true to score the prompt",
                           param="max_tokens", code="invalid_value")
        rows_asked, most = len(prompts) * body.n, self.settings.max_completions_per_request
        if rows_asked > most:
            raise APIError(400, f"this request asks for {rows_asked} completions ({len(prompts)} prompt(s) x n="
                                f"{body.n}); this server allows at most {most} per request; send fewer prompts per "
                                "request", param="prompt" if len(prompts) > 1 else "n", code="too_many_completions")
        context, limit = self.limits.context_length, self.settings.max_tokens_limit
        longest = max(len(p) for p in prompts)
        if longest >= context:
            raise APIError(400, f"this model's maximum context length is {context} tokens, but the prompt has "
                                f"{longest} tokens; shorten it", param="messages" if default_max else "prompt",
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(limit, context - longest)
        elif max_tokens > limit:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {limit}", param="max_tokens",
                           code="max_tokens_too_large")
        elif longest + max_tokens > context:
            raise APIError(400, f"this model's maximum context length is {context} tokens; you requested "
                                f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} for the "
                                "completion); reduce the prompt or max_tokens", param="max_tokens",
                           code="context_length_exceeded")
        temperature = 1.0 if body.temperature is None else body.temperature
        rows = []
        for _ in prompts:
            for choice in range(body.n):
                seed = None if body.seed is None else body.seed + choice
                try:
                    rows.append(SamplingParams(
                        max_new_tokens=max_tokens, temperature=temperature, top_k=body.top_k or 0,
                        top_p=1.0 if body.top_p is None else body.top_p,
                        repetition_penalty=body.repetition_penalty or 1.0, seed=seed, stop=body.stop_strings(),
                        logprobs=logprobs, prompt_logprobs=prompt_logprobs))
                except GenerationError as error:
                    raise APIError(400, str(error), code="invalid_value") from None
        return rows

    def submit(self, model: str, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
               n: int) -> tuple[_Events, list[GenerationRequest], object]:
        events = _Events(asyncio.get_running_loop())
        requests = [GenerationRequest(tuple(prompts[i // n]), p, i) for i, p in enumerate(params)]
        try:
            ticket = self.engine.submit(model, requests, events)
        except GenerationError as error:
            raise APIError(400, str(error), param="prompt", code="invalid_prompt") from None
        return events, requests, ticket

    async def run(self, events: _Events, requests: list[GenerationRequest],
                  ticket) -> AsyncIterator[tuple[int, TokenEvent]]:
        """Yield (choice index, event) until every row has finished; cancels the rows if abandoned."""
        open_rows = len(requests)
        try:
            while open_rows:
                event = await events.queue.get()
                if isinstance(event, BaseException):
                    raise APIError(500, f"the model run failed: {event}", type="server_error", code="model_error")
                if event.finish_reason is not None:
                    open_rows -= 1
                yield event.request_id, event
        finally:
            if open_rows:
                self.engine.cancel(ticket)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class _BodyLimit:
    """ASGI middleware: refuses bodies above ``max_bytes`` with 413 (by Content-Length, or while reading a
    chunked body, which it buffers up to the limit and replays), and bodies not received in full within
    ``timeout_s`` with 408 (a client trickling its body gets its connection closed)."""

    def __init__(self, app, max_bytes: int, timeout_s: float) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"the request body is larger than {self.max_bytes} bytes",
                             code="request_too_large").response()
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await too_large(scope, receive, send)
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                return await APIError(408, f"the request body did not arrive within {self.timeout_s:g} s",
                                      code="request_timeout").response()(scope, receive, send)
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _base_app(title: str, settings: ServerSettings, protected: Callable[[str], bool]) -> FastAPI:
    """What both servers share: OpenAI-shaped errors for every failure, the API key on the ``protected`` paths
    (``Authorization: Bearer``), and ``GET /health``."""
    app = FastAPI(title=title, version="1", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        return _validation_error(error).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(error.status_code,
                                                                                             str(error.detail))
        return APIError(error.status_code, message, code=code).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, error: Exception):
        logger.exception("unhandled error")
        return APIError(500, f"internal error: {type(error).__name__}", type="server_error").response()

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if settings.api_key and protected(request.url.path):
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
                return APIError(401, "invalid or missing API key: send Authorization: Bearer <key>",
                                code="invalid_api_key").response()
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app


def create_app(service: Service):
    """The FastAPI application (``service.engine`` must be started by the caller or the lifespan)."""
    settings = service.settings
    app = _base_app("adalora-deploy", settings, protected=lambda path: path.startswith("/v1"))

    def model_card(model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": service.created, "owned_by": "adalora-deploy"}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(m) for m in service.engine.models]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str):
        return model_card(service.model(model_id).id)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        service.model(body.model)
        for name, unsupported in (("best_of", body.best_of not in (None, 1)), ("suffix", body.suffix is not None)):
            if unsupported:
                raise _unsupported(name)
        prompts = _completion_prompts(service, body.prompt)
        # echo scores the prompt when logprobs are asked for (or when nothing is generated: max_tokens 0)
        scored = body.echo and (body.logprobs is not None or body.max_tokens == 0)
        params = service.params(body, body.max_tokens, prompts, default_max=False, logprobs=body.logprobs,
                                prompt_logprobs=(body.logprobs or 0) if scored else None)
        echoes = _echo_texts(service, body.prompt, prompts) if body.echo else None
        return await _respond(service, body, prompts, params, chat=False, echoes=echoes)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        service.model(body.model)
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise APIError(400, "send max_tokens or max_completion_tokens, not both", param="max_tokens",
                           code="invalid_value")
        try:
            prompt = service.tokenizer.encode_chat([m.as_template_message() for m in body.messages])
        except UserError as error:
            raise APIError(400, str(error), param="messages", code="invalid_messages") from None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = service.params(body, max_tokens, [prompt], default_max=max_tokens is None,
                                logprobs=(body.top_logprobs or 0) if body.logprobs else None)
        return await _respond(service, body, [prompt], params, chat=True)

    app.add_middleware(_BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    return app


def _echo_texts(service: Service, prompt, encoded: list[list[int]]) -> list[str]:
    """The text ``echo`` returns per prompt: the prompt as sent, or its tokens decoded when sent as ids."""
    texts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt and isinstance(prompt[0], str) else []
    return texts if len(texts) == len(encoded) else [service.tokenizer.decode(p) for p in encoded]


def _completion_prompts(service: Service, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError(400, "prompt is empty", param="prompt", code="invalid_prompt")
    encoded = [service.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    if any(not p for p in encoded):
        raise APIError(400, "a prompt encodes to no tokens; send some text", param="prompt", code="invalid_prompt")
    vocab = service.limits.vocab_size
    if any(t < 0 or t >= vocab for p in encoded for t in p):
        raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt", code="invalid_prompt")
    return encoded


async def _respond(service: Service, body: _Sampling, prompts: list[list[int]], params: list[SamplingParams], *,
                   chat: bool, echoes: list[str] | None = None):
    events, requests, ticket = service.submit(body.model, prompts, params, body.n)
    prompt_tokens = sum(len(p) for p in prompts)
    created, model = int(time.time()), body.model
    prefix = "chatcmpl" if chat else "cmpl"
    response_id = f"{prefix}-{uuid.uuid4().hex}"
    obj = "chat.completion" if chat else "text_completion"
    wants_logprobs = params[0].logprobs is not None
    if not body.stream:
        choices = [_Choice() for _ in requests]
        async for index, event in service.run(events, requests, ticket):
            choice = choices[index]
            choice.text += event.text
            choice.completion_tokens = event.completion_tokens
            choice.finish_reason = event.finish_reason or choice.finish_reason
            choice.prompt_logprobs = event.prompt_logprobs or choice.prompt_logprobs
            if event.token_id is not None:
                choice.token_ids.append(event.token_id)
                if event.logprob is not None:
                    choice.logprobs.append(event.logprob)
        completion_tokens = sum(c.completion_tokens for c in choices)
        if chat:
            items = [{"index": i, "message": {"role": "assistant", "content": c.text},
                      "logprobs": chat_logprobs(c.logprobs, service.token_texts) if wants_logprobs else None,
                      "finish_reason": c.finish_reason} for i, c in enumerate(choices)]
        else:
            items = []
            for i, c in enumerate(choices):
                echo = "" if echoes is None else echoes[i // body.n]
                logprobs = None
                if wants_logprobs:  # an echoed prompt's tokens come first
                    ids, entries = ([*requests[i].prompt], [*c.prompt_logprobs]) if echoes is not None else ([], [])
                    logprobs = CompletionLogprobs(service.token_texts).piece(ids + c.token_ids, entries + c.logprobs)
                items.append({"index": i, "text": echo + c.text, "logprobs": logprobs, "finish_reason": c.finish_reason})
        return {"id": response_id, "object": obj, "created": created, "model": model, "choices": items,
                "usage": _usage(prompt_tokens, completion_tokens)}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    chunk_object = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict[str, Any]], usage: dict | None = None) -> str:
        data = {"id": response_id, "object": chunk_object, "created": created, "model": model, "choices": choices}
        if include_usage:
            data["usage"] = usage
        return _sse(data)

    async def stream() -> AsyncIterator[str]:
        counts = [0] * len(requests)
        pieces = [CompletionLogprobs(service.token_texts) for _ in requests]
        echoed = [False] * len(requests)
        if chat:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(len(requests))])
        try:
            async for index, event in service.run(events, requests, ticket):
                counts[index] = event.completion_tokens
                text, ids, entries = event.text, [], []
                if echoes is not None and not echoed[index]:  # the row's first event carries the echoed prompt
                    echoed[index] = True
                    text = echoes[index // body.n] + text
                    ids, entries = [*requests[index].prompt], [*(event.prompt_logprobs or ())]
                if event.token_id is not None and event.logprob is not None:
                    ids, entries = ids + [event.token_id], entries + [event.logprob]
                logprobs = None
                if wants_logprobs and ids:
                    logprobs = chat_logprobs(entries, service.token_texts) if chat else pieces[index].piece(ids, entries)
                if not text and event.finish_reason is None and logprobs is None:
                    continue
                if chat:
                    delta = {"content": text} if text else {}
                    item = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": event.finish_reason}
                else:
                    item = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": event.finish_reason}
                yield chunk([item])
        except APIError as error:  # headers are sent: the error travels as an event, as OpenAI's stream does
            yield _sse({"error": {"message": error.message, "type": error.type, "param": None, "code": error.code}})
            return
        if include_usage:
            yield chunk([], _usage(prompt_tokens, sum(counts)))
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# --- sequence classification: text-embeddings-inference's /predict ---------------------------------------------


class PredictBody(_Body):
    """Hugging Face text-embeddings-inference's ``POST /predict`` body (single texts; pairs are not supported)."""

    inputs: str | list[str]
    raw_scores: bool = False
    """Return the logits instead of the softmax probabilities."""
    truncate: bool = True
    """Accepted for compatibility: texts are always cut to the model's positions."""


def create_classifier_app(classifier: ClassifierSession, settings: ServerSettings):
    """The HTTP application of a sequence-classification export: ``POST /predict`` (text-embeddings-inference's
    convention: ``{"inputs": "text" | ["t1", "t2"]}`` -> ``[{"label", "score"}, ...]`` highest first, a list of
    such lists for a list of texts), ``GET /info`` (the labels) and ``GET /health``; errors in the OpenAI shape
    of the decoder server, the same API key rule (every path but ``/health``), body limit and timeout."""
    app = _base_app("adalora-deploy classifier", settings, protected=lambda path: path != "/health")
    model_id = settings.model_name or classifier.folder.name

    @app.get("/info")
    async def info():
        return {"model_id": model_id, "model_type": {"classifier": {"id2label": dict(enumerate(classifier.labels))}},
                "max_input_length": classifier.max_length, "max_client_batch_size": settings.max_completions_per_request}

    @app.post("/predict")
    async def predict(body: PredictBody):
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        if not texts:
            raise APIError(400, "inputs: give a text or a non-empty list of texts", param="inputs", code="invalid_value")
        if len(texts) > settings.max_completions_per_request:
            raise APIError(400, f"inputs: {len(texts)} texts in one request, more than the limit of "
                                f"{settings.max_completions_per_request}", param="inputs", code="invalid_value")
        if body.raw_scores:
            logits = await asyncio.to_thread(lambda: classifier.logits(*classifier.encode(texts)))
            answers = [[{"label": classifier.labels[j], "score": float(row[j])} for j in (-row).argsort(kind="stable")]
                       for row in logits]
        else:
            answers = await asyncio.to_thread(classifier.predict, texts)
        return answers[0] if isinstance(body.inputs, str) else answers

    app.add_middleware(_BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    return app


def build_service(export_dir: str | os.PathLike, settings: ServerSettings, *, adapters_dir=None,
                  intra_op_threads: int | None = None, provider: str = "cpu") -> Service:
    """Open the export, find its model ids, start the engine."""
    generator = TextGenerator.from_export(export_dir, provider=provider, intra_op_threads=intra_op_threads)
    models = served_models(export_dir, generator, adapters_dir=adapters_dir, name=settings.model_name)
    engine = Engine(generator, models, max_batch_size=settings.max_batch_size,
                    max_prefill_tokens=settings.max_prefill_tokens)
    engine.start()
    return Service(engine, settings)


def serve(export_dir: str | os.PathLike, settings: ServerSettings, *, adapters_dir=None,
          intra_op_threads: int | None = None, provider: str = "cpu") -> None:
    """Serve until interrupted (uvicorn; Ctrl-C or SIGTERM stops it cleanly)."""
    import uvicorn

    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        logger.warning("serving on %s without an API key: anyone who can reach this port can use the model "
                       "(pass --api-key)", settings.host)
    if is_classifier_export(export_dir):
        if adapters_dir is not None:
            raise UserError("--adapters applies to causal-LM exports; a classification export bakes its adapter in")
        classifier = ClassifierSession(export_dir, provider=provider, intra_op_threads=intra_op_threads)
        app = create_classifier_app(classifier, settings)
        logger.info("serving the %s classifier %s on http://%s:%d/predict", "/".join(classifier.labels),
                    Path(export_dir), settings.host, settings.port)
        uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                                      access_log=False, lifespan="off")).run()
        return
    service = build_service(export_dir, settings, adapters_dir=adapters_dir, intra_op_threads=intra_op_threads,
                            provider=provider)
    config = uvicorn.Config(create_app(service), host=settings.host, port=settings.port, log_level="warning",
                            access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    logger.info("serving %s on http://%s:%d/v1 (models: %s)", Path(export_dir), settings.host, settings.port,
                ", ".join(service.engine.models))
    try:
        server.run()
    finally:
        service.engine.stop()
