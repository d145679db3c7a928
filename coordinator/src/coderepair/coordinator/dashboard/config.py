"""Settings of the operators' web dashboard and its Prometheus endpoint.

The coordinator's own config embeds `DashboardConfig` (a `[dashboard]` table in
coordinator.toml); every field has a default, so an operator who writes nothing gets a
dashboard on loopback only. Binding to another address is an explicit choice: the pages
show worker names, ban reasons and credit, and there is no login.
"""

from __future__ import annotations

import ipaddress

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["DashboardConfig", "StatsWindow"]

# More points than this would make a plot illegible and a refresh needlessly heavy.
_MAX_BUCKETS = 720


class StatsWindow(BaseModel):
    """Which slice of history the figures cover and how finely it is cut."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    history_s: int = Field(
        default=900,
        ge=10,
        le=7 * 24 * 3600,
        description="How far back the time series (rollouts/s, batches by outcome, reward "
        "over time) reach, in seconds.",
    )
    bucket_s: int = Field(
        default=15,
        ge=1,
        le=24 * 3600,
        description="Width of one time bucket of those series, in seconds. Buckets are "
        "aligned to multiples of this width, so a refresh moves them without reshuffling.",
    )
    rate_window_s: int = Field(
        default=60,
        ge=1,
        le=24 * 3600,
        description="The headline rates (rollouts/s, recent mean reward) are averaged "
        "over this many trailing seconds.",
    )
    online_window_s: int = Field(
        default=120,
        ge=1,
        le=24 * 3600,
        description="A worker counts as online when it was last seen (heartbeat or any "
        "signed call) within this many seconds. Set it above the workers' heartbeat "
        "interval, or workers flicker offline between beats.",
    )
    max_policy_versions: int = Field(
        default=50,
        ge=1,
        le=10_000,
        description="The reward curve and the policy table cover this many latest policy "
        "versions of the run.",
    )
    max_listed_workers: int = Field(
        default=50,
        ge=1,
        le=10_000,
        description="At most this many online (most recently seen first) and banned "
        "workers are listed by name; the counts always cover all of them.",
    )

    @model_validator(mode="after")
    def _bucket_count(self) -> StatsWindow:
        if self.bucket_s > self.history_s:
            raise ValueError(
                f"bucket_s ({self.bucket_s}) is longer than history_s ({self.history_s}): "
                "make the buckets shorter than the history they cut"
            )
        buckets = -(-self.history_s // self.bucket_s)
        if buckets > _MAX_BUCKETS:
            raise ValueError(
                f"history_s / bucket_s gives {buckets} buckets, more than {_MAX_BUCKETS}: "
                "raise bucket_s or shorten history_s"
            )
        return self

    @property
    def n_buckets(self) -> int:
        """How many buckets the history is cut into (the last one may be partial)."""
        return -(-self.history_s // self.bucket_s)


class DashboardConfig(BaseModel):
    """Where the dashboard listens and what it shows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        default=True,
        description="Serve the dashboard, /api/stats, /metrics and /healthz. Off: none of "
        "them (the service's own counters still exist, nothing exposes them).",
    )
    host: str = Field(
        default="127.0.0.1",
        description="IP address to bind, e.g. 127.0.0.1 (this machine only), 0.0.0.0 (every "
        "IPv4 interface) or :: (every IPv6 interface). The pages have no login: bind beyond "
        "loopback only on a network you trust, or behind an authenticating proxy.",
    )
    port: int = Field(
        default=9464,
        ge=0,
        le=65535,
        description="TCP port; 0 picks a free one (the server reports the port it got).",
    )
    refresh_s: float = Field(
        default=3.0,
        ge=0.5,
        le=3600,
        description="The open page fetches fresh figures this often, in seconds.",
    )
    cache_s: float = Field(
        default=1.0,
        ge=0.0,
        le=60,
        description="A snapshot of the database is reused for this many seconds, so many "
        "open pages and Prometheus scrapers cost one set of queries per interval. 0: "
        "query on every request.",
    )
    max_connections: int = Field(
        default=64,
        ge=1,
        le=10_000,
        description="Connections served at once; further ones are answered 503 at once.",
    )
    request_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="A client must send its request head within this many seconds, or the "
        "connection is closed (a slow client cannot hold a connection for ever).",
    )
    window: StatsWindow = Field(
        default_factory=StatsWindow,
        description="History, buckets and limits of the figures shown.",
    )

    @field_validator("host")
    @classmethod
    def _ip_address(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(
                f"host {value!r} is not an IP address: give one such as 127.0.0.1, 0.0.0.0 "
                "or ::1 (a name would bind whatever it resolves to at start-up)"
            ) from None
        return value
