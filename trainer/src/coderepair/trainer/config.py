"""The trainer's run configuration: one pydantic model, light to import (no torch).

`TrainerConfig` is what a researcher writes in ``run.toml`` (the CLI layers env and flags
on top). Every field has a default and a description; validators reject combinations that
would train silently wrong (an ε that can flip the clip window, a δ cap inside the clip
window, a group of one sample) with a message that says what to change. The loss knobs
follow INTELLECT-2 / prime-rl: PPO clipping against the *behaviour* policy that produced
the rollout, plus a two-sided cap δ on the ratio even for negative advantages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from coderepair.protocol.errors import ProtocolError

__all__ = ["ConfigError", "LossConfig", "MetricsConfig", "TrainerConfig", "load_config"]


class ConfigError(ProtocolError):
    """A trainer configuration is invalid; the message names the field and the fix."""


class LossConfig(BaseModel):
    """The GRPO objective's knobs (see `coderepair.trainer.loss`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    clip_eps_low: float = Field(
        default=0.2,
        gt=0.0,
        lt=1.0,
        description="PPO clip below 1: the ratio π/π_behaviour is clipped at 1 - clip_eps_low "
        "for negative advantages. Must lie in (0, 1).",
    )
    clip_eps_high: float = Field(
        default=0.28,
        gt=0.0,
        description="PPO clip above 1: the ratio is clipped at 1 + clip_eps_high for positive "
        "advantages (DAPO's 'clip higher' default 0.28 keeps exploration alive).",
    )
    delta: float = Field(
        default=4.0,
        description="Two-sided cap (INTELLECT-2): the unclipped ratio is capped at δ even for "
        "negative advantages, so one very off-policy token cannot dominate a step. Must exceed "
        "1 + clip_eps_high.",
    )
    kl_coef: float = Field(
        default=0.0,
        ge=0.0,
        description="Weight of the k3 KL estimate against the initial (reference) policy; 0 "
        "(default) keeps no reference model in memory.",
    )
    entropy_coef: float = Field(
        default=0.0,
        ge=0.0,
        description="Weight of the entropy bonus (subtracted from the loss); 0 (default) skips "
        "computing entropies.",
    )
    advantage_eps: float = Field(
        default=1e-6,
        gt=0.0,
        description="A group whose reward std is at most this has no learning signal and is "
        "dropped (and counted).",
    )

    @model_validator(mode="after")
    def _delta_outside_clip(self) -> LossConfig:
        if self.delta <= 1.0 + self.clip_eps_high:
            raise ValueError(
                f"delta={self.delta} must be greater than 1 + clip_eps_high = "
                f"{1.0 + self.clip_eps_high}: a cap inside the clip window would clip "
                "positive advantages twice; raise delta (INTELLECT-2 used 4) or lower "
                "clip_eps_high"
            )
        return self


class MetricsConfig(BaseModel):
    """Where training metrics go. A ``metrics.jsonl`` file is always written as well."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Literal["tensorboard", "wandb", "jsonl"] = Field(
        default="tensorboard",
        description="'tensorboard' (default: event files under <output_dir>/tensorboard; "
        "falls back to jsonl with a warning when tensorboard is not installed), 'wandb' "
        "(needs `pip install wandb` and wandb_project), or 'jsonl' only.",
    )
    wandb_project: str | None = Field(
        default=None, description="W&B project name; required when backend is 'wandb'."
    )
    wandb_entity: str | None = Field(default=None, description="W&B entity (team); optional.")

    @model_validator(mode="after")
    def _wandb_needs_project(self) -> MetricsConfig:
        if self.backend == "wandb" and not self.wandb_project:
            raise ValueError(
                "metrics.backend is 'wandb' but metrics.wandb_project is not set: name the "
                "W&B project, or choose backend 'tensorboard'"
            )
        return self


class TrainerConfig(BaseModel):
    """One training run: model, batch shape, async rules, optimiser, loss and outputs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(
        description="Path of a Hugging Face model directory (config.json, weights, tokenizer) "
        "to start from; it must be the policy the network's version 0 was published from."
    )
    output_dir: Path = Field(
        default=Path("runs/default"),
        description="Directory for checkpoints, metrics and the stored config of the run.",
    )
    seed: int = Field(default=0, ge=0, description="Seed of torch and Python RNGs.")
    max_steps: int = Field(default=100, ge=1, description="Optimizer steps to train for.")
    prompts_per_step: int = Field(
        default=4, ge=1, description="GRPO groups (tasks) per optimizer step."
    )
    group_size: int = Field(
        default=8,
        ge=2,
        description="Samples per task (G). Must equal the lease group size; advantages need "
        "at least 2 samples to compare.",
    )
    micro_batch_size: int = Field(
        default=8,
        ge=1,
        description="Sequences per forward/backward pass; gradients accumulate over the "
        "step's micro-batches (memory knob; the result does not depend on it).",
    )
    max_staleness: int = Field(
        default=1,
        ge=0,
        description="Step n trains only on rollouts of policy versions >= n - max_staleness; "
        "older ones are dropped and counted. 0 = fully on-policy (synchronous).",
    )
    temperature: float = Field(
        default=1.0,
        gt=0.0,
        description="Sampling temperature of the workers: logprobs are computed as "
        "log_softmax(logits / T) to match the behaviour logprobs in the rollouts.",
    )
    learning_rate: float = Field(default=1e-6, gt=0.0, description="AdamW peak learning rate.")
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW weight decay.")
    adam_betas: tuple[float, float] = Field(
        default=(0.9, 0.99), description="AdamW (beta1, beta2), each in [0, 1)."
    )
    warmup_steps: int = Field(
        default=0, ge=0, description="Linear learning-rate warm-up steps; constant afterwards."
    )
    max_grad_norm: float = Field(
        default=1.0,
        gt=0.0,
        description="Gradients are clipped to this global L2 norm; a step whose norm is not "
        "finite is skipped (and counted) instead of corrupting the weights.",
    )
    loss: LossConfig = Field(default_factory=LossConfig, description="The GRPO objective.")
    checkpoint_every: int = Field(
        default=10,
        ge=1,
        description="Save a resumable checkpoint (model, optimizer, scheduler, RNG, rollout "
        "cursor) every this many steps, and at the end of the run.",
    )
    keep_checkpoints: int = Field(
        default=2, ge=1, description="Most recent checkpoints kept on disk; older are deleted."
    )
    publish_every: int = Field(
        default=1, ge=1, description="Call the publish hook every this many steps."
    )
    publish: dict[str, Any] = Field(
        default_factory=dict,
        description="Publisher settings, validated by coderepair.trainer.publish (object "
        "store, key file, full-checkpoint interval); empty = do not publish.",
    )
    metrics: MetricsConfig = Field(
        default_factory=MetricsConfig, description="Metrics backend (TensorBoard by default)."
    )
    rollout_wait_warn_s: float = Field(
        default=60.0,
        gt=0.0,
        description="Watchdog: warn when the trainer has waited this long for rollouts.",
    )

    @model_validator(mode="after")
    def _check(self) -> TrainerConfig:
        beta1, beta2 = self.adam_betas
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"adam_betas={self.adam_betas}: both betas must lie in [0, 1)")
        if self.warmup_steps > self.max_steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} exceeds max_steps={self.max_steps}: the run "
                "would never reach the peak learning rate; lower warmup_steps"
            )
        return self

    @property
    def samples_per_step(self) -> int:
        """Completions per optimizer step (prompts × G)."""
        return self.prompts_per_step * self.group_size


def load_config(data: dict[str, Any]) -> TrainerConfig:
    """Validate a parsed config mapping (e.g. from TOML); `ConfigError` on any flaw."""
    try:
        return TrainerConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid trainer config: {problems}") from exc
