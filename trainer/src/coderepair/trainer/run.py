"""A training run wired end to end: config -> key -> source -> Trainer -> publish + announce.

`run_training` is what ``coderepair-trainer run`` / ``resume`` do:

1. load (or create, 0600) the trainer's signing key;
2. open the rollout source: the coordinator's stream (`CoordinatorSource`) or, offline,
   Parquet files;
3. if a store is configured, build a `Publisher` and a `PublishHook`. Before the first
   step the base model is published as coordinator version 1 (what workers sample
   with first); then every ``publish_every`` steps the trained weights are published
   (full every ``publish.full_every`` versions, sparse deltas between) and announced;
4. run the `Trainer`, which checkpoints and acks the stream cursor.

Resume: the loop restores weights, optimizer, RNG and cursor and is bit-identical to an
uninterrupted run, so a version the coordinator already holds (published after the last
checkpoint, before the stop) is not published again: the resumed run would produce the
very same bits. The first version a resumed run does publish is full (its new `Publisher`
has nothing to diff against).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from coderepair.protocol.errors import ProtocolError
from coderepair.protocol.identity import Identity
from coderepair.trainer.announce import PolicyAnnouncer
from coderepair.trainer.config import ConfigError, StoreConfig, TrainerConfig
from coderepair.trainer.loop import Trainer, TrainResult
from coderepair.trainer.publish import (
    LocalDirectorySink,
    ObjectSink,
    PublishedVersion,
    Publisher,
    PublisherConfig,
    tokenizer_sha256,
)
from coderepair.trainer.rollouts import ParquetSource, RolloutSource
from coderepair.trainer.stream import CoordinatorSource, to_coordinator_version

__all__ = [
    "PublishHook",
    "RunError",
    "S3Sink",
    "load_identity",
    "make_publisher",
    "make_sink",
    "republish",
    "run_training",
]

log = logging.getLogger(__name__)

UrlFor = Callable[[str], str]
"""Object key -> URL a worker downloads it from."""


class RunError(ProtocolError):
    """A run cannot start as configured; the message says what to change."""


# ---------------------------------------------------------------- key, store, publisher


def load_identity(path: Path, say: Callable[[str], None] = print) -> Identity:
    """The trainer's key; a new one (mode 0600) when the file does not exist yet."""
    existed = path.exists()
    identity = Identity.load_or_create(path)
    if not existed:
        say(
            f"created a new trainer key at {path} (mode 0600). Put its public key in the "
            "coordinator's config as this run's trainer_public_key:\n"
            f'  trainer_public_key = "{identity.public_key_hex}"'
        )
    else:
        say(f"trainer key {path}: public key {identity.public_key_hex}")
    return identity


class S3Sink:
    """Objects in an S3 bucket (boto3), for the shards of published versions."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None) -> None:
        try:
            import boto3  # type: ignore[import-untyped]  # noqa: PLC0415
        except ImportError as exc:
            raise RunError(
                "store.kind is 's3' but boto3 is not installed: pip install boto3"
            ) from exc
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._client = boto3.client("s3", endpoint_url=endpoint_url)

    def key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes) -> None:
        self._client.put_object(Bucket=self.bucket, Key=self.key(key), Body=data)


def make_sink(store: StoreConfig) -> tuple[ObjectSink, UrlFor]:
    """The sink for ``store`` and how its keys become worker-facing URLs."""
    if store.kind == "local":
        assert store.path is not None
        local = LocalDirectorySink(store.path)
        return local, lambda key: local.path(key).as_uri()
    assert store.bucket is not None
    s3 = S3Sink(store.bucket, store.prefix, store.endpoint_url)
    return s3, lambda key: f"s3://{s3.bucket}/{s3.key(key)}"


def make_publisher(cfg: TrainerConfig, identity: Identity, sink: ObjectSink) -> Publisher:
    """A `Publisher` from ``cfg.publish`` (run id, base model and tokenizer hash defaulted)."""
    defaults: dict[str, Any] = {
        "run_id": cfg.coordinator.run_id if cfg.coordinator is not None else "offline",
        "base_model": Path(cfg.model).name or cfg.model,
    }
    if "tokenizer_sha256" not in cfg.publish:
        defaults["tokenizer_sha256"] = tokenizer_sha256(cfg.model)
    try:
        config = PublisherConfig.model_validate({**defaults, **cfg.publish})
    except ValueError as exc:
        raise ConfigError(f"invalid [publish] section: {exc}") from exc
    if cfg.coordinator is not None and config.run_id != cfg.coordinator.run_id:
        raise ConfigError(
            f"publish.run_id {config.run_id!r} differs from coordinator.run_id "
            f"{cfg.coordinator.run_id!r}: remove publish.run_id (it defaults to the latter)"
        )
    return Publisher(config, identity, sink)


# ---------------------------------------------------------------- the publishing hook


class PublishHook:
    """``on_step`` of the Trainer: publish every ``publish_every`` steps and announce."""

    def __init__(
        self,
        cfg: TrainerConfig,
        publisher: Publisher,
        url_for: UrlFor,
        announcer: PolicyAnnouncer | None,
    ) -> None:
        self.cfg = cfg
        self.publisher = publisher
        self.url_for = url_for
        self.announcer = announcer
        self.trainer: Trainer | None = None
        """Set by the run: its cursor is announced as trained_through_cursor."""
        self.coordinator_latest = announcer.latest_version() if announcer is not None else 0
        self.published: list[PublishedVersion] = []

    def publish_base(self) -> None:
        """Publish the start model as version 1, unless the coordinator already has it."""
        if self.coordinator_latest >= 1:
            if self.coordinator_latest > 1:
                raise RunError(
                    f"coordinator run {self.publisher.config.run_id!r} already has versions up "
                    f"to {self.coordinator_latest}, but this run starts from the base model: "
                    "`coderepair-trainer resume` the run that published them, or use a new run"
                )
            log.info("version 1 (the base model) is already published: not publishing it again")
            return
        model = AutoModelForCausalLM.from_pretrained(self.cfg.model, dtype=torch.float32)
        self._publish(model.state_dict(), step=0)

    def __call__(self, step: int, model: torch.nn.Module) -> None:
        self._publish(model.state_dict(), step)

    def _publish(self, state: dict[str, torch.Tensor], step: int) -> None:
        version = to_coordinator_version(step, self.cfg.publish_every)
        if version <= self.coordinator_latest:
            # Published before a stop; the resumed run reproduces the same bits.
            log.info("version %d (step %d) is already at the coordinator: skipped", version, step)
            return
        if self.announcer is not None and version != self.coordinator_latest + 1:
            raise RunError(
                f"step {step} is version {version}, but the coordinator's latest is "
                f"{self.coordinator_latest}: versions in between are missing; resume from "
                "the checkpoint of the coordinator's latest version"
            )
        published = self.publisher.publish(state, version)
        self.published.append(published)
        log.info(
            "published version %d (step %d, %s, %d bytes, %d changed elements)",
            version,
            step,
            published.kind,
            published.shard_bytes,
            published.changed_elements,
        )
        if self.announcer is not None:
            shards = {s.name: (s.size, s.sha256) for s in published.manifest.shards}
            urls = {name: self.url_for(f"{published.prefix}/{name}") for name in shards}
            cursor = self.trainer.cursor if self.trainer is not None else 0
            self.coordinator_latest = self.announcer.announce(
                published.manifest_bytes,
                version,
                shards,
                urls,
                trained_through_cursor=cursor,
                trainer_step=step,
            )
        else:
            self.coordinator_latest = version


# ---------------------------------------------------------------- the run


def make_source(cfg: TrainerConfig, identity: Identity, *, follow: bool = True) -> RolloutSource:
    """The coordinator's stream, or the configured Parquet files."""
    if cfg.coordinator is not None:
        c = cfg.coordinator
        return CoordinatorSource(
            c.address,
            c.run_id,
            identity,
            follow=follow,
            publish_every=cfg.publish_every,
            buffer_rows=c.buffer_rows,
            reconnect_max_s=c.reconnect_max_s,
            rpc_timeout_s=c.rpc_timeout_s,
        )
    if cfg.rollouts_parquet:
        missing = [str(p) for p in cfg.rollouts_parquet if not p.is_file()]
        if missing:
            raise ConfigError(f"rollouts_parquet files do not exist: {missing[:5]}")
        return ParquetSource(cfg.rollouts_parquet, group_size=cfg.group_size)
    raise ConfigError("no rollout source: set [coordinator] (address, run_id) or rollouts_parquet")


def run_training(
    cfg: TrainerConfig,
    *,
    resume: bool,
    follow: bool = True,
    say: Callable[[str], None] = print,
) -> tuple[TrainResult, PublishHook | None]:
    """Train as configured; ``resume`` continues from the latest checkpoint if there is one."""
    identity = load_identity(cfg.key_file, say)
    source = make_source(cfg, identity, follow=follow)
    hook: PublishHook | None = None
    announcer: PolicyAnnouncer | None = None
    try:
        if cfg.store is not None:
            sink, url_for = make_sink(cfg.store)
            if cfg.coordinator is not None:
                announcer = PolicyAnnouncer(
                    cfg.coordinator.address,
                    cfg.coordinator.run_id,
                    identity,
                    timeout_s=cfg.coordinator.rpc_timeout_s,
                )
            hook = PublishHook(cfg, make_publisher(cfg, identity, sink), url_for, announcer)
        trainer = Trainer(cfg, source, on_step=_stepper(hook, source), resume=resume)
        has_checkpoint = resume and trainer._latest_checkpoint() is not None
        if hook is not None:
            hook.trainer = trainer
            if not has_checkpoint:
                hook.publish_base()
        result = trainer.run()
    finally:
        if announcer is not None:
            announcer.close()
    say(f"done: {result.steps} steps, cursor {result.cursor} ({result.reason})")
    return result, hook


def _stepper(
    hook: PublishHook | None, source: RolloutSource
) -> Callable[[int, torch.nn.Module], None]:
    def on_step(step: int, model: torch.nn.Module) -> None:
        if isinstance(source, CoordinatorSource):
            source.trainer_step = step
        if hook is not None:
            hook(step, model)

    return on_step


def republish(
    cfg: TrainerConfig, checkpoint: Path, say: Callable[[str], None] = print
) -> PublishedVersion:
    """Publish a checkpoint directory as a new full version (the coordinator's latest + 1)."""
    if cfg.store is None:
        raise ConfigError("publishing needs a [store] section (local path or S3 bucket)")
    if not (checkpoint / "config.json").is_file():
        raise RunError(
            f"{checkpoint} is not a checkpoint directory (no config.json): pass one of "
            f"{cfg.output_dir / 'checkpoints'}/step-*"
        )
    identity = load_identity(cfg.key_file, say)
    sink, url_for = make_sink(cfg.store)
    publisher = make_publisher(cfg, identity, sink)
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    announcer = None
    if cfg.coordinator is not None:
        announcer = PolicyAnnouncer(
            cfg.coordinator.address,
            cfg.coordinator.run_id,
            identity,
            timeout_s=cfg.coordinator.rpc_timeout_s,
        )
    try:
        latest = announcer.latest_version() if announcer is not None else 0
        version = latest + 1
        published = publisher.publish(model.state_dict(), version)  # a new publisher: full
        if announcer is not None:
            shards = {s.name: (s.size, s.sha256) for s in published.manifest.shards}
            urls = {name: url_for(f"{published.prefix}/{name}") for name in shards}
            announcer.announce(
                published.manifest_bytes,
                version,
                shards,
                urls,
                trained_through_cursor=0,
                trainer_step=0,
            )
    finally:
        if announcer is not None:
            announcer.close()
    say(f"published {checkpoint} as full version {version} under {published.prefix}")
    return published
