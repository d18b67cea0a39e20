"""The fast path (``adalora_deploy.export.build.fastpath.build_decoder``): a directly built GQA graph equals the torch twin.

Every parity check runs ``adalora_deploy.export.judge.parity.decoder_parity``: a left-padded batch of 2, the prompt step, three
KV-cache steps (logits and every present tensor over valid positions), then greedy generation against
transformers' ``generate``.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
from adalora_deploy.export.build.adapter_file import add_default_adapter_inputs
from adalora_deploy.export.api import _adapter_matmuls
from adalora_deploy.export.judge.agreement import held_out_batch
from adalora_deploy.export.judge.check import ADAPTER_EFFECT_MIN
from adalora_deploy.export.build.convert import convert_for_export
from adalora_deploy.export.build.fastpath import (
    FastPathUnsupported,
    build_decoder,
    quantize_table,
)
from adalora_deploy.export.build.graph import DecoderWrapper, adapter_input_names
from adalora_deploy.export.build.kinds.bnb4 import Bnb4Linear
from adalora_deploy.export.build.kinds.bnb8 import Int8EmulationLinear
from adalora_deploy.export.build.modules import (
    LowRankBranch,
    NBitsLinear,
    swap_module,
)
from adalora_deploy.export.judge.parity import ExactScale, decoder_parity
from adalora_deploy.export.runtime.session import DecoderSession, adapter_feeds, create_session
from adalora_deploy.export.build.source import adapters_bypassed, load_source_model
from torch import nn

from adalora_deploy.demo import tiny_llama

MAX_NEW_TOKENS = 8
DECODE_STEPS = 3
FASTPATH_EXACT_MEASURED = 1.2e-6
"""Largest max abs difference measured over the exact tests below (tiny Llama, fp32, onnxruntime 1.32): 1.2e-6
on present tensors (LLM.int8 emulation base), <= 4.8e-7 on logits. The fused onnxruntime kernels
reassociate sums as the dynamo graph's do (1.5e-7 to 3e-7 there). The tests assert the exact tier's bound
(:class:`ExactScale`, from the logits' magnitude, width and depth); this constant documents what was seen."""


def _prompt_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, lora=()) -> torch.Tensor:
    wrapper = DecoderWrapper(model).eval()
    dtype = model.get_input_embeddings().weight.dtype
    past = tuple(torch.zeros(ids.shape[0], wrapper.num_kv_heads, 0, wrapper.head_dim, dtype=dtype)
                 for _ in range(2 * wrapper.num_layers))
    with torch.no_grad():
        return wrapper(ids, mask, past, lora)[0]


def _parity(model, out, ids, mask, *, tier="exact", factors=None, **build):
    result = build_decoder(model, out, **build)
    decoder = DecoderSession(create_session(result.model_path))
    report = decoder_parity(model, decoder, ids, mask, tier=tier, decode_steps=DECODE_STEPS,
                            max_new_tokens=MAX_NEW_TOKENS, factors=factors)
    return result, report


def _assert_exact(report):
    assert report.passed, report.failures
    assert all(o.max_abs <= o.tolerance for o in report.outputs)
    assert report.tokens_equal


@pytest.fixture(scope="module")
def batch(export_workspace):
    source = load_source_model(export_workspace.model, export_workspace.adapter, quantization="none")
    ids, mask = held_out_batch(export_workspace.model, source.config)
    assert (mask == 0).any()  # left padded
    return ids, mask


@pytest.fixture(scope="module")
def adapter_effect(export_workspace, batch):
    """max |logits(adapted) - logits(base)| of the trained adapter: parity below means something only if large."""
    ids, mask = batch
    source = load_source_model(export_workspace.model, export_workspace.adapter, quantization="none")
    adapted = _prompt_logits(source, ids, mask)
    with adapters_bypassed(source):
        base = _prompt_logits(source, ids, mask)
    return float((adapted - base).abs()[mask.bool()].max())


def _twin(ws, **conversion):
    model = load_source_model(ws.model, ws.adapter, quantization="none")
    result = convert_for_export(model, quantization="none", **conversion)
    return model, result


def test_adapter_changes_the_logits(adapter_effect):
    assert adapter_effect > ADAPTER_EFFECT_MIN


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_merged_fp32_matches_the_twin(export_workspace, batch, tmp_path, fused):
    model, _ = _twin(export_workspace, mode="merged")
    result, report = _parity(model, tmp_path, *batch, fused_qkv=fused, fused_gate_up=fused)
    _assert_exact(report)
    ops = result.op_counts
    assert ops["com.microsoft::GroupQueryAttention"] == 2 and ops["com.microsoft::SkipSimplifiedLayerNormalization"] == 4
    assert ops["MatMul"] == (4 if fused else 7) * 2 + 1  # projections per layer (qkv, gate_up fused), lm_head
    # GQA rotates q and k itself, reading the fused projection packed: no RotaryEmbedding, one Split (gate/up) a layer
    assert "com.microsoft::RotaryEmbedding" not in ops
    assert ops.get("Split", 0) == (2 if fused else 0)
    assert result.input_names[:2] == ("input_ids", "attention_mask") and result.output_names[0] == "logits"


def test_separate_branches_match_the_twin_and_count_as_adapter_matmuls(export_workspace, batch, tmp_path,
                                                                         adapter_effect):
    assert adapter_effect > ADAPTER_EFFECT_MIN
    model, conversion = _twin(export_workspace, mode="separate")
    live = [name for name, rank in conversion.ranks.items() if rank > 0]
    assert live and len(live) < len(conversion.ranks)  # rank-0 modules exist and get no branch
    result, report = _parity(model, tmp_path, *batch)
    _assert_exact(report)
    assert _adapter_matmuls(result.model_path, live) == 2 * len(live)
    proto = onnx.load(str(result.model_path), load_external_data=False)
    names = {n.name for n in proto.graph.node}
    assert "/model/layers/0/self_attn/qkv_proj/MatMul_0" in names  # the base stays fused beside the branches


def test_adapter_inputs_serve_any_factors(export_workspace, batch, tmp_path):
    ids, mask = batch
    model, conversion = _twin(export_workspace, mode="separate", adapter_inputs=True)
    factors = conversion.factors
    result, report = _parity(model, tmp_path, ids, mask, factors=factors)
    _assert_exact(report)
    assert result.adapter_input_names == adapter_input_names(model)
    assert result.input_names[-len(result.adapter_input_names):] == result.adapter_input_names
    # q and v share the fused q/k/v base, yet their branches read their own inputs: one per module
    assert _branch_matmuls(result.model_path) == {name: 2 for name in conversion.ranks}
    # per-member branches need q, k, v split; GQA still rotates them (unpacked inputs, no RotaryEmbedding)
    assert "com.microsoft::RotaryEmbedding" not in result.op_counts
    assert _adapter_matmuls(result.model_path, list(conversion.ranks)) == 2 * len(conversion.ranks)
    proto = onnx.load(str(result.model_path), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    for name in conversion.ranks:
        a, b = dims[f"{name}.lora_A"], dims[f"{name}.lora_B"]
        assert isinstance(a[1], str) and a[1] == b[0]
    # rank-0 defaults (what export_model adds): no feeds = the base model
    add_default_adapter_inputs(result.model_path, result.adapter_input_names)
    decoder = DecoderSession(create_session(result.model_path))
    assert decoder.adapter_optional
    got = decoder.step(ids.numpy(), mask.numpy()).logits
    zeros = {name: (A[:0], B[:, :0]) for name, (A, B) in factors.items()}
    lora = tuple(torch.from_numpy(adapter_feeds(zeros)[n]) for n in adapter_input_names(model))
    ref = _prompt_logits(model, ids, mask, lora).numpy()
    assert np.abs(got - ref)[mask.bool().numpy()].max() <= ExactScale.of(model).tolerance(ref)
    with_adapter = decoder.step(ids.numpy(), mask.numpy(), adapter=adapter_feeds(factors)).logits
    assert np.abs(with_adapter - got)[mask.bool().numpy()].max() > ADAPTER_EFFECT_MIN


def test_gptq_act_order_base_with_branches(export_workspace, batch, tmp_path):
    ws = export_workspace
    base = ws.gptq_base(act_order=True)
    adapter = ws.trained_on(base, "gptq")
    model = load_source_model(base, adapter, quantization="gptq")
    convert_for_export(model, quantization="gptq", mode="separate")
    kinds = {type(m) for m in model.modules()}
    assert NBitsLinear in kinds and LowRankBranch in kinds
    attn = model.model.layers[0].self_attn
    q_perm, v_perm = attn.q_proj.perm, attn.v_proj.base.perm
    # act-order sorts channels by the Hessian of the shared input, so q/k/v (and gate/up) share one perm
    assert q_perm is not None and torch.equal(q_perm, v_perm)
    result, report = _parity(model, tmp_path, *batch)
    _assert_exact(report)
    ops = result.op_counts
    assert ops["com.microsoft::MatMulNBits"] == 4 * 2  # fused qkv and gate_up bases, one Gather(perm) each
    assert ops["Gather"] == 4 * 2 + 1  # + the embedding


def test_merged_int4_is_lossy_but_close(export_workspace, batch, tmp_path):
    """Merged int4 (MatMulNBits accuracy_level 4: int8 activations in onnxruntime) against the twin."""
    model, _ = _twin(export_workspace, mode="merged", weights="int4", requantize="rtn")  # the graph vs its twin
    result, report = _parity(model, tmp_path, *batch, tier="lossy")
    assert report.passed, report.failures
    assert result.op_counts["com.microsoft::MatMulNBits"] == 4 * 2  # fused qkv, gate_up


@pytest.mark.parametrize(("bits", "symmetric"), [("int4", False), ("int4", True), ("int8", False)])
def test_tied_quantized_tables_share_one_copy_and_match_their_dequantized_twin(tmp_path, bits, symmetric):
    model = tiny_llama()
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 7), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    result = build_decoder(model, tmp_path, quantize_embeddings=bits, quantize_lm_head=bits, table_accuracy_level=0,
                           table_symmetric=symmetric)
    proto = onnx.load(str(result.model_path), load_external_data=False)
    tables = sorted(i.name for i in proto.graph.initializer if i.name.startswith(("lm_head", "model.embed_tokens")))
    assert tables == ["lm_head.qweight", "lm_head.scales"] + ([] if symmetric else ["lm_head.zero_points"])
    assert result.op_counts["com.microsoft::GatherBlockQuantized"] == 1 and "Gather" not in result.op_counts
    # the twin: the same tables, dequantized, in torch
    table = quantize_table(model.model.embed_tokens.weight, bits, accuracy_level=0, symmetric=symmetric)
    twin = tiny_llama()
    twin.model.embed_tokens.weight.data = table.dequantized_weight()
    swap_module(twin, "lm_head", table)
    decoder = DecoderSession(create_session(result.model_path))
    report = decoder_parity(twin, decoder, ids, mask, decode_steps=DECODE_STEPS, max_new_tokens=MAX_NEW_TOKENS)
    _assert_exact(report)


def _random_bnb4(linear: nn.Linear, generator: torch.Generator, block: int = 64) -> Bnb4Linear:
    n, k = linear.weight.shape
    packed = torch.randint(0, 256, ((n * k + 1) // 2,), generator=generator, dtype=torch.uint8)
    absmax = torch.rand(-(-n * k // block), generator=generator) * 0.1 + 0.05
    return Bnb4Linear(packed, absmax, in_features=k, out_features=n, block_size=block, quant_type="nf4")


def _random_int8(linear: nn.Linear, generator: torch.Generator) -> Int8EmulationLinear:
    n, k = linear.weight.shape
    cb = torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8)
    return Int8EmulationLinear(cb, torch.rand(n, generator=generator) * 0.3 + 0.1, threshold=1.5)


_KINDS = {
    "linear": lambda linear, gen: linear,
    "nbits": lambda linear, gen: NBitsLinear.from_float(linear.weight, bits=4, block_size=16, accuracy_level=0),
    "nbits-sym": lambda linear, gen: NBitsLinear.from_float(linear.weight, bits=4, block_size=16, symmetric=True),
    "bnb4": _random_bnb4,
    "int8": _random_int8,
}


def attach_branches(model: nn.Module, kind: str, targets: tuple[str, ...], generator: torch.Generator,
                    ids: torch.Tensor, mask: torch.Tensor) -> nn.Module:
    """Every decoder linear as base ``kind`` (:data:`_KINDS`), a random non-zero rank-4 branch on the modules
    named ``targets``; asserts that the branches change the prompt's logits (a parity test of them means
    something)."""
    plain = _prompt_logits(model, ids, mask)
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name.startswith("model.layers"):
            base = _KINDS[kind](module, generator)
            if name.rsplit(".", 1)[-1] in targets:
                n, k = module.weight.shape
                A = torch.randn(4, k, generator=generator) * 0.2
                B = torch.randn(n, 4, generator=generator) * 0.2
                base = LowRankBranch(base, A, B, in_features=k, out_features=n)
            swap_module(model, name, base)
    assert (_prompt_logits(model, ids, mask) - plain).abs().max() > ADAPTER_EFFECT_MIN
    return model


def _branch_matmuls(model_path) -> collections.Counter[str]:
    """Products (MatMul, or the up-projection's Gemm) that read a branch factor (initializer or graph input
    ``<m>.lora_A`` / ``.lora_B``), by ``<m>``."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    factors = {i.name for i in [*graph.initializer, *graph.input] if i.name.endswith((".lora_A", ".lora_B"))}
    return collections.Counter(name.rsplit(".", 1)[0] for n in graph.node if n.op_type in ("MatMul", "Gemm")
                               for name in n.input if name in factors)


ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("kind", ["linear", "nbits"])
def test_fused_siblings_share_one_branch(kind, tmp_path):
    """A branch on every projection: the fused q/k/v and gate/up groups each get one down and one up MatMul
    (2 + 2 + 2 + 2 per layer instead of 6 + 2 + 4 + 2), and the graph still equals the per-member twin."""
    model = tiny_llama()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 7), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    attach_branches(model, kind, ALL_PROJECTIONS, generator, ids, mask)  # asserts the branches change the logits
    result, report = _parity(model, tmp_path, ids, mask)
    _assert_exact(report)
    layers = [f"model.layers.{i}" for i in range(2)]
    expected = {f"{layer}.{m}": 2 for layer in layers
                for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}
    assert _branch_matmuls(result.model_path) == expected
    # one Gemm per group or module: the up-projection adds the base output (its C), no Add (no biases either)
    assert result.op_counts["Gemm"] == 4 * 2 and "Add" not in result.op_counts
    assert _adapter_matmuls(result.model_path, [n for n, m in model.named_modules()
                                                if isinstance(m, LowRankBranch)]) == 8 * 2
    proto = onnx.load(str(result.model_path), load_external_data=False)
    shapes = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    assert shapes["model.layers.0.self_attn.qkv_proj.lora_A"] == (64, 3 * 4)  # [K, sum r_i]
    assert shapes["model.layers.0.self_attn.qkv_proj.lora_B"] == (3 * 4, 64 + 32 + 32)  # [sum r_i, sum N_i]
    assert shapes["model.layers.0.mlp.gate_up_proj.lora_B"] == (2 * 4, 2 * 128)


def test_rank_0_and_plain_siblings_join_as_zero_columns(tmp_path):
    """q and v with branches, k a rank-0 branch (layer 0) or none (layer 1): one q/k/v branch whose k columns are
    zero; gate without a branch beside up: up keeps its own branch after the Split (a joint one saves no node)."""
    model = tiny_llama()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 7), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    attach_branches(model, "nbits", ("q_proj", "v_proj", "up_proj"), generator, ids, mask)
    attn = model.model.layers[0].self_attn
    attn.k_proj = LowRankBranch(attn.k_proj, torch.zeros(0, 64), torch.zeros(32, 0), in_features=64, out_features=32)
    result, report = _parity(model, tmp_path, ids, mask)
    _assert_exact(report)
    expected = {f"model.layers.{i}.{m}": 2 for i in range(2) for m in ("self_attn.qkv_proj", "mlp.up_proj")}
    assert _branch_matmuls(result.model_path) == expected
    proto = onnx.load(str(result.model_path))
    for i in range(2):
        lora_B = next(onnx.numpy_helper.to_array(init) for init in proto.graph.initializer
                      if init.name == f"model.layers.{i}.self_attn.qkv_proj.lora_B")
        assert lora_B.shape == (8, 128) and not lora_B[:, 64:96].any()  # k's columns
        assert not lora_B[:4, 96:].any() and not lora_B[4:, :64].any()  # off the q and v blocks


def test_one_branch_on_packed_qkv_joins_the_group(tmp_path):
    """q alone adapted: GroupQueryAttention reads q/k/v packed, so q's branch becomes the group's (zero k and v
    columns) instead of a Split and a branch on q's slice; up alone keeps its own branch after the MLP's Split."""
    model = tiny_llama()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 7), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    attach_branches(model, "nbits", ("q_proj", "up_proj"), generator, ids, mask)
    result, report = _parity(model, tmp_path, ids, mask)
    _assert_exact(report)
    expected = {f"model.layers.{i}.{m}": 2 for i in range(2) for m in ("self_attn.qkv_proj", "mlp.up_proj")}
    assert _branch_matmuls(result.model_path) == expected
    assert result.op_counts["Split"] == 2  # gate/up only
    proto = onnx.load(str(result.model_path))
    lora_B = next(onnx.numpy_helper.to_array(init) for init in proto.graph.initializer
                  if init.name == "model.layers.0.self_attn.qkv_proj.lora_B")
    assert lora_B.shape == (4, 128) and lora_B[:, :64].any() and not lora_B[:, 64:].any()


def test_fp16_graph_with_fused_branches_matches_the_fp16_twin(tmp_path):
    """fp16 weights and factors, one branch per fused group; judged by the lossy tier, as
    :func:`test_fp16_graph_matches_the_fp16_twin`."""
    model = tiny_llama(dtype=torch.float16)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 7), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    attach_branches(model, "linear", ALL_PROJECTIONS, generator, ids, mask)
    result, report = _parity(model, tmp_path, ids, mask, tier="lossy")
    assert report.passed and report.tokens_equal, report.failures
    assert sum(_branch_matmuls(result.model_path).values()) == 8 * 2


@pytest.mark.parametrize(("kind", "fused"), [(kind, True) for kind in sorted(_KINDS)] + [("nbits", False)],
                         ids=lambda v: v if isinstance(v, str) else ("fused" if v else "unfused"))
def test_every_base_kind_with_branches_matches_the_twin(kind, fused, tmp_path):
    """Each base module type (fused along q/k/v and gate/up, or not), with a non-zero branch on q and up."""
    model = tiny_llama()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 7), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    attach_branches(model, kind, ("q_proj", "up_proj"), generator, ids, mask)
    result, report = _parity(model, tmp_path, ids, mask, fused_qkv=fused, fused_gate_up=fused)
    _assert_exact(report)
    proto = onnx.load(str(result.model_path), load_external_data=False)
    fused_nodes = [n.name for n in proto.graph.node if "/qkv_proj/" in n.name]
    assert bool(fused_nodes) == fused
    if kind.startswith("nbits"):  # symmetric blocks leave MatMulNBits' zero_points input out (same default)
        inputs = [len(n.input) for n in proto.graph.node if n.op_type == "MatMulNBits"]
        assert set(inputs) == ({3} if kind == "nbits-sym" else {4})


def test_fp16_graph_matches_the_fp16_twin(tmp_path):
    """fp16 weights, activations and KV cache, fp32 logits; judged by the lossy tier (fp16 rounding differs)."""
    model = tiny_llama(dtype=torch.float16)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 7), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    result, report = _parity(model, tmp_path, ids, mask, tier="lossy")
    assert report.passed and report.tokens_equal, report.failures
    decoder = DecoderSession(create_session(result.model_path))
    assert decoder.past_dtype == np.float16
    assert decoder.step(ids.numpy(), mask.numpy()).logits.dtype == np.float32


def test_unsupported_architecture_is_refused(tmp_path):
    model = tiny_llama()
    model.config.model_type = "gpt2"
    with pytest.raises(FastPathUnsupported, match="model_type 'gpt2'"):
        build_decoder(model, tmp_path)
    assert not list(tmp_path.glob("*.onnx"))


def test_shared_kv_buffer_generation_equals_the_copying_loop(export_workspace, batch, tmp_path):
    """DecoderSession's in-place KV loop (IOBinding, past = present buffer) gives the same tokens as the loop
    that feeds each step's present back, on a left-padded batch with adapter inputs."""
    ids, mask = batch
    model, conversion = _twin(export_workspace, mode="separate", adapter_inputs=True)
    result = build_decoder(model, tmp_path)
    decoder = DecoderSession(create_session(result.model_path))
    assert decoder.shares_kv_buffer
    feeds = adapter_feeds(conversion.factors)
    shared = decoder.generate_greedy(ids.numpy(), mask.numpy(), MAX_NEW_TOKENS, adapter=feeds, share_kv_buffer=True)
    copied = decoder.generate_greedy(ids.numpy(), mask.numpy(), MAX_NEW_TOKENS, adapter=feeds, share_kv_buffer=False)
    assert np.array_equal(shared, copied)
    # without the metadata (export_decoder's graphs concatenate past and new keys) the loop refuses
    proto = onnx.load(str(result.model_path), load_external_data=False)
    del proto.metadata_props[:]
    onnx.save(proto, str(result.model_path))
    undeclared = DecoderSession(create_session(result.model_path))
    assert not undeclared.shares_kv_buffer
    with pytest.raises(ValueError, match="in place"):
        undeclared.generate_greedy(ids.numpy(), mask.numpy(), 2, adapter=feeds, share_kv_buffer=True)


def _tiny(model_type: str) -> nn.Module:
    """A tiny random ``model_type`` model sized like the demo Llama (qwen2: non-zero q/k/v biases)."""
    import transformers

    sizes = dict(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, pad_token_id=258, eos_token_id=257)
    config_class, model_class = {
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[model_type]
    extra = {"sliding_window": None} if model_type == "mistral" else {}
    torch.manual_seed(0)
    model = model_class(config_class(**sizes, **extra)).eval()
    if model_type == "qwen2":
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.data.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_other_llama_family_types(model_type, tmp_path):
    model = _tiny(model_type)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 7), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    result, report = _parity(model, tmp_path, ids, mask)
    _assert_exact(report)
    if model_type == "qwen2":
        assert result.op_counts["Add"] == 2  # one fused q/k/v bias per layer


def test_multi_token_steps_with_a_past_match_the_twin(tmp_path):
    """A prompt in two chunks (seq > 1 with a past), left-padded batch of 2."""
    model = tiny_llama()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    decoder = DecoderSession(create_session(build_decoder(model, tmp_path).model_path))
    wrapper = DecoderWrapper(model)
    first = decoder.step(ids[:, :5].numpy(), mask[:, :5].numpy())
    second = decoder.step(ids[:, 5:].numpy(), mask.numpy(), first.present)
    empty = tuple(torch.zeros(2, 2, 0, 16) for _ in range(4))
    with torch.no_grad():
        reference = wrapper(ids, mask, empty)[0][:, 5:].numpy()
    assert np.abs(second.logits - reference).max() <= ExactScale.of(model).tolerance(reference)

