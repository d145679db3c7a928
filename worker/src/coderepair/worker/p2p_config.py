"""Settings of a worker's peer network (`coderepair.worker.p2p`), and address checks.

Multiaddrs are parsed here with py-libp2p's own parser, so a bad bootstrap entry is
refused when the config is loaded, with the reason, rather than failing a dial later.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from coderepair.worker.p2p_bridge import PeerError
from coderepair.worker.weights import FetchConfig

try:
    import ifaddr
    import multiaddr  # type: ignore[import-untyped]
    from libp2p.peer.peerinfo import info_from_p2p_addr
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"coderepair.worker.p2p_config needs py-libp2p ({exc}): install the extra with "
        "`pip install 'coderepair-worker[p2p]'`, or run the worker without peers"
    ) from exc


class PeerAddressError(PeerError, ValueError):
    """A multiaddr is malformed or lacks the peer id (a ValueError too, so pydantic reports
    it as a validation error of the field)."""


def check_multiaddr(text: str, *, need_peer_id: bool) -> str:
    try:
        addr = multiaddr.Multiaddr(text)
        if need_peer_id:
            info_from_p2p_addr(addr)
    except ValueError as exc:
        what = "a multiaddr ending in /p2p/<peer id>" if need_peer_id else "a multiaddr"
        raise PeerAddressError(
            f"{text!r} is not {what} ({exc}); e.g. /ip4/192.0.2.7/tcp/4001/p2p/12D3KooW…, as "
            "another worker's `PeerNetwork.addrs` prints it"
        ) from exc
    return text


class PeerConfig(BaseModel):
    """How a worker joins its run's peer network."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    run_id: str = Field(min_length=1, max_length=128)
    """The run whose manifests this network carries; announcements of other runs are
    dropped."""
    trainer_key: str = Field(pattern=r"^[0-9a-f]{64}$")
    """The pinned trainer public key (64 lowercase hex characters); announcements signed by
    any other key are dropped."""
    store_dir: Path
    """Folder for shards received from peers or the origin; the worker serves them."""
    listen_addrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    """Multiaddrs to listen on. ``0.0.0.0`` is expanded to each local IPv4 address, so the
    addresses announced (and sent by mDNS) can be dialled by others; port 0 picks one."""
    bootstrap: tuple[str, ...] = ()
    """Peers to connect to, as multiaddrs ending in /p2p/<peer id> (the coordinator hands
    them out in PolicyInfo.peer_bootstrap; more can be added with `connect`)."""
    mdns: bool = True
    """Find peers on the local network with mDNS (needs multicast on the LAN)."""
    redial_s: float = Field(default=10.0, gt=0, le=3600)
    """Seconds between attempts to reconnect to bootstrap peers that are not connected."""
    request_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    """Longest time one shard request to one peer may take, transfer included."""
    claim_wait_s: float = Field(default=3.0, ge=0, le=600)
    """How long a worker waits for the peer responsible for a shard (`designated_peer`) to
    start fetching it from the origin before fetching it itself."""
    poll_s: float = Field(default=0.25, gt=0, le=60)
    """Seconds between asking peers again while one of them is fetching the shard."""
    pending_wait_s: float = Field(default=120.0, ge=0, le=86400)
    """How long to wait on peers that say they are fetching a shard before fetching it
    from the origin too."""
    max_uploads: int = Field(default=4, ge=1, le=1024)
    """Shards served at the same time; further askers are told BUSY and ask others."""
    max_parallel_shards: int = Field(default=4, ge=1, le=256)
    """Shards `prefetch` obtains at the same time."""
    keep_versions: int = Field(default=2, ge=1, le=1000)
    """Versions whose shards stay in `store_dir` and are served; older ones are deleted."""
    fetch: FetchConfig = FetchConfig()
    """Retries and timeouts of origin downloads (the same settings as `PolicyWeights`)."""

    @field_validator("listen_addrs")
    @classmethod
    def _listen(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("listen_addrs is empty: give at least /ip4/0.0.0.0/tcp/0")
        return tuple(check_multiaddr(a, need_peer_id=False) for a in value)

    @field_validator("bootstrap")
    @classmethod
    def _bootstrap(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_multiaddr(a, need_peer_id=True) for a in value)


def topic_for(run_id: str) -> str:
    """The gossipsub topic of a run's manifest announcements."""
    return f"/coderepair/{run_id}/manifests/1"


def expand_wildcards(addrs: Sequence[str]) -> list[multiaddr.Multiaddr]:
    """Replace ``/ip4/0.0.0.0`` by each local IPv4 address.

    py-libp2p 0.8 announces its transport addresses as they are (also over mDNS), and
    ``0.0.0.0`` can be dialled by no other machine."""
    local = sorted(
        {
            str(ip.ip)
            for adapter in ifaddr.get_adapters()
            for ip in adapter.ips
            if isinstance(ip.ip, str)  # IPv4 (IPv6 entries are tuples)
        }
    ) or ["127.0.0.1"]
    result: list[multiaddr.Multiaddr] = []
    for text in addrs:
        if text.startswith("/ip4/0.0.0.0/"):
            rest = text[len("/ip4/0.0.0.0") :]
            result.extend(multiaddr.Multiaddr(f"/ip4/{ip}{rest}") for ip in local)
        else:
            result.append(multiaddr.Multiaddr(text))
    return result
