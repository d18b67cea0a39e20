"""Op by op: our torch emulation of MatMulNBits' int8 compute path equals onnxruntime's kernel.

Every case builds one MatMulNBits node (4-bit and 8-bit codes, default and explicit zero points) and runs it
under onnxruntime's CPU provider at ``accuracy_level`` 4; the emulation (:func:`fake_quantize_activations`
then an fp32 product with the dequantized weight) must agree within the fp32 summation bound of the two
dot products. The same bound is shown to separate the int8 path from fp32 compute (``accuracy_level`` 0)
and from activations quantized with another block length, so it is a test that can fail.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adalora_deploy.gptq.int8_compute import (
    fake_quantize_activations,
    fake_quantize_weights,
    nbits_block_size,
    quantize_activations,
    weight_codes,
)

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

U32 = 2.0**-24
"""fp32 unit roundoff."""


def _matmul_nbits_session(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, *, bits: int, block: int,
                          accuracy_level: int) -> ort.InferenceSession:
    """One MatMulNBits node over ``codes [N, K]`` (unsigned), ``scales``/``zeros [N, k_blocks]``."""
    n, k = codes.shape
    k_blocks = math.ceil(k / block)
    padded = np.zeros((n, k_blocks * block), dtype=np.uint8)
    padded[:, :k] = codes
    per_byte = 8 // bits
    grouped = padded.reshape(n, k_blocks, block // per_byte, per_byte).astype(np.uint16)
    packed = sum(grouped[..., i] << (bits * i) for i in range(per_byte)).astype(np.uint8)
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales.astype(np.float32), "S")]
    inputs = ["A", "B", "S"]
    if zeros is not None:
        zpad = np.zeros((n, math.ceil(k_blocks * bits / 8) * per_byte), dtype=np.uint16)
        zpad[:, :k_blocks] = zeros
        zgrouped = zpad.reshape(n, -1, per_byte)
        inits.append(numpy_helper.from_array(
            sum(zgrouped[..., i] << (bits * i) for i in range(per_byte)).astype(np.uint8), "Z"))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "matmul_nbits", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _weight(codes, scales, zeros, block) -> torch.Tensor:
    """Dequantized ``[N, K]`` fp32 weight ``scale * (q - zero)`` (exact in fp32)."""
    k = codes.shape[1]
    expand = lambda t: torch.from_numpy(np.asarray(t, dtype=np.float32)).repeat_interleave(block, 1)[:, :k]  # noqa: E731
    return expand(scales) * (torch.from_numpy(codes.astype(np.float32)) - expand(zeros))


def _bound(xq: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Both sides' fp32 rounding of ``sum_k xq_k w_k`` (gamma_K times the sum of magnitudes, twice) plus the
    rounding of the dequantized activations themselves: the most two correct fp32 evaluations can differ by."""
    k = xq.shape[-1]
    gamma = (k + 2) * U32 / (1 - (k + 2) * U32)
    return 2 * gamma * (xq.abs() @ w.abs().T)


def _layer(rng, n, k, bits, block, explicit_zeros):
    k_blocks = math.ceil(k / block)
    codes = rng.integers(0, 2**bits, (n, k), dtype=np.uint8)
    scales = (rng.random((n, k_blocks)) * 0.02 + 1e-3).astype(np.float16).astype(np.float32)
    zeros = rng.integers(0, 2**bits, (n, k_blocks)) if explicit_zeros else np.full((n, k_blocks), 2 ** (bits - 1))
    return codes, scales, zeros


SHAPES = [  # (M, K, N, block): decode (M = 1) and prefill, SmolLM2's widths, partial last blocks
    (1, 576, 192, 128), (1, 1536, 64, 128), (9, 576, 192, 128), (64, 576, 96, 128),
    (1, 576, 64, 64), (17, 576, 64, 32), (3, 200, 48, 16), (130, 1536, 64, 256), (1, 100, 32, 256),
]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("explicit_zeros", [False, True], ids=["default-zero", "zero-points"])
@pytest.mark.parametrize("m,k,n,block", SHAPES)
def test_emulation_equals_onnxruntime_int8_path(m, k, n, block, bits, explicit_zeros):
    rng = np.random.default_rng(m * 1000 + k + n + block + bits)
    codes, scales, zeros = _layer(rng, n, k, bits, block, explicit_zeros)
    session = _matmul_nbits_session(codes, scales, zeros if explicit_zeros else None, bits=bits, block=block,
                                    accuracy_level=4)
    # heavy-tailed activations with outlier channels, like a transformer's residual stream
    x = torch.from_numpy((rng.standard_normal((m, k)) * np.exp(rng.standard_normal(k))).astype(np.float32))
    got = torch.from_numpy(session.run(None, {"A": x.numpy()})[0])
    w = _weight(codes, scales, zeros, block)
    xq = fake_quantize_activations(x, block)
    assert (torch.round(xq / xq.abs().max()) != 0).any()
    emulated = xq @ w.T
    bound = _bound(xq, w)
    assert ((got - emulated).abs() <= bound).all(), (got - emulated).abs().max()
    # the bound separates the int8 path from fp32 compute and from another activation block length
    fp32 = x @ w.T
    assert ((got - fp32).abs() > bound).any()
    other = 16 if block > 16 else 32
    assert ((got - fake_quantize_activations(x, other) @ w.T).abs() > bound).any()


@pytest.mark.parametrize("m", [1, 9])
@pytest.mark.parametrize("k,rank,block", [(576, 1, 128), (576, 5, 128), (1536, 12, 128), (576, 21, 64), (200, 3, 32)])
def test_8_bit_down_factor_equals_onnxruntime_int8_path(m, k, rank, block):
    """A LoRA down factor on the 8-bit grid (``adapter.down_weights: int8``; ranks as AdaLoRA leaves them, one row
    zero as a masked triplet leaves it) in MatMulNBits: onnxruntime's product equals the training forward's."""
    rng = np.random.default_rng(m + k + rank + block)
    w = torch.from_numpy((rng.standard_normal((rank, k)) * 0.02).astype(np.float32))
    w[0] = 0.0
    q, scales = weight_codes(w, block)
    assert q.min() >= 1 and q.max() <= 255 and (q[0] == 128).all() and (scales[0] == 0).all()
    session = _matmul_nbits_session(q.numpy().astype(np.uint8), scales.numpy(), None, bits=8, block=block,
                                    accuracy_level=4)
    x = torch.from_numpy((rng.standard_normal((m, k)) * np.exp(rng.standard_normal(k))).astype(np.float32))
    got = torch.from_numpy(session.run(None, {"A": x.numpy()})[0])
    xq, wq = fake_quantize_activations(x, block), fake_quantize_weights(w, block)
    assert torch.equal(wq, _weight(q.numpy(), scales.numpy(), np.full(scales.shape, 128), block))
    bound = _bound(xq, wq)
    assert ((got - xq @ wq.T).abs() <= bound).all() and (got[:, 0] == 0).all()
    if rank > 1:  # the bound separates it from the fp32 factor
        assert ((got - xq @ w.T).abs() > bound).any()


def test_weight_grid_rows_are_independent_and_straight_through():
    w = torch.randn(6, 100, requires_grad=True)
    wq = fake_quantize_weights(w, 32)
    wq.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    assert torch.equal(fake_quantize_weights(w.detach()[[1, 4]], 32), wq.detach()[[1, 4]])  # compaction keeps codes
    perm = torch.randperm(100)
    q, scales = weight_codes(w, 32, perm)
    dequantized = (q - 128).float() * scales.repeat_interleave(32, 1)[:, :100]
    assert torch.equal(dequantized, fake_quantize_weights(w.detach(), 32, perm)[:, perm])


def test_accuracy_level_zero_is_fp32_compute():
    """The other side of the tier: accuracy_level 0 equals fp32 products, not the int8 emulation."""
    rng = np.random.default_rng(7)
    codes, scales, zeros = _layer(rng, 64, 576, 4, 128, False)
    x = torch.from_numpy(rng.standard_normal((5, 576)).astype(np.float32))
    got = torch.from_numpy(_matmul_nbits_session(codes, scales, None, bits=4, block=128, accuracy_level=0)
                           .run(None, {"A": x.numpy()})[0])
    w = _weight(codes, scales, zeros, 128)
    bound = _bound(x, w)
    assert ((got - x @ w.T).abs() <= bound).all()
    assert ((got - fake_quantize_activations(x, 128) @ w.T).abs() > bound).any()


def test_real_activations_of_a_model(tiny_model_dir):
    """Hidden states of a language model on text (not Gaussian noise) through the same comparison."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    rng = np.random.default_rng(3)
    for states in hidden:
        x = states.reshape(-1, states.shape[-1]).float()
        k = x.shape[-1]
        block = 16 if k < 32 else 32
        codes, scales, zeros = _layer(rng, 48, k, 4, block, False)
        session = _matmul_nbits_session(codes, scales, None, bits=4, block=block, accuracy_level=4)
        w = _weight(codes, scales, zeros, block)
        for rows in (x[:1], x):  # decode and prefill
            got = torch.from_numpy(session.run(None, {"A": rows.numpy()})[0])
            xq = fake_quantize_activations(rows, block)
            assert ((got - xq @ w.T).abs() <= _bound(xq, w)).all()


def test_codes_follow_mlas_rules():
    x = torch.tensor([[0.0] * 16 + [1.0, -2.0, 0.5 * 2 / 127, 1.5 * 2 / 127] + [0.0] * 12])
    codes, scales = quantize_activations(x, 16)
    assert torch.equal(codes[0, 0], torch.zeros(16)) and scales[0, 0, 0] == 0  # an all-zero block stays zero
    assert scales[0, 1, 0] == torch.tensor(2.0) / 127
    assert codes[0, 1, :4].tolist() == [64.0, -127.0, 0.0, 2.0]  # 63.5 -> 64, 0.5 -> 0, 1.5 -> 2: half to even


def test_codes_equal_onnxruntime_codes_next_to_rounding_boundaries():
    """Values within an ulp of x.5 codes: our codes are onnxruntime's, read back through an identity weight
    (each output is one code times the block's scale). The inverse scale must be a correctly rounded ``127 /
    amax`` as MLAS computes it; torch's ``127.0 / tensor`` (a multiply by the reciprocal) is an ulp off for some
    amax, and this input is chosen so that it flips codes: the test fails on that formula."""
    block = 32
    candidates = torch.rand(20000, dtype=torch.float32) * 4 + 0.25
    off = candidates[(127.0 / candidates) != torch.full_like(candidates, 127.0) / candidates][:64]
    assert len(off) == 64
    rows = []
    for amax in off.tolist():
        amax = np.float32(amax)
        halves = (np.arange(-15, 16, dtype=np.float32) * 4 + np.float32(0.5)) * amax / np.float32(127)
        rows.append(np.concatenate([[amax], halves.astype(np.float32)]))
    x = np.stack(rows).astype(np.float32)  # [64, 32]: one block per row, the row's amax first
    codes = np.full((block, block), 8, dtype=np.uint8) + np.eye(block, dtype=np.uint8)  # q - 8 = identity
    session = _matmul_nbits_session(codes, np.ones((block, 1), np.float32), None, bits=4, block=block,
                                    accuracy_level=4)
    scale = x[:, :1] / np.float32(127)
    onnxruntime_codes = session.run(None, {"A": x})[0] / scale
    ours, _ = quantize_activations(torch.from_numpy(x), block)
    assert np.array_equal(ours.reshape(64, block).numpy(), np.round(onnxruntime_codes))
    np.testing.assert_allclose(onnxruntime_codes, np.round(onnxruntime_codes), atol=1e-3)
    amax = torch.from_numpy(x).abs().amax(-1, keepdim=True)
    reciprocal = torch.round(torch.from_numpy(x) * (127.0 / amax))
    assert not np.array_equal(reciprocal.numpy(), np.round(onnxruntime_codes))


def test_straight_through_forwards_the_codes_bit_for_bit():
    x = torch.randn(8, 64) * 3
    codes, scales = quantize_activations(x, 32)
    assert torch.equal(fake_quantize_activations(x.requires_grad_(), 32).detach(), (codes * scales).flatten(-2))


def test_straight_through_gradient_and_permutation():
    x = torch.randn(3, 64, requires_grad=True)
    perm = torch.randperm(64)
    y = fake_quantize_activations(x, 16, perm)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    # permuted blocks: the same as quantizing x[..., perm] and scattering back
    direct = fake_quantize_activations(x.detach()[..., perm], 16)
    assert torch.equal(y.detach()[..., perm], direct)
    assert not torch.equal(y.detach(), fake_quantize_activations(x.detach(), 16))


@pytest.mark.parametrize("group,k,block", [(128, 576, 128), (64, 576, 64), (-1, 576, 128), (-1, 64, 64), (48, 576, 16),
                                           (256, 1536, 256), (512, 1536, 256)])
def test_block_size_rule(group, k, block):
    assert nbits_block_size(group, k) == block


def test_block_size_refuses_unfit_groups():
    from adalora_deploy.errors import ConfigError

    with pytest.raises(ConfigError, match="multiple of 16"):
        nbits_block_size(40, 576)
