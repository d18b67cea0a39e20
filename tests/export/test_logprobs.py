"""Log-probabilities through the server with the official ``openai`` client: completions ``logprobs``/``echo``/
``max_tokens: 0``, chat ``logprobs``/``top_logprobs``, streamed and not, equal to the trained model's
``log_softmax`` within the exact tier, alone and among 8 concurrent mixed requests; the fields accepted and
ignored; tool turns in a chat history."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import torch
from adalora_deploy.export.runtime.generation import SamplingParams
from adalora_deploy.export.runtime.logprobs import log_softmax, prompt_logprobs, token_logprob
from adalora_deploy.export.judge.parity import ExactScale
from adalora_deploy.export.runtime.server import ServerSettings

from tests.export.test_server import running_server

PROMPT = "The river rises in"
CHAT = [{"role": "user", "content": "Where does the river go?"}]
LOGPROB_TOLERANCE_FACTOR = 2.0
"""log_softmax(x)_i = x_i - logsumexp(x): the error of one logit plus that of the log-sum-exp, each within the
exact tier's logits bound (~6e-6 on the tiny Llama, see export/parity.py)."""
BATCH_TOLERANCE = 1e-5
"""A row's values alone vs batched with others (left padding changes the kernels' summation order only: measured
~1e-7 on the tiny model)."""


@pytest.fixture(scope="module")
def served(serving_exports):
    with running_server(serving_exports.merged, ServerSettings(max_tokens_limit=64)) as running:
        yield running


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[1].url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def trained(serving_exports, export_workspace):
    """The trained model in torch (the merged export's source) and the base without the adapter."""
    from adalora_deploy.export.build.source import adapters_bypassed, load_source_model

    model = load_source_model(serving_exports.model, export_workspace.adapter, quantization="none")

    @torch.no_grad()
    def logprobs(ids: list[int], base: bool = False) -> tuple[np.ndarray, float]:
        """log_softmax of the logits at every position of ``ids`` [len, vocab], and the exact-tier bound."""
        tokens = torch.tensor([ids])
        if base:
            with adapters_bypassed(model):
                logits = model(tokens).logits[0].numpy()
        else:
            logits = model(tokens).logits[0].numpy()
        bound = LOGPROB_TOLERANCE_FACTOR * ExactScale.of(model).tolerance(logits)
        return log_softmax(logits), bound

    return logprobs


def _assert_scores(ids: list[int], got: list[float | None], trained, *, first_is_prompt: bool) -> None:
    """``got[i]`` is the log-probability of ``ids[i]`` given ``ids[:i]`` (``None`` for a prompt's first token)."""
    want, bound = trained(ids)
    adapter_off, _ = trained(ids, base=True)
    if first_is_prompt:
        assert got[0] is None
    positions = range(1, len(ids))
    expected = np.array([want[i - 1, ids[i]] for i in positions])
    measured = np.array([got[i] for i in positions])
    base = np.array([adapter_off[i - 1, ids[i]] for i in positions])
    assert np.abs(base - expected).max() > 100 * bound  # the adapter matters for these values
    np.testing.assert_allclose(measured, expected, rtol=0, atol=bound)


def test_log_softmax_helpers_on_known_values():
    logits = np.array([[0.0, np.log(3.0)], [1.0, 1.0]], np.float32)  # probabilities 1/4, 3/4 and 1/2, 1/2
    np.testing.assert_allclose(np.exp(log_softmax(logits)), [[0.25, 0.75], [0.5, 0.5]], rtol=1e-6)
    entry = token_logprob(np.array([2.0, 5.0, 5.0, -1.0], np.float32), 0, 2)
    assert [i for i, _ in entry.top] == [1, 2]  # ties: lower id first
    scored = prompt_logprobs(logits, [7, 1], 1)
    assert scored[0] is None and scored[1].token_id == 1 and scored[1].logprob == pytest.approx(np.log(0.75))


def test_completion_echo_logprobs_equal_the_trained_model(served, client, trained):
    service, _ = served
    tokenizer = service.tokenizer
    response = client.completions.create(model="tiny-merged", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                         echo=True, extra_body={"repetition_penalty": 5.0})
    choice = response.choices[0]
    lp = choice.logprobs
    prompt = tokenizer.encode(PROMPT)
    assert len(lp.tokens) == len(prompt) + 6 == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert choice.text.startswith(PROMPT) and lp.top_logprobs[0] is None
    generated = list(service.engine.generator.generate([prompt], SamplingParams(
        max_new_tokens=6, repetition_penalty=5.0))[0].token_ids)
    assert lp.tokens[len(prompt):] == [service.token_texts.text(t) for t in generated]
    _assert_scores(prompt + generated, lp.token_logprobs, trained, first_is_prompt=True)
    for i, (token, top) in enumerate(zip(lp.tokens[1:], lp.top_logprobs[1:]), start=1):
        assert 1 <= len(top) <= 4 and max(top.values()) >= lp.token_logprobs[i]  # 3 alternatives and the chosen
        if "\ufffd" not in token:  # partial UTF-8 bytes share one text, so their entries can collide
            assert top[token] == lp.token_logprobs[i]
    for token, offset in zip(lp.tokens[:len(prompt)], lp.text_offset):  # the prompt is ASCII: one char a token
        assert choice.text[offset:offset + len(token)] == token
    assert lp.text_offset == sorted(lp.text_offset)
    plain = client.completions.create(model="tiny-merged", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                      extra_body={"repetition_penalty": 5.0}).choices[0]
    assert PROMPT + plain.text == choice.text and plain.logprobs.tokens == lp.tokens[len(prompt):]
    assert plain.logprobs.token_logprobs == lp.token_logprobs[len(prompt):] and plain.logprobs.text_offset[0] == 0


def test_max_tokens_0_scores_the_prompt_in_one_prefill(served, client, trained):
    service, _ = served
    steps = service.engine.steps
    prompts = [PROMPT, "In winter the", "Every morning he rowed across the", "a b"]
    with ThreadPoolExecutor(len(prompts)) as pool:  # arrive together: one prefill for all
        responses = list(pool.map(lambda p: client.completions.create(
            model="tiny-merged", prompt=p, max_tokens=0, echo=True, logprobs=1), prompts * 4))
    assert service.engine.steps == steps  # no decoding step ran
    assert service.engine.max_prefill_rows > 1
    for prompt, response in zip(prompts * 4, responses):
        choice = response.choices[0]
        assert choice.text == prompt and choice.finish_reason == "length" and response.usage.completion_tokens == 0
        _assert_scores(service.tokenizer.encode(prompt), choice.logprobs.token_logprobs, trained, first_is_prompt=True)
    lists = client.completions.create(model="tiny-merged", prompt=prompts, max_tokens=0, echo=True, logprobs=0)
    for got, response in zip(lists.choices, responses):  # one request with a list of prompts: the same scores
        np.testing.assert_allclose(got.logprobs.token_logprobs[1:], response.choices[0].logprobs.token_logprobs[1:],
                                   rtol=0, atol=BATCH_TOLERANCE)


def test_streamed_completion_logprobs_equal_the_whole(client):
    kwargs = dict(model="tiny-merged", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2, echo=True)
    whole = client.completions.create(**kwargs).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**kwargs, stream=True) if c.choices]
    assert "".join(c.text for c in chunks) == whole.text
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [v for c in chunks if c.logprobs for v in getattr(c.logprobs, field)] == getattr(whole.logprobs, field)


def test_chat_logprobs_and_top_logprobs(served, client, trained):
    service, _ = served
    kwargs = dict(model="tiny-merged", messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=5)
    whole = client.chat.completions.create(**kwargs).choices[0]
    content = whole.logprobs.content
    assert len(content) == 6 and "".join(item.token for item in content) == whole.message.content
    prompt = service.tokenizer.encode_chat(CHAT)
    ids = list(service.engine.generator.generate([prompt], SamplingParams(max_new_tokens=6))[0].token_ids)
    assert [item.token for item in content] == [service.token_texts.text(t) for t in ids]
    for item in content:
        assert len(item.top_logprobs) == 5 and item.top_logprobs[0].token == item.token  # greedy: the top one
        assert [t.logprob for t in item.top_logprobs] == sorted((t.logprob for t in item.top_logprobs), reverse=True)
        assert bytes(item.bytes).decode("utf-8", "replace") == item.token
    want, bound = trained(prompt + ids)
    expected = [want[len(prompt) + i - 1, t] for i, t in enumerate(ids)]
    np.testing.assert_allclose([item.logprob for item in content], expected, rtol=0, atol=bound)
    streamed = [c.choices[0] for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
    assert [item for c in streamed if c.logprobs for item in c.logprobs.content] == content
    plain = client.chat.completions.create(model="tiny-merged", messages=CHAT, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == whole.message.content


def test_eight_concurrent_mixed_requests_equal_alone(served, client):
    """8 different requests at once (scoring only, echo + generation, plain logprobs, chat, streamed) get the
    log-probabilities they get alone (exact fp32 export: left padding adds masked positions only)."""
    service, _ = served

    def ask(kind: int):
        if kind % 4 == 0:
            r = client.completions.create(model="tiny-merged", prompt=f"{PROMPT} {kind}", max_tokens=0, echo=True,
                                          logprobs=2)
            return r.choices[0].logprobs.tokens, r.choices[0].logprobs.token_logprobs
        if kind % 4 == 1:
            r = client.completions.create(model="tiny-merged", prompt="x" * kind, max_tokens=5, temperature=0,
                                          echo=True, logprobs=1)
            return r.choices[0].logprobs.tokens, r.choices[0].logprobs.token_logprobs
        if kind % 4 == 2:
            r = client.chat.completions.create(model="tiny-merged", messages=[{"role": "user", "content": "y" * kind}],
                                               max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
            return [c.token for c in r.choices[0].logprobs.content], [c.logprob for c in r.choices[0].logprobs.content]
        chunks = client.completions.create(model="tiny-merged", prompt=f"z{kind}", max_tokens=5, temperature=0,
                                           logprobs=1, stream=True)
        pieces = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
        return [t for p in pieces for t in p.tokens], [v for p in pieces for v in p.token_logprobs]

    alone = [ask(kind) for kind in range(8)]
    rows = service.engine.max_prefill_rows
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    assert service.engine.max_prefill_rows >= 2 or rows >= 2
    for (tokens, values), (want_tokens, want_values) in zip(together, alone):
        assert tokens == want_tokens
        np.testing.assert_allclose([v for v in values if v is not None], [v for v in want_values if v is not None],
                                   rtol=0, atol=BATCH_TOLERANCE)


def test_harmless_fields_are_accepted_and_ignored(client):
    kwargs = dict(model="tiny-merged", messages=CHAT, max_tokens=5, temperature=0)
    plain = client.chat.completions.create(**kwargs).choices[0].message.content
    extra = client.chat.completions.create(**kwargs, store=False, metadata={"team": "eval"}, user="u1",
                                           service_tier="auto", parallel_tool_calls=False,
                                           response_format={"type": "text"},
                                           extra_body={"tools": [], "tool_choice": "none"})
    assert extra.choices[0].message.content == plain
    text = client.completions.create(model="tiny-merged", prompt=PROMPT, max_tokens=5, temperature=0, user="u1",
                                     extra_body={"store": False, "metadata": {"a": "b"}}).choices[0].text
    assert text == client.completions.create(model="tiny-merged", prompt=PROMPT, max_tokens=5,
                                             temperature=0).choices[0].text


def test_tool_turns_in_a_history_reach_the_template(served, client):
    service, _ = served
    history = [{"role": "user", "content": "What is the weather?"},
               {"role": "assistant", "content": None,
                "tool_calls": [{"id": "call_1", "type": "function",
                                "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    response = client.chat.completions.create(model="tiny-merged", messages=history, max_tokens=3, temperature=0)
    template_messages = [{"role": m["role"], "content": m["content"] or "",
                          **{k: m[k] for k in ("tool_calls", "tool_call_id") if k in m}} for m in history]
    assert response.usage.prompt_tokens == len(service.tokenizer.encode_chat(template_messages))
    assert "sunny" in service.tokenizer.render_chat(template_messages)
