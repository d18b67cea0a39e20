"""The OpenAI-compatible server against the official ``openai`` client: completions and chat, streaming and not,
adapters per request, every 4xx, and 8 concurrent clients whose answers equal the single-client answers."""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from adalora_deploy.errors import ArtifactError
from adalora_deploy.export.runtime.engine import served_models
from adalora_deploy.export.runtime.generation import SamplingParams, TextGenerator
from adalora_deploy.export.runtime.server import ServerSettings, build_service, create_app

API_KEY = "test-key"
PROMPTS = ["The river rises in", "In winter the", "Every morning he rowed across the", "a"]
MAX_TOKENS_LIMIT = 64
START_TIMEOUT_S = 60


class ServerThread:
    """uvicorn on 127.0.0.1 and a free port, in a thread; stops itself (bounded waits)."""

    def __init__(self, app) -> None:
        import uvicorn

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@contextlib.contextmanager
def running_server(export, settings: ServerSettings, **options):
    """(service, server) of ``export`` on a free port for the block; both stopped after it."""
    service = build_service(export, settings, **options)
    server = ServerThread(create_app(service))
    try:
        yield service, server
    finally:
        server.stop()
        service.engine.stop()


@pytest.fixture(scope="module")
def served(serving_exports):
    settings = ServerSettings(api_key=API_KEY, max_tokens_limit=MAX_TOKENS_LIMIT, max_body_bytes=64 << 10)
    with running_server(serving_exports.adapter_inputs, settings, adapters_dir=serving_exports.adapters) as running:
        yield running


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[1].url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(serving_exports):
    """Answers computed without the server: our loop on the same export, one request at a time."""
    import onnxruntime as ort

    generator = TextGenerator.from_export(serving_exports.adapter_inputs)
    options = {"tiny-ai": None}
    keep = []
    for name, path in (("adapter", serving_exports.adapter_inputs / "adapter.onnx_adapter"),
                       ("second", serving_exports.adapters / "second.onnx_adapter")):
        lora = ort.LoraAdapter()
        lora.Load(str(path))
        keep.append(lora)
        options[name] = ort.RunOptions()
        options[name].add_active_adapter(lora)

    def answer(model: str, prompt: list[int], params: SamplingParams):
        return generator.generate([prompt], params, run_options=options[model])[0]

    answer.generator, answer.keep = generator, keep
    return answer


def test_models_health_and_ids(served, client):
    service, server = served
    assert {m.id for m in client.models.list()} == {"tiny-ai", "adapter", "second"}
    assert client.models.retrieve("second").id == "second"
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}  # no key needed for health


@pytest.mark.parametrize("model", ["tiny-ai", "adapter", "second"])
def test_completion_equals_generate_for_each_model(client, reference, model):
    tokenizer = reference.generator.tokenizer
    params = SamplingParams(max_new_tokens=12, repetition_penalty=5.0)  # the tiny adapters repeat one letter otherwise
    response = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                         extra_body={"repetition_penalty": 5.0})
    want = reference(model, tokenizer.encode(PROMPTS[0]), params)
    assert response.choices[0].text == want.text and response.choices[0].finish_reason == want.finish_reason
    assert response.usage.prompt_tokens == want.prompt_tokens
    assert response.usage.completion_tokens == len(want.token_ids)
    assert response.model == model and response.object == "text_completion"


def test_adapters_per_request_really_differ(client):
    texts = {m: client.completions.create(model=m, prompt=PROMPTS[1], max_tokens=10, temperature=0,
                                          extra_body={"repetition_penalty": 5.0}).choices[0].text
             for m in ("tiny-ai", "adapter", "second")}
    assert len(set(texts.values())) == 3


def test_streaming_completion_equals_the_whole(client):
    kwargs = dict(model="tiny-ai", prompt=PROMPTS[2], max_tokens=20, temperature=0)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage.completion_tokens == 20 and not chunks[-1].choices
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) > 3  # token by token, not one blob


def test_stream_is_server_sent_events_ending_with_done(served):
    _, server = served
    body = {"model": "tiny-ai", "prompt": PROMPTS[0], "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_chat_completion_streaming_and_not(client, reference):
    tokenizer = reference.generator.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where does the river go?"}]
    response = client.chat.completions.create(model="adapter", messages=messages, max_tokens=10, temperature=0,
                                              extra_body={"repetition_penalty": 5.0})
    want = reference("adapter", tokenizer.encode_chat(messages), SamplingParams(max_new_tokens=10,
                                                                                repetition_penalty=5.0))
    assert response.choices[0].message.content == want.text and response.choices[0].message.role == "assistant"
    assert response.usage.prompt_tokens == len(tokenizer.encode_chat(messages))
    chunks = list(client.chat.completions.create(model="adapter", messages=messages, max_tokens=10, temperature=0,
                                                 extra_body={"repetition_penalty": 5.0}, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].object == "chat.completion.chunk"


def test_chat_without_max_tokens_runs_to_eos_or_the_limit(client):
    response = client.chat.completions.create(model="tiny-ai", messages=[{"role": "user", "content": "hi"}],
                                              temperature=0)
    assert response.usage.completion_tokens <= MAX_TOKENS_LIMIT
    assert response.choices[0].finish_reason in ("stop", "length")


def test_n_choices_seeds_and_stop(client, reference):
    kwargs = dict(model="tiny-ai", prompt=PROMPTS[0], max_tokens=10, temperature=1.0, seed=7, n=2)
    first, again = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # reproducible with a seed
    assert first.choices[0].text != first.choices[1].text  # each choice its own stream (seed, seed + 1)
    greedy = client.completions.create(model="tiny-ai", prompt=PROMPTS[0], max_tokens=10, temperature=0).choices[0]
    stop = next(ch for i, ch in enumerate(greedy.text) if i >= 2 and ch.isascii() and ch.isprintable()
                and ch not in greedy.text[:i])
    cut = client.completions.create(model="tiny-ai", prompt=PROMPTS[0], max_tokens=10, temperature=0, stop=[stop])
    assert cut.choices[0].text == greedy.text[:greedy.text.index(stop)] and cut.choices[0].finish_reason == "stop"


def _post(server, path: str, content: bytes | str, *, key: str | None = API_KEY, method: str = "POST"):
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.request(method, f"{server.url}{path}", content=content, headers=headers, timeout=60)


@pytest.mark.parametrize("body, status, code, words", [
    ("{not json", 400, "invalid_json", "not valid JSON"),
    ('[1, 2]', 400, "invalid_json", "JSON object"),
    ('{"model": "tiny-ai", "prompt": "x", "temprature": 0}', 400, "unknown_parameter", "temprature"),
    ('{"model": "gpt-4", "prompt": "x"}', 404, "model_not_found", "gpt-4"),
    ('{"model": "../adapter", "prompt": "x"}', 404, "model_not_found", "does not exist"),
    ('{"prompt": "x"}', 400, "missing_required_parameter", "model"),
    ('{"model": "tiny-ai", "prompt": "x", "max_tokens": 100000}', 400, "max_tokens_too_large", "at most 64"),
    ('{"model": "tiny-ai", "prompt": "' + "a" * 600 + '"}', 400, "context_length_exceeded", "600 tokens"),
    ('{"model": "tiny-ai", "prompt": "' + "a" * 500 + '", "max_tokens": 60}', 400, "context_length_exceeded",
     "560 tokens"),
    ('{"model": "tiny-ai", "prompt": "x", "temperature": -1}', 400, "invalid_value", "temperature"),
    ('{"model": "tiny-ai", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', 400, "invalid_value", "at most 4"),
    ('{"model": "tiny-ai", "prompt": "x", "logprobs": 6}', 400, "invalid_value", "logprobs"),
    ('{"model": "tiny-ai", "prompt": "x", "max_tokens": 0}', 400, "invalid_value", "echo"),
    ('{"model": "tiny-ai", "prompt": "x", "suffix": "y"}', 400, "unsupported_parameter", "suffix is not supported"),
    ('{"model": "tiny-ai", "prompt": "x", "response_format": {"type": "json_object"}}', 400, "unsupported_parameter",
     "response_format is not supported"),
    ('{"model": "tiny-ai", "prompt": "x", "frequency_penalty": 0.5}', 400, "unsupported_parameter", "repetition_penalty"),
    ('{"model": "tiny-ai", "prompt": [99999]}', 400, "invalid_prompt", "token ids"),
    ('{"model": "tiny-ai", "prompt": ""}', 400, "invalid_prompt", "no tokens"),
])
def test_bad_completion_requests_get_openai_errors(served, body, status, code, words):
    response = _post(served[1], "/v1/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code and words in error["message"]


@pytest.mark.parametrize("body, code, words", [
    ('{"model": "tiny-ai", "messages": []}', "invalid_value", "messages"),
    ('{"model": "tiny-ai", "messages": [{"role": "wizard", "content": "x"}]}', "invalid_value", "messages.0.role"),
    ('{"model": "tiny-ai", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}',
     "invalid_value", "messages.0.content"),
    ('{"model": "tiny-ai", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}',
     "unsupported_parameter", "tools is not supported"),
    ('{"model": "tiny-ai", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}',
     "unsupported_parameter", "tool_choice is not supported"),
    ('{"model": "tiny-ai", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}', "invalid_value",
     "needs logprobs"),
    ('{"model": "tiny-ai", "messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21}',
     "invalid_value", "top_logprobs"),
    ('{"model": "tiny-ai", "messages": [{"role": "user", "content": "x"}], "wizardry": 1}', "unknown_parameter",
     "unrecognized"),
])
def test_bad_chat_requests(served, body, code, words):
    response = _post(served[1], "/v1/chat/completions", body)
    assert response.status_code == 400 and response.json()["error"]["code"] == code
    assert words in response.json()["error"]["message"]


def test_auth_size_method_and_path_errors(served, client):
    _, server = served
    ok = '{"model": "tiny-ai", "prompt": "x", "max_tokens": 1}'
    assert _post(server, "/v1/completions", ok).status_code == 200
    for key in (None, "wrong"):
        response = _post(server, "/v1/completions", ok, key=key)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    big = json.dumps({"model": "tiny-ai", "prompt": "x" * (70 << 10)})
    assert _post(server, "/v1/completions", big).status_code == 413

    def chunked():  # no Content-Length: the limit holds while reading
        yield big[: 1 << 15].encode()
        yield big[1 << 15:].encode()

    response = httpx.post(f"{server.url}/v1/completions", content=chunked(),
                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert _post(server, "/v1/completions", "", method="GET").status_code == 405
    assert _post(server, "/v1/nothing", ok).json()["error"]["code"] == "not_found"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny-ai", prompt="x", max_tokens=MAX_TOKENS_LIMIT + 1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")


def test_an_abandoned_stream_frees_its_row(served, client):
    service, _ = served
    stream = client.completions.create(model="tiny-ai", prompt=PROMPTS[0], max_tokens=MAX_TOKENS_LIMIT,
                                       temperature=0, stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 30
    while service.engine.busy and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not service.engine.busy


CLIENTS = 8
REQUESTS_PER_CLIENT = 50


def test_concurrent_clients_get_the_single_client_answers(served, client):
    """8 clients x 50 requests (mixed models, greedy and seeded sampling, streamed or not, different lengths):
    every answer equals the one the same request got alone, and requests really were batched together."""
    service, server = served
    rng = random.Random(0)
    kinds = [(model, prompt, sampled, max_tokens) for model in ("tiny-ai", "adapter", "second")
             for prompt in PROMPTS for sampled in (False, True) for max_tokens in (4, 9)]

    def ask(kind, stream: bool) -> str:
        model, prompt, sampled, max_tokens = kind
        extra = dict(temperature=0.9, seed=11, top_p=0.9) if sampled else dict(temperature=0)
        if stream:
            chunks = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, stream=True, **extra)
            return "".join(c.choices[0].text for c in chunks if c.choices)
        return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, **extra).choices[0].text

    single = {kind: ask(kind, stream=False) for kind in kinds}  # one at a time
    assert len(set(single.values())) > len(kinds) // 2  # answers really differ between requests
    plans = [[(rng.choice(kinds), rng.random() < 0.5) for _ in range(REQUESTS_PER_CLIENT)] for _ in range(CLIENTS)]
    rows_before = service.engine.max_rows_seen

    def run(plan):
        return [(kind, ask(kind, stream)) for kind, stream in plan]

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = [answer for answers in pool.map(run, plans) for answer in answers]
    assert len(results) == CLIENTS * REQUESTS_PER_CLIENT
    wrong = [(kind, got, single[kind]) for kind, got in results if got != single[kind]]
    assert not wrong, wrong[:3]
    assert service.engine.max_rows_seen > max(rows_before, 1)  # several requests decoded in one batch


def test_adapter_ids_cannot_name_files_outside_their_folder(serving_exports, tmp_path):
    generator = TextGenerator.from_export(serving_exports.adapter_inputs)
    outside = tmp_path / "outside.onnx_adapter"
    outside.write_bytes((serving_exports.adapters / "second.onnx_adapter").read_bytes())
    folder = tmp_path / "adapters"
    folder.mkdir()
    (folder / "escape.onnx_adapter").symlink_to(outside)
    with pytest.raises(ArtifactError, match="outside its folder"):
        served_models(serving_exports.adapter_inputs, generator, adapters_dir=folder)
    (folder / "escape.onnx_adapter").unlink()
    (folder / "bad name!.onnx_adapter").write_bytes(outside.read_bytes())  # not a model id: skipped
    (folder / "adapter.onnx_adapter").write_bytes(outside.read_bytes())  # same id as the export's own
    with pytest.raises(ArtifactError, match="two models would be called 'adapter'"):
        served_models(serving_exports.adapter_inputs, generator, adapters_dir=folder)
    (folder / "adapter.onnx_adapter").unlink()
    (folder / "junk.onnx_adapter").write_bytes(b"not an adapter")
    with pytest.raises(ArtifactError, match="not an onnxruntime adapter file"):
        served_models(serving_exports.adapter_inputs, generator, adapters_dir=folder)
    merged = TextGenerator.from_export(serving_exports.merged)
    with pytest.raises(ArtifactError, match="without --adapter-inputs"):
        served_models(serving_exports.merged, merged, adapters_dir=serving_exports.adapters)


def test_merged_export_serves_one_model(serving_exports):
    generator = TextGenerator.from_export(serving_exports.merged)
    assert list(served_models(serving_exports.merged, generator)) == ["tiny-merged"]
    assert list(served_models(serving_exports.merged, generator, name="mine")) == ["mine"]
    with pytest.raises(ArtifactError, match="model name"):
        served_models(serving_exports.merged, generator, name="../x")
