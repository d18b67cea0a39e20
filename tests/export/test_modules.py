"""Export-friendly modules: torch forward == what they replace, and onnxruntime == torch forward."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from adalora_deploy.export.build.kinds.bnb4 import Bnb4Linear
from adalora_deploy.export.build.kinds.bnb8 import Int8EmulationLinear
from adalora_deploy.export.build.modules import (
    LowRankBranch,
    NBitsLinear,
    joint_factors,
)

from adalora_deploy.backends.bnb import FP4_CODE, NF4_CODE
from tests.export.helpers import export_module, gptq_rtn, op_types, run_module

FP32_MATMUL_ATOL = 1e-5
"""Same fp32 weights, different summation order (MLAS vs torch); measured <= 1.2e-6 at K = 64..128."""
INT8_SERVING_MIN_COSINE = 0.999
"""bnb int8 weights served by MatMulNBits at accuracy_level 4 vs bnb's LLM.int8 forward; measured 0.99998."""

IN_FEATURES, OUT_FEATURES = 128, 48


@pytest.fixture(scope="module")
def linear() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(IN_FEATURES, OUT_FEATURES)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(5, IN_FEATURES, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("bits", "group_size", "act_order", "checkpoint_format"),
    [
        (4, 32, False, "gptq"),
        (4, 32, True, "gptq"),
        (4, -1, False, "gptq_v2"),
        (4, 64, True, "gptq_v2"),
        (2, 32, False, "gptq"),
        (2, 16, True, "gptq"),
        (8, 32, False, "gptq"),
        (8, 64, True, "gptq"),
        (8, 128, True, "gptq"),  # one group: act-order needs no permutation
    ],
)
def test_nbits_from_gptq_matches_dequantized_matmul(tmp_path, linear, x, bits, group_size, act_order, checkpoint_format):
    tensors = gptq_rtn(linear.weight, bits=bits, group_size=group_size, act_order=act_order,
                       checkpoint_format=checkpoint_format)
    module = NBitsLinear.from_gptq_tensors(
        tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], bits=bits,
        group_size=group_size, in_features=IN_FEATURES, out_features=OUT_FEATURES,
        checkpoint_format=checkpoint_format, bias=linear.bias,
    )
    # the repack is exact: same weight as the GPTQ format's own dequantization
    torch.testing.assert_close(module.dequantized_weight(), tensors["dequantized"], rtol=0, atol=0)
    reference = (x @ tensors["dequantized"].T + linear.bias).detach()
    with torch.no_grad():
        torch.testing.assert_close(module(x), reference, rtol=0, atol=FP32_MATMUL_ATOL)
    model = export_module(module, x, tmp_path / "m.onnx")
    ops = op_types(model)
    assert ops.count("MatMulNBits") == 1
    # act-order: K permuted offline + one Gather on the activations, never g_idx (PITFALL in docs/ONNX.md)
    assert ("Gather" in ops) == (act_order and group_size not in (-1, IN_FEATURES))
    assert all(len(n.input) <= 4 for n in model.graph.node if n.op_type == "MatMulNBits")
    got = run_module(tmp_path / "m.onnx", x)
    np.testing.assert_allclose(got, reference.numpy(), rtol=0, atol=FP32_MATMUL_ATOL)


def test_nbits_from_gptq_layer_object(linear):
    tensors = gptq_rtn(linear.weight, bits=4, group_size=32, act_order=True)

    class FakeQuantLinear(torch.nn.Module):  # the contract of adalora_deploy.gptq.linear.QuantLinear
        bits, group_size, in_features, out_features, checkpoint_format = 4, 32, IN_FEATURES, OUT_FEATURES, "gptq"

    layer = FakeQuantLinear()
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        layer.register_buffer(name, tensors[name])
    layer.register_buffer("bias", linear.bias.detach())
    module = NBitsLinear.from_gptq(layer)
    torch.testing.assert_close(module.dequantized_weight(), tensors["dequantized"], rtol=0, atol=0)


def test_nbits_from_gptq_one_group_with_odd_width(tmp_path):
    linear = torch.nn.Linear(104, 32)  # K = 104: no power-of-two block >= 16 divides it; one group needs none
    tensors = gptq_rtn(linear.weight, bits=4, group_size=-1, checkpoint_format="gptq_v2")
    module = NBitsLinear.from_gptq_tensors(tensors["qweight"], tensors["qzeros"], tensors["scales"], None,
                                           bits=4, group_size=-1, in_features=104, out_features=32,
                                           checkpoint_format="gptq_v2", bias=linear.bias)
    torch.testing.assert_close(module.dequantized_weight(), tensors["dequantized"], rtol=0, atol=0)
    x = torch.randn(3, 104)
    export_module(module, x, tmp_path / "m.onnx")  # onnxruntime pads the last block itself
    reference = (x @ tensors["dequantized"].T + linear.bias).detach().numpy()
    np.testing.assert_allclose(run_module(tmp_path / "m.onnx", x), reference, rtol=0, atol=FP32_MATMUL_ATOL)


def test_nbits_rejects_unsupported_layouts(linear):
    tensors = gptq_rtn(linear.weight, bits=4, group_size=32)
    with pytest.raises(ValueError, match="3-bit"):
        NBitsLinear.from_gptq_tensors(tensors["qweight"], tensors["qzeros"], tensors["scales"], None, bits=3,
                                      group_size=32, in_features=IN_FEATURES, out_features=OUT_FEATURES)
    with pytest.raises(ValueError, match="multiple of 16"):
        NBitsLinear.from_gptq_tensors(tensors["qweight"], tensors["qzeros"], tensors["scales"], None, bits=4,
                                      group_size=24, in_features=IN_FEATURES, out_features=OUT_FEATURES)


@pytest.mark.parametrize("bits", [4, 8])
def test_nbits_from_float_rtn(tmp_path, linear, x, bits):
    module = NBitsLinear.from_float(linear.weight, linear.bias, bits=bits, block_size=32)
    error = (module.dequantized_weight() - linear.weight).abs()
    # round to nearest: at most half a step per block
    step = module.scales.repeat_interleave(32, dim=1)[:, :IN_FEATURES]
    assert bool((error <= step / 2 + 1e-6).all())
    with torch.no_grad():
        reference = module(x)
    export_module(module, x, tmp_path / "m.onnx")
    np.testing.assert_allclose(run_module(tmp_path / "m.onnx", x), reference.numpy(), rtol=0, atol=FP32_MATMUL_ATOL)


@pytest.fixture(scope="module")
def bnb():
    return pytest.importorskip("bitsandbytes")


BNB_OUT_FEATURES = 64
"""bnb's AVX512-BF16 CPU kernel repacks weights in blocks of 32 output rows: N must be a multiple of 32."""


@pytest.fixture(scope="module")
def bnb_linear() -> torch.nn.Linear:
    torch.manual_seed(3)
    return torch.nn.Linear(IN_FEATURES, BNB_OUT_FEATURES)


def _linear4bit(bnb, linear, quant_type, double_quant):
    layer = bnb.nn.Linear4bit(IN_FEATURES, BNB_OUT_FEATURES, compute_dtype=torch.float32,
                              compress_statistics=double_quant, quant_type=quant_type)
    layer.load_state_dict(linear.state_dict())
    # train mode: bnb's reference fp32 dequantize-then-matmul path; in eval + no-grad on AVX512-BF16 CPUs
    # bnb switches to a bf16 kernel and repacks the weight in place (see export/bnb.py)
    return layer.to("cpu").train()


def test_bnb_code_books_match_bitsandbytes(bnb):
    from bitsandbytes.functional import get_4bit_type

    torch.testing.assert_close(NF4_CODE, get_4bit_type("nf4", device="cpu").float(), rtol=0, atol=1e-7)
    torch.testing.assert_close(FP4_CODE, get_4bit_type("fp4", device="cpu").float(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bnb4_matches_bitsandbytes_forward(tmp_path, bnb, bnb_linear, x, quant_type, double_quant):
    layer = _linear4bit(bnb, bnb_linear, quant_type, double_quant)
    module = Bnb4Linear.from_bnb(layer)
    with torch.no_grad():
        reference = layer(x)
        mine = module(x)
    torch.testing.assert_close(mine, reference, rtol=0, atol=FP32_MATMUL_ATOL)
    model = export_module(module, x, tmp_path / "m.onnx")
    assert op_types(model).count("MatMulBnb4") == 1
    np.testing.assert_allclose(run_module(tmp_path / "m.onnx", x), reference.numpy(), rtol=0, atol=FP32_MATMUL_ATOL)


def test_nbits_from_bnb_int8(tmp_path, bnb, bnb_linear, x):
    linear = bnb_linear
    layer = bnb.nn.Linear8bitLt(IN_FEATURES, BNB_OUT_FEATURES, has_fp16_weights=False, threshold=6.0)
    layer.load_state_dict(linear.state_dict())
    layer = layer.to("cpu").eval()
    exact = NBitsLinear.from_bnb_int8(layer, accuracy_level=0)
    weight = layer.weight.CB.float() * (layer.weight.SCB.float() / 127.0).unsqueeze(1)
    torch.testing.assert_close(exact.dequantized_weight(), weight, rtol=0, atol=0)
    export_module(exact, x, tmp_path / "exact.onnx")
    reference = (x @ weight.T + linear.bias).detach()
    np.testing.assert_allclose(run_module(tmp_path / "exact.onnx", x), reference.numpy(), rtol=0, atol=FP32_MATMUL_ATOL)
    serving = NBitsLinear.from_bnb_int8(layer)  # accuracy_level 4: lossy tier vs bnb's own forward
    export_module(serving, x, tmp_path / "serving.onnx")
    got = torch.from_numpy(run_module(tmp_path / "serving.onnx", x))
    with torch.no_grad():
        bnb_out = layer(x).float()
    assert float(torch.nn.functional.cosine_similarity(got, bnb_out, dim=-1).min()) >= INT8_SERVING_MIN_COSINE


def test_bnb4_after_bnb_cpu_repack(bnb, bnb_linear, x):
    from bitsandbytes.functional import has_avx512bf16

    from adalora_deploy.backends.bnb import linear4bit_state

    layer = _linear4bit(bnb, bnb_linear, "nf4", True)
    exact = Bnb4Linear.from_bnb(layer)
    layer.eval()
    with torch.no_grad():
        layer(x)  # may repack in place (AVX512-BF16 CPUs)
    state = linear4bit_state(layer)
    assert state.exact == (not has_avx512bf16())
    repacked = Bnb4Linear.from_bnb(layer)
    assert torch.equal(repacked.packed, exact.packed)  # the codes unpack back exactly
    # absmax rounded to bfloat16 by bnb: relative error <= 2**-8
    torch.testing.assert_close(repacked.absmax, exact.absmax, rtol=2**-8, atol=0)


@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_int8_emulation_matches_bitsandbytes_eval_forward(tmp_path, bnb, bnb_linear, threshold):
    layer = bnb.nn.Linear8bitLt(IN_FEATURES, BNB_OUT_FEATURES, has_fp16_weights=False, threshold=threshold)
    layer.load_state_dict(bnb_linear.state_dict())
    layer = layer.to("cpu").eval()
    x = torch.randn(2, 5, IN_FEATURES, generator=torch.Generator().manual_seed(4)) * 2
    x[0, 1, 3], x[1, 2, 70] = 9.0, -7.5  # outlier columns (|a| >= 6)
    with torch.no_grad():
        reference = layer(x)
        module = Int8EmulationLinear.from_bnb(layer)  # after a forward: CB/SCB live in layer.state
        mine = module(x)
    assert float((reference - bnb_linear(x)).abs().max()) > 1e-3  # int8 arithmetic is visible
    torch.testing.assert_close(mine, reference, rtol=0, atol=FP32_MATMUL_ATOL)
    model = export_module(module, x, tmp_path / "m.onnx")
    ops = op_types(model)
    assert "MatMulInteger" in ops and "Div" not in ops and ("GreaterOrEqual" in ops) == (threshold > 0)
    np.testing.assert_allclose(run_module(tmp_path / "m.onnx", x), reference.numpy(), rtol=0, atol=FP32_MATMUL_ATOL)


def test_nbits_from_bnb_4bit_requantizes(bnb, bnb_linear):
    layer = _linear4bit(bnb, bnb_linear, "nf4", False)
    module = NBitsLinear.from_bnb_4bit(layer, accuracy_level=0)
    from adalora_deploy.backends.bnb import linear4bit_state

    source = linear4bit_state(layer).dequantize()
    step = module.scales.repeat_interleave(32, dim=1)[:, :IN_FEATURES]
    assert bool(((module.dequantized_weight() - source).abs() <= step / 2 + 1e-6).all())


def test_low_rank_branch_changes_output_then_matches(tmp_path, linear, x):
    generator = torch.Generator().manual_seed(2)
    A = torch.randn(3, IN_FEATURES, generator=generator) * 0.1
    B = torch.randn(OUT_FEATURES, 3, generator=generator) * 0.1
    branch = LowRankBranch(linear, A, B)
    with torch.no_grad():
        base_out, out = linear(x), branch(x)
    assert float((out - base_out).abs().max()) > 1e-2  # the adapter matters before parity means anything
    torch.testing.assert_close(out, base_out + (x @ A.T) @ B.T, rtol=0, atol=FP32_MATMUL_ATOL)
    model = export_module(branch, x, tmp_path / "m.onnx")
    assert op_types(model).count("MatMul") == 2  # the low-rank pair (the 2-D base linear is a Gemm)
    np.testing.assert_allclose(run_module(tmp_path / "m.onnx", x), out.numpy(), rtol=0, atol=FP32_MATMUL_ATOL)


def test_low_rank_branch_validates_shapes(linear):
    with pytest.raises(ValueError, match="do not fit"):
        LowRankBranch(linear, torch.zeros(2, IN_FEATURES + 1), torch.zeros(OUT_FEATURES, 2))
    with pytest.raises(ValueError, match="required"):
        LowRankBranch(linear)


def test_joint_factors_pack_the_members_branches_exactly(x):
    """Concatenated down factors, block-diagonal up factors: member i's columns are its own branch; a plain
    member and a rank-0 branch are rank 0 (zero columns); adapter-inputs members have nothing to pack."""
    generator = torch.Generator().manual_seed(3)

    def branch(out: int, rank: int) -> LowRankBranch:
        A = torch.randn(rank, IN_FEATURES, generator=generator)
        B = torch.randn(out, rank, generator=generator)
        return LowRankBranch(torch.nn.Linear(IN_FEATURES, out), A, B)

    members = [branch(48, 3), torch.nn.Linear(IN_FEATURES, 16), branch(16, 0), branch(32, 5)]
    lora_A, lora_B = joint_factors(members)
    assert lora_A.shape == (IN_FEATURES, 8) and lora_B.shape == (8, 112)
    assert torch.equal(lora_A, torch.cat([members[0].lora_A, members[3].lora_A], 1))
    assert torch.equal(lora_B[:3, :48], members[0].lora_B) and torch.equal(lora_B[3:, 80:], members[3].lora_B)
    assert not lora_B[:3, 48:].any() and not lora_B[3:, :80].any()
    # the joint branch's columns are each member's branch, or zero
    own = [(x @ m.lora_A) @ m.lora_B if isinstance(m, LowRankBranch) else torch.zeros(len(x), m.out_features)
           for m in members]
    torch.testing.assert_close((x @ lora_A) @ lora_B, torch.cat(own, 1), rtol=0, atol=FP32_MATMUL_ATOL)
    with pytest.raises(ValueError, match="adapter-inputs"):
        joint_factors([members[0], LowRankBranch(torch.nn.Linear(IN_FEATURES, 8), factors_as_inputs=True)])
    with pytest.raises(ValueError, match="different widths"):
        joint_factors([members[0], torch.nn.Linear(IN_FEATURES + 1, 8)])


GPTQ_FP16_DEQUANT_RTOL = 2**-11
"""QuantLinear rounds each dequantized weight to fp16 (gptqmodel's arithmetic); MatMulNBits keeps the exact
fp32 product: at most half an fp16 ulp apart, relative 2**-11."""


def test_nbits_from_project_quant_linear(tmp_path, linear, x):
    from adalora_deploy.gptq.linear import QuantLinear
    from adalora_deploy.gptq.packing import unpack_rows

    tensors = gptq_rtn(linear.weight, bits=4, group_size=32, act_order=True)
    q = unpack_rows(tensors["qweight"], 4).T
    zeros = torch.full((IN_FEATURES // 32, OUT_FEATURES), 8)
    layer = QuantLinear.from_quantized(q, tensors["scales"], zeros, tensors["g_idx"], bits=4, group_size=32,
                                            sym=True, desc_act=True, bias=linear.bias)
    module = NBitsLinear.from_gptq(layer)
    torch.testing.assert_close(module.dequantized_weight(), tensors["dequantized"], rtol=0, atol=0)
    torch.testing.assert_close(module.dequantized_weight(), layer.dequantize_weight(), rtol=GPTQ_FP16_DEQUANT_RTOL, atol=0)
    export_module(module, x, tmp_path / "m.onnx")
    with torch.no_grad():
        np.testing.assert_allclose(run_module(tmp_path / "m.onnx", x), module(x).numpy(), rtol=0, atol=FP32_MATMUL_ATOL)


def _contrib_node(model_nodes, initializers):
    """The one com.microsoft node of a graph, as (op_type, attributes, input arrays after the activation)."""
    (node,) = [n for n in model_nodes if n.domain == "com.microsoft"]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return node.op_type, attributes, [initializers[name] for name in node.input[1:]]


def _lowered_twins():
    torch.manual_seed(2)
    weight = torch.randn(OUT_FEATURES, IN_FEATURES)
    nbits = NBitsLinear.from_float(weight, bits=4, block_size=32)
    act_order = NBitsLinear(nbits.qweight, nbits.scales, nbits.zero_points, in_features=IN_FEATURES,
                            out_features=OUT_FEATURES, bits=4, block_size=32, perm=torch.randperm(IN_FEATURES),
                            accuracy_level=4)
    symmetric = NBitsLinear.from_float(weight, bits=8, block_size=32, symmetric=True)
    packed = torch.randint(0, 256, (OUT_FEATURES * IN_FEATURES // 2,), dtype=torch.uint8)
    bnb4 = Bnb4Linear(packed, torch.rand(OUT_FEATURES * IN_FEATURES // 64) + 0.5, in_features=IN_FEATURES,
                      out_features=OUT_FEATURES, block_size=64, quant_type="nf4", bias=torch.randn(OUT_FEATURES))
    return {"nbits": nbits, "nbits-act-order": act_order, "nbits-default-zero-points": symmetric, "bnb4": bnb4}


@pytest.mark.parametrize("name", ["nbits", "nbits-act-order", "nbits-default-zero-points", "bnb4"])
def test_both_builders_emit_the_twins_lowering(tmp_path, x, name):
    """The node a twin's ``lowering()`` describes is the node the dynamo path and the fast path emit: same op
    type, attributes and tensors (the fast path leaves out inputs equal to the op's default)."""
    from onnx import numpy_helper

    from adalora_deploy.export.build.fastpath.graph import Graph, WeightFile
    from adalora_deploy.export.build.fastpath.linear import LinearEmitter

    module = _lowered_twins()[name]
    node = module.lowering()
    expected_attributes = node.attribute_dict()
    arrays = [t.numpy() for t in node.inputs]

    dynamo = export_module(module, x, tmp_path / "m.onnx")
    initializers = {t.name: numpy_helper.to_array(t) for t in dynamo.graph.initializer}
    op_type, attributes, inputs = _contrib_node(dynamo.graph.node, initializers)
    assert op_type == node.op.op_type
    assert expected_attributes.items() <= attributes.items()  # onnxscript adds the schema's defaults (transB=1, ...)
    assert len(inputs) == len(arrays) and all(np.array_equal(a, b) for a, b in zip(inputs, arrays))
    assert ("Gather" in op_types(dynamo)) == (node.permutation is not None)

    g = Graph(WeightFile(tmp_path / "w.bin"), np.float32)
    LinearEmitter(g, {}).linear(module, "x", "layer")
    g.weights.close()
    initializers = {t.name: numpy_helper.to_array(t, str(tmp_path)) for t in g.initializers}
    op_type, attributes, inputs = _contrib_node(g.nodes, initializers)
    assert (op_type, attributes) == (node.op.op_type, expected_attributes)
    kept = [a for n, a in zip(node.op.inputs, arrays) if n not in node.default_inputs()]
    assert len(inputs) == len(kept) and all(np.array_equal(a, b) for a, b in zip(inputs, kept))
    assert len(kept) < len(arrays) if name == "nbits-default-zero-points" else len(kept) == len(arrays)
    assert ("Gather" in [n.op_type for n in g.nodes]) == (node.permutation is not None)
