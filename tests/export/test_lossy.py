"""Lossy graphs: int4 weights (round to nearest) served with int8 activations (accuracy_level 4)."""

from __future__ import annotations

import pytest
from adalora_deploy.export.build.graph import export_decoder
from adalora_deploy.export.build.modules import NBitsLinear, swap_module
from adalora_deploy.export.judge.parity import LOSSY_MAX_KL, LOSSY_MIN_TOP1, decoder_parity
from adalora_deploy.export.runtime.session import DecoderSession, create_session

from adalora_deploy.demo import tiny_llama
from tests.export.test_graph import EOS, PAD, left_padded_batch

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def int4_acc4(tmp_path_factory):
    model = tiny_llama(seed=0)
    for i in range(model.config.num_hidden_layers):
        for suffix in PROJECTIONS:
            name = f"model.layers.{i}.{suffix}"
            linear = model.get_submodule(name)
            swap_module(model, name, NBitsLinear.from_float(linear.weight, linear.bias, bits=4, block_size=32,
                                                            accuracy_level=4))
    result = export_decoder(model, tmp_path_factory.mktemp("int4"))
    return model, result, DecoderSession(create_session(result.model_path))


def test_int4_accuracy_level_4_passes_the_lossy_tier_only(int4_acc4):
    model, result, decoder = int4_acc4
    assert result.op_counts["com.microsoft::MatMulNBits"] == 14
    ids, mask = left_padded_batch(seed=5)
    lossy = decoder_parity(model, decoder, ids, mask, tier="lossy", decode_steps=3, max_new_tokens=8,
                           eos_token_id=EOS, pad_token_id=PAD)
    assert lossy.passed, lossy.failures
    logits = [o for o in lossy.outputs if o.name.endswith("/logits")]
    assert min(o.top1_agreement for o in logits) >= LOSSY_MIN_TOP1
    assert max(o.mean_kl for o in logits) <= LOSSY_MAX_KL
    # int8 activations are visible: against the same weights with fp32 activations (accuracy_level 0 in the
    # torch twin, whose op otherwise reproduces the int8 path) the exact tier's elementwise bound fails
    for module in model.modules():
        if isinstance(module, NBitsLinear):
            module.accuracy_level = 0
    try:
        exact = decoder_parity(model, decoder, ids, mask, tier="exact", decode_steps=0, max_new_tokens=0)
    finally:
        for module in model.modules():
            if isinstance(module, NBitsLinear):
                module.accuracy_level = 4
    assert not exact.passed
