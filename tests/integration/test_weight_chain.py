"""The weight path end to end: real training steps on the tiny model, published as signed
full checkpoints and sparse deltas, taken by a worker from a directory, a real loopback
HTTP server (with resumed and corrupted downloads) and presigned S3 URLs (moto server),
and applied to the real HF engine.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from coderepair.coordinator.storage.objects import S3ObjectStore
from coderepair.protocol.identity import Identity
from coderepair.protocol.manifest import ShardHashMismatch
from coderepair.trainer.publish import (
    LocalDirectorySink,
    PublishedVersion,
    Publisher,
    PublisherConfig,
    snapshot,
    tokenizer_sha256,
)
from coderepair.worker.engines.base import GenerationRequest, SamplingParams
from coderepair.worker.engines.hf import HFEngine
from coderepair.worker.models import build_tiny_model
from coderepair.worker.weights import FetchConfig, PolicyWeights, ShardFetchError, WeightsConfig

STEPS = 20
TEXT = "def add(a, b):\n    return a + b\n\ndef fib(n):\n    return n if n < 2 else fib(n - 1)\n"


@dataclass
class TrainedRun:
    model_dir: Path
    trainer: Identity
    chain_root: Path  # full every 10 versions, deltas in between
    full_root: Path  # every version full: the reference
    chain: list[PublishedVersion]
    full: list[PublishedVersion]
    states: list[dict[str, torch.Tensor]]  # what the trainer held at each version
    final_dir: Path  # the trained model saved with save_pretrained


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    root = tmp_path_factory.mktemp("weights")
    model_dir = build_tiny_model(root / "tiny")
    trainer = Identity.generate()
    common = {
        "run_id": "chain-test",
        "base_model": "coderepair/tiny",
        "tokenizer_sha256": tokenizer_sha256(model_dir),
        "shard_size_bytes": 256 * 1024,  # several shards per full checkpoint
        # As trained (fp32): the chain is then checked against the trainer's own tensors.
        "publish_dtype": "keep",
    }
    chain_pub = Publisher(
        PublisherConfig.model_validate({**common, "full_every": 10}),
        trainer,
        LocalDirectorySink(root / "chain"),
    )
    full_pub = Publisher(
        PublisherConfig.model_validate({**common, "full_every": 1}),
        trainer,
        LocalDirectorySink(root / "full"),
    )
    torch.manual_seed(0)
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    chain, full, states = [], [], []
    for version in range(STEPS + 1):
        if version:  # one real optimizer step per version
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        chain.append(chain_pub.publish(model.state_dict(), version))
        full.append(full_pub.publish(model.state_dict(), version))
        states.append(snapshot(model.state_dict()))
    final_dir = root / "final"
    model.save_pretrained(final_dir)
    tokenizer.save_pretrained(final_dir)
    return TrainedRun(
        model_dir, trainer, root / "chain", root / "full", chain, full, states, final_dir
    )


def weights_for(run: TrainedRun, cache: Path, **fetch: Any) -> PolicyWeights:
    config = WeightsConfig(
        trainer_key=run.trainer.public_key_hex,
        cache_dir=cache,
        fetch=FetchConfig(backoff_s=0.0, timeout_s=10.0, chunk_bytes=16 * 1024, **fetch),
    )
    return PolicyWeights(config)


def assert_bit_identical(held: Any, reference: dict[str, torch.Tensor]) -> None:
    assert sorted(held) == sorted(reference)
    for name, tensor in reference.items():
        assert held[name].dtype == tensor.dtype, name
        assert torch.equal(held[name], tensor), name


def test_delta_chain_is_bit_identical_to_full_checkpoints(run: TrainedRun, tmp_path: Path) -> None:
    kinds = [p.kind for p in run.chain]
    assert kinds == ["full"] + ["delta"] * 9 + ["full"] + ["delta"] * 9 + ["full"]
    follower = weights_for(run, tmp_path / "follower")
    for version in range(STEPS + 1):
        update = follower.apply_dir(run.chain_root / run.chain[version].prefix)
        assert update.kind == kinds[version]
        # A fresh worker taking the all-full publisher's checkpoint of the same version.
        reference = weights_for(run, tmp_path / f"ref{version}")
        reference.apply_dir(run.full_root / run.full[version].prefix)
        assert_bit_identical(follower.state_dict, dict(reference.state_dict))
        assert_bit_identical(follower.state_dict, run.states[version])
    # Real AdamW steps at lr 1e-3 move (nearly) every fp32 weight, so these deltas are
    # not sparse; bench/weights.py measures what makes them so.
    assert all(p.changed_elements > 0 for p in run.chain[1:])


def greedy(engine: HFEngine, prompt: list[int]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    request = GenerationRequest(
        prompt_ids=tuple(prompt), seeds=(1,), sample_indices=(0,), params=params
    )
    (generation,) = engine.generate([request])
    return generation.completion_ids, generation.logprobs


def test_engine_generates_as_the_trained_model_after_applying_the_chain(
    run: TrainedRun, tmp_path: Path
) -> None:
    engine = HFEngine(max_batch=1)
    engine.load(run.model_dir)
    prompt = engine.tokenizer("def fib(n):\n").input_ids
    before = greedy(engine, prompt)
    follower = weights_for(run, tmp_path)
    for version in range(STEPS + 1):
        update = follower.apply_dir(run.chain_root / run.chain[version].prefix)
        engine.apply_weights(update.tensors)
    after = greedy(engine, prompt)
    trained = HFEngine(max_batch=1)
    trained.load(run.final_dir)
    assert after == greedy(trained, prompt)
    assert after[0] != before[0]


# ---------------------------------------------------------------- HTTP


@dataclass
class Server:
    root: Path
    url: str
    ranges: list[tuple[str, str | None]] = field(default_factory=list)
    cut_once: set[str] = field(default_factory=set)
    corrupt: set[str] = field(default_factory=set)
    fail_status: dict[str, int] = field(default_factory=dict)


def make_handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        """Serves files with single-range support, and misbehaves on request."""

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path.lstrip("/")
            header = self.headers.get("Range")
            server.ranges.append((path, header))
            if path in server.fail_status:
                self.send_error(server.fail_status[path])
                return
            file = server.root / path
            if not file.is_file():
                self.send_error(404)
                return
            data = bytearray(file.read_bytes())
            if path in server.corrupt:
                data[len(data) // 2] ^= 0xFF
            start = int(header.removeprefix("bytes=").split("-")[0]) if header else 0
            body = bytes(data[start:])
            self.send_response(206 if header else 200)
            if header:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if path in server.cut_once:
                server.cut_once.discard(path)
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


@pytest.fixture
def http_server(run: TrainedRun) -> Iterator[Server]:
    state = Server(root=run.chain_root, url="")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_http_fetch_resumes_and_refuses_corrupt_shards(
    run: TrainedRun, http_server: Server, tmp_path: Path
) -> None:
    follower = weights_for(run, tmp_path)
    v0, v1 = run.chain[0], run.chain[1]
    # A download interrupted by an earlier run: the first half of v0's first shard.
    first = v0.manifest.shards[0]
    partial = tmp_path / "partial" / f"{first.sha256}.part"
    partial.parent.mkdir(parents=True)
    have = first.size // 2
    partial.write_bytes((run.chain_root / v0.prefix / first.name).read_bytes()[:have])
    # v1's shard is cut off half-way the first time it is served.
    cut = f"{v1.prefix}/{v1.manifest.shards[0].name}"
    http_server.cut_once.add(cut)
    for version in range(4):
        follower.apply(
            run.chain[version].manifest_bytes, f"{http_server.url}/{run.chain[version].prefix}"
        )
    assert_bit_identical(follower.state_dict, run.states[3])
    assert (f"{v0.prefix}/{first.name}", f"bytes={have}-") in http_server.ranges
    cut_requests = [r for p, r in http_server.ranges if p == cut]
    assert len(cut_requests) == 2 and cut_requests[0] is None
    assert cut_requests[1] is not None and cut_requests[1].startswith("bytes=")
    assert not list((tmp_path / "partial").iterdir())  # verified downloads are cleaned up

    v4 = run.chain[4]
    http_server.corrupt.add(f"{v4.prefix}/{v4.manifest.shards[0].name}")
    with pytest.raises(ShardHashMismatch, match="corrupt or was tampered with"):
        follower.apply(v4.manifest_bytes, f"{http_server.url}/{v4.prefix}")
    assert follower.held == run.chain[3].manifest
    assert_bit_identical(follower.state_dict, run.states[3])
    # The same version from a source that serves it intact is taken.
    follower.apply(v4.manifest_bytes, run.chain_root / v4.prefix)
    assert_bit_identical(follower.state_dict, run.states[4])


def test_http_errors_are_typed(run: TrainedRun, http_server: Server, tmp_path: Path) -> None:
    follower = weights_for(run, tmp_path, max_attempts=3)
    v0 = run.chain[0]
    base = f"{http_server.url}/{v0.prefix}"
    name = v0.manifest.shards[0].name
    http_server.fail_status[f"{v0.prefix}/{name}"] = 403
    with pytest.raises(ShardFetchError, match=r"HTTP 403.*expired"):
        follower.apply(v0.manifest_bytes, base)
    http_server.fail_status[f"{v0.prefix}/{name}"] = 503
    with pytest.raises(ShardFetchError, match="in 3 attempts"):
        follower.apply(v0.manifest_bytes, base)
    assert sum(p == f"{v0.prefix}/{name}" for p, _ in http_server.ranges) == 1 + 3
    assert follower.held is None


# ---------------------------------------------------------------- S3


def test_publish_to_s3_and_fetch_through_presigned_urls(
    run: TrainedRun, s3_bucket: Callable[[], tuple[Any, str]], tmp_path: Path
) -> None:
    client, bucket = s3_bucket()
    store = S3ObjectStore(bucket, client, prefix="policies")
    config = PublisherConfig(
        run_id="s3-run",
        base_model="coderepair/tiny",
        tokenizer_sha256="0" * 64,
        shard_size_bytes=256 * 1024,
        full_every=10,
        publish_dtype="keep",
    )
    publisher = Publisher(config, run.trainer, store)  # the coordinator's store is a sink
    follower = weights_for(run, tmp_path)
    for version in (0, 1, 2):
        published = publisher.publish(run.states[version], version)
        urls = {
            s.name: store.url(f"{published.prefix}/{s.name}", expires_s=600)
            for s in published.manifest.shards
        }
        manifest = store.get(published.manifest_key)
        follower.apply(manifest, urls)
        assert_bit_identical(follower.state_dict, run.states[version])
