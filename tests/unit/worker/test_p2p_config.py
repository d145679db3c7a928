"""`PeerConfig` validation, multiaddr checks and listen-address expansion."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from coderepair.protocol.identity import Identity
from coderepair.worker.p2p_config import (
    PeerAddressError,
    PeerConfig,
    check_multiaddr,
    expand_wildcards,
    topic_for,
)

PEER = "/ip4/192.0.2.7/tcp/4001/p2p/12D3KooWDymxcPJwhRYevzJ2pVJ7wUgmsbo5eyicY5pCUyb4uJSZ"


def config(tmp_path: Path, **overrides: object) -> PeerConfig:
    settings: dict[str, object] = {
        "run_id": "run-1",
        "trainer_key": Identity.generate().public_key_hex,
        "store_dir": tmp_path,
    }
    settings.update(overrides)
    return PeerConfig(**settings)


def test_defaults_listen_everywhere_with_mdns(tmp_path: Path) -> None:
    cfg = config(tmp_path, bootstrap=[PEER])
    assert cfg.listen_addrs == ("/ip4/0.0.0.0/tcp/0",)
    assert cfg.bootstrap == (PEER,)
    assert cfg.mdns


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("bootstrap", ["/ip4/192.0.2.7/tcp/4001"], "must end in|/p2p/<peer id>"),
        ("bootstrap", ["garbage"], "not a multiaddr"),
        ("bootstrap", ["/ip4/192.0.2.7/tcp/99999/p2p/x"], "not a multiaddr"),
        ("listen_addrs", [], "listen_addrs is empty"),
        ("listen_addrs", ["tcp:4001"], "not a multiaddr"),
        ("trainer_key", "AB" * 32, "pattern"),
        ("run_id", "", "at least 1"),
        ("claim_wait_s", -1, "greater than or equal"),
    ],
)
def test_bad_settings_say_what_to_change(
    tmp_path: Path, field: str, value: object, message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        config(tmp_path, **{field: value})


def test_wildcard_listen_addresses_become_local_ones() -> None:
    expanded = [str(a) for a in expand_wildcards(["/ip4/0.0.0.0/tcp/0", "/ip4/127.0.0.1/tcp/5"])]
    assert "/ip4/127.0.0.1/tcp/0" in expanded
    assert expanded[-1] == "/ip4/127.0.0.1/tcp/5"
    assert not any("0.0.0.0" in a for a in expanded)


def test_each_run_has_its_own_topic() -> None:
    assert topic_for("a") != topic_for("b")
    assert "a" in topic_for("a")


def test_check_multiaddr_raises_the_typed_error() -> None:
    assert check_multiaddr(PEER, need_peer_id=True) == PEER
    assert check_multiaddr("/ip4/127.0.0.1/tcp/0", need_peer_id=False)
    with pytest.raises(PeerAddressError, match="/p2p/<peer id>"):
        check_multiaddr("/ip4/127.0.0.1/tcp/1", need_peer_id=True)
