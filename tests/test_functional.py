"""The pure math: schedule, selection, sensitivity, scores, factor identities."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adalora_deploy import functional as F

# Golden: PEFT 0.21.2's RankAllocator.budget_schedule, n = 4 layers, init_r 12, target_r 4, T 20, tinit 2,
# tfinal 2 (docs/ALGORITHM.md, "Worked example").
PEFT_BUDGETS = [48, 48, 48, 42, 37, 33, 29, 26, 23, 21, 20, 18, 17, 16, 16, 16, 16, 16, 16, 16]


def test_budget_matches_peft_worked_example():
    budgets = [F.budget_at(t, init_budget=48, target_budget=16, tinit=2, tfinal=2, total_step=20) for t in range(20)]
    assert budgets == PEFT_BUDGETS


def test_budget_reaches_target_on_last_step_when_tfinal_is_zero():
    budgets = [F.budget_at(t, init_budget=48, target_budget=16, tinit=0, tfinal=0, total_step=10) for t in range(10)]
    assert budgets[0] == 48 and budgets[-1] == 16
    assert F.final_step(0, 10) == 9 and F.final_step(3, 10) == 7


def test_linear_schedule_is_an_option_not_the_default():
    cubic = F.budget_at(5, init_budget=48, target_budget=16, tinit=0, tfinal=0, total_step=20)
    linear = F.budget_at(5, init_budget=48, target_budget=16, tinit=0, tfinal=0, total_step=20, schedule="linear")
    assert linear == int(32 * 0.75 + 16) and cubic == int(32 * 0.75**3 + 16)
    with pytest.raises(ValueError):
        F.budget_at(5, init_budget=48, target_budget=16, tinit=0, tfinal=0, total_step=20, schedule="cosine")


@settings(max_examples=200, deadline=None)
@given(layers=st.integers(1, 50), init_r=st.integers(2, 64), data=st.data())
def test_budget_never_increases_and_hits_both_ends(layers, init_r, data):
    target_r = data.draw(st.integers(1, init_r - 1))
    total = data.draw(st.integers(2, 400))
    tfinal = data.draw(st.integers(0, total - 1))
    tinit = data.draw(st.integers(0, total - tfinal - 1))
    kwargs = dict(init_budget=layers * init_r, target_budget=layers * target_r, tinit=tinit, tfinal=tfinal,
                  total_step=total)
    budgets = [F.budget_at(t, **kwargs) for t in range(total)]
    assert budgets[0] == layers * init_r
    assert budgets[-1] == layers * target_r
    assert budgets[F.final_step(tfinal, total)] == layers * target_r
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))
    assert all(layers * target_r <= b <= layers * init_r for b in budgets)


def test_select_top_keeps_exactly_budget_with_ties_zeros_and_nan():
    ties = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5])
    keep = F.select_top(ties, 2)
    assert keep.sum() == 2 and keep.tolist() == [False, True, True, False, False]  # earlier tie wins
    zeros = torch.zeros(8)
    assert F.select_top(zeros, 3).sum() == 3  # PEFT's kthvalue + <= would mask all eight
    with_nan = torch.tensor([float("nan"), 0.1, 0.2, float("nan")])
    keep = F.select_top(with_nan, 2)
    assert keep.tolist() == [False, True, True, False]  # NaN never pins a triplet
    assert F.select_top(with_nan, 4).sum() == 4
    with pytest.raises(ValueError):
        F.select_top(zeros, 9)


@settings(max_examples=100, deadline=None)
@given(scores=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=64),
       data=st.data())
def test_select_top_exact_count_and_dominance(scores, data):
    values = torch.tensor(scores)
    budget = data.draw(st.integers(0, len(scores)))
    keep = F.select_top(values, budget)
    assert int(keep.sum()) == budget
    clean = torch.nan_to_num(values, nan=-math.inf)
    if 0 < budget < len(scores):
        assert clean[keep].min() >= clean[~keep].max()


def test_sensitivity_update_follows_eq_9_to_11():
    torch.manual_seed(0)
    w, g = torch.randn(3, 4), torch.randn(3, 4)
    ipt_bar, unc_bar = torch.rand(3, 4), torch.rand(3, 4)
    expected_ipt = 0.85 * ipt_bar + 0.15 * (w * g).abs()
    expected_unc = 0.7 * unc_bar + 0.3 * ((w * g).abs() - expected_ipt).abs()
    F.update_sensitivity([w], [g], [ipt_bar], [unc_bar], beta1=0.85, beta2=0.7)
    torch.testing.assert_close(ipt_bar, expected_ipt)
    torch.testing.assert_close(unc_bar, expected_unc)
    torch.testing.assert_close(F.element_scores(ipt_bar, unc_bar), expected_ipt * expected_unc)


def test_triplet_score_is_lambda_plus_row_and_column_means():
    s_A, s_E, s_B = torch.rand(3, 5), torch.rand(3, 1), torch.rand(7, 3)
    scores = F.triplet_scores(s_A, s_E, s_B)
    for i in range(3):
        assert scores[i].item() == pytest.approx(s_E[i, 0].item() + s_A[i].mean().item() + s_B[:, i].mean().item())


def test_delta_output_and_lora_factors_agree():
    torch.manual_seed(0)
    A, E, B, x = torch.randn(4, 6), torch.randn(4, 1), torch.randn(5, 4), torch.randn(2, 3, 6)
    scale = F.adapter_scale(8, 12)
    assert scale == 8 / (12 + 1e-5)
    delta = F.adapter_delta(A, E, B, scale)
    torch.testing.assert_close(F.adapter_output(x, A, E, B, scale), x @ delta.T, rtol=1e-5, atol=1e-6)
    lora_A, lora_B = F.lora_factors(A, E, B, scale)
    torch.testing.assert_close(lora_B @ lora_A, delta, rtol=1e-5, atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(mask=st.lists(st.booleans(), min_size=1, max_size=10))
def test_slicing_a_masked_layer_never_changes_its_output(mask):
    torch.manual_seed(len(mask))
    r = len(mask)
    keep = torch.tensor(mask)
    A, E, B, x = torch.randn(r, 6), torch.randn(r, 1), torch.randn(5, r), torch.randn(3, 6)
    masked = F.adapter_output(x, A, E.masked_fill(~keep.view(-1, 1), 0.0), B, 0.5)
    sliced = F.adapter_output(x, *F.slice_triplets(A, E, B, keep), 0.5)
    torch.testing.assert_close(sliced, masked, rtol=1e-5, atol=1e-6)


def test_orthogonal_penalty_zero_for_orthonormal_factors():
    q = torch.linalg.qr(torch.randn(8, 3)).Q
    assert F.orthogonal_penalty(q.T, q).item() == pytest.approx(0.0, abs=1e-5)
    A = torch.randn(3, 8)
    peft_form = F.orthogonal_penalty(A, q)
    paper_form = F.orthogonal_penalty(A, q, squared=True)
    norm = torch.linalg.matrix_norm(A @ A.T - torch.eye(3))
    assert peft_form.item() == pytest.approx(norm.item(), rel=1e-4)
    assert paper_form.item() == pytest.approx(norm.item() ** 2, rel=1e-3)
