"""The GRPO objective: group advantages, two-sided clipping, NaN guards, normalisation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coderepair.trainer.config import LossConfig
from coderepair.trainer.loss import group_advantages, grpo_loss

CFG = LossConfig(clip_eps_low=0.2, clip_eps_high=0.28, delta=4.0)

rewards_st = st.lists(
    st.floats(min_value=-100, max_value=100, allow_nan=False), min_size=2, max_size=16
)


@settings(max_examples=200, deadline=None)
@given(
    rewards=rewards_st,
    shift=st.floats(min_value=-50, max_value=50),
    scale=st.floats(min_value=0.1, max_value=10),
    groups=st.integers(min_value=1, max_value=4),
)
def test_advantages_are_invariant_to_reward_shift_and_scale(
    rewards: list[float], shift: float, scale: float, groups: int
) -> None:
    ids = torch.tensor([i % groups for i in range(len(rewards))])
    r = torch.tensor(rewards, dtype=torch.float64)
    base = group_advantages(r, ids)
    moved = group_advantages(r * scale + shift, ids)
    # A group at the eps boundary may flip; every group kept by both must agree.
    both = base.keep & moved.keep
    assert torch.allclose(base.advantages[both], moved.advantages[both], atol=1e-3)


@settings(max_examples=200, deadline=None)
@given(rewards=rewards_st, groups=st.integers(min_value=1, max_value=4))
def test_kept_groups_have_zero_mean_unit_std(rewards: list[float], groups: int) -> None:
    ids = torch.tensor([i % groups for i in range(len(rewards))])
    out = group_advantages(torch.tensor(rewards, dtype=torch.float64), ids)
    for g in range(groups):
        sel = (ids == g) & out.keep
        if sel.any():
            a = out.advantages[sel].double()
            assert abs(float(a.mean())) < 1e-4
            assert abs(float(a.pow(2).mean().sqrt()) - 1.0) < 1e-4
        assert not out.advantages[(ids == g) & ~out.keep].any()


def test_zero_variance_and_nonfinite_are_dropped_and_counted() -> None:
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, float("nan"), 2.0, 3.0], dtype=torch.float64)
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    out = group_advantages(rewards, ids)
    assert out.dropped_groups == 1 and out.nonfinite_rewards == 1
    assert out.keep.tolist() == [False, False, True, True, False, True, True]
    assert torch.isfinite(out.advantages).all()


def _loss_of(logprob: float, behaviour: float, advantage: float) -> tuple[float, float]:
    lp = torch.tensor([[logprob]], requires_grad=True)
    out = grpo_loss(
        lp, torch.tensor([[behaviour]]), torch.tensor([advantage]), torch.tensor([[True]]), CFG
    )
    out.loss.backward()
    assert lp.grad is not None
    return float(out.loss.detach()), float(lp.grad)


@settings(max_examples=200, deadline=None)
@given(
    log_ratio=st.floats(min_value=-10, max_value=10),
    advantage=st.floats(min_value=-5, max_value=5).filter(lambda a: abs(a) > 1e-3),
)
def test_per_token_loss_is_bounded_by_clip_and_delta(log_ratio: float, advantage: float) -> None:
    loss, grad = _loss_of(-1.0 + log_ratio, -1.0, advantage)
    ratio = math.exp(log_ratio)
    if advantage > 0:
        # Never more credit than (1 + eps_high) * A.
        assert loss >= -(1 + CFG.clip_eps_high) * advantage - 1e-4
        if ratio > 1 + CFG.clip_eps_high + 1e-4:
            assert grad == 0.0
    else:
        # Two-sided: the penalty of a negative advantage is capped at delta * |A|.
        assert loss <= CFG.delta * abs(advantage) + 1e-4
        if ratio > CFG.delta + 1e-4 or ratio < 1 - CFG.clip_eps_low - 1e-4:
            assert grad == 0.0


def test_on_policy_gradient_is_the_policy_gradient() -> None:
    # At ratio 1 the loss is -A * ratio, so d loss / d logprob = -A / n_tokens.
    loss, grad = _loss_of(-2.0, -2.0, 1.5)
    assert loss == pytest.approx(-1.5)
    assert grad == pytest.approx(-1.5)


bad = st.sampled_from([float("nan"), float("inf"), float("-inf")])


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    rows=st.integers(min_value=1, max_value=4),
    cols=st.integers(min_value=1, max_value=6),
)
def test_nan_and_inf_inputs_never_give_a_nan_loss_or_gradient(
    data: st.DataObject, rows: int, cols: int
) -> None:
    def tensor(shape: tuple[int, ...], lo: float, hi: float) -> torch.Tensor:
        n = math.prod(shape)
        values = data.draw(
            st.lists(st.one_of(st.floats(min_value=lo, max_value=hi), bad), min_size=n, max_size=n)
        )
        return torch.tensor(values, dtype=torch.float32).reshape(shape)

    lp = tensor((rows, cols), -30, 0).requires_grad_(True)
    blp = tensor((rows, cols), -30, 0)
    adv = tensor((rows,), -5, 5)
    mask = torch.tensor(
        data.draw(st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols))
    ).reshape(rows, cols)
    out = grpo_loss(lp, blp, adv, mask, CFG)
    out.loss.backward()
    assert lp.grad is not None
    assert torch.isfinite(out.loss)
    assert torch.isfinite(lp.grad).all()
    bad_tokens = mask & ~(torch.isfinite(lp.detach()) & torch.isfinite(blp))
    assert out.stats["skipped_tokens"] == float(bad_tokens.sum())


def test_token_level_normalisation_weights_every_token_equally() -> None:
    # A long and a short completion with the same advantage: every token's gradient is
    # -A / total_tokens, whatever the length of its sequence.
    lp = torch.full((2, 4), -1.0, requires_grad=True)
    mask = torch.tensor([[True, True, True, True], [True, False, False, False]])
    out = grpo_loss(lp, torch.full((2, 4), -1.0), torch.tensor([1.0, 1.0]), mask, CFG)
    out.loss.backward()
    assert lp.grad is not None
    assert torch.allclose(lp.grad[mask], torch.full((5,), -1.0 / 5))
    assert not lp.grad[~mask].any()


def test_micro_batches_add_up_to_the_full_batch() -> None:
    torch.manual_seed(0)
    lp = torch.randn(4, 5).clamp(max=0)
    blp = lp + 0.1 * torch.randn(4, 5)
    blp = blp.clamp(max=0)
    adv = torch.randn(4)
    mask = torch.rand(4, 5) > 0.3
    full = grpo_loss(lp, blp, adv, mask, CFG).loss
    n = float(mask.sum())
    parts = sum(
        grpo_loss(
            lp[i : i + 2], blp[i : i + 2], adv[i : i + 2], mask[i : i + 2], CFG, token_normaliser=n
        ).loss
        for i in (0, 2)
    )
    assert float(parts) == pytest.approx(float(full), abs=1e-6)


def test_kl_and_entropy_terms_are_off_by_default_and_need_inputs_when_on() -> None:
    lp = torch.full((1, 2), -1.0)
    mask = torch.ones(1, 2, dtype=torch.bool)
    base = grpo_loss(lp, lp, torch.tensor([1.0]), mask, CFG).loss
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(lp, lp, torch.tensor([1.0]), mask, LossConfig(kl_coef=0.1))
    kl = grpo_loss(
        lp, lp, torch.tensor([1.0]), mask, LossConfig(kl_coef=0.1), ref_logprobs=lp - 1.0
    ).loss
    ent = grpo_loss(
        lp,
        lp,
        torch.tensor([1.0]),
        mask,
        LossConfig(entropy_coef=0.1),
        entropy=torch.full((1, 2), 2.0),
    ).loss
    assert float(kl) > float(base) and float(ent) < float(base)


def test_shape_mismatch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="must match"):
        grpo_loss(
            torch.zeros(1, 2),
            torch.zeros(1, 3),
            torch.zeros(1),
            torch.ones(1, 2, dtype=torch.bool),
            CFG,
        )
