"""The GRPO objective on off-policy rollouts, as INTELLECT-2 / prime-rl run it. Pure torch.

Two functions, in the order a step uses them:

* `group_advantages`: rewards → advantages normalised within each group (mean 0, std 1).
  A group whose rewards are all equal carries no signal; it is dropped (its samples get a
  zero weight) and counted, rather than kept with advantage 0 where it would still dilute
  the token normaliser.
* `grpo_loss`: per-token clipped surrogate with the importance ratio taken against the
  *behaviour* logprobs the worker recorded (the rollout may be several versions old). The
  ratio is PPO-clipped to [1 - ε_low, 1 + ε_high] and, on top, capped at δ on both sides
  of the min (INTELLECT-2's two-sided clipping): without the cap, a negative advantage
  times a huge ratio is an unbounded loss term. Tokens with non-finite logprobs are masked
  out and counted; the sum is normalised by the number of valid tokens of the whole step
  (token-level normalisation, as DAPO), so long completions are not down-weighted.

Everything here is differentiable where it must be and returns its counters as floats,
ready to log.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from coderepair.trainer.config import LossConfig

__all__ = ["AdvantageResult", "LossOutput", "group_advantages", "grpo_loss", "token_entropy"]

# exp() of a float32 overflows above ~88.7; beyond this the clipped/capped ratio has zero
# gradient anyway, so clamping the log-ratio changes no gradient and keeps the loss finite.
_MAX_LOG_RATIO = 80.0


@dataclass(frozen=True)
class AdvantageResult:
    """Advantages of a batch of samples and which samples take part in the loss."""

    advantages: torch.Tensor
    """(B,) float: (reward - group mean) / group std; 0 for samples that do not take part."""
    keep: torch.Tensor
    """(B,) bool: sample has a finite reward in a group with non-zero reward variance."""
    dropped_groups: int
    """Groups dropped because all their (finite) rewards were equal, or fewer than 2."""
    nonfinite_rewards: int
    """Samples dropped because their reward was NaN or infinite."""


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, eps: float = 1e-6
) -> AdvantageResult:
    """Group-normalised advantages: (r - mean_g) / std_g over the finite rewards of group g.

    ``rewards``: (B,) float; ``group_ids``: (B,) int64 labels in [0, n_groups). The std is
    the population std (it is only a scale). Groups with std <= ``eps`` are dropped.
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be 1-D of the same length, got "
            f"{tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )
    rewards = rewards.detach().to(torch.float64)
    finite = torch.isfinite(rewards)
    r = torch.where(finite, rewards, torch.zeros_like(rewards))
    n_groups = int(group_ids.max().item()) + 1 if group_ids.numel() else 0
    count = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group_ids, finite.double())
    total = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group_ids, r)
    mean = total / count.clamp(min=1.0)
    centred = torch.where(finite, r - mean[group_ids], torch.zeros_like(r))
    var = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group_ids, centred**2)
    std = (var / count.clamp(min=1.0)).sqrt()
    present = count > 0
    alive = present & (count >= 2) & (std > eps)
    keep = finite & alive[group_ids]
    advantages = torch.where(keep, centred / std.clamp(min=eps)[group_ids], torch.zeros_like(r))
    labels_used = torch.zeros(n_groups, dtype=torch.bool)
    labels_used[group_ids] = True
    return AdvantageResult(
        advantages=advantages.to(torch.float32),
        keep=keep,
        dropped_groups=int((labels_used & ~alive).sum().item()),
        nonfinite_rewards=int((~finite).sum().item()),
    )


@dataclass
class LossOutput:
    """The loss of one (micro-)batch and what happened inside it."""

    loss: torch.Tensor
    """Scalar to call backward() on (already divided by the step's token count)."""
    stats: dict[str, float] = field(default_factory=dict)
    """Sums over this batch (tokens, clipped tokens, skipped tokens, ...) for logging."""


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's next-token distribution: (..., V) logits → (...)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def grpo_loss(
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: LossConfig,
    *,
    token_normaliser: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> LossOutput:
    """Clipped, δ-capped surrogate against behaviour logprobs, summed per token.

    All token tensors are (B, T): ``logprobs`` (current policy, with grad),
    ``behaviour_logprobs`` (from the rollouts), ``mask`` (bool: completion token of a kept
    sample), ``ref_logprobs`` (needed when ``config.kl_coef`` > 0), ``entropy`` (needed
    when ``config.entropy_coef`` > 0). ``advantages``: (B,). ``token_normaliser``: the
    number of valid tokens in the whole optimizer step (so micro-batches add up to one
    token-level mean); defaults to this batch's valid token count.
    """
    if logprobs.shape != behaviour_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, behaviour_logprobs "
            f"{tuple(behaviour_logprobs.shape)} and mask {tuple(mask.shape)} must match"
        )
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be ({logprobs.shape[0]},), got {advantages.shape}")
    if config.kl_coef > 0 and ref_logprobs is None:
        raise ValueError("config.kl_coef > 0 needs ref_logprobs")
    if config.entropy_coef > 0 and entropy is None:
        raise ValueError("config.entropy_coef > 0 needs entropy")

    mask = mask.bool()
    adv = advantages.to(logprobs.dtype)
    finite_adv = torch.isfinite(adv)
    # A behaviour logprob above 0 is not a log-probability; a non-finite one (or a
    # non-finite current logprob) would make the ratio meaningless.
    token_ok = torch.isfinite(logprobs) & torch.isfinite(behaviour_logprobs)
    token_ok &= behaviour_logprobs <= 1e-3
    if ref_logprobs is not None:
        token_ok &= torch.isfinite(ref_logprobs)
    valid = mask & token_ok & finite_adv[:, None]
    skipped_tokens = int((mask & ~token_ok).sum().item())
    skipped_samples = int((mask.any(dim=1) & ~finite_adv).sum().item())

    # Sanitise before any arithmetic, so that NaN/inf never enters the graph on the
    # positions that are masked out (0 * NaN is NaN, and its gradient too).
    zero = torch.zeros_like(logprobs)
    lp = torch.where(valid, logprobs, zero)
    blp = torch.where(valid, behaviour_logprobs.to(logprobs.dtype), zero)
    a = torch.where(finite_adv, adv, torch.zeros_like(adv))[:, None]

    log_ratio = (lp - blp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1.0 - config.clip_eps_low, 1.0 + config.clip_eps_high)
    capped = ratio.clamp(max=config.delta)
    per_token = -torch.minimum(capped * a, clipped * a)

    if config.kl_coef > 0 and ref_logprobs is not None:
        ref = torch.where(valid, ref_logprobs.to(lp.dtype), zero)
        d = (ref - lp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        per_token = per_token + config.kl_coef * (torch.exp(d) - d - 1.0)
    if config.entropy_coef > 0 and entropy is not None:
        ent = torch.where(valid, entropy.to(lp.dtype), zero)
        per_token = per_token - config.entropy_coef * ent

    n_valid = int(valid.sum().item())
    denom = float(token_normaliser) if token_normaliser is not None else float(n_valid)
    denom = max(denom, 1.0)
    loss = torch.where(valid, per_token, zero).sum() / denom

    with torch.no_grad():
        a_tok = a.expand_as(ratio)
        low = valid & (a_tok < 0) & (ratio < 1.0 - config.clip_eps_low)
        high = valid & (a_tok > 0) & (ratio > 1.0 + config.clip_eps_high)
        delta_capped = valid & (ratio > config.delta)
        stats = {
            "tokens": float(n_valid),
            "skipped_tokens": float(skipped_tokens),
            "skipped_samples": float(skipped_samples),
            "clipped_low": float(low.sum().item()),
            "clipped_high": float(high.sum().item()),
            "delta_capped": float(delta_capped.sum().item()),
            "ratio_sum": float(torch.where(valid, ratio, zero).sum().item()),
            "ratio_max": float(torch.where(valid, ratio, zero).max().item()) if n_valid else 0.0,
            "abs_log_ratio_sum": float(torch.where(valid, log_ratio.abs(), zero).sum().item()),
            "loss_sum": float(torch.where(valid, per_token, zero).sum().item()),
        }
    return LossOutput(loss=loss, stats=stats)
