"""The volunteer's configuration of `coderepair-worker`.

Three sources, highest priority first: command-line flags (passed to `load_config` as
``overrides``), environment variables ``CODEREPAIR_WORKER_<FIELD>`` (e.g.
``CODEREPAIR_WORKER_COORDINATOR=host:50051``), and the TOML file ``worker.toml`` in the
user config directory (``~/.config/coderepair/worker.toml`` on Linux; another file with
``--config`` or ``CODEREPAIR_WORKER_CONFIG``). Every field has a default, so a volunteer
needs no file at all: ``coderepair-worker join --coordinator HOST:PORT`` is enough.

A bad value raises `ConfigError`, whose message names the field, where the value came
from (file, environment variable or flag) and what to write instead. An environment
variable with the prefix that names no field is an error too: a typo must not be
silently ignored.

Importing this module pulls in pydantic and platformdirs only (never torch), so the CLI
can parse its configuration before anything heavy loads.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from coderepair.protocol.errors import ProtocolError

__all__ = [
    "CONFIG_ENV",
    "ENV_PREFIX",
    "ConfigError",
    "EngineChoice",
    "SandboxChoice",
    "WorkerConfig",
    "default_cache_dir",
    "default_config_path",
    "default_key_path",
    "load_config",
    "read_toml",
]

ENV_PREFIX = "CODEREPAIR_WORKER_"
CONFIG_ENV = "CODEREPAIR_WORKER_CONFIG"
"""Environment variable naming the TOML file (instead of the default location)."""
APP_NAME = "coderepair"

EngineChoice = Literal["auto", "vllm", "hf"]
SandboxChoice = Literal["auto", "docker", "bubblewrap"]

_RUN_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
# host:port where host is a DNS name, an IPv4 address or a bracketed IPv6 address.
_HOST_PORT = re.compile(
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?):(?P<port>\d{1,5})"
)
_PATH_FIELDS = ("key_path", "cache_dir")


class ConfigError(ProtocolError):
    """The worker's configuration cannot be used; the message says what to change."""


def default_config_path() -> Path:
    """``worker.toml`` in the user config dir (``~/.config/coderepair`` on Linux)."""
    return platformdirs.user_config_path(APP_NAME) / "worker.toml"


def default_key_path() -> Path:
    """The worker's Ed25519 key file in the user data dir."""
    return platformdirs.user_data_path(APP_NAME) / "worker-key.pem"


def default_cache_dir() -> Path:
    """Where downloaded policy weights are kept."""
    return platformdirs.user_cache_path(APP_NAME) / "worker"


def _empty_is_none(value: object) -> object:
    # An empty environment variable or flag means "not set", not "the empty string".
    if isinstance(value, str) and not value.strip():
        return None
    return value


class WorkerConfig(BaseSettings):
    """Everything `coderepair-worker` needs to know; every field has a working default."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, validate_default=True
    )

    coordinator: str | None = Field(
        default=None,
        description="host:port of the coordinator's gRPC endpoint, e.g. "
        "coordinator.example.org:50051. Default: none; `join` and the connectivity check "
        "of `doctor` need it.",
    )
    run_id: str | None = Field(
        default=None,
        description="Run to work for ([A-Za-z0-9._-], at most 64 characters). Default: none, "
        "meaning the only run the coordinator offers.",
    )
    display_name: str = Field(
        default="",
        description="Name shown on the coordinator's dashboard; at most 64 printable "
        "characters. Default: empty (the worker id is shown).",
    )
    key_path: Path = Field(
        default_factory=default_key_path,
        description="The worker's Ed25519 key file (mode 0600), created on first use. "
        "Default: worker-key.pem in the user data dir (~/.local/share/coderepair on Linux).",
    )
    trainer_public_key: str | None = Field(
        default=None,
        description="The trainer's Ed25519 public key as 64 hex characters; policies signed "
        "by any other key are refused. Default: none until the first `join`, which shows "
        "the key the coordinator announces and pins it.",
    )
    engine: EngineChoice = Field(
        default="auto",
        description="Generation engine: 'vllm', 'hf' (Hugging Face transformers) or 'auto' "
        "(vLLM when it runs here, else HF). Default: auto.",
    )
    gpu_memory_fraction: float = Field(
        default=0.9,
        gt=0.0,
        le=1.0,
        description="Share of each GPU's memory the engine may use, in (0, 1]. Default: 0.9.",
    )
    max_sandboxes: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Sandboxes running tests at the same time, 1..64. Default: 2.",
    )
    cpu_threads: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="CPU threads the engine may use, 1..1024. Default: none, meaning every "
        "core this process may run on.",
    )
    sandbox: SandboxChoice = Field(
        default="auto",
        description="Preferred sandbox backend: 'docker', 'bubblewrap' or 'auto' (Docker "
        "first). When the preferred one does not work the other is used; model-written "
        "code never runs unsandboxed. Default: auto.",
    )
    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description="Where policy weights are downloaded and kept. Default: worker/ in the "
        "user cache dir (~/.cache/coderepair on Linux).",
    )
    p2p: bool = Field(
        default=False,
        description="Share policy shards with other workers over libp2p (needs the extra "
        "`coderepair-worker[p2p]`): less load on the origin, the same hash checks. "
        "Default: false.",
    )
    p2p_listen: tuple[str, ...] = Field(
        default=("/ip4/0.0.0.0/tcp/4001",),
        description="Multiaddrs the peer host listens on. Default: /ip4/0.0.0.0/tcp/4001.",
    )
    p2p_bootstrap: tuple[str, ...] = Field(
        default=(),
        description="Peers to dial at start (multiaddrs with /p2p/<peer id>), in addition to "
        "those the coordinator hands out. Default: none.",
    )
    p2p_mdns: bool = Field(
        default=True,
        description="Find peers on the local network with mDNS (only when p2p is on). "
        "Default: true.",
    )
    json_logs: bool = Field(
        default=False,
        description="Log one JSON object per line on stderr (headless use) instead of "
        "human-readable lines. Default: false.",
    )

    @field_validator("coordinator", mode="before")
    @classmethod
    def _coordinator(cls, value: object) -> object:
        value = _empty_is_none(value)
        if not isinstance(value, str):
            return value
        address = value.strip()
        match = _HOST_PORT.fullmatch(address)
        if match is None or not 1 <= int(match["port"]) <= 65535:
            raise ValueError(
                f"{address[:80]!r} is not HOST:PORT: write the coordinator's address as e.g. "
                "coordinator.example.org:50051, 127.0.0.1:50051 or [::1]:50051 (port 1-65535)"
            )
        return address

    @field_validator("run_id", mode="before")
    @classmethod
    def _run_id(cls, value: object) -> object:
        value = _empty_is_none(value)
        if isinstance(value, str) and not _RUN_ID.fullmatch(value):
            raise ValueError(
                f"{value[:80]!r} is not a run id: use 1-64 characters of [A-Za-z0-9._-] as "
                "the operator published it, or leave it unset to take the only run offered"
            )
        return value

    @field_validator("display_name")
    @classmethod
    def _display_name(cls, value: str) -> str:
        if len(value) > 64 or not value.isprintable():
            raise ValueError(
                "must be at most 64 printable characters (no newlines or control "
                f"characters); got {len(value)} characters"
            )
        return value

    @field_validator("trainer_public_key", mode="before")
    @classmethod
    def _trainer_key(cls, value: object) -> object:
        value = _empty_is_none(value)
        if not isinstance(value, str):
            return value
        key = value.strip().lower()
        if not _HEX64.fullmatch(key):
            raise ValueError(
                f"{value[:80]!r} is not an Ed25519 public key: write the 64 hex characters "
                "`join` showed on first contact (or the operator published), or leave it "
                "unset to pin the key the coordinator announces on the next join"
            )
        return key

    @field_validator(*_PATH_FIELDS, mode="before")
    @classmethod
    def _path(cls, value: object) -> object:
        if isinstance(value, str) and ("\x00" in value or not value.strip()):
            raise ValueError("must be a non-empty file-system path without NUL characters")
        return value

    @field_validator(*_PATH_FIELDS)
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # Relative paths from the environment or flags mean "from the current directory";
        # making them absolute now keeps their meaning if the worker changes directory.
        return value.expanduser().absolute()

    @field_validator("key_path")
    @classmethod
    def _key_not_dir(cls, value: Path) -> Path:
        if value.is_dir():
            raise ValueError(
                f"{value} is a directory: name the key file itself, e.g. {value / 'worker-key.pem'}"
            )
        return value

    @field_validator("cache_dir")
    @classmethod
    def _cache_not_file(cls, value: Path) -> Path:
        if value.exists() and not value.is_dir():
            raise ValueError(f"{value} exists and is not a directory: name a directory")
        return value

    @property
    def state_path(self) -> Path:
        """Where `join` records what it learnt (worker id, run, policy version held)."""
        return self.key_path.parent / "worker-state.json"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # `load_config` merges file < environment < flags itself and passes the result as
        # init values: with the environment as a source here too, it would silently beat
        # the flags (pydantic-settings re-reads sources even in `model_validate`).
        return (init_settings,)


def read_toml(path: Path) -> dict[str, Any]:
    """The TOML file as a dict; `ConfigError` when it cannot be read or is not TOML."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(
            f"no configuration file at {path}: create it (every setting is optional) or "
            "leave --config / CODEREPAIR_WORKER_CONFIG unset to use the defaults"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory, not a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid UTF-8 TOML: {exc}; fix or remove it") from exc


def load_config(
    path: Path | None = None, overrides: Mapping[str, Any] | None = None
) -> WorkerConfig:
    """Defaults < the TOML file < environment < ``overrides`` (flags; None means unset).

    `path` None means ``CODEREPAIR_WORKER_CONFIG`` if set, else `default_config_path`,
    which may be absent. An explicitly named file must exist. Relative paths inside
    the file are resolved against the file's directory.
    """
    named = path if path is not None else os.environ.get(CONFIG_ENV) or None
    file_path = Path(named).expanduser() if named is not None else default_config_path()
    file_data: dict[str, Any] = {}
    if named is not None or file_path.exists():
        file_data = _resolve_paths(read_toml(file_path), file_path.parent)
    env_fields = _environment_fields(os.environ)
    # pydantic-settings reads the variables (prefix, case rules) as raw values; the
    # model validates them below with everything else.
    try:
        env_data = EnvSettingsSource(WorkerConfig)()
    except SettingsError as exc:
        # List fields (p2p_listen, p2p_bootstrap) are read from the environment as JSON.
        raise ConfigError(
            f"invalid worker configuration: {exc}; list values in CODEREPAIR_WORKER_* "
            "variables are JSON, "
            "e.g. '[\"/ip4/1.2.3.4/tcp/4001/p2p/<peer id>\"]'"
        ) from None
    flags = {key: value for key, value in (overrides or {}).items() if value is not None}
    unknown_flags = sorted(set(flags) - set(WorkerConfig.model_fields))
    if unknown_flags:
        raise ConfigError(f"unknown override(s) {unknown_flags}: not fields of WorkerConfig")
    origins = {key: f"file {file_path}" for key in file_data}
    origins.update({key: f"environment {var}" for key, var in env_fields.items()})
    origins.update({key: "flag --" + key.replace("_", "-") for key in flags})
    try:
        return WorkerConfig(**{**file_data, **env_data, **flags})
    except ValidationError as exc:
        raise _explain(exc, origins) from None


def _environment_fields(environ: Mapping[str, str]) -> dict[str, str]:
    """{field: variable} for every ``CODEREPAIR_WORKER_*`` variable; typos are errors."""
    fields: dict[str, str] = {}
    unknown: list[str] = []
    for var in environ:
        # pydantic-settings matches the prefix case-insensitively; so does this check.
        if not var.upper().startswith(ENV_PREFIX) or var.upper() == CONFIG_ENV:
            continue
        name = var[len(ENV_PREFIX) :].lower()
        if name in WorkerConfig.model_fields:
            fields[name] = var
        else:
            unknown.append(var)
    if unknown:
        known = ", ".join(ENV_PREFIX + name.upper() for name in WorkerConfig.model_fields)
        raise ConfigError(
            f"unknown environment variable(s) {', '.join(sorted(unknown))}: fix the spelling "
            f"or unset them. Known: {CONFIG_ENV}, {known}"
        )
    return fields


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    out = dict(data)
    for key in _PATH_FIELDS:
        value = out.get(key)
        if isinstance(value, str) and value and "\x00" not in value:
            path = Path(value).expanduser()
            out[key] = str(path if path.is_absolute() else base / path)
    return out


def _explain(exc: ValidationError, origins: Mapping[str, str]) -> ConfigError:
    lines = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "(top level)"
        where = ".".join(str(part) for part in error["loc"]) or field
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            known = ", ".join(WorkerConfig.model_fields)
            message = f"unknown setting: check its spelling; known settings are {known}"
        origin = origins.get(field, "default")
        lines.append(f"  {where} (from {origin}): {message}")
    return ConfigError("invalid worker configuration:\n" + "\n".join(lines))
