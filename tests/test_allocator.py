"""The rank allocator on a real model: the golden budget, exact final count, and the call-order pitfalls."""

from __future__ import annotations

import logging

import pytest
import torch

from adalora_deploy import AdaLoraConfig, RankAllocator, inject_adapters
from adalora_deploy.demo import tiny_llama
from tests.conftest import random_tokens
from tests.test_functional import PEFT_BUDGETS


def _setup(**kwargs):
    config = AdaLoraConfig(**({"total_step": 20, "init_r": 12, "target_r": 4, "tinit": 2, "tfinal": 2,
                               "target_modules": ["q_proj", "v_proj"]} | kwargs))
    model = tiny_llama()
    adapters = inject_adapters(model, config)
    return model, adapters, RankAllocator(adapters, config), config


def _step(model, adapters, optimizer, seed):
    tokens = random_tokens(seed=seed)
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()


def test_two_layer_llama_budget_and_final_pattern():
    model, adapters, allocator, config = _setup()
    optimizer = torch.optim.AdamW(adapters.parameters(), lr=1e-2)
    seen = []
    for step in range(config.total_step):
        _step(model, adapters, optimizer, step)
        result = allocator.update_and_allocate(step)
        optimizer.zero_grad()
        seen.append(result.budget)
        assert result.live == result.budget  # exactly b(t) triplets alive after every masking step
        if step > 2:
            live_lambda = sum(int((layer.lora_E != 0).sum()) for layer in adapters.values())
            assert live_lambda <= result.budget
    assert seen == PEFT_BUDGETS
    pattern = adapters.rank_pattern()
    assert sum(sum(v) for v in pattern.values()) == 16
    assert set(pattern) == {f"model.layers.{i}.self_attn.{m}.lora_E" for i in range(2) for m in ("q_proj", "v_proj")}


def test_final_mask_happens_with_tfinal_zero():
    model, adapters, allocator, config = _setup(tfinal=0, total_step=8)
    optimizer = torch.optim.AdamW(adapters.parameters(), lr=1e-2)
    for step in range(config.total_step):
        _step(model, adapters, optimizer, step)
        result = allocator.update_and_allocate(step)
        optimizer.zero_grad()
    assert result.final and result.live == 16 and allocator.frozen


def test_masked_lambda_stays_zero_in_final_phase():
    model, adapters, allocator, config = _setup()
    optimizer = torch.optim.AdamW(adapters.parameters(), lr=5e-2)
    for step in range(config.total_step):
        _step(model, adapters, optimizer, step)
        allocator.update_and_allocate(step)
        optimizer.zero_grad()
        if step >= 18:
            for layer in adapters.values():
                assert torch.all(layer.lora_E[~layer.rank_mask] == 0)


def test_calling_after_zero_grad_is_caught():
    model, adapters, allocator, _ = _setup()
    optimizer = torch.optim.AdamW(adapters.parameters(), lr=1e-2)
    _step(model, adapters, optimizer, 0)
    optimizer.zero_grad()  # the wrong order: on_step_end sees no gradients
    with pytest.raises(RuntimeError, match="before optimizer.zero_grad"):
        allocator.update_and_allocate(0)


def test_steps_must_increase():
    model, adapters, allocator, _ = _setup()
    optimizer = torch.optim.AdamW(adapters.parameters(), lr=1e-2)
    _step(model, adapters, optimizer, 0)
    allocator.update_and_allocate(0)
    with pytest.raises(ValueError, match="must increase"):
        allocator.update_and_allocate(0)  # e.g. called once per micro-batch


def test_non_finite_gradients_skip_the_update_with_a_warning(caplog):
    model, adapters, allocator, _ = _setup()
    optimizer = torch.optim.SGD(adapters.parameters(), lr=0.0)
    for step in range(3):
        _step(model, adapters, optimizer, step)
        if step == 1:
            adapters.parameters()[0].grad[0, 0] = float("nan")
            before = [t.clone() for t in allocator.exp_avg_ipt]
        with caplog.at_level(logging.WARNING):
            result = allocator.update_and_allocate(step)
        if step == 1:
            assert result.skipped_update and "non-finite" in caplog.text
            assert all(torch.equal(a, b) for a, b in zip(before, allocator.exp_avg_ipt))
        optimizer.zero_grad()
    assert allocator.skipped_steps == [1]
    assert all(torch.isfinite(t).all() for t in allocator.exp_avg_ipt)


def test_scores_use_every_element_and_the_product():
    model, adapters, allocator, _ = _setup()
    optimizer = torch.optim.SGD(adapters.parameters(), lr=0.0)  # lr 0: weights stay, EMAs are checkable
    _step(model, adapters, optimizer, 0)
    params = adapters.parameters()
    grads = [p.grad.clone() for p in params]
    allocator.update_and_allocate(0)
    ipt = [(p * g).abs() for p, g in zip(params, grads)]
    bar = [0.15 * i for i in ipt]
    unc = [0.15 * (i - b).abs() for i, b in zip(ipt, bar)]
    s = [b * u for b, u in zip(bar, unc)]
    expected = s[1].view(-1) + s[0].mean(1) + s[2].mean(0)
    torch.testing.assert_close(allocator.scores()[0], expected)


def test_deltaT_masks_only_on_multiples():
    model, adapters, allocator, config = _setup(deltaT=3)
    optimizer = torch.optim.AdamW(adapters.parameters(), lr=1e-2)
    masked = []
    for step in range(config.total_step):
        _step(model, adapters, optimizer, step)
        if allocator.update_and_allocate(step).masked:
            masked.append(step)
        optimizer.zero_grad()
    assert masked == [3, 6, 9, 12, 15, 18]
