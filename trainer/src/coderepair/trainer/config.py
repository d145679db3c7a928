"""The trainer's run configuration: one pydantic model, light to import (no torch).

`TrainerConfig` is what a researcher writes in ``run.toml`` (the CLI layers env and flags
on top). Every field has a default and a description; validators reject combinations that
would train silently wrong (an ε that can flip the clip window, a δ cap inside the clip
window, a group of one sample) with a message that says what to change. The loss knobs
follow INTELLECT-2 / prime-rl: PPO clipping against the *behaviour* policy that produced
the rollout, plus a two-sided cap δ on the ratio even for negative advantages.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import EnvSettingsSource
from pydantic_settings.exceptions import SettingsError

from coderepair.protocol.errors import ProtocolError

__all__ = [
    "ENV_PREFIX",
    "ConfigError",
    "CoordinatorClientConfig",
    "EvalConfig",
    "LossConfig",
    "MetricsConfig",
    "StoreConfig",
    "TrainerConfig",
    "load_config",
    "load_run_config",
]

ENV_PREFIX = "CODEREPAIR_TRAINER_"
"""Environment variables with this prefix override the TOML file (nested: ``__``)."""


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


class CoordinatorClientConfig(BaseModel):
    """Where the rollouts come from and where versions are announced (TrainerService)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    address: str = Field(
        min_length=1,
        description="host:port of the coordinator's gRPC endpoint, e.g. '127.0.0.1:7443'.",
    )
    run_id: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="The coordinator run this trainer trains (its [[runs]] run_id); the "
        "coordinator's config must name this trainer's public key as the run's "
        "trainer_public_key.",
    )
    buffer_rows: int = Field(
        default=256,
        ge=1,
        le=1_000_000,
        description="Rows read ahead of the trainer. When the buffer is full the stream is "
        "not read, so gRPC flow control stops the coordinator (back-pressure).",
    )
    reconnect_max_s: float = Field(
        default=300.0,
        gt=0.0,
        description="Give up (typed error) when the coordinator stays UNAVAILABLE this long; "
        "shorter outages are retried with exponential back-off from the last row received.",
    )
    rpc_timeout_s: float = Field(
        default=30.0, gt=0.0, description="Deadline of unary calls (AckCursor, PublishPolicy)."
    )


class StoreConfig(BaseModel):
    """The object store the published shards are uploaded to (workers download from it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["local", "s3"] = Field(
        default="local",
        description="'local': a directory (shards announced as file:// URLs; workers must "
        "see the same filesystem). 's3': an S3 bucket through boto3 (`pip install boto3`).",
    )
    path: Path | None = Field(
        default=None, description="Directory of the local store; required for kind 'local'."
    )
    bucket: str | None = Field(default=None, description="S3 bucket; required for kind 's3'.")
    prefix: str = Field(default="", description="Key prefix inside the bucket (S3 only).")
    endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint (MinIO, moto); None = AWS."
    )

    @model_validator(mode="after")
    def _complete(self) -> StoreConfig:
        if self.kind == "local" and self.path is None:
            raise ValueError("store.kind is 'local' but store.path is not set: name a directory")
        if self.kind == "s3" and not self.bucket:
            raise ValueError("store.kind is 's3' but store.bucket is not set: name the bucket")
        return self


class EvalConfig(BaseModel):
    """pass@k on the held-out repair tasks (``coderepair-trainer eval``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tasks_path: Path | None = Field(
        default=None,
        description="Task-set file (JSONL, `coderepair-coordinator tasks build`); its "
        "'heldout' split is evaluated. None: the bundled fixture tasks.",
    )
    samples: int = Field(
        default=64,
        ge=1,
        le=1024,
        description="Completions sampled per task (n). pass@k is reported for k in "
        "{1, 8, 64} up to n, with the unbiased estimator.",
    )
    max_tasks: int | None = Field(
        default=None, ge=1, description="Evaluate at most this many held-out tasks."
    )
    max_new_tokens: int = Field(default=1024, ge=1, description="Tokens per completion.")
    temperature: float = Field(default=1.0, ge=0.0, description="Sampling temperature.")
    seed: int = Field(default=0, ge=0, description="Seeds of the samples are derived from it.")
    sandbox_backend: Literal["docker", "bubblewrap"] | None = Field(
        default=None, description="Preferred sandbox backend; None = the first that works."
    )
    timeout_s: float = Field(default=10.0, gt=0.0, le=600.0, description="Per test job.")


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
    coordinator: CoordinatorClientConfig | None = Field(
        default=None,
        description="The coordinator to stream rollouts from and announce versions to; "
        "None = offline run on rollouts_parquet.",
    )
    rollouts_parquet: list[Path] = Field(
        default_factory=list,
        description="Offline runs (no coordinator): rollout Parquet files read in order.",
    )
    key_file: Path = Field(
        default=Path("trainer-key.pem"),
        description="The trainer's Ed25519 key (PEM, mode 0600) that signs RPCs and "
        "manifests; created if absent. Its public key is the coordinator run's "
        "trainer_public_key.",
    )
    store: StoreConfig | None = Field(
        default=None, description="Object store for published versions; None = no publishing."
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Held-out pass@k.")

    @model_validator(mode="after")
    def _check(self) -> TrainerConfig:
        beta1, beta2 = self.adam_betas
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"adam_betas={self.adam_betas}: both betas must lie in [0, 1)")
        if self.coordinator is not None and self.rollouts_parquet:
            raise ValueError(
                "both coordinator and rollouts_parquet are set: a run reads one source; "
                "remove rollouts_parquet to train on the coordinator's stream"
            )
        if self.publish and self.store is None:
            raise ValueError(
                "publish settings are given but no store: add a [store] section (local path "
                "or S3 bucket) for the shards, or remove [publish]"
            )
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


def _deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _resolve(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative paths in a file are relative to the file, so a config works from anywhere."""

    def path(value: Any) -> Any:
        if isinstance(value, str) and value and not Path(value).is_absolute():
            candidate = base / value
            return str(candidate)
        return value

    out = dict(data)
    for key in ("output_dir", "key_file"):
        if key in out:
            out[key] = path(out[key])
    if isinstance(out.get("model"), str) and (base / out["model"]).exists():
        out["model"] = path(out["model"])
    if isinstance(out.get("rollouts_parquet"), list):
        out["rollouts_parquet"] = [path(p) for p in out["rollouts_parquet"]]
    for section, key in (("store", "path"), ("eval", "tasks_path")):
        if isinstance(out.get(section), dict) and key in out[section]:
            out[section] = {**out[section], key: path(out[section][key])}
    return out


def load_run_config(
    path: Path | None = None, overrides: Mapping[str, Any] | None = None
) -> TrainerConfig:
    """TOML file (optional) < environment ``CODEREPAIR_TRAINER_*`` < ``overrides`` (flags).

    Nested fields use ``__`` in variable names (``CODEREPAIR_TRAINER_COORDINATOR__ADDRESS``);
    complex values are JSON. Relative paths in the file resolve against its directory.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = _resolve(tomllib.loads(path.read_text()), path.resolve().parent)
        except OSError as exc:
            raise ConfigError(f"cannot read the config file {path}: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid TOML ({exc}): fix the syntax") from None
    try:
        env = EnvSettingsSource(
            TrainerConfig,  # type: ignore[arg-type]  # a BaseModel works as the schema
            env_prefix=ENV_PREFIX,
            env_nested_delimiter="__",
            case_sensitive=False,
        )()
    except SettingsError as exc:
        raise ConfigError(
            f"an environment variable {ENV_PREFIX}* cannot be parsed ({exc}): complex values "
            "are JSON, e.g. CODEREPAIR_TRAINER_ROLLOUTS_PARQUET='[\"a.parquet\"]'"
        ) from None
    return load_config(_deep_merge(_deep_merge(data, env), overrides or {}))
