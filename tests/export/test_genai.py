"""onnxruntime-genai loads our exports as its own: genai_config.json, og.Model/og.Generator greedy tokens equal to
our loop (and so to transformers), og.Adapters with our .onnx_adapter files, and what genai cannot do."""

from __future__ import annotations

import json

import numpy as np
import pytest
from adalora_deploy.export.runtime.generation import SamplingParams, TextGenerator, collect
from adalora_deploy.export.build.manifest import read_manifest, sha256_file

from adalora_deploy.cli import main

og = pytest.importorskip("onnxruntime_genai")
from adalora_deploy.export.contract import GENAI_CONFIG_FILE  # noqa: E402
from adalora_deploy.export.runtime.genai import GenaiGenerator  # noqa: E402

PROMPTS = ["The river rises in", "In winter the", "Every morning he rowed across the", "a"]
GREEDY = SamplingParams(max_new_tokens=20)


def test_every_export_writes_genai_config_into_its_manifest(serving_exports):
    for folder in (serving_exports.merged, serving_exports.adapter_inputs):
        manifest = read_manifest(folder)
        assert manifest.files[GENAI_CONFIG_FILE] == sha256_file(folder / GENAI_CONFIG_FILE)
        config = json.loads((folder / GENAI_CONFIG_FILE).read_text())
        model_config = json.loads((folder / "config.json").read_text())
        decoder = config["model"]["decoder"]
        # fast-path graphs append to one KV buffer in place (GroupQueryAttention); adapter-input graphs concatenate
        assert config["search"]["past_present_share_buffer"] is (manifest.builder == "fast" and not manifest.adapter_inputs)
        assert decoder["num_hidden_layers"] == model_config["num_hidden_layers"]
        assert decoder["num_key_value_heads"] == model_config["num_key_value_heads"]
        assert config["model"]["eos_token_id"] == model_config["eos_token_id"]
        assert config["model"]["context_length"] == model_config["max_position_embeddings"]
        names = set(manifest.input_names) | set(manifest.output_names)
        assert {decoder["inputs"]["input_ids"], decoder["inputs"]["attention_mask"], decoder["outputs"]["logits"],
                decoder["inputs"]["past_key_names"] % 0, decoder["outputs"]["present_value_names"] % 1} <= names


@pytest.mark.parametrize("which", ["merged", "adapter_inputs"])
def test_genai_greedy_tokens_equal_our_loop(serving_exports, which):
    """og.Model + og.Generator on the merged export and on the separate (adapter-inputs) export without adapter."""
    folder = getattr(serving_exports, which)
    ours, genai = TextGenerator.from_export(folder), GenaiGenerator(folder)
    prompts = [ours.tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(max_new_tokens=20, repetition_penalty=5.0 if which == "merged" else 1.0)
    for prompt in prompts:  # one at a time: og batches only equal lengths (see below)
        want = ours.generate([prompt], params)[0]
        got = collect(genai.stream([prompt], params), [prompt])[0]
        assert got == want
    assert len({c.token_ids for c in ours.generate(prompts, params)}) > 1  # the prompts lead to different text


def test_genai_adapters_equal_onnxruntime_lora_adapters(serving_exports):
    """og.Adapters loads our .onnx_adapter files (the export's own and one from adapter-file) and switches them
    per generator, with the same tokens as onnxruntime.LoraAdapter in our loop."""
    import onnxruntime as ort

    folder = serving_exports.adapter_inputs
    ours, genai = TextGenerator.from_export(folder), GenaiGenerator(folder)
    prompt = ours.tokenizer.encode(PROMPTS[1])
    params = SamplingParams(max_new_tokens=16, repetition_penalty=5.0)
    outputs = {}
    for path in (folder / "adapter.onnx_adapter", serving_exports.adapters / "second.onnx_adapter"):
        lora = ort.LoraAdapter()
        lora.Load(str(path))
        options = ort.RunOptions()
        options.add_active_adapter(lora)
        want = ours.generate([prompt], params, run_options=options)[0]
        got = collect(genai.stream([prompt], params, adapter=genai.load_adapter(path)), [prompt])[0]
        assert got == want
        outputs[path.name] = got.token_ids
    base = collect(genai.stream([prompt], params), [prompt])[0].token_ids
    assert len({base, *outputs.values()}) == 3  # base and both adapters differ: the switch is real


def test_genai_batches_equal_lengths_and_seeds(serving_exports):
    folder = serving_exports.adapter_inputs
    ours, genai = TextGenerator.from_export(folder), GenaiGenerator(folder)
    prompts = [ours.tokenizer.encode(p) for p in ("river", "mills", "bread", "a")]  # three of one length
    assert collect(genai.stream(prompts, GREEDY), prompts) == ours.generate(prompts, GREEDY)
    sampled = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=40, seed=5)
    first = collect(genai.stream(prompts[:1], sampled), prompts[:1])[0]
    assert first == collect(genai.stream(prompts[:1], sampled), prompts[:1])[0]  # og's own seeded sampling
    assert first.token_ids != collect(genai.stream(prompts[:1], GREEDY), prompts[:1])[0].token_ids[:12]


def test_genai_left_padded_batches_attend_to_padding(serving_exports):
    """Why GenaiGenerator batches only equal lengths: og 0.18 feeds attention_mask all ones for a left-padded
    batch, so a padded row continues differently from the same prompt alone. If this test starts failing,
    genai learned to mask padding and GenaiGenerator can batch any prompts."""
    folder = serving_exports.adapter_inputs
    ours = TextGenerator.from_export(folder)
    short, long = ours.tokenizer.encode("In winter the"), ours.tokenizer.encode("Every morning he rowed across")
    pad = ours.limits.pad_token_id
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(batch_size=2, max_length=len(long) + 8, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([[pad] * (len(long) - len(short)) + short, long], dtype=np.int32))
    generator.generate_next_token()
    assert generator.get_input("attention_mask").min() == 1  # the pad positions are attended to
    while not generator.is_done():
        generator.generate_next_token()
    padded_row = generator.get_sequence(0).tolist()[len(long):]
    alone = ours.generate([short], SamplingParams(max_new_tokens=8))[0].token_ids
    assert tuple(padded_row) != alone
    assert ours.generate([short, long], SamplingParams(max_new_tokens=8))[0].token_ids == alone  # ours masks it


def test_generate_command_with_the_genai_engine(serving_exports, capsys):
    args = ["generate", str(serving_exports.adapter_inputs), "--prompt", PROMPTS[0], "--prompt", PROMPTS[2],
            "--max-new-tokens", "10", "--json", "--adapter", "adapter", "--repetition-penalty", "5"]
    outputs = []
    for engine in ("onnxruntime", "genai"):
        assert main([*args, "--engine", engine]) == 0
        lines = sorted((json.loads(line) for line in capsys.readouterr().out.splitlines()), key=lambda d: d["index"])
        outputs.append([(d["text"], d["token_ids"]) for d in lines])
    assert outputs[0] == outputs[1] and len(outputs[0]) == 2
