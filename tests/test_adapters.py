"""Injection by target_modules (PEFT's matching), the SVD layer, and what is trainable afterwards."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adalora_deploy import (
    AdaLoraConfig,
    AdaLoraLinear,
    ConfigError,
    UnsupportedLayerError,
    find_adapters,
    inject_adapters,
)
from adalora_deploy.adapters import matches_target
from adalora_deploy.demo import tiny_llama
from tests.conftest import random_tokens


def _config(**kwargs) -> AdaLoraConfig:
    return AdaLoraConfig(**({"total_step": 10, "target_modules": ["q_proj", "v_proj"]} | kwargs))


def test_matching_follows_peft():
    assert matches_target("model.layers.0.self_attn.q_proj", ["q_proj"])
    assert matches_target("q_proj", ["q_proj"])
    assert not matches_target("model.layers.0.self_attn.xq_proj", ["q_proj"])
    assert matches_target("model.layers.1.self_attn.v_proj", r".*layers\.1\.self_attn\.(q|v)_proj")
    assert not matches_target("model.layers.0.self_attn.v_proj", r".*layers\.1\.self_attn\.(q|v)_proj")
    assert not matches_target("model.layers.1.self_attn.v_proj", r"v_proj")  # a regex must match the whole name


def test_injected_model_equals_base_and_only_adapters_train():
    model = tiny_llama()
    tokens = random_tokens()
    with torch.no_grad():
        before = model(input_ids=tokens).logits
    adapters = inject_adapters(model, _config())
    assert list(adapters) == [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
    with torch.no_grad():
        after = model(input_ids=tokens).logits
    assert torch.equal(before, after)  # Λ = 0: exactly the base model
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{k}" for n in adapters for k in "AEB"}
    layer = adapters["model.layers.0.self_attn.q_proj"]
    assert layer.lora_A.shape == (12, 64) and layer.lora_E.shape == (12, 1) and layer.lora_B.shape == (64, 12)
    assert float(layer.lora_A.detach().std()) == pytest.approx(0.02, rel=0.2)
    assert layer.scale == 8 / (12 + 1e-5)


def test_regex_targets_and_defaults():
    model = tiny_llama()
    adapters = inject_adapters(model, _config(target_modules=r"model\.layers\.1\.mlp\.(gate|up)_proj"))
    assert list(adapters) == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    defaults = inject_adapters(tiny_llama(), _config(target_modules=None))  # llama: PEFT's q_proj, v_proj
    assert len(defaults) == 4


def test_no_match_names_the_linear_layers():
    with pytest.raises(ConfigError, match="matches no module.*q_proj"):
        inject_adapters(tiny_llama(), _config(target_modules=["query"]))


def test_unsupported_layer_is_named():
    model = nn.Sequential()
    model.add_module("embed", nn.Embedding(10, 4))
    with pytest.raises(UnsupportedLayerError, match="embed.*Embedding"):
        inject_adapters(model, _config(target_modules=["embed"]))


def test_inject_twice_is_refused():
    model = tiny_llama()
    inject_adapters(model, _config())
    with pytest.raises(ValueError, match="already"):
        inject_adapters(model, _config())


def test_adapter_changes_output_and_mask_then_compact_keeps_it():
    torch.manual_seed(0)
    layer = AdaLoraLinear(nn.Linear(16, 8), init_r=6, lora_alpha=8)
    x = torch.randn(3, 16)
    base = layer.base_layer(x)
    with torch.no_grad():
        layer.lora_E.normal_()
    assert (layer(x) - base).abs().max() > 1e-3
    keep = torch.tensor([True, False, True, True, False, False])
    layer.apply_mask(keep)
    masked = layer(x)
    torch.testing.assert_close(masked, base + x @ layer.delta_weight().T, rtol=1e-5, atol=1e-6)
    layer.compact_()
    assert layer.rank == 3 and layer.is_compacted and layer.rank_mask.tolist() == keep.tolist()
    torch.testing.assert_close(layer(x), masked, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="frozen"):
        layer.apply_mask(torch.ones(6, dtype=torch.bool))


def test_state_dict_round_trips_masks():
    model = tiny_llama()
    adapters = inject_adapters(model, _config())
    layer = adapters["model.layers.0.self_attn.v_proj"]
    layer.apply_mask(torch.arange(12) % 2 == 0)
    state = model.state_dict()
    other = tiny_llama()
    inject_adapters(other, _config())
    other.load_state_dict(state)
    assert find_adapters(other)["model.layers.0.self_attn.v_proj"].rank_mask.tolist() == (torch.arange(12) % 2 == 0).tolist()


def test_gradients_reach_adapters_only():
    model = tiny_llama()
    adapters = inject_adapters(model, _config())
    with torch.no_grad():
        for layer in adapters.values():
            layer.lora_E.fill_(0.1)
    tokens = random_tokens()
    model(input_ids=tokens, labels=tokens).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters.parameters())
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
