"""A coordinator world for service tests: tokenizer, task set, keys, config, clients.

Everything is real: a Hugging Face tokenizer (byte-level, built here without training
so it takes milliseconds), the bundled repository fixture tasks, Ed25519 key files
(mode 0600) from `coderepair.protocol.identity`, a signed policy manifest over a real
shard file, and gRPC over loopback. The samples a "worker" submits are made by
`make_samples` from the lease (no model runs in these tests): what is tested is the
coordinator's handling of them, and the values satisfy every structural rule.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from coderepair.coordinator.config import CoordinatorConfig, load_config
from coderepair.protocol import rpc
from coderepair.protocol.identity import Identity
from coderepair.protocol.manifest import build_manifest_for_dir, sign_manifest
from coderepair.protocol.proofs import proof_size
from coderepair.protocol.task import TaskSet, write_taskset
from coderepair.v1 import (
    admin_pb2_grpc,
    common_pb2,
    trainer_pb2,
    trainer_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)

TOKENIZER_SHA = "c" * 64
BASE_MODEL = "tiny-test-model"


def build_byte_tokenizer(out: Path) -> Path:
    """A byte-level BPE tokenizer with no merges (nothing to train) and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from coderepair.worker.models import CHAT_TEMPLATE

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate([*specials, *sorted(alphabet)])}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def service_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tokenizer directory, task-set file and one policy shard, shared by the session."""
    from coderepair.coordinator.tasks.repo import load_fixtures

    root = tmp_path_factory.mktemp("coordinator-assets")
    tokenizer = build_byte_tokenizer(root / "tokenizer")
    tasks = load_fixtures()
    taskset = TaskSet.from_tasks(tasks, builder_version="test", split_rule="fixtures")
    tasks_path = root / "tasks.jsonl"
    write_taskset(taskset, tasks_path)
    shards = root / "policy-v1"
    shards.mkdir()
    (shards / "model.safetensors").write_bytes(b"weights of version 1")
    return {"tokenizer": tokenizer, "tasks": tasks_path, "shards": shards}


@dataclass
class Keys:
    """Key files (0600) of the parties."""

    trainer: Identity
    admin: Identity
    workers: list[Identity] = field(default_factory=list)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    directory = tmp_path / "keys"
    made = Keys(
        trainer=Identity.create(directory / "trainer.pem"),
        admin=Identity.create(directory / "admin.pem"),
        workers=[Identity.create(directory / f"worker{i}.pem") for i in range(3)],
    )
    for path in directory.iterdir():
        assert path.stat().st_mode & 0o077 == 0
    return made


def make_config(
    tmp_path: Path,
    assets: dict[str, Path],
    keys: Keys,
    *,
    database_url: str | None = None,
    run: dict[str, Any] | None = None,
    audit: dict[str, Any] | None = None,
    object_store: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
) -> CoordinatorConfig:
    """A config for one run "r1" (group size 2) over the fixture tasks, port 0."""
    overrides: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:0", "sweep_interval_s": 0.2, **(server or {})},
        "database": {"url": database_url or f"sqlite:///{tmp_path / 'coordinator.db'}"},
        "object_store": object_store or {"kind": "local", "path": str(tmp_path / "objects")},
        "audit": {"window_s": 0.0, "poll_s": 0.05, **(audit or {})},
        "admin": {"public_keys": [keys.admin.public_key_hex]},
        # Port 0: parallel test coordinators must not collide on the default 9464.
        "dashboard": {"port": 0},
        "runs": [
            {
                "run_id": "r1",
                "trainer_public_key": keys.trainer.public_key_hex,
                "base_model_id": BASE_MODEL,
                "tokenizer_path": str(assets["tokenizer"]),
                "tokenizer_sha256": TOKENIZER_SHA,
                "tasks_path": str(assets["tasks"]),
                "group_size": 2,
                "max_policy_lag": 1,
                "max_new_tokens": 64,
                "max_tasks_per_lease": 2,
                **(run or {}),
            }
        ],
    }
    return load_config(None, overrides)


def signed(identity: Identity, method: str, payload: Any) -> bytes:
    """Envelope bytes of ``payload`` for the signed RPC at ``method``."""
    purpose = rpc.SIGNED_RPCS[method].purpose
    return identity.sign(purpose, payload.SerializeToString()).to_bytes()


W = f"/{rpc.WORKER_SERVICE}/"
T = f"/{rpc.TRAINER_SERVICE}/"
A = f"/{rpc.ADMIN_SERVICE}/"


class Clients:
    """Stubs of the three services on one loopback channel."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(address, options=rpc.channel_options())
        self.worker = worker_pb2_grpc.WorkerServiceStub(self.channel)
        self.trainer = trainer_pb2_grpc.TrainerServiceStub(self.channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def register(self, identity: Identity) -> worker_pb2.RegisterResponse:
        payload = worker_pb2.RegisterPayload(
            display_name="test worker",
            client_version="0.1.0",
            capabilities=common_pb2.WorkerCapabilities(engine="hf", max_concurrent_samples=4),
        )
        return await self.worker.Register(
            worker_pb2.RegisterRequest(envelope=signed(identity, W + "Register", payload))
        )

    async def lease(self, identity: Identity, max_tasks: int = 1) -> worker_pb2.LeaseTasksResponse:
        payload = worker_pb2.LeasePayload(run_id="r1", max_tasks=max_tasks)
        return await self.worker.LeaseTasks(
            worker_pb2.LeaseTasksRequest(envelope=signed(identity, W + "LeaseTasks", payload))
        )

    async def submit(
        self, identity: Identity, payload: worker_pb2.SubmitPayload
    ) -> worker_pb2.SubmitRolloutsResponse:
        return await self.worker.SubmitRollouts(
            worker_pb2.SubmitRolloutsRequest(
                envelope=signed(identity, W + "SubmitRollouts", payload)
            )
        )

    async def publish(
        self, trainer: Identity, shards: Path, version: int = 1
    ) -> trainer_pb2.PublishPolicyResponse:
        manifest = build_manifest_for_dir(
            shards,
            run_id="r1",
            version=version,
            base_model=BASE_MODEL,
            tokenizer_sha256=TOKENIZER_SHA,
            kind="full",
            trainer_key=trainer.public_key,
        )
        signed_manifest = sign_manifest(manifest, trainer)
        payload = trainer_pb2.PublishPayload(
            run_id="r1",
            version=version,
            manifest_json=signed_manifest.to_bytes(),
            shards=[
                common_pb2.ShardLocation(
                    name=s.name,
                    urls=[(shards / s.name).as_uri()],
                    size_bytes=s.size,
                    sha256=s.sha256,
                )
                for s in manifest.shards
            ],
            trainer_step=version,
        )
        return await self.trainer.PublishPolicy(
            trainer_pb2.PublishPolicyRequest(envelope=signed(trainer, T + "PublishPolicy", payload))
        )

    async def stream(
        self, trainer: Identity, after: int = 0, follow: bool = False
    ) -> list[trainer_pb2.RolloutRow]:
        payload = trainer_pb2.StreamPayload(run_id="r1", after_cursor=after, follow=follow)
        call = self.trainer.StreamRollouts(
            trainer_pb2.StreamRolloutsRequest(
                envelope=signed(trainer, T + "StreamRollouts", payload)
            )
        )
        return [row async for row in call]


def make_samples(
    lease: common_pb2.Lease, *, salt: str = "", n_tokens: int = 5
) -> list[common_pb2.RolloutSample]:
    """Structurally valid samples for every task and index of ``lease``: well-formed
    patches that apply but fail (reward 0 under the default spec)."""
    samples = []
    for task in lease.tasks:
        for index in range(lease.group_size):
            digest = hashlib.sha256(f"{lease.lease_id}/{task.task_id}/{index}/{salt}".encode())
            ids = [b % 200 + 3 for b in digest.digest()[:n_tokens]]
            chunks = 1 + math.ceil(n_tokens / 32)
            samples.append(
                common_pb2.RolloutSample(
                    task_id=task.task_id,
                    sample_index=index,
                    seed=task.seeds[index],
                    prompt_token_ids=task.prompt_token_ids,
                    completion_token_ids=ids,
                    behaviour_logprobs=[-0.5] * n_tokens,
                    completion_text="<solution>...</solution>",
                    patch="### a.py\n<<<<<<< SEARCH\nx\n=======\ny\n>>>>>>> REPLACE\n",
                    reward=0.0,
                    reward_components={"fail": 0.0},
                    test_log_sha256=digest.hexdigest(),
                    proof=bytes(proof_size() * chunks),
                    finish_reason=common_pb2.FINISH_REASON_STOP,
                    timings=common_pb2.SampleTimings(generate_ms=10, reward_ms=20, proof_ms=1),
                )
            )
    return samples


def submit_payload(
    lease: common_pb2.Lease, samples: list[common_pb2.RolloutSample], key: str | None = None
) -> worker_pb2.SubmitPayload:
    return worker_pb2.SubmitPayload(
        lease_id=lease.lease_id,
        idempotency_key=key or uuid.uuid4().hex,
        policy_version=lease.policy_version,
        samples=samples,
    )


@pytest.fixture
def assets(service_assets: dict[str, Path]) -> Iterator[dict[str, Path]]:
    yield service_assets
