"""Real py-libp2p hosts on loopback (each `PeerNetwork` runs its own trio thread) and a
real HTTP origin on loopback that counts the bytes it sends: manifest gossip with
signature checks, shards passed between peers, a lying peer, and mDNS discovery.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from coderepair.protocol.identity import Identity
from coderepair.protocol.manifest import (
    PolicyManifest,
    SignedManifest,
    build_manifest_for_dir,
    sign_manifest,
)
from coderepair.worker.p2p import PeerConfig, PeerNetwork
from coderepair.worker.weights import FetchConfig, ShardFetcher

RUN = "p2p-test"
SHARD_BYTES = 300_000


@dataclass
class Version:
    trainer: Identity
    shard_dir: Path
    manifest: PolicyManifest
    manifest_bytes: bytes


@dataclass
class Origin:
    url: str
    sent: dict[str, int] = field(default_factory=dict)  # path → payload bytes sent

    def urls(self, manifest: PolicyManifest) -> dict[str, list[str]]:
        return {s.name: [f"{self.url}/{s.name}"] for s in manifest.shards}

    @property
    def total(self) -> int:
        return sum(self.sent.values())


def make_version(root: Path, trainer: Identity, *, run_id: str = RUN) -> Version:
    shard_dir = root / "v1"
    shard_dir.mkdir(parents=True)
    for i in range(3):
        (shard_dir / f"shard-{i}.bin").write_bytes(os.urandom(SHARD_BYTES))
    manifest = build_manifest_for_dir(
        shard_dir,
        run_id=run_id,
        version=1,
        base_model="coderepair/tiny",
        tokenizer_sha256="0" * 64,
        kind="full",
        trainer_key=trainer.public_key,
    )
    signed = sign_manifest(manifest, trainer)
    return Version(trainer, shard_dir, manifest, signed.to_bytes())


@pytest.fixture
def version(tmp_path: Path) -> Version:
    return make_version(tmp_path / "published", Identity.generate())


@pytest.fixture
def origin(version: Version) -> Iterator[Origin]:
    state = Origin(url="")
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = version.shard_dir / self.path.lstrip("/")
            if not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            with lock:
                state.sent[path.name] = state.sent.get(path.name, 0) + len(data)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
async def network(tmp_path: Path, version: Version) -> AsyncIterator[Callable[..., Any]]:
    started: list[PeerNetwork] = []

    async def make(name: str, *, bootstrap: tuple[str, ...] = (), **overrides: Any) -> PeerNetwork:
        settings: dict[str, Any] = {
            "run_id": RUN,
            "trainer_key": version.trainer.public_key_hex,
            "store_dir": tmp_path / name,
            "listen_addrs": ("/ip4/127.0.0.1/tcp/0",),
            "bootstrap": bootstrap,
            "mdns": False,
            "claim_wait_s": 0.5,
            "request_timeout_s": 20.0,
        }
        settings.update(overrides)
        net = PeerNetwork(PeerConfig(**settings))
        await net.start()
        started.append(net)
        return net

    yield make
    await asyncio.gather(*(n.shutdown() for n in started))


async def wait_connected(net: PeerNetwork, count: int, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while len(await net.connected_peers()) < count:
            await asyncio.sleep(0.1)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_announcement_reaches_every_peer_and_forgeries_are_dropped(
    network: Callable[..., Any], version: Version, tmp_path: Path
) -> None:
    a = await network("a")
    b = await network("b", bootstrap=(a.addrs[0],))
    c = await network("c", bootstrap=(b.addrs[0],))  # c hears a only through b
    # A peer that trusts another trainer key: it can announce its own key's manifests.
    rogue_trainer = Identity.generate()
    rogue_version = make_version(tmp_path / "rogue", rogue_trainer)
    rogue = await network(
        "rogue", bootstrap=(a.addrs[0], b.addrs[0]), trainer_key=rogue_trainer.public_key_hex
    )
    received: dict[str, asyncio.Queue[tuple[bytes, PolicyManifest]]] = {}
    for name, net in (("b", b), ("c", c)):
        queue: asyncio.Queue[tuple[bytes, PolicyManifest]] = asyncio.Queue()
        received[name] = queue
        net.on_manifest(lambda data, m, q=queue: q.put_nowait((data, m)))
    await wait_connected(a, 2)
    await wait_connected(c, 1)
    await asyncio.sleep(2.5)  # a few gossipsub heartbeats: subscriptions and meshes form

    await rogue.announce(rogue_version.manifest_bytes)
    await a.announce(version.manifest_bytes)

    for name in ("b", "c"):
        data, manifest = await asyncio.wait_for(received[name].get(), 20)
        assert data == version.manifest_bytes, f"{name} got a manifest it should have dropped"
        assert manifest.trainer_key == version.trainer.public_key_hex
    await asyncio.sleep(1.0)
    assert received["b"].empty() and received["c"].empty()
    # b heard the rogue directly and refused to pass its manifest on.
    assert b.stats.announcements_dropped >= 1
    assert SignedManifest.from_bytes(rogue_version.manifest_bytes)  # it was well-formed


async def test_shard_from_a_peer_matches_its_hash_and_spares_the_origin(
    network: Callable[..., Any], version: Version, origin: Origin, tmp_path: Path
) -> None:
    seeder = await network("seeder")
    seeded = await seeder.prefetch(version.manifest_bytes, origin.urls(version.manifest))
    assert origin.total == 3 * SHARD_BYTES
    assert seeder.stats.shards_from_origin == 3

    leecher = await network("leecher", bootstrap=(seeder.addrs[0],))
    await wait_connected(leecher, 1)
    first = version.manifest.shards[0]
    data = await leecher.fetch_shard(first.sha256, first.size)
    assert data is not None and hashlib.sha256(data).hexdigest() == first.sha256
    assert await leecher.fetch_shard("ab" * 32, 10) is None  # nobody has it

    sources = await leecher.prefetch(version.manifest_bytes, origin.urls(version.manifest))
    assert origin.total == 3 * SHARD_BYTES  # not one more byte from the origin
    assert leecher.stats.shards_from_peers == 3 and leecher.stats.shards_from_origin == 0
    assert seeder.stats.bytes_served >= 3 * SHARD_BYTES
    for shard in version.manifest.shards:
        local = Path(sources[shard.name][0])
        assert local.parent == tmp_path / "leecher"
        assert sha256_file(local) == shard.sha256
        assert sources[shard.name][1:] == origin.urls(version.manifest)[shard.name]
        assert Path(seeded[shard.name][0]).is_file()
    # The sources are what PolicyWeights.apply takes: its fetcher reads the local copies.
    fetcher = ShardFetcher(FetchConfig(), tmp_path / "w")
    for shard in version.manifest.shards:
        expected = (version.shard_dir / shard.name).read_bytes()
        assert fetcher.fetch(shard, sources[shard.name]) == expected
    assert origin.total == 3 * SHARD_BYTES


async def test_workers_taking_a_version_at_once_get_each_shard_from_the_origin_once(
    network: Callable[..., Any], version: Version, origin: Origin
) -> None:
    first = await network("first", claim_wait_s=10.0)
    others = [
        await network(f"w{i}", bootstrap=(first.addrs[0],), claim_wait_s=10.0) for i in (1, 2)
    ]
    for net in others:
        await net.connect([o.addrs[0] for o in others if o is not net])
    for net in (first, *others):
        await wait_connected(net, 2)
    urls = origin.urls(version.manifest)
    results = await asyncio.gather(
        *(n.prefetch(version.manifest_bytes, urls) for n in (first, *others))
    )
    # Each shard has one designated peer; the others waited for its copy.
    assert origin.sent == {s.name: SHARD_BYTES for s in version.manifest.shards}
    assert sum(n.stats.shards_from_origin for n in (first, *others)) == 3
    for sources in results:
        for shard in version.manifest.shards:
            assert sha256_file(Path(sources[shard.name][0])) == shard.sha256


async def test_a_lying_peer_is_rejected_and_the_origin_used(
    network: Callable[..., Any], version: Version, origin: Origin
) -> None:
    liar = await network("liar")
    await liar.prefetch(version.manifest_bytes, origin.urls(version.manifest))
    # Corrupt the liar's copies on disk behind its back, keeping size and mtime, so its
    # store cannot notice and it serves wrong bytes under the right hash.
    for shard in version.manifest.shards:
        path = liar.store.path_for(shard.sha256, shard.size)
        assert path is not None
        stat = path.stat()
        path.write_bytes(os.urandom(shard.size))
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    before = origin.total

    victim = await network("victim", bootstrap=(liar.addrs[0],))
    await wait_connected(victim, 1)
    sources = await victim.prefetch(version.manifest_bytes, origin.urls(version.manifest))

    assert victim.stats.peers_rejected == 1  # caught on the first shard, never asked again
    assert victim.stats.shards_from_peers == 0 and victim.stats.shards_from_origin == 3
    assert origin.total - before == 3 * SHARD_BYTES
    for shard in version.manifest.shards:
        assert sha256_file(Path(sources[shard.name][0])) == shard.sha256
    first = version.manifest.shards[0]
    assert await victim.fetch_shard(first.sha256, first.size) is None  # liar not asked again


@pytest.mark.slow
async def test_mdns_finds_a_peer_without_bootstrap(network: Callable[..., Any]) -> None:
    a = await network("a", mdns=True, listen_addrs=("/ip4/0.0.0.0/tcp/0",))
    b = await network("b", mdns=True, listen_addrs=("/ip4/0.0.0.0/tcp/0",))
    assert not any("/ip4/0.0.0.0/" in addr for addr in a.addrs)  # dialable addresses only
    await wait_connected(a, 1, timeout=30)
    assert b.peer_id in await a.connected_peers()
