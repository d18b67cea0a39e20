"""Adapted decoders: low-rank branches over dense and quantized bases, baked in or fed as graph inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from adalora_deploy.export.build.graph import DecoderWrapper, export_decoder
from adalora_deploy.export.build.kinds.bnb4 import Bnb4Linear
from adalora_deploy.export.build.kinds.bnb8 import Int8EmulationLinear
from adalora_deploy.export.build.modules import (
    LowRankBranch,
    NBitsLinear,
    swap_module,
)
from adalora_deploy.export.judge.parity import ExactScale, decoder_parity
from adalora_deploy.export.runtime.session import DecoderSession, adapter_feeds, create_session

from adalora_deploy.demo import tiny_llama
from tests.export.helpers import gptq_rtn
from tests.export.test_graph import EOS, PAD, left_padded_batch

ADAPTER_EFFECT_MIN = 1e-2
"""Smallest max-abs logits change that counts as "the adapter matters" (measured 0.1-0.5 here)."""

ADAPTED = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")


def _factors(model, names, rank, seed, scale=0.2):
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for name in names:
        module = model.get_submodule(name)
        factors[name] = (torch.randn(rank, module.in_features, generator=generator) * scale,
                         torch.randn(module.out_features, rank, generator=generator) * scale)
    return factors


def _prompt_logits(model, ids, mask, lora=()):
    wrapper = DecoderWrapper(model).eval()
    past = tuple(torch.zeros(ids.shape[0], wrapper.num_kv_heads, 0, wrapper.head_dim)
                 for _ in range(2 * wrapper.num_layers))
    with torch.no_grad():
        return wrapper(ids, mask, past, lora)[0]


@pytest.fixture(scope="module")
def quantized_adapted(tmp_path_factory):
    """Layer 0: q_proj GPTQ 4-bit act-order + branch, k_proj bnb NF4 (double quant), v_proj dense + branch;
    layer 1: down_proj GPTQ 8-bit + branch, o_proj bnb LLM.int8 emulated. Factors baked in as initializers."""
    bnb = pytest.importorskip("bitsandbytes")
    model = tiny_llama(seed=0)
    base = tiny_llama(seed=0)
    generator = torch.Generator().manual_seed(5)
    for name, kind in [("model.layers.0.self_attn.q_proj", "gptq4"), ("model.layers.0.self_attn.k_proj", "nf4"),
                       ("model.layers.0.self_attn.v_proj", "dense"), ("model.layers.1.mlp.down_proj", "gptq8")]:
        linear = model.get_submodule(name)
        if kind.startswith("gptq"):
            bits = int(kind[4:])
            t = gptq_rtn(linear.weight, bits=bits, group_size=32, act_order=bits == 4)
            quantized = NBitsLinear.from_gptq_tensors(
                t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=bits, group_size=32,
                in_features=linear.in_features, out_features=linear.out_features)
        elif kind == "nf4":
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                      compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
            layer.load_state_dict(linear.state_dict())
            quantized = Bnb4Linear.from_bnb(layer.to("cpu"))
            swap_module(model, name, quantized)
            swap_module(base, name, quantized)
            continue
        else:
            quantized = linear
        A = torch.randn(4, linear.in_features, generator=generator) * 0.2
        B = torch.randn(linear.out_features, 4, generator=generator) * 0.2
        swap_module(model, name, LowRankBranch(quantized, A, B))
        swap_module(base, name, quantized)
    name = "model.layers.1.self_attn.o_proj"
    linear = model.get_submodule(name)
    layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False, threshold=6.0)
    layer.load_state_dict(linear.state_dict())
    emulated = Int8EmulationLinear.from_bnb(layer.to("cpu"))
    swap_module(model, name, emulated)
    swap_module(base, name, emulated)
    result = export_decoder(model, tmp_path_factory.mktemp("quantized"))
    return model, base, result, DecoderSession(create_session(result.model_path))


def test_quantized_bases_with_baked_adapters(quantized_adapted):
    model, base, result, decoder = quantized_adapted
    assert result.op_counts["com.microsoft::MatMulNBits"] == 2
    assert result.op_counts["com.microsoft::MatMulBnb4"] == 1
    assert result.op_counts["MatMulInteger"] == 1
    ids, mask = left_padded_batch(seed=3)
    valid = mask.bool()
    effect = (_prompt_logits(model, ids, mask) - _prompt_logits(base, ids, mask))[valid].abs().max()
    assert float(effect) > ADAPTER_EFFECT_MIN  # prove the adapters matter first
    report = decoder_parity(model, decoder, ids, mask, decode_steps=2, max_new_tokens=8,
                            eos_token_id=EOS, pad_token_id=PAD)
    assert report.passed, report.failures
    assert report.tokens_equal


@pytest.fixture(scope="module")
def runtime_adapted(tmp_path_factory):
    """Branches in adapter-inputs mode on q/v/down of both layers (layer 1 q_proj over a GPTQ 4-bit base)."""
    model = tiny_llama(seed=0)
    base = tiny_llama(seed=0)
    names = [f"model.layers.{i}.{suffix}" for i in range(2) for suffix in ADAPTED]
    for name in names:
        linear = model.get_submodule(name)
        if name == "model.layers.1.self_attn.q_proj":
            t = gptq_rtn(linear.weight, bits=4, group_size=32)
            linear = NBitsLinear.from_gptq_tensors(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=4,
                                                   group_size=32, in_features=64, out_features=64)
            swap_module(base, name, linear)
        swap_module(model, name, LowRankBranch(linear, factors_as_inputs=True))
    result = export_decoder(model, tmp_path_factory.mktemp("runtime"))
    return model, base, names, result, DecoderSession(create_session(result.model_path))


def test_adapter_inputs_interface(runtime_adapted):
    _, _, names, result, decoder = runtime_adapted
    assert result.adapter_input_names == tuple(f"{n}.{p}" for n in names for p in ("lora_A", "lora_B"))
    assert decoder.adapter_names == result.adapter_input_names
    inputs = {i.name: i.shape for i in decoder.session.get_inputs()}
    assert inputs["model.layers.0.mlp.down_proj.lora_A"] == [128, "rank_2"]
    assert inputs["model.layers.0.mlp.down_proj.lora_B"] == ["rank_2", 64]


def test_one_graph_serves_two_adapters_and_zeros(runtime_adapted):
    model, base, names, _, decoder = runtime_adapted
    ids, mask = left_padded_batch(seed=4)
    valid = mask.bool().numpy()
    adapters = {
        "first": _factors(model, names, rank=3, seed=10),
        "second": _factors(model, names, rank=6, seed=11),
        "zeros": {n: (torch.zeros(5, model.get_submodule(n).in_features),
                      torch.zeros(model.get_submodule(n).out_features, 5)) for n in names},
        "rank0": _factors(model, names, rank=0, seed=12),
    }
    logits = {}
    for label, factors in adapters.items():
        report = decoder_parity(model, decoder, ids, mask, decode_steps=2, max_new_tokens=6,
                                eos_token_id=EOS, pad_token_id=PAD, factors=factors)
        assert report.passed, (label, report.failures)
        assert all(o.max_abs <= o.tolerance for o in report.outputs)
        logits[label] = decoder.step(ids.numpy(), mask.numpy(), adapter=adapter_feeds(factors)).logits[valid]
    base_logits = _prompt_logits(base, ids, mask).numpy()[valid]
    # the two adapters change the output, differently; zero factors (any rank, even 0) give the base model
    assert np.abs(logits["first"] - base_logits).max() > ADAPTER_EFFECT_MIN
    assert np.abs(logits["second"] - base_logits).max() > ADAPTER_EFFECT_MIN
    assert np.abs(logits["first"] - logits["second"]).max() > ADAPTER_EFFECT_MIN
    atol = ExactScale.of(base).tolerance(base_logits)
    np.testing.assert_allclose(logits["zeros"], base_logits, rtol=0, atol=atol)
    np.testing.assert_allclose(logits["rank0"], base_logits, rtol=0, atol=atol)


def test_missing_adapter_feeds_are_rejected(runtime_adapted):
    _, _, _, _, decoder = runtime_adapted
    ids, mask = left_padded_batch()
    with pytest.raises(ValueError, match="adapter feeds"):
        decoder.step(ids.numpy(), mask.numpy())
