"""Generation with our decoding loop: transformers' greedy text, its logits processors, seeds, stop strings,
streaming, left-padded batches and the ``generate`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from adalora_deploy.export.runtime.generation import (
    GenerationError,
    SamplingParams,
    TextGenerator,
    TextStream,
    TokenSampler,
    repetition_penalty,
    top_k_filter,
    top_p_filter,
)
from adalora_deploy.export.build.source import load_source_model
from adalora_deploy.export.runtime.tokenizer import TextTokenizer

from adalora_deploy.cli import main

PROMPTS = ["The river rises in", "In winter the", "Every morning he rowed across the"]
MAX_NEW = 16


@pytest.fixture(scope="module")
def merged(serving_exports):
    return TextGenerator.from_export(serving_exports.merged)


@pytest.fixture(scope="module")
def torch_model(serving_exports, export_workspace):
    return load_source_model(serving_exports.model, export_workspace.adapter, quantization="none")


def _hf_generate(model, tokenizer: TextTokenizer, prompt: str, **kwargs) -> list[int]:
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                             do_sample=False, num_beams=1, min_new_tokens=0, **kwargs)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("penalty", [1.0, 2.0])
def test_greedy_equals_the_trained_torch_model(merged, torch_model, penalty):
    """Exact merged export, greedy (with and without repetition penalty) == transformers' generate."""
    params = SamplingParams(max_new_tokens=MAX_NEW, repetition_penalty=penalty)
    ours = merged.generate([merged.tokenizer.encode(p) for p in PROMPTS], params)
    for prompt, completion in zip(PROMPTS, ours):
        want = _hf_generate(torch_model, merged.tokenizer, prompt, repetition_penalty=penalty,
                            eos_token_id=sorted(merged.limits.eos_token_ids), pad_token_id=merged.limits.pad_token_id)
        assert list(completion.token_ids) == want
        assert completion.text == merged.tokenizer.decode(want)
    if penalty != 1.0:  # the penalty changes the output, so the equality above tests it
        plain = merged.generate([merged.tokenizer.encode(PROMPTS[0])], SamplingParams(max_new_tokens=MAX_NEW))
        assert plain[0].token_ids != ours[0].token_ids


def test_processors_equal_transformers_warpers():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = (rng.normal(size=300) * 3).astype(np.float32)
        history = rng.integers(0, 300, size=12)
        seen = np.zeros(300, bool)
        seen[history] = True
        scores = torch.from_numpy(logits[None].copy())
        ids = torch.from_numpy(history[None])
        want = RepetitionPenaltyLogitsProcessor(1.7)(ids, scores.clone())
        np.testing.assert_allclose(repetition_penalty(logits, seen, 1.7), want[0].numpy(), rtol=0, atol=0)
        want = TopKLogitsWarper(13)(ids, TemperatureLogitsWarper(0.7)(ids, scores.clone()))
        np.testing.assert_array_equal(np.isinf(top_k_filter(logits / np.float32(0.7), 13)), torch.isinf(want)[0].numpy())
        for p in (0.3, 0.9):
            want = TopPLogitsWarper(p)(ids, scores.clone())
            np.testing.assert_array_equal(np.isinf(top_p_filter(logits, p)), torch.isinf(want)[0].numpy())


def test_sampler_draws_from_the_filtered_distribution():
    """Top-k 3 at temperature 1: only those three tokens, at frequencies near their renormalized probabilities."""
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    sampler = TokenSampler(SamplingParams(temperature=1.0, top_k=3, seed=0), 4, [])
    draws = np.bincount([sampler(logits) for _ in range(4000)], minlength=4) / 4000
    assert draws[3] == 0
    np.testing.assert_allclose(draws[:3], np.array([0.5, 0.3, 0.15]) / 0.95, atol=0.03)


def test_sampling_is_reproducible_with_a_seed_and_differs_from_greedy(merged):
    prompts = [merged.tokenizer.encode(p) for p in PROMPTS]
    sampled = SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0, top_k=50, top_p=0.95, seed=1234)
    first = [c.token_ids for c in merged.generate(prompts, sampled)]
    again = [c.token_ids for c in merged.generate(prompts, sampled)]
    other = [c.token_ids for c in merged.generate(prompts, SamplingParams(**{**sampled.__dict__, "seed": 99}))]
    greedy = [c.token_ids for c in merged.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW))]
    assert first == again
    assert first != other and first != greedy
    # a row's draws depend on its own seed only: alone == in the batch
    alone = merged.generate([prompts[1]], sampled)[0].token_ids
    assert alone == first[1]


def test_left_padded_batch_equals_single_prompts(serving_exports):
    """The base of the adapter-inputs export (a random tiny Llama: varied text) on prompts of different lengths."""
    generator = TextGenerator.from_export(serving_exports.adapter_inputs)
    prompts = [generator.tokenizer.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # really padded
    params = SamplingParams(max_new_tokens=24)
    batch = generator.generate(prompts, params)
    singles = [generator.generate([p], params)[0] for p in prompts]
    assert batch == singles
    assert len({c.token_ids for c in batch}) == len(prompts) and all(len(set(c.token_ids)) > 3 for c in batch)


def test_rows_finish_on_their_own(merged):
    """Different max_new_tokens per row: each stops at its own length, the others go on (and are unchanged)."""
    prompts = [merged.tokenizer.encode(p) for p in PROMPTS]
    lengths = [3, MAX_NEW, 7]
    mixed = merged.generate(prompts, [SamplingParams(max_new_tokens=n) for n in lengths])
    full = merged.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW))
    for got, whole, n in zip(mixed, full, lengths):
        assert got.finish_reason == "length" and got.token_ids == whole.token_ids[:n]


def test_eos_ends_a_row(serving_exports, tmp_path):
    """Make the model's favourite next token the EOS id (generation_config.json): the row stops there."""
    import shutil

    folder = tmp_path / "export"
    shutil.copytree(serving_exports.merged, folder)
    generator = TextGenerator.from_export(folder)
    prompt = generator.tokenizer.encode(PROMPTS[0])
    tokens = generator.generate([prompt], SamplingParams(max_new_tokens=MAX_NEW))[0].token_ids
    config = json.loads((folder / "generation_config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"], tokens[2]]
    (folder / "generation_config.json").write_text(json.dumps(config))
    stopped = TextGenerator.from_export(folder).generate([prompt], SamplingParams(max_new_tokens=MAX_NEW))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == tokens[:tokens.index(tokens[2]) + 1]


class _CharTokenizer:
    """Decodes ids as characters (for TextStream unit tests)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)

    def detokenizer(self):
        from adalora_deploy.export.runtime.tokenizer import IncrementalDetokenizer

        return IncrementalDetokenizer(self)


def _stream(text: str, stop: tuple[str, ...]) -> tuple[list[str], bool]:
    stream = TextStream(_CharTokenizer(), stop)
    deltas = []
    for ch in text:
        deltas.append(stream.push(ord(ch)))
        if stream.stopped:
            break
    deltas.append(stream.finish())
    return deltas, stream.stopped


def test_stop_strings_cut_the_text_and_hold_back_partial_matches():
    deltas, stopped = _stream("hello world. next", ("world.",))
    assert stopped and "".join(deltas) == "hello "
    assert "w" not in "".join(deltas[:-1])  # "w", "wo"... were held back, never sent
    deltas, stopped = _stream("a wonder", ("world",))  # a partial match that fails is released
    assert not stopped and "".join(deltas) == "a wonder"
    deltas, stopped = _stream("x##y", ("##", "#y"))  # the earliest stop wins
    assert stopped and "".join(deltas) == "x"


def test_stop_string_end_to_end(merged):
    prompt = merged.tokenizer.encode(PROMPTS[2])
    params = SamplingParams(max_new_tokens=MAX_NEW, repetition_penalty=5.0)  # varied text from the tiny model
    full = merged.generate([prompt], params)[0]
    at = next(i for i, ch in enumerate(full.text) if i >= 3 and ch.isascii() and ch.isprintable()
              and ch not in full.text[:i])
    cut = merged.generate([prompt], SamplingParams(**{**params.__dict__, "stop": (full.text[at],)}))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:at]
    assert len(cut.token_ids) < len(full.token_ids)


def test_bad_parameters_and_prompts_are_user_errors(merged):
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"max_new_tokens": 0}, {"stop": ("",)},
                {"repetition_penalty": 0}):
        with pytest.raises(GenerationError):
            SamplingParams(**bad)
    with pytest.raises(GenerationError, match="context"):
        merged.generate([[1] * merged.limits.context_length], SamplingParams())
    with pytest.raises(GenerationError, match="empty"):
        merged.generate([[]], SamplingParams())


def test_generate_command_streams_and_prints_json(serving_exports, capsys):
    export = str(serving_exports.merged)
    assert main(["generate", export, "--prompt", PROMPTS[0], "--max-new-tokens", "8", "--stats"]) == 0
    out = capsys.readouterr()
    generator = TextGenerator.from_export(export)
    want = generator.generate([generator.tokenizer.encode(PROMPTS[0])], SamplingParams(max_new_tokens=8))[0]
    assert out.out == want.text + "\n" and "tokens/s" in out.err
    assert main(["generate", export, "--chat", "hi", "--chat", "tell me about the river", "--json",
                 "--max-new-tokens", "6", "--temperature", "0.8", "--seed", "3", "--top-k", "20"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(line["index"] for line in lines) == [0, 1] and all(len(line["token_ids"]) == 6 for line in lines)
    chat = generator.tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    assert next(line for line in lines if line["index"] == 0)["prompt_tokens"] == len(chat)


def test_generate_command_with_an_adapter(serving_exports, capsys):
    export = serving_exports.adapter_inputs
    # a strong repetition penalty: the trained tiny adapters otherwise all repeat one letter
    args = ["generate", str(export), "--prompt", PROMPTS[1], "--max-new-tokens", "10", "--json",
            "--repetition-penalty", "5"]
    outputs = {}
    for name, extra in (("base", []), ("adapter", ["--adapter", "adapter"]),
                        ("second", ["--adapter", str(serving_exports.adapters / "second.onnx_adapter")])):
        assert main(args + extra) == 0
        outputs[name] = json.loads(capsys.readouterr().out)["token_ids"]
    assert len({tuple(t) for t in outputs.values()}) == 3  # three different models from one graph
    merged = TextGenerator.from_export(serving_exports.merged)  # the export's own adapter == the merged export
    want = merged.generate([merged.tokenizer.encode(PROMPTS[1])], SamplingParams(max_new_tokens=10,
                                                                                   repetition_penalty=5.0))[0]
    assert outputs["adapter"] == list(want.token_ids)
    assert main(["generate", str(serving_exports.merged), "--prompt", "x", "--adapter", "adapter"]) == 2
    assert "no such file" in capsys.readouterr().err
