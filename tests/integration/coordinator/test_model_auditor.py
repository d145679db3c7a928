"""The model auditor end to end: a real tiny model, real proofs, the real sandbox.

Service test: a coordinator over real gRPC with ``audit.kinds = [proof, sampling,
reward]`` and ``audit.policy_dir`` (so the model auditor is the default). The trainer
publishes version 1 (weights other than the base model's, so the auditor must load the
published shards); three workers generate with the tiny model (`HFEngine`, the worker's
own code): an honest one, one that changes one token of a completion, one that claims a
reward its completion did not earn. The honest batch passes all three audits; the
other two are voided, and the worker sees why.

Reward test: the `ModelAuditor` alone on completions that are real patches (the task's
oracle fix), re-run in the coordinator's sandbox: a correct claim passes, a wrong one
fails with the re-run's terms.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from service_support import BASE_MODEL, TOKENIZER_SHA, Clients, Keys, make_config, submit_payload

from coderepair.coordinator.service.audit import AuditRequest
from coderepair.coordinator.service.auditor import ModelAuditor, PolicyLoader, PolicySource
from coderepair.coordinator.service.scheduler import PooledTask, PromptEncoder
from coderepair.coordinator.service.server import Coordinator
from coderepair.coordinator.storage import audits, batches
from coderepair.coordinator.storage.models import AuditKind, AuditState, BatchState
from coderepair.coordinator.tasks.repo import load_fixtures
from coderepair.coordinator.tasks.sandboxes import open_sandbox
from coderepair.protocol.identity import Identity
from coderepair.protocol.manifest import build_manifest_for_dir, sign_manifest
from coderepair.protocol.patch import edits_between, render_edits
from coderepair.protocol.reward import RewardSpec
from coderepair.protocol.rollout import RolloutRecord
from coderepair.v1 import common_pb2
from coderepair.worker.engines.base import GenerationRequest, SamplingParams
from coderepair.worker.engines.hf import HFEngine
from coderepair.worker.models import build_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: oversubscription makes torch crawl
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The base model (seed 0), and version 1 (seed 1) as a published shard folder."""
    root = tmp_path_factory.mktemp("tiny")
    base = build_tiny_model(root / "base", seed=0)
    v1 = build_tiny_model(root / "v1", seed=1)
    shards = root / "v1-shards"
    shards.mkdir()
    shutil.copy(v1 / "model.safetensors", shards / "model.safetensors")
    return {"base": base, "v1": v1, "shards": shards}


def _generate(engine: HFEngine, lease: common_pb2.Lease) -> list[common_pb2.RolloutSample]:
    """What an honest worker submits: the engine's tokens, proofs and logprobs; the
    tiny model writes no patch, so every sample is malformed and scored as such."""
    spec = RewardSpec.from_json(lease.reward_spec_json)
    requests = [
        GenerationRequest(
            prompt_ids=tuple(task.prompt_token_ids),
            seeds=tuple(task.seeds),
            sample_indices=tuple(range(lease.group_size)),
            params=SamplingParams(
                temperature=lease.sampling.temperature,
                max_new_tokens=lease.sampling.max_new_tokens,
            ),
        )
        for task in lease.tasks
    ]
    samples = []
    for g in engine.generate(requests):
        task = lease.tasks[g.request_index]
        samples.append(
            common_pb2.RolloutSample(
                task_id=task.task_id,
                sample_index=g.sample_index,
                seed=g.seed,
                prompt_token_ids=task.prompt_token_ids,
                completion_token_ids=g.completion_ids,
                behaviour_logprobs=g.logprobs,
                completion_text=g.text,
                patch="",
                reward=spec.malformed_reward,
                reward_components={"malformed": spec.malformed_reward},
                test_log_sha256="0" * 64,
                proof=b"".join(g.proofs),
                finish_reason=common_pb2.FINISH_REASON_STOP
                if g.finish_reason == "stop"
                else common_pb2.FINISH_REASON_LENGTH,
                timings=common_pb2.SampleTimings(generate_ms=1, reward_ms=1, proof_ms=1),
            )
        )
    return samples


async def _audits_done(coordinator: Coordinator, batch_ids: list[str]) -> dict[str, Any]:
    ctx = coordinator.context
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        jobs = {b: await ctx.call(audits.list_audit_jobs, ctx.db, batch_id=b) for b in batch_ids}
        finished = (AuditState.PASSED, AuditState.FAILED)
        if all(
            any(j.state is AuditState.FAILED for j in js) or all(j.state in finished for j in js)
            for js in jobs.values()
        ):
            return jobs
        await asyncio.sleep(0.2)
    raise AssertionError(f"audits not finished in time: {jobs}")


async def test_honest_batch_passes_and_forgeries_are_voided(
    tmp_path: Path, assets: dict[str, Path], keys: Keys, tiny: dict[str, Path]
) -> None:
    config = make_config(
        tmp_path,
        assets,
        keys,
        run={"tokenizer_path": str(tiny["base"]), "max_new_tokens": 12, "max_tasks_per_lease": 1},
        audit={
            "kinds": ["proof", "sampling", "reward"],
            "policy_dir": str(tiny["base"]),
            "window_s": 600.0,
            "model_threads": 1,
            "weights_cache_dir": str(tmp_path / "weights"),
        },
        server={"sweep_interval_s": 0.2},
    )
    assert config.audit.resolved_auditor() == "model"
    engine = HFEngine(num_threads=1)
    engine.load(tiny["v1"])
    async with Coordinator(config, seed=0) as coordinator:
        clients = Clients(coordinator.address)
        try:
            published = await clients.publish(keys.trainer, tiny["shards"])
            assert published.accepted, published.rejection.message
            honest, token_cheat, reward_cheat = keys.workers
            batch_ids: dict[str, str] = {}
            for name, worker in (
                ("honest", honest),
                ("token", token_cheat),
                ("reward", reward_cheat),
            ):
                await clients.register(worker)
                lease = (await clients.lease(worker)).lease
                samples = await asyncio.to_thread(_generate, engine, lease)
                if name == "token":
                    first = samples[0]
                    ids = list(first.completion_token_ids)
                    ids[len(ids) // 2] = (ids[len(ids) // 2] + 7) % 200 + 3
                    del first.completion_token_ids[:]
                    first.completion_token_ids.extend(ids)
                    first.completion_text = engine.tokenizer.decode(ids, skip_special_tokens=True)
                if name == "reward":
                    for sample in samples:
                        sample.reward = 1.0
                        sample.reward_components.clear()
                        sample.reward_components["pass"] = 1.0
                        sample.patch = "### a.py\n<<<<<<< SEARCH\nx\n=======\ny\n>>>>>>> REPLACE\n"
                answer = await clients.submit(worker, submit_payload(lease, samples))
                assert answer.accepted and answer.audit_pending, answer.rejection.message
                batch_ids[name] = answer.batch_id

            jobs = await _audits_done(coordinator, list(batch_ids.values()))
            ctx = coordinator.context
            honest_jobs = jobs[batch_ids["honest"]]
            assert {j.kind for j in honest_jobs} == set(AuditKind)
            assert all(j.state is AuditState.PASSED for j in honest_jobs), [
                (j.kind, j.detail) for j in honest_jobs
            ]
            assert "reproduced" in " ".join(j.detail for j in honest_jobs)
            honest_batch = await ctx.call(batches.get_batch, ctx.db, batch_ids["honest"])
            assert honest_batch is not None and honest_batch.state is BatchState.PENDING_AUDIT

            token_batch = await ctx.call(batches.get_batch, ctx.db, batch_ids["token"])
            assert token_batch is not None and token_batch.state is BatchState.VOIDED
            assert token_batch.rejection_reason in ("AUDIT_PROOF", "AUDIT_SAMPLING")
            failed = [j for j in jobs[batch_ids["token"]] if j.state is AuditState.FAILED]
            assert failed and failed[0].kind in (AuditKind.PROOF, AuditKind.SAMPLING)

            reward_batch = await ctx.call(batches.get_batch, ctx.db, batch_ids["reward"])
            assert reward_batch is not None and reward_batch.state is BatchState.VOIDED
            assert reward_batch.rejection_reason == "AUDIT_REWARD"
            assert "claimed reward 1.0" in (reward_batch.rejection_message or "")

            # The auditor's verdicts are on the coordinator's own metrics.
            voided = coordinator.registry.get_sample_value(
                "coderepair_batches_voided_total", {"reason": "AUDIT_REWARD"}
            )
            assert voided == 1.0
            passed = coordinator.registry.get_sample_value(
                "coderepair_audit_verdicts_total", {"kind": "proof", "verdict": "passed"}
            )
            assert passed is not None and passed >= 1.0
        finally:
            await clients.close()


# ---------------------------------------------------------------- reward re-runs


def _record(task_id: str, prompt: tuple[int, ...], ids: list[int], text: str, **claim: Any) -> Any:
    return RolloutRecord(
        task_id=task_id,
        lease_id="lease-1",
        run_id="r1",
        worker_key="ab" * 32,
        policy_version=1,
        sample_index=0,
        seed=1,
        prompt_ids=list(prompt),
        completion_ids=ids,
        behaviour_logprobs=[-0.5] * len(ids),
        completion_text=text,
        patch="patch",
        reward=claim["reward"],
        reward_components=claim["components"],
        reward_spec_hash="0" * 64,
        test_log_sha256="0" * 64,
        proof=b"",
        timings={},
        created_at_ms=1,
    )


@pytest.mark.docker
def test_reward_rerun_in_the_sandbox_confirms_or_refutes_the_claim(
    tmp_path: Path, tiny: dict[str, Path]
) -> None:
    trainer = Identity.create(tmp_path / "trainer.pem")
    manifest = build_manifest_for_dir(
        tiny["shards"],
        run_id="r1",
        version=1,
        base_model=BASE_MODEL,
        tokenizer_sha256=TOKENIZER_SHA,
        kind="full",
        trainer_key=trainer.public_key,
    )
    source = PolicySource(
        1,
        sign_manifest(manifest, trainer).to_bytes(),
        {"model.safetensors": [(tiny["shards"] / "model.safetensors").as_uri()]},
    )
    loader = PolicyLoader(
        tiny["base"],
        lambda run_id, version: [source],
        {"r1": trainer.public_key_hex},
        tmp_path / "weights",
        num_threads=1,
    )
    auditor = ModelAuditor(loader, lambda: open_sandbox("docker", workers=1), sandbox_workers=1)
    task = next(t for t in load_fixtures() if t.split == "train")
    encoder = PromptEncoder(tiny["base"])
    _, prompt = encoder.encode(task)
    pooled = PooledTask(task.task_id, "", prompt, task.to_json_line().encode())
    text = render_edits(edits_between(task.files, task.oracle), think="fix the bug")
    tokenizer = loader.validator("r1", 1).engine.tokenizer
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text

    def audit(record: RolloutRecord) -> Any:
        return auditor(
            AuditRequest(
                job_id="job",
                kind=AuditKind.REWARD,
                batch_id=f"batch-{record.reward}",
                worker_id="w",
                run_id="r1",
                policy_version=1,
                reward_spec=RewardSpec(),
                records=[record],
                tasks={task.task_id: pooled},
            )
        )

    try:
        honest = audit(
            _record(task.task_id, prompt, ids, text, reward=1.0, components={"pass": 1.0})
        )
        assert honest.verdict == "passed", honest.detail
        spec = RewardSpec()
        lie = audit(
            _record(
                task.task_id,
                prompt,
                ids,
                text,
                reward=spec.fail_reward,
                components={"fail": spec.fail_reward},
            )
        )
        assert lie.verdict == "failed" and "pass=1" in lie.detail, lie.detail
    finally:
        auditor.close()
