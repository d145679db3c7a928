"""The dashboard inside the coordinator's lifecycle: started with it on the configured
address, serving the coordinator's own registry, stopped with it; an address that cannot
be bound (the dashboard's or the gRPC server's) is a start-up error that leaves nothing
running."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from service_support import Keys, make_config

from coderepair.coordinator.service.server import Coordinator, StartupError


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return int(answer.status), answer.read().decode()


async def test_dashboard_starts_and_stops_with_the_coordinator(
    tmp_path: Path, assets: dict[str, Path], keys: Keys
) -> None:
    config = make_config(tmp_path, assets, keys)
    config = config.model_copy(
        update={"dashboard": config.dashboard.model_copy(update={"port": 0})}
    )
    coordinator = Coordinator(config, seed=0)
    await coordinator.start()
    try:
        assert coordinator.dashboard is not None
        url = coordinator.dashboard.url
        status, _ = await asyncio.to_thread(_get, url + "/healthz")
        assert status == 200
        coordinator.metrics.record_leases(3)  # the service's registry is what /metrics serves
        _, metrics = await asyncio.to_thread(_get, url + "/metrics")
        assert "coderepair_leases_issued_total 3.0" in metrics
        assert 'coderepair_run_policy_version{run="r1"} 0.0' in metrics
    finally:
        await coordinator.shutdown()
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(_get, url + "/healthz")


async def test_a_taken_dashboard_port_is_a_startup_error(
    tmp_path: Path, assets: dict[str, Path], keys: Keys
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = make_config(tmp_path, assets, keys)
        dashboard = config.dashboard.model_copy(update={"port": port})
        coordinator = Coordinator(config.model_copy(update={"dashboard": dashboard}), seed=0)
        with pytest.raises(StartupError, match=f"port {port}"):
            await coordinator.start()
    # Nothing was left bound (the gRPC port, the database): a new coordinator on the same
    # files and a free dashboard port starts.
    free = config.model_copy(update={"dashboard": config.dashboard.model_copy(update={"port": 0})})
    async with Coordinator(free, seed=0) as again:
        assert again.dashboard is not None


async def test_a_taken_grpc_port_is_a_startup_error_unless_replicas_share_it(
    tmp_path: Path, assets: dict[str, Path], keys: Keys
) -> None:
    """gRPC sets SO_REUSEPORT by default: before `server.reuse_port` (off unless asked
    for), a second coordinator on a taken port bound it and took some of the first one's
    clients."""
    config = make_config(tmp_path, assets, keys)
    async with Coordinator(config, seed=0) as first:
        listen = f"127.0.0.1:{first.port}"
        second = Coordinator(
            config.model_copy(
                update={"server": config.server.model_copy(update={"listen": listen})}
            ),
            seed=1,
        )
        with pytest.raises(StartupError, match=f"cannot listen on {listen}"):
            await second.start()
    # Replicas of one deployment that each ask for it share the port.
    sharing = config.model_copy(
        update={"server": config.server.model_copy(update={"reuse_port": True})}
    )
    async with Coordinator(sharing, seed=0) as one:
        shared = f"127.0.0.1:{one.port}"
        replica = sharing.model_copy(
            update={"server": sharing.server.model_copy(update={"listen": shared})}
        )
        async with Coordinator(replica, seed=1) as two:
            assert two.port == one.port
