"""One graph with adapter inputs serves many adapters: ``.onnx_adapter`` files switched per run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from adalora_deploy.export.build.adapter_file import write_onnx_adapter
from adalora_deploy.export.contract import ADAPTER_FILE
from adalora_deploy.export.api import export_model
from adalora_deploy.export.judge.agreement import held_out_batch
from adalora_deploy.export.judge.check import ADAPTER_EFFECT_MIN, check_export
from adalora_deploy.export.build.convert import adapter_factors
from adalora_deploy.export.build.graph import DecoderWrapper
from adalora_deploy.export.judge.parity import ExactScale, torch_greedy
from adalora_deploy.export.runtime.session import DecoderSession, create_session
from adalora_deploy.export.build.source import load_source_model

from adalora_deploy.cli import main

MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def served(export_workspace, tmp_path_factory):
    """An adapter-inputs export of adapter 1, plus .onnx_adapter files for adapter 2 and the zero adapter."""
    ws = export_workspace
    out = tmp_path_factory.mktemp("adapter-inputs") / "export"
    manifest = export_model(ws.model, ws.adapter, output=out, mode="separate", quantization="none",
                            adapter_inputs=True)
    # The second adapter goes through the CLI (adapter folder only, no base model loaded).
    assert main(["adapter-file", str(ws.adapter2), "--export", str(out), "--output",
                 str(out.parent / "second.onnx_adapter")]) == 0
    second = adapter_factors(load_source_model(ws.model, ws.adapter2, quantization="none"))
    zeros = {name: (A[:0], B[:, :0]) for name, (A, B) in second.items()}
    write_onnx_adapter(out.parent / "zero.onnx_adapter", zeros)
    files = {"first": out / ADAPTER_FILE, "second": out.parent / "second.onnx_adapter",
             "zero": out.parent / "zero.onnx_adapter"}
    return out, manifest, files


def _prompt_logits(model, ids, mask):
    wrapper = DecoderWrapper(model).eval()
    past = tuple(torch.zeros(ids.shape[0], wrapper.num_kv_heads, 0, wrapper.head_dim)
                 for _ in range(2 * wrapper.num_layers))
    with torch.no_grad():
        return wrapper(ids, mask, past)[0].numpy()


def test_adapter_inputs_have_a_symbolic_rank_and_a_rank_0_default(served):
    import onnx

    out, manifest, _ = served
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    defaults = {i.name: tuple(i.dims) for i in proto.graph.initializer if i.name in manifest.adapter_input_names}
    assert len(manifest.adapter_input_names) == 2 * len(manifest.ranks)
    for name in manifest.ranks:
        a, b = dims[f"{name}.lora_A"], dims[f"{name}.lora_B"]
        assert isinstance(a[1], str) and a[1] == b[0]  # one symbolic rank per module, shared by A and B
        assert defaults[f"{name}.lora_A"] == (a[0], 0) and defaults[f"{name}.lora_B"] == (0, b[1])
    decoder = DecoderSession(create_session(out / "model.onnx"))
    assert set(decoder.adapter_names) == set(manifest.adapter_input_names) and decoder.adapter_optional


def test_one_graph_serves_two_adapters_and_the_zero_adapter(served, export_workspace):
    import onnxruntime as ort

    out, manifest, files = served
    ws = export_workspace
    torch_models = {
        "first": load_source_model(ws.model, ws.adapter, quantization="none"),
        "second": load_source_model(ws.model, ws.adapter2, quantization="none"),
    }
    from transformers import AutoModelForCausalLM

    torch_models["zero"] = AutoModelForCausalLM.from_pretrained(ws.model, local_files_only=True).eval()
    session = create_session(out / "model.onnx")
    decoder = DecoderSession(session)
    ids, mask = held_out_batch(out, torch_models["zero"].config)
    valid = mask.bool().numpy()
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
             **dict(zip(decoder.past_names, decoder.empty_past(ids.shape[0])))}
    graph_logits, torch_logits = {}, {}
    for label, path in files.items():
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        options = ort.RunOptions()
        options.add_active_adapter(adapter)  # switched per run: same session, no reload
        graph_logits[label] = session.run(["logits"], feeds, options)[0][valid]
        torch_logits[label] = _prompt_logits(torch_models[label], ids, mask)[valid]
        np.testing.assert_allclose(graph_logits[label], torch_logits[label], rtol=0,
                                   atol=ExactScale.of(torch_models[label]).tolerance(torch_logits[label]))
        # greedy decoding with the KV cache, same adapter, batch 2 left padded: identical tokens
        cfg = torch_models[label].config
        got = decoder.generate_greedy(ids.numpy(), mask.numpy(), MAX_NEW_TOKENS, eos_token_id=cfg.eos_token_id,
                                      pad_token_id=cfg.pad_token_id, run_options=options)
        want = torch_greedy(torch_models[label], ids, mask, MAX_NEW_TOKENS, eos_token_id=cfg.eos_token_id,
                            pad_token_id=cfg.pad_token_id)
        np.testing.assert_array_equal(got, want.numpy())
    # no adapter at all: the rank-0 defaults, i.e. the base model
    no_adapter = session.run(["logits"], feeds)[0][valid]
    np.testing.assert_allclose(no_adapter, torch_logits["zero"], rtol=0,
                               atol=ExactScale.of(torch_models["zero"]).tolerance(torch_logits["zero"]))
    # prove the adapters matter, and differently: otherwise the equalities above would be vacuous
    assert np.abs(torch_logits["first"] - torch_logits["zero"]).max() > ADAPTER_EFFECT_MIN
    assert np.abs(torch_logits["second"] - torch_logits["zero"]).max() > ADAPTER_EFFECT_MIN
    assert np.abs(torch_logits["first"] - torch_logits["second"]).max() > ADAPTER_EFFECT_MIN


def test_onnx_adapter_holds_the_exact_ranks(served):
    import onnxruntime as ort

    out, manifest, _ = served
    params = ort.AdapterFormat.read_adapter(str(out / ADAPTER_FILE)).get_parameters()
    assert set(params) == set(manifest.adapter_input_names)
    for name, rank in manifest.ranks.items():
        assert params[f"{name}.lora_A"].shape()[1] == rank and params[f"{name}.lora_B"].shape()[0] == rank


def test_check_of_an_adapter_inputs_export(served):
    out, _, _ = served
    report = check_export(out, max_new_tokens=6, decode_steps=1)
    assert report.passed, report.failures
    assert report["twin"].report.tokens_equal
    assert report["zero-adapter"].passed


def test_adapter_file_refuses_a_baked_graph_and_a_foreign_adapter(served, export_workspace, tmp_path, capsys):
    out, _, _ = served
    ws = export_workspace
    baked = tmp_path / "baked"
    export_model(ws.model, ws.adapter, output=baked, mode="separate", quantization="none")
    assert main(["adapter-file", str(ws.adapter2), "--export", str(baked), "--output", str(tmp_path / "x")]) == 2
    assert "without --adapter-inputs" in capsys.readouterr().err
    from adalora_deploy import AdaLoraConfig, inject_adapters, save_adapter
    from adalora_deploy.demo import tiny_llama

    other = tiny_llama(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)
    config = AdaLoraConfig(total_step=4, init_r=4, target_r=2, target_modules=["q_proj", "v_proj"])
    layers = inject_adapters(other, config)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_E.fill_(0.5)
    save_adapter(layers, config, tmp_path / "foreign")
    assert main(["adapter-file", str(tmp_path / "foreign"), "--export", str(out), "--output", str(tmp_path / "y")]) == 2
    assert "another base" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
