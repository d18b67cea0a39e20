"""The fp32 tiny Llama as one KV-cache decoding graph: interface, parity, left-padded greedy generation."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from adalora_deploy.export.build.graph import ExportError, export_decoder
from adalora_deploy.export.judge.parity import decoder_parity
from adalora_deploy.export.runtime.session import DecoderSession, create_session

from adalora_deploy.demo import tiny_llama

EOS, PAD = 257, 258
PADDING_ATOL = 1e-5
"""Same graph, a prompt with and without left padding: masked keys add exact zeros, only the summation
order of the softmax denominators changes; measured <= 3e-7."""


def left_padded_batch(seed: int = 0, lengths=(7, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of different lengths, left-padded with PAD (what a tokenizer with padding_side='left' gives)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.int64)
    mask = torch.zeros(len(lengths), width, dtype=torch.int64)
    for row, length in enumerate(lengths):
        ids[row, width - length:] = torch.randint(0, 256, (length,), generator=generator)
        mask[row, width - length:] = 1
    return ids, mask


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_llama(seed=0)
    result = export_decoder(model, tmp_path_factory.mktemp("fp32"))
    return model, result, DecoderSession(create_session(result.model_path))


def test_graph_interface(exported):
    model, result, _ = exported
    layers = model.config.num_hidden_layers
    assert result.input_names == ("input_ids", "attention_mask",
                                  *[f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")])
    assert result.output_names == ("logits", *[f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")])
    assert result.external_data_path is None and result.adapter_input_names == ()
    assert (result.num_layers, result.num_kv_heads, result.head_dim) == (2, 2, 16)
    proto = onnx.load(str(result.model_path))
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*proto.graph.input, *proto.graph.output]}
    assert dims["input_ids"] == ["batch", "seq"]
    assert dims["attention_mask"] == ["batch", "total_seq"]
    assert dims["past_key_values.0.key"] == ["batch", 2, "past_seq", 16]
    assert dims["logits"] == ["batch", "seq", 259]
    assert proto.opset_import[0].version == result.opset
    names = [node.name for node in proto.graph.node]
    assert len(set(names)) == len(names) and "/model/layers/0/self_attn/MatMul_0" in names
    assert result.op_counts["MatMul"] >= 7 * layers
    # atomic write: nothing but the model in the folder
    assert sorted(p.name for p in result.model_path.parent.iterdir()) == ["model.onnx"]


def test_prompt_and_incremental_decode_match_torch(exported):
    model, _, decoder = exported
    ids, mask = left_padded_batch()
    report = decoder_parity(model, decoder, ids, mask, decode_steps=3, max_new_tokens=0)
    assert report.passed, report.failures
    assert len(report.outputs) == 4 * 5
    assert all(o.max_abs <= o.tolerance for o in report.outputs)
    assert report["step0/logits"].top1_agreement == 1.0
    assert report["step3/logits"].cosine_min > 0.999999


def test_left_padded_batch_greedy_tokens_equal_transformers(exported):
    model, _, decoder = exported
    ids, mask = left_padded_batch(seed=1)
    report = decoder_parity(model, decoder, ids, mask, decode_steps=0, max_new_tokens=12,
                            eos_token_id=EOS, pad_token_id=PAD)
    assert report.tokens_equal is True, report.failures
    assert report.passed


def test_left_padding_does_not_change_a_row(exported):
    _, _, decoder = exported
    ids, mask = left_padded_batch(seed=2)
    short = ids[1:, mask[1].bool()]  # the padded row on its own, unpadded
    padded_out = decoder.generate_greedy(ids.numpy(), mask.numpy(), 6)
    alone_out = decoder.generate_greedy(short.numpy(), np.ones_like(short.numpy()), 6)
    assert (padded_out[1, -6:] == alone_out[0, -6:]).all()
    padded = decoder.step(ids.numpy(), mask.numpy()).logits[1, mask[1].bool().numpy()]
    alone = decoder.step(short.numpy(), np.ones_like(short.numpy())).logits[0]
    np.testing.assert_allclose(padded, alone, rtol=0, atol=PADDING_ATOL)


def test_external_data(exported, tmp_path):
    model, _, decoder = exported
    result = export_decoder(model, tmp_path, external_data=True)
    assert result.external_data_path == tmp_path / "model.onnx.data"
    assert result.external_data_path.stat().st_size > 100_000
    other = DecoderSession(create_session(result.model_path))
    ids, mask = left_padded_batch()
    np.testing.assert_array_equal(other.step(ids.numpy(), mask.numpy()).logits,
                                  decoder.step(ids.numpy(), mask.numpy()).logits)
    # a second export of the same model: same node names, same op counts
    first = onnx.load(str(exported[1].model_path), load_external_data=False)
    second = onnx.load(str(result.model_path), load_external_data=False)
    assert [n.name for n in first.graph.node] == [n.name for n in second.graph.node]
    assert result.op_counts == exported[1].op_counts


def test_unswapped_quantized_layer_is_named(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    model = tiny_llama(seed=0)
    model.model.layers[0].mlp.up_proj = bnb.nn.Linear4bit(64, 128, bias=False, compute_dtype=torch.float32)
    with pytest.raises(ExportError, match=r"model.layers.0.mlp.up_proj \(Linear4bit\): swap it for .*Bnb4Linear"):
        export_decoder(model, tmp_path)
    assert list(tmp_path.iterdir()) == []
