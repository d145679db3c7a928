"""Origin egress for one new policy version delivered to N workers, without and with peers.

What is measured. The trainer publishes one full version (safetensors shards of random
float32 tensors, signed manifest). A real HTTP origin on loopback (ThreadingHTTPServer,
standing in for the coordinator or S3) serves the shards and counts every payload byte it
sends. Each of N workers (default 8) takes the version with its own `PolicyWeights`,
which verifies the signature, every shard's hash, and decodes the tensors:

* **origin only**: every worker downloads every shard from the origin
  (`PolicyWeights.apply` with the origin URLs), all workers at once;
* **with peers**: every worker runs a real `PeerNetwork` (py-libp2p host in its own
  trio thread, TCP + noise + yamux on loopback, all in this process), bootstrapped from
  the workers started before it. One worker learns of the version (as if from its
  coordinator poll) and announces it on the run's gossipsub topic; every worker, on the
  verified announcement, calls `PeerNetwork.prefetch` (peers first, the origin only for
  shards no peer has or is fetching) and then `PolicyWeights.apply` with the sources it
  returns, exactly the lines the worker's loop uses.

Figures per mode: bytes sent by the origin, in copies of the version; wall time from the
first worker hearing of the version until all hold it; bytes passed between peers. The
ratio origin-only ÷ with-peers is the figure of merit (target ≥ 3×). Both modes run in
one process, one after the other, on the same version.

Run: .venv/bin/python bench/worker_egress.py [--workers 8] [--shards 4] [--shard-mib 2]
The last line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from coderepair.protocol.identity import Identity
from coderepair.protocol.manifest import PolicyManifest, build_manifest_for_dir, sign_manifest
from coderepair.worker.p2p import PeerConfig, PeerNetwork
from coderepair.worker.weights import PolicyWeights, WeightsConfig

RUN = "egress-bench"


@dataclass
class Version:
    trainer: Identity
    directory: Path
    manifest: PolicyManifest
    manifest_bytes: bytes

    @property
    def size(self) -> int:
        return sum(s.size for s in self.manifest.shards)


@dataclass
class Origin:
    url: str = ""
    sent: int = 0
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def urls(self, manifest: PolicyManifest) -> dict[str, list[str]]:
        return {s.name: [f"{self.url}/{s.name}"] for s in manifest.shards}

    def reset(self) -> None:
        with self.lock:
            self.sent = self.requests = 0


def publish(root: Path, shards: int, shard_mib: float) -> Version:
    directory = root / "v1"
    directory.mkdir(parents=True)
    elements = int(shard_mib * (1 << 20)) // 4
    generator = torch.Generator().manual_seed(0)
    for i in range(shards):
        tensor = torch.randn(elements, generator=generator)
        save_file({f"layer{i}.weight": tensor}, str(directory / f"model-{i:03d}.safetensors"))
    trainer = Identity.generate()
    manifest = build_manifest_for_dir(
        directory,
        run_id=RUN,
        version=1,
        base_model="coderepair/bench",
        tokenizer_sha256="0" * 64,
        kind="full",
        trainer_key=trainer.public_key,
    )
    return Version(trainer, directory, manifest, sign_manifest(manifest, trainer).to_bytes())


@contextmanager
def serve_origin(version: Version) -> Iterator[Origin]:
    origin = Origin()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = version.directory / self.path.lstrip("/")
            if not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            with origin.lock:
                origin.sent += len(data)
                origin.requests += 1

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    origin.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield origin
    finally:
        httpd.shutdown()
        httpd.server_close()


def new_weights(version: Version, cache: Path) -> PolicyWeights:
    return PolicyWeights(WeightsConfig(trainer_key=version.trainer.public_key_hex, cache_dir=cache))


async def origin_only(version: Version, origin: Origin, workers: int, root: Path) -> dict[str, Any]:
    origin.reset()
    holders = [new_weights(version, root / f"plain-{i}") for i in range(workers)]
    started = time.perf_counter()
    await asyncio.gather(
        *(
            asyncio.to_thread(w.apply, version.manifest_bytes, origin.urls(version.manifest))
            for w in holders
        )
    )
    seconds = time.perf_counter() - started
    assert all(w.held is not None and w.held.version == 1 for w in holders)
    return {"origin_bytes": origin.sent, "origin_requests": origin.requests, "seconds": seconds}


async def with_peers(
    version: Version, origin: Origin, workers: int, root: Path, claim_wait_s: float
) -> dict[str, Any]:
    origin.reset()
    nets: list[PeerNetwork] = []
    try:
        for i in range(workers):
            config = PeerConfig(
                run_id=RUN,
                trainer_key=version.trainer.public_key_hex,
                store_dir=root / f"peer-{i}" / "store",
                listen_addrs=("/ip4/127.0.0.1/tcp/0",),
                bootstrap=tuple(n.addrs[0] for n in nets),
                mdns=False,
                claim_wait_s=claim_wait_s,
            )
            net = PeerNetwork(config)
            await net.start()
            nets.append(net)
        async with asyncio.timeout(60):
            for net in nets:
                while len(await net.connected_peers()) < workers - 1:
                    await asyncio.sleep(0.1)
        await asyncio.sleep(2.5)  # gossipsub heartbeats: meshes form

        holders = [new_weights(version, root / f"peer-{i}" / "weights") for i in range(workers)]
        done: list[asyncio.Future[float]] = [
            asyncio.get_running_loop().create_future() for _ in nets
        ]

        async def take(i: int, manifest_bytes: bytes) -> None:
            sources = await nets[i].prefetch(manifest_bytes, origin.urls(version.manifest))
            await asyncio.to_thread(holders[i].apply, manifest_bytes, sources)
            done[i].set_result(time.perf_counter())

        def listener(i: int) -> Callable[[bytes, PolicyManifest], Awaitable[None]]:
            return lambda data, _manifest: take(i, data)

        for i, net in enumerate(nets[1:], start=1):
            net.on_manifest(listener(i))
        started = time.perf_counter()
        # Worker 0 heard of the version from its coordinator: it tells the others.
        await nets[0].announce(version.manifest_bytes)
        await take(0, version.manifest_bytes)
        async with asyncio.timeout(300):
            finished = await asyncio.gather(*done)
        seconds = max(finished) - started
        assert all(w.held is not None and w.held.version == 1 for w in holders)
        return {
            "origin_bytes": origin.sent,
            "origin_requests": origin.requests,
            "seconds": seconds,
            "peer_bytes": sum(n.stats.bytes_from_peers for n in nets),
            "served_bytes": sum(n.stats.bytes_served for n in nets),
            "announcements_received": sum(n.stats.announcements_received for n in nets),
        }
    finally:
        await asyncio.gather(*(n.shutdown() for n in nets))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--shard-mib", type=float, default=2.0)
    parser.add_argument(
        "--claim-wait-s", type=float, default=3.0, help="PeerConfig.claim_wait_s of every worker"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="egress-") as tmp:
        root = Path(tmp)
        version = publish(root / "published", args.shards, args.shard_mib)
        with serve_origin(version) as origin:
            plain = await origin_only(version, origin, args.workers, root)
            peers = await with_peers(version, origin, args.workers, root, args.claim_wait_s)
    size = version.size
    ratio = plain["origin_bytes"] / max(1, peers["origin_bytes"])
    print(f"one version ({args.shards} shards, {size / 2**20:.1f} MiB) to {args.workers} workers")
    print(f"{'mode':<14}{'origin MiB':>12}{'copies':>8}{'requests':>10}{'seconds':>9}")
    for name, row in (("origin only", plain), ("with peers", peers)):
        print(
            f"{name:<14}{row['origin_bytes'] / 2**20:>12.1f}{row['origin_bytes'] / size:>8.2f}"
            f"{row['origin_requests']:>10}{row['seconds']:>9.2f}"
        )
    print(
        f"peers passed {peers['peer_bytes'] / 2**20:.1f} MiB among themselves; origin egress "
        f"{ratio:.1f}× lower with peers (target ≥ 3×)"
    )
    print(
        json.dumps(
            {
                "bench": "worker_egress",
                "workers": args.workers,
                "shards": args.shards,
                "version_bytes": size,
                "claim_wait_s": args.claim_wait_s,
                "origin_only": plain,
                "with_peers": peers,
                "origin_egress_ratio": round(ratio, 3),
                "target_ratio": 3.0,
                "meets_target": ratio >= 3.0,
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
