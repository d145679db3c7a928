"""The operator's configuration of `coderepair-coordinator serve`.

Three sources, highest priority first: command-line flags (passed to `load_config` as
``overrides``), environment variables ``CODEREPAIR_COORDINATOR_<SECTION>__<FIELD>``
(e.g. ``CODEREPAIR_COORDINATOR_DATABASE__URL``), and the TOML file named by
``--config``. Every field has a default except the runs, so an empty file serves
nothing but is valid; ``deploy/coordinator.toml`` is a documented example.

A bad value raises `ConfigError` whose message names the field (as a TOML path) and
what to write instead.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from coderepair.coordinator.dashboard.config import DashboardConfig
from coderepair.protocol.errors import ProtocolError
from coderepair.protocol.rpc import DEFAULT_MAX_MESSAGE_BYTES

__all__ = [
    "AdminConfig",
    "AuditConfig",
    "ConfigError",
    "CoordinatorConfig",
    "DashboardConfig",
    "DatabaseConfig",
    "ObjectStoreConfig",
    "RunConfig",
    "ServerConfig",
    "load_config",
]

ENV_PREFIX = "CODEREPAIR_COORDINATOR_"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_RUN_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class ConfigError(ProtocolError):
    """The coordinator's configuration cannot be used; the message says what to change."""


class _Section(BaseModel):
    # Unknown keys are typos: refuse them instead of silently ignoring a setting.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Section):
    """The gRPC endpoint and request limits."""

    listen: str = Field(
        default="127.0.0.1:50051",
        description="host:port the gRPC server binds; 0.0.0.0:PORT (or [::]:PORT) to serve "
        "other machines; port 0 picks a free port (tests).",
    )
    reuse_port: bool = Field(
        default=False,
        description="Let several replicas on one host bind the same listen port "
        "(SO_REUSEPORT): the kernel spreads incoming connections across them, so each "
        "replica's event loop gets its own core. Only for replicas of one deployment (one "
        "database); off by default, so a coordinator started on a port another process "
        "holds fails at start instead of silently sharing its clients.",
    )
    max_message_bytes: int = Field(
        default=DEFAULT_MAX_MESSAGE_BYTES,
        ge=64 * 1024,
        le=256 * 1024 * 1024,
        description="Largest gRPC message accepted or sent; a larger request fails with "
        "RESOURCE_EXHAUSTED before any of it is processed.",
    )
    max_clock_skew_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="Largest |envelope timestamp - coordinator clock| accepted (seconds).",
    )
    heartbeat_interval_s: float = Field(
        default=15.0,
        gt=0,
        le=3600,
        description="How often workers call Heartbeat; silent for 3 intervals = offline.",
    )
    db_threads: int = Field(
        default=8,
        ge=1,
        le=256,
        description="Threads (and database connections) that run storage calls.",
    )
    prepare_processes: int = Field(
        default=0,
        ge=0,
        le=64,
        description="Helper processes that check and encode submitted batches (the payload "
        "digest, the structural checks, the Parquet encoding, the completion digests and, "
        "for a local object store, the object's write: about 6 ms of CPU per 64-rollout "
        "batch). 0 runs that work in a thread of the serving process, where it holds the "
        "interpreter lock the event loop and the database threads need; 1 or more takes it "
        "off, for lower submit latency under load where a core is free (the deploy configs "
        "use 1). Each helper costs about 150 MB of memory and a second of start-up.",
    )
    sweep_interval_s: float = Field(
        default=1.0,
        gt=0,
        le=600,
        description="How often expired leases go back to the pool, audit windows close "
        "and old nonces are forgotten.",
    )
    stream_batch_rows: int = Field(
        default=256,
        ge=1,
        le=100_000,
        description="Rows read from the store per step of StreamRollouts; the next step "
        "waits until gRPC flow control has taken the previous rows (back-pressure).",
    )
    stream_poll_s: float = Field(
        default=0.2,
        gt=0,
        le=60,
        description="In follow mode, how long StreamRollouts waits at the head before "
        "looking again (it is also woken at once by every acceptance in this process).",
    )

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(
                f"listen = {value!r} is not host:port: write e.g. '127.0.0.1:50051' or "
                "'0.0.0.0:50051'"
            )
        bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if bare not in ("localhost",) and not re.fullmatch(r"[A-Za-z0-9.-]+", bare):
            try:
                ipaddress.ip_address(bare)
            except ValueError:
                raise ValueError(
                    f"listen host {host!r} is neither an IP address nor a host name"
                ) from None
        return value


class DatabaseConfig(_Section):
    """Where runs, workers, leases, batches and audits are stored."""

    url: str = Field(
        default="sqlite:///coordinator.db",
        description="sqlite:///PATH (embedded, WAL mode; a relative PATH is relative to "
        "the config file's directory) or postgresql+psycopg://USER@HOST:PORT/DB (production, "
        "several replicas on one database).",
    )
    sqlite_synchronous: Literal["FULL", "NORMAL"] = Field(
        default="FULL",
        description="SQLite only: FULL makes every acknowledged batch survive a power cut; "
        "NORMAL survives a process crash only, and commits faster.",
    )

    @field_validator("url")
    @classmethod
    def _supported(cls, value: str) -> str:
        if value.startswith("sqlite:///") and len(value) > len("sqlite:///"):
            if value.endswith(":memory:"):
                raise ValueError(
                    "an in-memory SQLite database is lost on exit: give a file path, "
                    "sqlite:///coordinator.db"
                )
            return value
        if value.startswith(("postgresql://", "postgresql+psycopg://")):
            return value
        raise ValueError(
            f"database url {value[:60]!r} is not supported: write sqlite:///PATH or "
            "postgresql+psycopg://USER@HOST:PORT/DB"
        )


class ObjectStoreConfig(_Section):
    """Where rollout Parquet files and policy shards are kept."""

    kind: Literal["local", "s3"] = Field(
        default="local", description="'local': a directory; 's3': an S3-compatible bucket."
    )
    path: Path = Field(
        default=Path("coordinator-objects"),
        description="kind = 'local': the directory (created if missing).",
    )
    bucket: str = Field(default="", description="kind = 's3': the bucket name (must exist).")
    endpoint_url: str = Field(
        default="",
        description="kind = 's3': endpoint of an S3-compatible server (MinIO, moto); empty "
        "= AWS. Credentials come from the usual AWS environment/config files.",
    )
    region: str = Field(default="us-east-1", description="kind = 's3': the bucket's region.")
    prefix: str = Field(
        default="", description="kind = 's3': folder under which every key is stored."
    )
    url_expiry_s: int = Field(
        default=6 * 3600,
        ge=60,
        le=7 * 24 * 3600,
        description="Lifetime of the presigned URLs handed to workers for policy shards.",
    )

    @model_validator(mode="after")
    def _complete(self) -> ObjectStoreConfig:
        if self.kind == "s3" and not self.bucket:
            raise ValueError(
                "object_store.kind = 's3' needs object_store.bucket: name an existing bucket"
            )
        return self


class RunConfig(_Section):
    """One training run the coordinator hands out work for."""

    run_id: str = Field(description="Run id: 1-64 characters of [A-Za-z0-9._-].")
    trainer_public_key: str = Field(
        description="The trainer's Ed25519 public key, 64 lowercase hex characters "
        "(`coderepair-trainer key show`); only this key may stream, ack and publish."
    )
    base_model_id: str = Field(
        min_length=1, max_length=256, description="Base model the policy started from."
    )
    tokenizer_path: Path = Field(
        description="Directory of the policy's Hugging Face tokenizer (with its chat "
        "template): the coordinator renders every prompt into exact token ids."
    )
    tokenizer_sha256: str = Field(
        description="sha256 of the tokenizer files, as the trainer writes into manifests."
    )
    tasks_path: Path = Field(
        description="Task-set JSONL (`coderepair-coordinator tasks build`) to lease from."
    )
    split: Literal["train", "heldout"] = Field(
        default="train", description="Which split of the task set is leased."
    )
    reward_spec_path: Path | None = Field(
        default=None,
        description="JSON file of the run's reward spec (coderepair.protocol.reward); "
        "absent = the protocol's defaults.",
    )
    group_size: int = Field(
        default=8, ge=1, le=256, description="GRPO group size G: samples per leased task."
    )
    max_policy_lag: int = Field(
        default=2,
        ge=0,
        le=1000,
        description="Staleness window: rollouts from versions < latest - max_policy_lag "
        "are refused.",
    )
    temperature: float = Field(
        default=1.0, ge=0.0, le=10.0, description="Sampling temperature of every lease."
    )
    max_new_tokens: int = Field(
        default=512, ge=1, le=65536, description="Completion token limit per sample."
    )
    max_tasks_per_lease: int = Field(
        default=4, ge=1, le=256, description="Most tasks handed out in one lease."
    )
    lease_ttl_s: float = Field(
        default=600.0,
        gt=0,
        le=7 * 24 * 3600,
        description="Time a worker has to submit a lease; afterwards its tasks go back to "
        "the pool and a submission is refused with LEASE_EXPIRED.",
    )
    max_rollouts_ahead: int | None = Field(
        default=None,
        ge=1,
        description="Back-pressure: no new lease while the rollouts accepted but not yet "
        "consumed by the trainer (trained on, dropped as stale or without reward variance, "
        "or held for its next step), plus those of open leases (tasks x G), reach this. "
        "None = no limit. Set it to at least the trainer's rollouts per step "
        "(prompts_per_step x G), or the trainer waits for rows that are never leased; on "
        "a shared machine a small value keeps workers from taking the trainer's CPU for "
        "rollouts that would go stale.",
    )

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, value: str) -> str:
        if not _RUN_ID.fullmatch(value):
            raise ValueError(f"run_id {value!r} must be 1-64 characters of [A-Za-z0-9._-]")
        return value

    @field_validator("trainer_public_key", "tokenizer_sha256")
    @classmethod
    def _hex64(cls, value: str, info: Any) -> str:
        if not _HEX64.fullmatch(value):
            raise ValueError(
                f"{info.field_name} must be 64 lowercase hex characters, got {value[:20]!r}…"
            )
        return value


class AuditConfig(_Section):
    """The audit stage: who is audited how often, what a failure costs."""

    min_rate: float = Field(
        default=0.05,
        gt=0.0,
        le=1.0,
        description="Floor of the audit probability for a worker with a long valid streak "
        "(BOINC: probability 1/streak, never below this).",
    )
    always_below_streak: int = Field(
        default=10,
        ge=0,
        le=1_000_000,
        description="Workers with fewer consecutive valid batches are audited every time.",
    )
    max_failed_audits: int = Field(
        default=3, ge=1, le=1000, description="Failed audits after which a key is banned."
    )
    ban_after_malformed: int = Field(
        default=5,
        ge=0,
        le=10_000,
        description="Ban a key when this many of its last `malformed_window` batches were "
        "refused as malformed (STRUCTURAL), for another key's lease (NOT_LEASE_OWNER) or as "
        "a second batch for a lease it already submitted (REPLAY); 0 never bans for these. "
        "Only the key's holder can sign such a batch, and the worker program sends none.",
    )
    malformed_window: int = Field(
        default=20,
        ge=1,
        le=100_000,
        description="How many of a key's latest batches `ban_after_malformed` looks at.",
    )
    window_s: float = Field(
        default=300.0,
        ge=0,
        le=30 * 24 * 3600,
        description="Audit window: credit is granted no sooner than this after acceptance, "
        "once a passed audit vouches for the batch (its own, or for a batch the sampler "
        "skipped, one of a later batch of the same key). A key that sent nothing for a "
        "whole window gets its newest batch audited, so 0 audits every batch.",
    )
    kinds: tuple[Literal["proof", "sampling", "reward"], ...] = Field(
        default=("reward",),
        min_length=1,
        description="Audit jobs queued for a sampled batch: 'proof' (TOPLOC prefill), "
        "'sampling' (seeded sampling replay and behaviour logprobs), 'reward' (the patch "
        "re-run in the coordinator's sandbox). Proof and sampling need the model auditor.",
    )
    auditor: Literal["auto", "model", "consistency"] = Field(
        default="auto",
        description="Which auditor runs the jobs. 'model': `ModelAuditor` (the policy "
        "loaded from the published versions, the reward re-run in a sandbox); "
        "'consistency': `ConsistencyAuditor` (re-derives reward totals from stored terms, "
        "no model, no sandbox; proof and sampling jobs end in error); 'auto': 'model' when "
        "audit.policy_dir is set, else 'consistency'.",
    )
    policy_dir: Path | None = Field(
        default=None,
        description="Directory of the run's base model (Hugging Face layout: config.json, "
        "tokenizer files, weights). The model auditor builds the model from it and then "
        "loads each audited policy version's published weights (full checkpoint plus "
        "deltas, verified against the run's trainer key) over it.",
    )
    sandbox: Literal["auto", "docker", "bubblewrap"] = Field(
        default="auto",
        description="Sandbox backend of reward re-runs: 'docker' (warm pool), 'bubblewrap' "
        "(fallback), 'auto' (what `select_sandbox` finds on this machine).",
    )
    sandbox_workers: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Reward re-runs in flight at once (and warm containers with Docker).",
    )
    model_threads: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="CPU threads of the auditor's model (None: torch's default). Keep it "
        "below the core count so that ingest keeps a core.",
    )
    weights_cache_dir: Path = Field(
        default=Path("coordinator-weights"),
        description="Folder for partial policy shard downloads of the model auditor.",
    )
    in_process: bool = Field(
        default=True,
        description="Run audits inside the coordinator; false when separate validator "
        "processes claim the jobs.",
    )
    claim_ttl_s: float = Field(
        default=600.0, gt=0, le=24 * 3600, description="How long an audit claim is held."
    )
    poll_s: float = Field(
        default=0.5, gt=0, le=600, description="Idle wait of the in-process audit loop."
    )
    max_attempts: int = Field(
        default=3, ge=1, le=100, description="Attempts of an audit that errors (not fails)."
    )

    @model_validator(mode="after")
    def _auditor_can_run(self) -> AuditConfig:
        if self.auditor == "model" and self.policy_dir is None:
            raise ValueError(
                "audit.auditor = 'model' needs audit.policy_dir: give the base model's "
                "directory, or set audit.auditor = 'consistency'"
            )
        if self.malformed_window < self.ban_after_malformed:
            raise ValueError(
                f"audit.malformed_window ({self.malformed_window}) is smaller than "
                f"audit.ban_after_malformed ({self.ban_after_malformed}), so no key could "
                "ever reach the limit: raise the window or lower the limit"
            )
        return self

    def resolved_auditor(self) -> Literal["model", "consistency"]:
        """The auditor 'auto' stands for with this configuration."""
        if self.auditor == "auto":
            return "model" if self.policy_dir is not None else "consistency"
        return self.auditor


class AdminConfig(_Section):
    """Who may call the admin service."""

    public_keys: tuple[str, ...] = Field(
        default=(),
        description="Ed25519 public keys (64 hex characters) allowed to call AdminService; "
        "empty = nobody (the admin CLI then fails with NOT_AUTHORIZED).",
    )

    @field_validator("public_keys")
    @classmethod
    def _keys(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for key in value:
            if not _HEX64.fullmatch(key):
                raise ValueError(
                    f"admin key {key[:20]!r}… is not 64 lowercase hex characters: paste the "
                    "output of `coderepair-coordinator admin key`"
                )
        return value


class CoordinatorConfig(BaseSettings):
    """Everything `coderepair-coordinator serve` needs."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True
    )

    server: ServerConfig = Field(default_factory=ServerConfig, description="gRPC endpoint.")
    database: DatabaseConfig = Field(default_factory=DatabaseConfig, description="SQL store.")
    object_store: ObjectStoreConfig = Field(
        default_factory=ObjectStoreConfig, description="Rollout and shard blobs."
    )
    audit: AuditConfig = Field(default_factory=AuditConfig, description="Audit stage.")
    admin: AdminConfig = Field(default_factory=AdminConfig, description="Admin access.")
    dashboard: DashboardConfig = Field(
        default_factory=DashboardConfig,
        description="The operators' web dashboard, /api/stats, Prometheus /metrics and "
        "/healthz (a [dashboard] table; loopback port 9464 unless told otherwise).",
    )
    runs: tuple[RunConfig, ...] = Field(
        default=(), description="Runs served; each a [[runs]] table in the TOML file."
    )

    @field_validator("runs")
    @classmethod
    def _unique_runs(cls, value: tuple[RunConfig, ...]) -> tuple[RunConfig, ...]:
        seen: set[str] = set()
        for run in value:
            if run.run_id in seen:
                raise ValueError(f"run_id {run.run_id!r} appears twice: give each run its own id")
            seen.add(run.run_id)
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # `load_config` merges file, environment and flags itself (in that priority
        # order) and passes the result as init values: the one source used here.
        return (init_settings,)


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _explain(exc: ValidationError, source: str) -> ConfigError:
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown setting: check its spelling against deploy/coordinator.toml"
        elif error["type"] == "missing":
            message = "required: add it"
        lines.append(f"  {where}: {message}")
    return ConfigError(f"invalid coordinator configuration ({source}):\n" + "\n".join(lines))


def read_toml(path: Path) -> dict[str, Any]:
    """The TOML file as a dict; `ConfigError` when it is missing or not TOML."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(
            f"no configuration file at {path}: copy deploy/coordinator.toml and edit it"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc


def load_config(
    path: Path | None = None, overrides: Mapping[str, Any] | None = None
) -> CoordinatorConfig:
    """File (optional) < environment < ``overrides`` (nested dict, e.g. from flags).

    Relative paths inside the file (tasks, tokenizer, reward spec, object directory) are
    resolved against the file's directory, so a config works from any working directory.
    """
    data = read_toml(path) if path is not None else {}
    if path is not None:
        data = _resolve_paths(data, path.parent)
    source = str(path) if path is not None else "defaults"
    try:
        env = EnvSettingsSource(
            CoordinatorConfig,
            env_prefix=ENV_PREFIX,
            env_nested_delimiter="__",
            case_sensitive=False,
        )()
        merged = _deep_merge(_deep_merge(data, env), overrides or {})
        config = CoordinatorConfig(**merged)
    except ValidationError as exc:
        raise _explain(exc, f"{source}, environment {ENV_PREFIX}*, flags") from None
    except SettingsError as exc:
        raise ConfigError(
            f"an environment variable {ENV_PREFIX}* cannot be parsed ({exc}): complex values "
            "are JSON, e.g. CODEREPAIR_COORDINATOR_ADMIN__PUBLIC_KEYS='[\"ab..\"]'"
        ) from None
    return config


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    def resolve(value: Any) -> Any:
        if isinstance(value, str) and value and not Path(value).is_absolute():
            return str(base / value)
        return value

    out = dict(data)
    database = out.get("database")
    if isinstance(database, dict) and isinstance(database.get("url"), str):
        url = database["url"]
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            out["database"] = {**database, "url": "sqlite:///" + resolve(url[10:])}
    store = out.get("object_store")
    if isinstance(store, dict) and "path" in store:
        out["object_store"] = {**store, "path": resolve(store["path"])}
    audit = out.get("audit")
    if isinstance(audit, dict):
        out["audit"] = {
            **audit,
            **{k: resolve(audit[k]) for k in ("policy_dir", "weights_cache_dir") if k in audit},
        }
    runs = out.get("runs")
    if isinstance(runs, list):
        out["runs"] = [
            {
                **run,
                **{
                    key: resolve(run[key])
                    for key in ("tokenizer_path", "tasks_path", "reward_spec_path")
                    if key in run
                },
            }
            if isinstance(run, dict)
            else run
            for run in runs
        ]
    return out
