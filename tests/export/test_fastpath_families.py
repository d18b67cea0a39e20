"""The fast path's families beyond Llama (Mistral, Qwen2 with sliding layers, Qwen3, Gemma, Phi-3) against transformers.

Each model is a tiny random one of :mod:`tests.tiny_families` (norm weights and biases randomised, so a hook that
dropped them would show), run through ``decoder_parity``: a left-padded batch of 2, the prompt step, three
KV-cache steps (logits and every present tensor), then greedy generation against transformers' ``generate``.
Prompts are longer than the sliding window (8 of 20 tokens), and a short prompt makes the decode steps and the
generation cross the window. With branches, every target of the family's default ``target_modules`` plus the
MLP's up projection carries a non-zero low-rank branch, and the test first shows the branches change the logits.
"""

from __future__ import annotations

import pytest
import torch
from adalora_deploy.architectures import ARCHITECTURES, architecture_for
from adalora_deploy.export.build.fastpath import SUPPORTED_MODEL_TYPES, FastPathUnsupported, build_decoder
from adalora_deploy.export.build.fastpath import family as family_module
from adalora_deploy.export.build.modules import LowRankBranch, swap_module
from adalora_deploy.export.judge.parity import decoder_parity
from adalora_deploy.export.runtime.session import DecoderSession, create_session
from torch import nn

from tests.export.test_fastpath import _assert_exact, attach_branches
from tests.tiny_families import CONFIGS, SLIDING_WINDOW, TOKENS

FAMILIES = ["mistral", "qwen2-sliding", "qwen3", "gemma", "phi3", "phi3-partial", "gemma2", "gemma3_text-mixed"]
"""Cases: a ``model_type`` of :data:`tests.tiny_families.CONFIGS`, ``-suffix`` naming config overrides."""
WINDOWED = ["mistral", "qwen2-sliding", "phi3-sliding", "gemma2", "gemma3_text-mixed"]
"""Cases with a sliding window of :data:`~tests.tiny_families.SLIDING_WINDOW` (Qwen2: layer 1 only, Gemma2/3: layer 0)."""
_OVERRIDES = {
    "qwen2-sliding": {"use_sliding_window": True, "sliding_window": SLIDING_WINDOW, "max_window_layers": 1},
    "phi3-sliding": {"sliding_window": SLIDING_WINDOW},
    "phi3-partial": {"partial_rotary_factor": 0.75, "head_dim": 32},  # RoPE on 24 of 32 dims (as Phi-4-mini)
    # RoPE on 16 of 32 dims: a table 8 wide, which GroupQueryAttention rotates with (24 dims: 12, it refuses)
    "phi3-partial-gqa": {"partial_rotary_factor": 0.5, "head_dim": 32},
    "gemma": {"head_dim": 32},  # head_dim != hidden / heads (16)
    # caps small enough to bend the tiny model's scores and logits (the defaults, 50 and 30, barely touch them)
    # one sliding layer (local RoPE base 1e4) and one full layer (global base 1e6); the default pattern is 5:1
    "gemma3_text-mixed": {"layer_types": ["sliding_attention", "full_attention"]},
    "gemma2-softcap": {"attn_logit_softcapping": 0.05, "final_logit_softcapping": 0.3, "query_pre_attn_scalar": 3},
}
ROTARY_EMBEDDING_NODES = {"qwen3": 4, "phi3-partial": 4, "gemma3_text-mixed": 4}
"""RotaryEmbedding nodes (2 layers x q, k) where GroupQueryAttention cannot rotate: q/k norms before RoPE (Qwen3,
Gemma3), a table width GQA refuses (12: 24 of 32 dims); every other case rotates inside GQA (none)."""
FASTPATH_FAMILIES_MEASURED = 6.6e-7
"""Largest max abs logits difference seen over the parity tests below (onnxruntime 1.32, transformers 5.25, fp32:
Phi-3 with branches on an NF4 base; float models <= 3.6e-7); present tensors up to 3.2e-6 (Gemma3's keys after
q/k norms with random weights, larger in magnitude). Every output stays within the exact tier's bound (its scale
follows the output's magnitude), greedy tokens equal."""


def _tiny(case: str) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = case.split("-")[0]
    config = AutoConfig.for_model(model_type, **(CONFIGS[model_type] | _OVERRIDES.get(case, {})), **TOKENS)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # Gemma stores w of (1 + w), zero at init
                param.normal_(0.0 if model_type.startswith("gemma") else 1.0, 0.3)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.5)
    return model


def _batch(seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, seq), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :min(5, seq - 1)] = 0
    return ids, mask


def _with_branches(model: nn.Module, kind: str) -> nn.Module:
    """Every decoder linear as base ``kind``; the default targets and the MLP's up projection get a branch."""
    targets = architecture_for(model.config.model_type).target_modules + ("up_proj", "gate_up_proj")
    ids, mask = _batch(20)
    return attach_branches(model, kind, targets, torch.Generator().manual_seed(1), ids, mask)


def _parity(model, tmp_path, seq=20, **build):
    ids, mask = _batch(seq)
    result = build_decoder(model, tmp_path, **build)
    decoder = DecoderSession(create_session(result.model_path))
    return result, decoder_parity(model, decoder, ids, mask, decode_steps=3, max_new_tokens=8)


@pytest.mark.parametrize("seq", [20, 4], ids=["prompt-over-window", "decode-over-window"])
@pytest.mark.parametrize("case", FAMILIES + ["phi3-sliding", "gemma2-softcap", "phi3-partial-gqa"])
def test_family_matches_transformers(case, seq, tmp_path):
    """A float model (what a merged export builds) against transformers, prompt and decode; RoPE inside
    GroupQueryAttention (packed q/k/v, no Split) except where :data:`ROTARY_EMBEDDING_NODES` says."""
    result, report = _parity(_tiny(case), tmp_path, seq)
    _assert_exact(report)
    assert max(o.max_abs for o in report.outputs if o.name.endswith("logits")) <= 10 * FASTPATH_FAMILIES_MEASURED
    assert result.op_counts["com.microsoft::GroupQueryAttention"] == 2
    rotary_nodes = ROTARY_EMBEDDING_NODES.get(case, 0)
    assert result.op_counts.get("com.microsoft::RotaryEmbedding", 0) == rotary_nodes
    # q/k/v stay packed where GQA rotates: the only Splits are the MLPs' gate/up (one a layer)
    assert result.op_counts["Split"] == 2 * (1 if rotary_nodes == 0 else 2)


@pytest.mark.parametrize("kind", ["linear", "nbits", "bnb4"])
@pytest.mark.parametrize("case", FAMILIES)
def test_family_with_branches_on_every_base_kind(case, kind, tmp_path):
    """Separate mode: non-zero branches on a float, a GPTQ-layout (MatMulNBits) or an NF4 base."""
    model = _with_branches(_tiny(case), kind)
    result, report = _parity(model, tmp_path)
    _assert_exact(report)
    names = [n for n in result.op_counts]
    assert ("com.microsoft::MatMulNBits" in names) == (kind == "nbits")


@pytest.mark.parametrize("case", ["mistral", "qwen3", "gemma", "phi3-sliding", "gemma2", "gemma3_text-mixed"])
def test_fp16_family_graph_matches_its_fp16_model(case, tmp_path):
    """fp16 weights, activations and KV cache (judged by the lossy tier: fp16 rounding differs), greedy tokens equal."""
    ids, mask = _batch(20)
    model = _tiny(case).half()
    result = build_decoder(model, tmp_path)
    report = decoder_parity(model, DecoderSession(create_session(result.model_path)), ids, mask, tier="lossy",
                            decode_steps=3, max_new_tokens=8)
    assert report.passed and report.tokens_equal, report.failures


@pytest.mark.parametrize("model_type", ["gemma", "gemma3_text"])
def test_gemma_scaled_embedding_from_a_tied_quantized_table(model_type, tmp_path):
    """Gemma ties its embeddings: one int4 table (GatherBlockQuantized, then x sqrt(hidden); MatMulNBits for the
    logits) against the model holding that table dequantized."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from adalora_deploy.export.build.fastpath import quantize_table

    def tied():
        torch.manual_seed(0)
        config = AutoConfig.for_model(model_type, **(CONFIGS[model_type] | {"tie_word_embeddings": True}), **TOKENS)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()

    model = tied()
    result = build_decoder(model, tmp_path, quantize_embeddings="int4", quantize_lm_head="int4", table_accuracy_level=0)
    assert result.op_counts["com.microsoft::GatherBlockQuantized"] == 1
    table = quantize_table(model.model.embed_tokens.weight, "int4", accuracy_level=0)
    twin = tied()
    twin.model.embed_tokens.weight.data = table.dequantized_weight()
    swap_module(twin, "lm_head", table)
    ids, mask = _batch(20)
    report = decoder_parity(twin, DecoderSession(create_session(result.model_path)), ids, mask, decode_steps=3,
                            max_new_tokens=8)
    _assert_exact(report)


def test_phi3_branch_sits_on_the_fused_module(tmp_path):
    from adalora_deploy.export.api import _adapter_matmuls

    model = _with_branches(_tiny("phi3"), "nbits")
    result, report = _parity(model, tmp_path)
    _assert_exact(report)
    branched = [n for n, m in model.named_modules() if isinstance(m, LowRankBranch)]
    assert branched and all(n.endswith(("qkv_proj", "gate_up_proj")) for n in branched)
    assert _adapter_matmuls(result.model_path, branched) == 2 * len(branched)


@pytest.mark.parametrize("case", WINDOWED)
def test_the_window_is_seen_and_off_by_one_fails(case, tmp_path, monkeypatch):
    """The parity above catches a window one key too wide or too narrow, or none at all."""
    from adalora_deploy.export.build.fastpath import mistral, phi3

    model = _tiny(case)
    _assert_exact(_parity(model, tmp_path / "ok")[1])
    # no window on a layer_types sliding layer is refused (Qwen2, Gemma2), so only Mistral/Phi-3 try -1
    for wrong in (SLIDING_WINDOW - 1, SLIDING_WINDOW + 1) + ((-1,) if case in ("mistral", "phi3-sliding") else ()):
        for module in (family_module, mistral, phi3):
            monkeypatch.setattr(module, "gqa_window", lambda s, w=wrong: w if s is not None else -1)
        _, report = _parity(model, tmp_path / str(wrong))
        assert not report.passed, wrong
        assert max(o.max_abs for o in report.outputs if o.name.endswith("logits")) > 1e-3, wrong


@pytest.mark.parametrize("cap", ["attention_softcap", "final_softcap"])
def test_gemma2_softcaps_are_seen(cap, tmp_path, monkeypatch):
    from adalora_deploy.export.build.fastpath.gemma2 import Gemma2Family

    monkeypatch.setattr(Gemma2Family, cap, lambda self, config: 0.0 if cap == "attention_softcap" else None)
    _, report = _parity(_tiny("gemma2-softcap"), tmp_path)
    assert not report.passed
    assert max(o.max_abs for o in report.outputs if o.name.endswith("logits")) > 1e-4


@pytest.mark.parametrize("table", ["sliding_attention", "full_attention"])
def test_gemma3_rotates_each_layer_type_with_its_own_base(table, tmp_path, monkeypatch):
    """One RoPE table for both layers (either base) fails: the parity sees the per-layer-type tables."""
    from adalora_deploy.export.build.fastpath.gemma3 import Gemma3Family

    monkeypatch.setattr(Gemma3Family, "rope_key", lambda self, config, layer: table)
    result, report = _parity(_tiny("gemma3_text-mixed"), tmp_path)
    assert not report.passed
    assert max(o.max_abs for o in report.outputs if o.name.endswith("logits")) > 1e-3


def test_a_window_needs_a_measured_onnxruntime(tmp_path, monkeypatch):
    monkeypatch.setattr(family_module, "_onnxruntime_version", lambda: (1, 31))
    with pytest.raises(FastPathUnsupported, match="onnxruntime >= 1.32"):
        build_decoder(_tiny("mistral"), tmp_path)
    model = _tiny("mistral")
    model.config.sliding_window = None  # no window: nothing to measure
    build_decoder(model, tmp_path)


@pytest.mark.parametrize(("case", "change", "match"), [
    ("gemma", {"hidden_act": "gelu_new"}, "hidden_act 'gelu_new'"),
    ("qwen3", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
    ("gemma2", {"hidden_activation": "gelu_new"}, "hidden_activation 'gelu_new'"),
    ("gemma3_text", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
])
def test_what_the_graph_would_get_wrong_is_refused(case, change, match, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(case, **(CONFIGS[case] | change), **TOKENS)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with pytest.raises(FastPathUnsupported, match=match):
        build_decoder(model, tmp_path)
    assert not list(tmp_path.glob("*.onnx"))


def test_the_table_says_which_families_take_the_fast_path():
    fast = {t for arch in ARCHITECTURES if arch.fast_path for t in arch.model_types}
    assert fast == set(SUPPORTED_MODEL_TYPES)
