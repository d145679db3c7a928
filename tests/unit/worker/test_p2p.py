"""The parts of `PeerNetwork` that need no running host, and the designated-peer rule
(hosts on loopback are in tests/integration/worker/test_p2p_hosts.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from coderepair.protocol.identity import Identity
from coderepair.worker.p2p import PeerError, PeerNetwork, designated_peer
from coderepair.worker.p2p_config import PeerAddressError, PeerConfig


def config(tmp_path: Path, **overrides: object) -> PeerConfig:
    settings: dict[str, object] = {
        "run_id": "run-1",
        "trainer_key": Identity.generate().public_key_hex,
        "store_dir": tmp_path,
    }
    settings.update(overrides)
    return PeerConfig(**settings)


async def test_calls_before_start_raise_a_typed_error(tmp_path: Path) -> None:
    net = PeerNetwork(config(tmp_path))
    with pytest.raises(PeerError, match="start"):
        await net.fetch_shard("ab" * 32, 1)
    with pytest.raises(PeerAddressError):
        await net.connect(["/ip4/192.0.2.7/tcp/4001"])
    await net.shutdown()  # harmless when never started


async def test_prefetch_refuses_a_manifest_of_another_key(tmp_path: Path) -> None:
    from coderepair.protocol.manifest import (
        UntrustedTrainerKey,
        build_manifest_for_dir,
        sign_manifest,
    )

    other = Identity.generate()
    shards = tmp_path / "v1"
    shards.mkdir()
    (shards / "a.bin").write_bytes(b"abc")
    manifest = build_manifest_for_dir(
        shards,
        run_id="run-1",
        version=1,
        base_model="m",
        tokenizer_sha256="0" * 64,
        kind="full",
        trainer_key=other.public_key,
    )
    net = PeerNetwork(config(tmp_path / "store"))
    with pytest.raises(UntrustedTrainerKey):
        await net.prefetch(sign_manifest(manifest, other).to_bytes(), {})


def test_the_designated_peer_is_agreed_and_spreads_over_shards() -> None:
    import hashlib

    peers = [f"12D3KooPeer{i}" for i in range(8)]
    shards = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(64)]
    chosen = [designated_peer(s, peers) for s in shards]
    assert chosen == [designated_peer(s, list(reversed(peers))) for s in shards]
    assert len(set(chosen)) >= 6  # 64 shards over 8 peers: nearly all get some
    with pytest.raises(ValueError, match="at least one"):
        designated_peer(shards[0], [])


async def test_a_port_in_use_fails_start_with_the_reason(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        net = PeerNetwork(config(tmp_path, listen_addrs=[f"/ip4/127.0.0.1/tcp/{port}"], mdns=False))
        with pytest.raises(PeerError, match=r"did not start.*port is in use"):
            await net.start()
        await net.shutdown()
