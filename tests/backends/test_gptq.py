"""GPTQ format: packing, dequantization, QuantLinear, backend and checkpoint I/O.

The references here are written from docs/QUANT.md with Python integers and numpy, independently of
the library's vectorized unpacking.
"""

from __future__ import annotations

import importlib.util
import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from adalora_deploy.backends import backend_for
from adalora_deploy.backends.gptq import GPTQBackend, QuantLinear
from adalora_deploy.demo import byte_tokenizer, tiny_llama
from adalora_deploy.errors import GPTQFormatError
from adalora_deploy.gptq.checkpoint import load_gptq_model, save_gptq_model
from adalora_deploy.gptq.packing import (
    pack_columns,
    pack_rows,
    unpack_columns,
    unpack_rows,
)

BITS = (2, 3, 4, 8)

BF16_FORWARD_RTOL = 2e-2
"""bf16 has an 8-bit mantissa (relative step 2**-8 = 0.4%); a 96-term dot product of bf16 products
accumulates a few steps. Measured max relative deviation from the fp32 result: ~0.6%."""


# ---------------------------------------------------------------------------------------------------
# Independent references (docs/QUANT.md, written with Python integers)
# ---------------------------------------------------------------------------------------------------


def ref_pack(values: list[int], bits: int) -> list[int]:
    """Pack values into signed int32 words as docs/QUANT.md describes, one word at a time."""
    words: list[int] = []
    if bits == 3:
        for start in range(0, len(values), 32):
            v = values[start : start + 32]
            word0 = sum(v[j] << (3 * j) for j in range(10)) | ((v[10] & 0b11) << 30)
            word1 = (v[10] >> 2) | sum(v[11 + j] << (1 + 3 * j) for j in range(10)) | ((v[21] & 1) << 31)
            word2 = (v[21] >> 1) | sum(v[22 + j] << (2 + 3 * j) for j in range(10))
            words += [word0, word1, word2]
    else:
        per_word = 32 // bits
        for start in range(0, len(values), per_word):
            words.append(sum(values[start + j] << (j * bits) for j in range(per_word)))
    return [w - (1 << 32) if w >= (1 << 31) else w for w in words]


def ref_unpack(words: list[int], bits: int) -> list[int]:
    """Read the words as one little-endian bit stream of ``bits``-bit fields."""
    stream = 0
    for k, word in enumerate(words):
        stream |= (int(word) & 0xFFFFFFFF) << (32 * k)
    return [(stream >> (bits * j)) & ((1 << bits) - 1) for j in range(len(words) * 32 // bits)]


def ref_dequantize(layer: QuantLinear, exact: bool = False) -> np.ndarray:
    """``W[o, i] = scales[g, o] * (q[i, o] - z[g, o])`` loop by loop, float32 ``(out, in)``.

    In fp16 (gptqmodel's arithmetic) by default; ``exact=True`` forms the product in float64.
    """
    bits = layer.bits
    qweight = layer.qweight.numpy().astype(np.int64)
    qzeros = layer.qzeros.numpy().astype(np.int64)
    scales = layer.scales.numpy()
    g_idx = layer.g_idx.numpy()
    q = np.array([ref_unpack(list(qweight[:, o]), bits) for o in range(qweight.shape[1])]).T  # (in, out)
    z = np.array([ref_unpack(list(qzeros[g]), bits) for g in range(qzeros.shape[0])])  # (G, out)
    if layer.checkpoint_format == "gptq":
        z = (z + 1) & ((1 << bits) - 1)
    out = np.empty((layer.out_features, layer.in_features), dtype=np.float32)
    for i in range(layer.in_features):
        g = g_idx[i]
        for o in range(layer.out_features):
            if exact:
                out[o, i] = np.float64(scales[g, o]) * np.float64(q[i, o] - z[g, o])
            else:
                out[o, i] = np.float16(scales[g, o]) * np.float16(q[i, o] - z[g, o])
    return out


# ---------------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_pack_rows_matches_reference_layout(bits):
    generator = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (64, 5), generator=generator)
    # Force the top field set so some words have the sign bit (signed int32 on disk).
    values[-1] = 2**bits - 1
    packed = pack_rows(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (64 * bits // 32, 5)
    for column in range(5):
        expected = ref_pack([int(v) for v in values[:, column]], bits)
        assert packed[:, column].tolist() == expected
        assert ref_unpack(expected, bits) == values[:, column].tolist()
    assert bool((packed < 0).any())
    assert torch.equal(unpack_rows(packed, bits), values.to(torch.int32))


@pytest.mark.parametrize("bits", BITS)
def test_pack_columns_is_rows_along_out(bits):
    values = torch.randint(0, 2**bits, (3, 64), generator=torch.Generator().manual_seed(0))
    packed = pack_columns(values, bits)
    assert packed.shape == (3, 64 * bits // 32)
    for row in range(3):
        assert packed[row].tolist() == ref_pack(values[row].tolist(), bits)
    assert torch.equal(unpack_columns(packed, bits), values.to(torch.int32))


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    runs=st.integers(1, 4),
    cols=st.integers(1, 7),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip(bits, runs, cols, seed):
    rows = runs * (32 if bits == 3 else 32 // bits)
    values = torch.randint(0, 2**bits, (rows, cols), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(unpack_rows(pack_rows(values, bits), bits), values.to(torch.int32))
    words = torch.randint(
        -(2**31), 2**31, (rows * bits // 32, cols), generator=torch.Generator().manual_seed(seed), dtype=torch.int64
    )
    words = words.to(torch.int32)
    # Every int32 bit pattern is a valid packing: unpack then pack returns the same words.
    assert torch.equal(pack_rows(unpack_rows(words, bits), bits), words)


def test_pack_rejects_bad_input():
    with pytest.raises(GPTQFormatError, match="bits"):
        pack_rows(torch.zeros(32, 1, dtype=torch.long), 5)
    with pytest.raises(GPTQFormatError, match="multiple of 32"):
        pack_rows(torch.zeros(16, 1, dtype=torch.long), 3)
    with pytest.raises(GPTQFormatError, match=r"\[0, 15\]"):
        pack_rows(torch.full((8, 1), 16), 4)


# ---------------------------------------------------------------------------------------------------
# Dequantization: every bits x sym x desc_act x format
# ---------------------------------------------------------------------------------------------------

IN, OUT = 96, 64


def _random_layer_inputs(bits, sym, desc_act, group_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    groups = 1 if group_size == -1 else -(-IN // group_size)
    q = torch.randint(0, maxq + 1, (OUT, IN), generator=generator)
    scales = (torch.rand(groups, OUT, generator=generator) * 0.05 + 1e-3).half()
    if sym:
        zeros = torch.full((groups, OUT), 2 ** (bits - 1))
    else:
        zeros = torch.randint(0, maxq + 1, (groups, OUT), generator=generator)
        zeros[0, :3] = 0  # the value v1 cannot store
        zeros[-1, -3:] = maxq
    size = IN if group_size == -1 else group_size
    if desc_act:
        order = torch.randperm(IN, generator=generator)
        g_idx = torch.empty(IN, dtype=torch.int32)
        g_idx[order] = (torch.arange(IN) // size).to(torch.int32)
    else:
        g_idx = (torch.arange(IN) // size).to(torch.int32)
    return q, scales, zeros, g_idx


COMBOS = list(itertools.product(BITS, (True, False), (False, True), ("gptq", "gptq_v2")))


@pytest.mark.parametrize("bits,sym,desc_act,fmt", COMBOS)
@pytest.mark.parametrize("group_size", [40, -1])  # 96 = 40 + 40 + 16: a partial last group
def test_dequantize_bit_exact(bits, sym, desc_act, fmt, group_size):
    q, scales, zeros, g_idx = _random_layer_inputs(bits, sym, desc_act, group_size)
    kwargs = dict(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, checkpoint_format=fmt)
    if fmt == "gptq" and not sym:
        with pytest.raises(GPTQFormatError, match="zero point of 0"):
            QuantLinear.from_quantized(q, scales, zeros, g_idx, **kwargs)
        return
    layer = QuantLinear.from_quantized(q, scales, zeros, g_idx, **kwargs)
    assert layer.qweight.shape == (IN * bits // 32, OUT)
    assert layer.qzeros.shape == (scales.shape[0], OUT * bits // 32)
    expected = ref_dequantize(layer)
    # The reference decodes the packed buffers; it must also agree with the integers we packed.
    direct = (scales[g_idx.long()].t() * (q - zeros[g_idx.long()].t()).half()).float().numpy()
    np.testing.assert_array_equal(expected, direct)
    np.testing.assert_array_equal(layer.dequantize_weight(torch.float16).float().numpy(), expected)
    # Float32 keeps the exact product (what MatMulNBits computes); rounded to fp16 it is gptqmodel's value.
    np.testing.assert_array_equal(layer.dequantize_weight().numpy(), ref_dequantize(layer, exact=True))


@pytest.mark.parametrize("bits", BITS)
def test_reads_externally_packed_v1_with_stored_minus_one(bits):
    """A v1 checkpoint packed field by field (zeros stored minus one) decodes to the intended weight."""
    q, scales, zeros, g_idx = _random_layer_inputs(bits, True, False, 32, seed=bits)
    layer = QuantLinear(IN, OUT, bits, 32, checkpoint_format="gptq")
    qweight = [ref_pack(q[o].tolist(), bits) for o in range(OUT)]
    layer.qweight.copy_(torch.tensor(qweight, dtype=torch.int64).t().to(torch.int32))
    qzeros = [ref_pack((zeros[g] - 1).tolist(), bits) for g in range(zeros.shape[0])]
    layer.qzeros.copy_(torch.tensor(qzeros, dtype=torch.int64).to(torch.int32))
    layer.scales.copy_(scales)
    expected = (scales[g_idx.long()].t() * (q - zeros[g_idx.long()].t()).half()).float()
    assert torch.equal(layer.dequantize_weight(torch.float16).float(), expected)


def test_format_conversion_keeps_values():
    q, scales, zeros, g_idx = _random_layer_inputs(4, True, True, 32)
    layer = QuantLinear.from_quantized(
        q, scales, zeros, g_idx, bits=4, group_size=32, sym=True, checkpoint_format="gptq_v2"
    )
    before = layer.dequantize_weight()
    layer.to_checkpoint_format("gptq")
    assert layer.checkpoint_format == "gptq"
    assert torch.equal(layer.dequantize_weight(), before)
    q, scales, zeros, g_idx = _random_layer_inputs(4, False, False, 32)
    asym = QuantLinear.from_quantized(q, scales, zeros, g_idx, bits=4, group_size=32, sym=False)
    with pytest.raises(GPTQFormatError, match="gptq_v2"):
        asym.to_checkpoint_format("gptq")


def test_from_float_round_trips_representable_weight():
    q, scales, zeros, g_idx = _random_layer_inputs(4, False, True, 32)
    reference = QuantLinear.from_quantized(q, scales, zeros, g_idx, bits=4, group_size=32, sym=False, desc_act=True)
    weight = reference.dequantize_weight()
    rebuilt = QuantLinear.from_float(weight, scales, zeros, g_idx, bits=4, group_size=32, sym=False, desc_act=True)
    assert torch.equal(rebuilt.qweight, reference.qweight)
    assert torch.equal(rebuilt.dequantize_weight(), weight)


# ---------------------------------------------------------------------------------------------------
# QuantLinear forward and backend
# ---------------------------------------------------------------------------------------------------


def _layer(bits=4, bias=True):
    q, scales, zeros, g_idx = _random_layer_inputs(bits, False, True, 32)
    bias_tensor = torch.linspace(-1, 1, OUT) if bias else None
    return QuantLinear.from_quantized(
        q, scales, zeros, g_idx, bits=bits, group_size=32, sym=False, desc_act=True, bias=bias_tensor
    )


@pytest.mark.parametrize("bits", BITS)
def test_forward_fp32_equals_linear_with_dequantized_weight(bits):
    layer = _layer(bits)
    x = torch.randn(3, 5, IN, requires_grad=True)
    y = layer(x)
    expected = F.linear(x.detach(), layer.dequantize_weight(), layer.bias.float())
    assert y.dtype == torch.float32 and y.shape == (3, 5, OUT)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    y.sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantize_weight().sum(0).expand(3, 5, IN), rtol=1e-6, atol=1e-6)
    assert all(not b.requires_grad for b in layer.buffers())


def test_forward_bf16():
    layer = _layer()
    x = torch.randn(4, IN).bfloat16().requires_grad_()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    weight = layer.dequantize_weight()
    torch.testing.assert_close(y, F.linear(x.detach(), weight.bfloat16(), layer.bias.bfloat16()), rtol=0, atol=0)
    torch.testing.assert_close(
        y.float(),
        F.linear(x.detach().float(), weight, layer.bias.float()),
        rtol=BF16_FORWARD_RTOL,
        atol=BF16_FORWARD_RTOL,
    )
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16 and bool(x.grad.abs().sum() > 0)


def test_backend_registered():
    layer = _layer(bits=3)
    backend = backend_for(layer)
    assert isinstance(backend, GPTQBackend) and backend.kind == "gptq"
    assert backend.features(layer) == (IN, OUT)
    assert torch.equal(backend.dequantize(layer), layer.dequantize_weight())
    assert backend.dequantize(layer).shape == (OUT, IN)
    assert backend.describe(layer) == "gptq-3bit-g32-asym-act"
    assert torch.equal(backend.bias(layer), layer.bias.float())


def test_state_dict_round_trip():
    layer = _layer()
    clone = QuantLinear(IN, OUT, 4, 32, sym=False, desc_act=True, bias=True, checkpoint_format="gptq_v2")
    clone.load_state_dict(layer.state_dict())
    assert set(layer.state_dict()) == {"qweight", "qzeros", "scales", "g_idx", "bias"}
    assert torch.equal(clone.dequantize_weight(), layer.dequantize_weight())


# ---------------------------------------------------------------------------------------------------
# Checkpoint I/O
# ---------------------------------------------------------------------------------------------------


def _quantize_tiny(model, bits=4, group_size=32, sym=True, fmt="gptq"):
    """RTN-quantize every linear in the decoder layers (no solver dependency)."""
    for name, module in list(model.model.layers.named_modules()):
        if type(module) is torch.nn.Linear:
            w = module.weight.detach()
            groups = -(-w.shape[1] // group_size)
            maxq = 2**bits - 1
            wg = w.view(w.shape[0], groups, group_size)
            if sym:
                scale = (2 * wg.abs().amax(-1) / maxq).t()
                zero = torch.full_like(scale, 2 ** (bits - 1)).long()
            else:
                lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
                scale = ((hi - lo) / maxq).t()
                zero = torch.round(-lo.t() / scale).long()
            model.model.layers.set_submodule(
                name,
                QuantLinear.from_float(
                    module, scale, zero, None, bits=bits, group_size=group_size, sym=sym, checkpoint_format=fmt
                ),
            )
    return model


@pytest.mark.parametrize("bits,sym", [(4, True), (3, False), (8, True), (2, False)])
def test_save_load_round_trip_identical_logits(tmp_path, bits, sym):
    model = _quantize_tiny(tiny_llama(), bits=bits, sym=sym, fmt="gptq" if sym else "gptq_v2")
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    folder = save_gptq_model(model, tmp_path / "q")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config == {
        **config,
        "quant_method": "gptq",
        "bits": bits,
        "group_size": 32,
        "sym": sym,
        "desc_act": False,
        "checkpoint_format": "gptq" if sym else "gptq_v2",
    }
    loaded = load_gptq_model(folder)
    assert isinstance(loaded.model.layers[1].mlp.down_proj, QuantLinear)
    assert type(loaded.lm_head) is torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


def test_save_v2_of_symmetric_and_v1_refused_for_asym(tmp_path):
    model = _quantize_tiny(tiny_llama(), sym=True)
    ids = torch.arange(20).view(1, 20)
    with torch.no_grad():
        expected = model(ids).logits
    loaded = load_gptq_model(save_gptq_model(model, tmp_path / "v2", checkpoint_format="gptq_v2"))
    assert loaded.model.layers[0].self_attn.q_proj.checkpoint_format == "gptq_v2"
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    asym = _quantize_tiny(tiny_llama(), sym=False, fmt="gptq_v2")
    with pytest.raises(GPTQFormatError, match="gptq_v2"):
        save_gptq_model(asym, tmp_path / "v1", checkpoint_format="gptq")
    assert not (tmp_path / "v1").exists()


def test_save_copies_tokenizer_and_refuses_overwrite(tmp_path):
    from adalora_deploy.demo import write_tiny_llama

    source = write_tiny_llama(tmp_path / "float")
    model = _quantize_tiny(tiny_llama())
    folder = save_gptq_model(model, tmp_path / "q", tokenizer_source=source)
    assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()
    with pytest.raises(GPTQFormatError, match="not empty"):
        save_gptq_model(model, folder)
    save_gptq_model(model, folder, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float", "q"]  # no staging folders left


def test_tied_embeddings_and_bf16_load(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=259,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = _quantize_tiny(LlamaForCausalLM(config).eval())
    folder = save_gptq_model(model, tmp_path / "q")
    ids = torch.arange(10).view(1, 10)
    loaded = load_gptq_model(folder)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    half = load_gptq_model(folder, dtype=torch.bfloat16)
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    layer = half.model.layers[0].self_attn.q_proj
    assert layer.scales.dtype == torch.float16 and layer.qweight.dtype == torch.int32
    with torch.no_grad():
        logits = half(ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_load_errors_name_file_and_key(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _quantize_tiny(tiny_llama())
    folder = save_gptq_model(model, tmp_path / "q")
    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))

    broken = dict(tensors)
    del broken["model.layers.0.self_attn.k_proj.qzeros"]
    save_file(broken, str(weights))
    with pytest.raises(GPTQFormatError, match=r"model\.safetensors.*model\.layers\.0\.self_attn\.k_proj\.qzeros"):
        load_gptq_model(folder)

    broken = dict(tensors)
    broken["model.layers.1.mlp.up_proj.qweight"] = tensors["model.layers.1.mlp.up_proj.qweight"][:-1].contiguous()
    save_file(broken, str(weights))
    with pytest.raises(GPTQFormatError, match=r"model\.layers\.1\.mlp\.up_proj\.qweight.*shape"):
        load_gptq_model(folder)

    broken = dict(tensors)
    broken["model.layers.1.mlp.up_proj.scales"] = tensors["model.layers.1.mlp.up_proj.qzeros"].repeat(1, 8)
    save_file(broken, str(weights))
    with pytest.raises(GPTQFormatError, match="floating point"):
        load_gptq_model(folder)

    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(GPTQFormatError, match=r"model\.safetensors.*not a readable safetensors"):
        load_gptq_model(folder)

    weights.unlink()
    with pytest.raises(GPTQFormatError, match=r"model\.safetensors: not found"):
        load_gptq_model(folder)

    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(GPTQFormatError, match=r"config\.json.*quantization_config"):
        load_gptq_model(folder)


def test_missing_g_idx_defaults_to_sequential_groups(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _quantize_tiny(tiny_llama())
    folder = save_gptq_model(model, tmp_path / "q")
    tensors = {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if not k.endswith(".g_idx")}
    save_file(tensors, str(folder / "model.safetensors"))
    ids = torch.arange(12).view(1, 12)
    with torch.no_grad():
        assert torch.equal(load_gptq_model(folder)(ids).logits, model(ids).logits)


# ---------------------------------------------------------------------------------------------------
# Cross-check with gptqmodel (optional dependency, never installed by the project)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.optional
@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="gptqmodel is not installed")
@pytest.mark.parametrize("sym", [True, False])
def test_gptqmodel_reads_our_checkpoint(tmp_path, sym, monkeypatch):
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "2")  # docs/QUANT.md: it crashes on 2 cores otherwise
    from gptqmodel import BACKEND, GPTQModel

    model = _quantize_tiny(tiny_llama(), sym=sym, fmt="gptq" if sym else "gptq_v2")
    byte_tokenizer().save_pretrained(tmp_path / "tokenizer")  # gptqmodel loads a tokenizer with the model
    folder = save_gptq_model(model, tmp_path / "q", tokenizer_source=tmp_path / "tokenizer")
    # fp16: gptqmodel's auto dtype on CPU is bf16, which would round the fp16 scales before comparing.
    theirs = GPTQModel.load(str(folder), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
    ours = dict(model.named_modules())
    compared = 0
    for name, module in theirs.model.named_modules():
        if hasattr(module, "qweight") and hasattr(module, "dequantize_weight"):
            mine = ours[name].dequantize_weight(torch.float16).float()
            weight = module.dequantize_weight().float().t()  # gptqmodel returns (in, out), as qweight is laid out
            assert torch.equal(weight, mine), name
            compared += 1
    assert compared == 14


@pytest.mark.optional
@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="gptqmodel is not installed")
@pytest.mark.parametrize("sym", [True, False])
def test_transformers_reads_our_checkpoint(tmp_path, sym, monkeypatch):
    """transformers' own from_pretrained (which delegates GPTQ to gptqmodel): measured 14/14 layers bit-identical."""
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "2")
    from transformers import AutoModelForCausalLM

    model = _quantize_tiny(tiny_llama(), sym=sym, fmt="gptq" if sym else "gptq_v2")
    byte_tokenizer().save_pretrained(tmp_path / "tokenizer")
    folder = save_gptq_model(model, tmp_path / "q", tokenizer_source=tmp_path / "tokenizer")
    theirs = AutoModelForCausalLM.from_pretrained(str(folder), device_map="cpu", dtype=torch.float16)
    ours = dict(model.named_modules())
    compared = 0
    for name, module in theirs.named_modules():
        if hasattr(module, "qweight") and hasattr(module, "dequantize_weight"):
            assert torch.equal(ours[name].dequantize_weight(torch.float16).float(),
                               module.dequantize_weight().float().t()), name
            compared += 1
    assert compared == 14


@pytest.mark.optional
@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="gptqmodel is not installed")
@pytest.mark.parametrize(("sym", "desc_act"), [(True, False), (False, True)])
def test_we_read_gptqmodels_checkpoint(tmp_path, sym, desc_act, monkeypatch):
    """Measured with gptqmodel 7.6.0: 14 of 14 layers bit-identical (it writes v1 zeros even when asymmetric)."""
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    from adalora_deploy.demo import SAMPLE_TEXT, write_tiny_llama

    source = write_tiny_llama(tmp_path / "float")
    calibration = [line for line in SAMPLE_TEXT.read_text(encoding="utf-8").splitlines() if line.strip()][:32]
    quantizer = GPTQModel.load(str(source), QuantizeConfig(bits=4, group_size=32, sym=sym, desc_act=desc_act),
                               device="cpu")
    quantizer.quantize(calibration, batch_size=4)
    quantizer.save(str(tmp_path / "q"))
    ours = dict(load_gptq_model(tmp_path / "q").named_modules())
    theirs = GPTQModel.load(str(tmp_path / "q"), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
    compared = 0
    for name, module in theirs.model.named_modules():
        if hasattr(module, "qweight") and hasattr(module, "dequantize_weight"):
            assert torch.equal(ours[name].dequantize_weight(torch.float16).float(),
                               module.dequantize_weight().float().t()), name
            compared += 1
    assert compared == 14


@pytest.mark.parametrize(
    "entry,message",
    [
        ({"quant_method": "awq", "bits": 4}, "quant_method"),
        ({"quant_method": "gptq"}, "missing key 'bits'"),
        ({"quant_method": "gptq", "bits": 5}, "bits must be one of"),
        ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "checkpoint_format"),
        ({"quant_method": "gptq", "bits": 4, "pack_dtype": "int16"}, "pack_dtype"),
    ],
)
def test_quantization_config_errors(entry, message):
    from adalora_deploy.gptq.checkpoint import GPTQQuantConfig

    with pytest.raises(GPTQFormatError, match=message):
        GPTQQuantConfig.from_dict(entry, where="config.json: quantization_config")
    assert GPTQQuantConfig.from_dict({"quant_method": "gptq", "bits": 4}).checkpoint_format == "gptq"
