"""Workers helping each other to new policy versions over libp2p (extra ``[p2p]``).

When the trainer publishes a version, every worker needs the same shards at about the
same time. Downloading them all from the origin (the coordinator's HTTP or S3) costs the
operator one copy per worker; with `PeerNetwork` the origin sends about one copy and the
workers pass it on among themselves:

* **Announcements.** A gossipsub topic per run (``/coderepair/<run_id>/manifests/1``)
  carries trainer-signed manifests. Every receiver checks the signature against the
  pinned trainer key (and the run id) in the topic validator, so anything else is
  dropped and never forwarded; `on_manifest` callbacks see only verified manifests.
* **Discovery.** Peers from a bootstrap list of multiaddrs (the coordinator's
  ``PolicyInfo.peer_bootstrap``, or the worker's config), redialled periodically, plus
  mDNS on the local network.
* **Shards.** The stream protocol ``/coderepair/shard/1.0.0`` (`coderepair.worker.p2p_wire`)
  asks a peer for a shard by SHA-256 and size; the answer is checked by hash on receipt.
  A peer that sends other bytes is never asked again. Peers serve only shards they have
  verified (`coderepair.worker.p2p_store`).
* **Origin as fallback.** `prefetch` gets each shard of a manifest from a peer that has
  it. For each shard one peer is responsible for fetching it from the origin
  (`designated_peer`, rendezvous hashing over the peers a worker sees); the others wait
  for its copy while it (or any peer) answers that it is downloading, and fetch from the
  origin themselves only when nobody does (after `claim_wait_s`) or a wait runs out
  (`pending_wait_s`). Origin downloads use `coderepair.worker.weights.ShardFetcher`.
  `prefetch` returns per-shard sources for `PolicyWeights.apply` with the verified local
  copy first and the origin URLs after, so a failed peer path never fails a download.

py-libp2p runs on trio; the worker runs on asyncio. `PeerNetwork` therefore runs libp2p
in its own thread with its own trio loop (`coderepair.worker.p2p_bridge.TrioThread`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from coderepair.protocol.errors import ProtocolError, VerificationError
from coderepair.protocol.manifest import (
    PolicyManifest,
    ShardInfo,
    SignedManifest,
    verify_manifest,
)
from coderepair.worker.p2p_bridge import PeerError, TrioThread
from coderepair.worker.p2p_config import (
    PeerAddressError,
    PeerConfig,
    check_multiaddr,
    expand_wildcards,
    topic_for,
)
from coderepair.worker.p2p_store import ShardStore
from coderepair.worker.p2p_wire import (
    LENGTH_BYTES,
    REQUEST_BYTES,
    SHARD_PROTOCOL,
    PeerWireError,
    ShardRequest,
    Status,
    decode_length,
    decode_status,
    encode_answer_header,
)
from coderepair.worker.weights import ShardFetcher

try:
    import multiaddr  # type: ignore[import-untyped]
    import trio
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.custom_types import TProtocol
    from libp2p.discovery.events.peerDiscovery import peerDiscovery
    from libp2p.network.stream.exceptions import StreamEOF
    from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
    from libp2p.pubsub.gossipsub import PROTOCOL_ID as GOSSIPSUB_PROTOCOL
    from libp2p.pubsub.gossipsub import GossipSub
    from libp2p.pubsub.pubsub import Pubsub
    from libp2p.tools.anyio_service import background_trio_service
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"coderepair.worker.p2p needs py-libp2p ({exc}): install the extra with "
        "`pip install 'coderepair-worker[p2p]'`, or run the worker without peers"
    ) from exc

__all__ = [
    "ForeignRunError",
    "PeerAddressError",
    "PeerConfig",
    "PeerError",
    "PeerLiedError",
    "PeerNetwork",
    "PeerStats",
    "designated_peer",
    "topic_for",
]

log = logging.getLogger(__name__)

ManifestCallback = Callable[[bytes, PolicyManifest], object]
"""Called on the asyncio loop with a verified announcement's bytes and manifest; may
return an awaitable, which is run as a task."""

_CHUNK = 1 << 16
_GOSSIP_MAX_BYTES = 1 << 20  # py-libp2p's default inbound RPC limit


class ForeignRunError(VerificationError):
    """A correctly signed manifest of another run arrived on this run's topic."""


class PeerLiedError(VerificationError):
    """A peer answered a shard request with bytes of another length or hash."""


@dataclass
class PeerStats:
    """Counters of one `PeerNetwork` (bytes are shard payload bytes)."""

    bytes_served: int = 0
    shards_served: int = 0
    bytes_from_peers: int = 0
    shards_from_peers: int = 0
    bytes_from_origin: int = 0
    shards_from_origin: int = 0
    peers_rejected: int = 0
    announcements_received: int = 0
    announcements_dropped: int = 0

    def to_dict(self) -> dict[str, int]:
        """The counters as a plain dict (for logs and the bench's JSON)."""
        return asdict(self)


def designated_peer(sha256: str, peer_ids: Sequence[str]) -> str:
    """The peer that fetches a shard from the origin for everyone (rendezvous hashing).

    Workers hearing of a version at the same instant would otherwise all find no copy
    among their peers and all go to the origin. With this rule every worker that sees the
    same peers picks the same one per shard, and different shards fall to different peers,
    so the origin sends each shard about once and the uploads are spread. Workers with
    different views of the network may pick differently; that costs an extra origin copy,
    never a missing one."""
    if not peer_ids:
        raise ValueError("designated_peer needs at least one peer id (this worker's own)")
    digest = bytes.fromhex(sha256)
    return min(peer_ids, key=lambda p: hashlib.sha256(p.encode() + digest).digest())


async def _read_exactly(stream: Any, count: int) -> bytes:
    buffer = bytearray()
    while len(buffer) < count:
        try:
            chunk = await stream.read(min(_CHUNK, count - len(buffer)))
        except StreamEOF:
            chunk = b""
        if not chunk:
            raise PeerWireError(f"the stream ended after {len(buffer)} of {count} bytes")
        buffer += chunk
    return bytes(buffer)


class PeerNetwork:
    """A worker's libp2p host: manifest gossip, shard serving and fetching.

    Use ``async with PeerNetwork(config) as peers:`` (or `start` / `shutdown`) on an
    asyncio loop; every method is a coroutine of that loop.
    """

    def __init__(self, config: PeerConfig) -> None:
        self.config = config
        self.store = ShardStore(config.store_dir)
        self.stats = PeerStats()
        self._pinned = bytes.fromhex(config.trainer_key)
        self._topic = topic_for(config.run_id)
        self._fetcher = ShardFetcher(config.fetch, config.store_dir / "origin")
        self._callbacks: list[ManifestCallback] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._seen: set[bytes] = set()
        self._kept: list[set[str]] = []
        self._bootstrap: list[str] = list(config.bootstrap)
        self._pending: dict[str, float] = {}  # sha256 → monotonic deadline of our claim
        self._bad_peers: set[str] = set()
        self._stats_lock = threading.Lock()
        self._trio = TrioThread(f"libp2p {config.run_id}")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._host: Any = None
        self._pubsub: Any = None
        self._upload_slots: Any = None
        self.peer_id = ""
        self.addrs: list[str] = []
        """This host's multiaddrs with /p2p/<peer id>, once started (for bootstrap lists)."""

    # ------------------------------------------------------------ lifecycle (asyncio)

    async def __aenter__(self) -> PeerNetwork:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    async def start(self) -> None:
        """Start the libp2p thread; return once the host listens and is subscribed."""
        self._loop = asyncio.get_running_loop()
        try:
            await self._trio.start(self._trio_main)
        except PeerError as exc:
            raise PeerError(
                f"the libp2p host did not start ({exc}); check listen_addrs "
                f"{list(self.config.listen_addrs)} (a port in use?)"
            ) from exc
        log.info("peer network of run %s listening on %s", self.config.run_id, self.addrs)

    async def shutdown(self) -> None:
        """Stop the host and its thread (idempotent)."""
        peerDiscovery.unregister_peer_discovered_handler(self._on_mdns_peer)
        await self._trio.stop()
        for task in list(self._tasks):
            task.cancel()

    # ------------------------------------------------------------ public API (asyncio)

    def on_manifest(self, callback: ManifestCallback) -> None:
        """Call `callback(manifest_bytes, manifest)` for each new verified announcement."""
        self._callbacks.append(callback)

    async def announce(self, manifest_bytes: bytes) -> PolicyManifest:
        """Publish a manifest on the run's topic after checking it as receivers will."""
        manifest = self._verify(manifest_bytes)
        if len(manifest_bytes) > _GOSSIP_MAX_BYTES - 4096:
            raise PeerError(
                f"manifest of {len(manifest_bytes)} bytes is too large for a gossipsub "
                "message (about 1 MiB): peers learn of it from the coordinator instead"
            )
        self._seen.add(hashlib.sha256(manifest_bytes).digest())
        await self._trio.call(self._pubsub.publish, self._topic, bytes(manifest_bytes))
        return manifest

    async def connect(self, addrs: Sequence[str]) -> int:
        """Add bootstrap peers (multiaddrs ending in /p2p/<id>) and dial them now; return
        how many of them are connected afterwards."""
        checked = [check_multiaddr(a, need_peer_id=True) for a in addrs]
        for addr in checked:
            if addr not in self._bootstrap:
                self._bootstrap.append(addr)
        return await self._trio.call(self._dial_all, checked)

    async def connected_peers(self) -> list[str]:
        """Peer ids of the peers connected now."""
        return await self._trio.call(self._connected)

    async def fetch_shard(self, sha256: str, size: int) -> bytes | None:
        """The shard's bytes from the first peer that has it (verified), or None."""
        data, _waiting = await self._trio.call(self._ask_peers, ShardRequest(sha256, size))
        return data

    async def serve_dir(self, directory: Path) -> int:
        """Serve the shards in `directory` that are named by their SHA-256 (optionally
        ``.part``), after checking each hash; return how many were added. Point it at
        `PolicyWeights`' ``cache_dir / "partial"`` when ``keep_downloads`` is set."""
        return await asyncio.to_thread(self.store.scan, Path(directory))

    async def serve_file(self, path: Path, sha256: str) -> bool:
        """Serve one file if its SHA-256 is `sha256`; return whether it matched."""
        return await asyncio.to_thread(self.store.add_file, Path(path), sha256) is not None

    async def prefetch(
        self, manifest_bytes: bytes, origin: Mapping[str, str | Sequence[str]]
    ) -> dict[str, list[str]]:
        """Get every shard of a manifest from peers or, failing that, from `origin` (URLs
        per shard name, as the coordinator's ShardLocation lists them).

        Returns sources for `PolicyWeights.apply`: for each shard, its verified local copy
        (when one was obtained) followed by the origin URLs. Raises the manifest's typed
        errors when it is not signed by the pinned key or belongs to another run; a shard
        that cannot be obtained here is left to `PolicyWeights`' own origin download.
        """
        manifest = self._verify(manifest_bytes)
        gate = asyncio.Semaphore(self.config.max_parallel_shards)

        async def one(shard: ShardInfo) -> tuple[str, list[str]]:
            raw = origin.get(shard.name, ())
            urls = [raw] if isinstance(raw, str) else list(raw)
            async with gate:
                path = await self._obtain(shard, urls)
            return shard.name, ([str(path)] if path is not None else []) + urls

        pairs = await asyncio.gather(*(one(s) for s in manifest.shards))
        self._keep({s.sha256 for s in manifest.shards})
        return dict(pairs)

    # ------------------------------------------------------------ shards (asyncio side)

    async def _obtain(self, shard: ShardInfo, urls: list[str]) -> Path | None:
        cfg = self.config
        request = ShardRequest(shard.sha256, shard.size)
        have = self.store.path_for(shard.sha256, shard.size)
        if have is not None:
            return have
        peers = [p for p in await self._trio.call(self._connected) if p not in self._bad_peers]
        responsible = designated_peer(shard.sha256, [self.peer_id, *peers]) == self.peer_id
        if responsible:
            # Claim before asking, so that peers asking meanwhile wait for this copy.
            self._pending[shard.sha256] = time.monotonic() + cfg.pending_wait_s
        started = time.monotonic()
        try:
            while True:
                data, waiting = await self._trio.call(self._ask_peers, request)
                if data is not None:
                    self._count(bytes_from_peers=len(data), shards_from_peers=1)
                    return await asyncio.to_thread(self.store.add_bytes, shard.sha256, data)
                waited = time.monotonic() - started
                if responsible or waited >= (cfg.pending_wait_s if waiting else cfg.claim_wait_s):
                    break
                await asyncio.sleep(cfg.poll_s)
            if not urls:
                return None
            self._pending[shard.sha256] = time.monotonic() + cfg.pending_wait_s
            try:
                data = await asyncio.to_thread(self._fetcher.fetch, shard, urls)
            except ProtocolError as exc:
                log.warning("origin download of shard %s failed: %s", shard.name, exc)
                return None
        finally:
            self._pending.pop(shard.sha256, None)
        self._count(bytes_from_origin=len(data), shards_from_origin=1)
        path = await asyncio.to_thread(self.store.add_bytes, shard.sha256, data)
        self._fetcher.partial_path(shard).unlink(missing_ok=True)
        return path

    def _keep(self, hashes: set[str]) -> None:
        self._kept.append(hashes)
        del self._kept[: -self.config.keep_versions]
        self.store.prune(set().union(*self._kept))

    def _verify(self, manifest_bytes: bytes) -> PolicyManifest:
        manifest = verify_manifest(SignedManifest.from_bytes(manifest_bytes), self._pinned)
        if manifest.run_id != self.config.run_id:
            raise ForeignRunError(
                f"manifest of run {manifest.run_id!r} v{manifest.version} on the topic of run "
                f"{self.config.run_id!r}: a peer relays another run's versions; ignored"
            )
        return manifest

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, delta in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)

    # ------------------------------------------------------------ the libp2p thread (trio)

    async def _trio_main(self, started: Callable[[], None], stop: Any) -> None:
        cfg = self.config
        self._upload_slots = trio.Semaphore(cfg.max_uploads)
        listen = expand_wildcards(cfg.listen_addrs)
        host = new_host(key_pair=create_new_key_pair(), enable_mDNS=cfg.mdns)
        router = GossipSub(
            protocols=[GOSSIPSUB_PROTOCOL],
            degree=6,
            degree_low=4,
            degree_high=12,
            heartbeat_interval=1,  # the default (120 s) would delay a new peer's mesh
        )
        # Identical announcements from several relaying workers are one message.
        pubsub = Pubsub(host, router, msg_id_constructor=lambda m: hashlib.sha256(m.data).digest())
        host.set_stream_handler(TProtocol(SHARD_PROTOCOL), self._serve)
        self._host, self._pubsub = host, pubsub
        async with (
            host.run(listen),
            background_trio_service(pubsub),
            background_trio_service(router),
        ):
            await pubsub.wait_until_ready()
            pubsub.set_topic_validator(self._topic, self._validate, False)
            subscription = await pubsub.subscribe(self._topic)
            self.peer_id = str(host.get_id())
            self.addrs = [str(a) for a in host.get_addrs()]
            if not self.addrs:  # py-libp2p logs a failed listener and carries on without it
                raise PeerError(
                    f"could not listen on any of {[str(a) for a in listen]}: the port is in use "
                    "or the address is not local; pick another port or address"
                )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive, subscription)
                nursery.start_soon(self._redial_loop)
                if cfg.mdns:
                    peerDiscovery.register_peer_discovered_handler(self._on_mdns_peer)
                started()
                await stop.wait()
                nursery.cancel_scope.cancel()

    # --- announcements

    def _validate(self, _peer: Any, message: Any) -> bool:
        try:
            self._verify(bytes(message.data))
        except ProtocolError as exc:
            self._count(announcements_dropped=1)
            log.warning("dropped a manifest announcement: %s", exc)
            return False
        return True

    async def _receive(self, subscription: Any) -> None:
        me = self._host.get_id().to_bytes()
        while True:
            message = await subscription.get()
            data = bytes(message.data)
            key = hashlib.sha256(data).digest()
            if bytes(message.from_id) == me or key in self._seen:
                continue
            try:  # the validator passed; decoding again here costs a millisecond
                manifest = self._verify(data)
            except ProtocolError:
                continue
            self._seen.add(key)
            self._count(announcements_received=1)
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._dispatch, data, manifest)

    def _dispatch(self, data: bytes, manifest: PolicyManifest) -> None:
        for callback in self._callbacks:
            try:
                result = callback(data, manifest)
            except Exception:
                log.exception("a manifest callback failed")
                continue
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    # --- discovery

    async def _connected(self) -> list[str]:
        return [str(p) for p in self._host.get_connected_peers()]

    async def _dial_all(self, addrs: Sequence[str]) -> int:
        results: list[bool] = []

        async def dial(text: str) -> None:
            results.append(await self._dial(info_from_p2p_addr(multiaddr.Multiaddr(text))))

        async with trio.open_nursery() as nursery:
            for text in addrs:
                nursery.start_soon(dial, text)
        return sum(results)

    async def _dial(self, info: PeerInfo) -> bool:
        if info.peer_id == self._host.get_id():
            return False
        if info.peer_id in self._host.get_connected_peers():
            return True
        try:
            with trio.fail_after(min(self.config.request_timeout_s, 15.0)):
                await self._host.connect(info)
        except Exception as exc:  # any transport or handshake failure: retried later
            log.debug("could not connect to peer %s: %s", info.peer_id, exc)
            return False
        return True

    async def _redial_loop(self) -> None:
        while True:
            await self._dial_all(list(self._bootstrap))
            await trio.sleep(self.config.redial_s)

    def _on_mdns_peer(self, info: PeerInfo) -> None:
        # Called from zeroconf's thread, for every host of this process (the handler list
        # is a py-libp2p module global): hop onto our trio loop before touching the host.
        self._trio.call_soon(self._dial, info)

    # --- shards: asking

    async def _ask_peers(self, request: ShardRequest) -> tuple[bytes | None, bool]:
        """One round: probe every connected peer at once, then fetch from the holders in
        random order. Return the verified shard from the first that sends it, else
        (None, whether some peer is fetching it from the origin or busy)."""
        peers = [p for p in self._host.get_connected_peers() if str(p) not in self._bad_peers]
        statuses: dict[Any, Status] = {}
        probe = ShardRequest(request.sha256, request.size, probe=True)

        async def ask(peer: Any) -> None:
            try:
                with trio.fail_after(min(self.config.request_timeout_s, 15.0)):
                    statuses[peer] = (await self._request(peer, probe))[0]
            except Exception as exc:  # timeouts, resets, peers without the protocol
                log.debug("shard probe to %s failed: %s", peer, exc)

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(ask, peer)
        waiting = any(s in (Status.PENDING, Status.BUSY) for s in statuses.values())
        holders = [p for p, s in statuses.items() if s is Status.OK]
        random.shuffle(holders)
        for peer in holders:
            try:
                with trio.fail_after(self.config.request_timeout_s):
                    status, data = await self._request(peer, request)
            except PeerLiedError as exc:
                if str(peer) not in self._bad_peers:  # requests in flight may all catch it
                    self._bad_peers.add(str(peer))
                    self._count(peers_rejected=1)
                    log.warning("peer %s is not asked again: %s", peer, exc)
                continue
            except Exception as exc:  # timeouts, resets, peers without the protocol
                log.debug("shard request to %s failed: %s", peer, exc)
                continue
            if data is not None:
                return data, False
            waiting = waiting or status in (Status.PENDING, Status.BUSY)
        return None, waiting

    async def _request(self, peer: Any, request: ShardRequest) -> tuple[Status, bytes | None]:
        stream = await self._host.new_stream(peer, [TProtocol(SHARD_PROTOCOL)])
        try:
            await stream.write(request.to_bytes())
            status = decode_status(await _read_exactly(stream, 1))
            if status is not Status.OK or request.probe:
                return status, None
            length = decode_length(await _read_exactly(stream, LENGTH_BYTES))
            if length != request.size:
                raise PeerLiedError(
                    f"it offered {length} bytes for shard {request.sha256[:16]}… of "
                    f"{request.size} bytes"
                )
            digest = hashlib.sha256()
            data = bytearray()
            while len(data) < length:
                chunk = await _read_exactly(stream, min(_CHUNK, length - len(data)))
                digest.update(chunk)
                data += chunk
            if digest.hexdigest() != request.sha256:
                raise PeerLiedError(
                    f"it sent bytes with sha256 {digest.hexdigest()[:16]}… for shard "
                    f"{request.sha256[:16]}…"
                )
            return status, bytes(data)
        finally:
            with contextlib.suppress(Exception):
                await stream.close()

    # --- shards: serving

    async def _serve(self, stream: Any) -> None:
        try:
            with trio.fail_after(self.config.request_timeout_s):
                request = ShardRequest.from_bytes(await _read_exactly(stream, REQUEST_BYTES))
                path = self.store.path_for(request.sha256, request.size)
                if path is None:
                    claim = self._pending.get(request.sha256)
                    pending = claim is not None and claim > time.monotonic()
                    await stream.write(
                        encode_answer_header(Status.PENDING if pending else Status.NOT_FOUND)
                    )
                    return
                if request.probe:
                    await stream.write(encode_answer_header(Status.OK, probe=True))
                    return
                try:
                    self._upload_slots.acquire_nowait()
                except trio.WouldBlock:
                    await stream.write(encode_answer_header(Status.BUSY))
                    return
                try:
                    await self._send_file(stream, path, request.size)
                finally:
                    self._upload_slots.release()
                self._count(bytes_served=request.size, shards_served=1)
        except Exception as exc:  # a bad request, a reset or slow asker: its problem
            log.debug("shard request from %s not served: %s", stream.muxed_conn.peer_id, exc)
        finally:
            with contextlib.suppress(Exception):
                await stream.close()

    async def _send_file(self, stream: Any, path: Path, size: int) -> None:
        await stream.write(encode_answer_header(Status.OK, size))
        handle = await trio.to_thread.run_sync(path.open, "rb")
        try:
            sent = 0
            while sent < size:
                chunk = await trio.to_thread.run_sync(handle.read, min(_CHUNK * 16, size - sent))
                if not chunk:
                    raise OSError(f"{path} shrank while being served")
                await stream.write(chunk)
                sent += len(chunk)
        finally:
            handle.close()
