"""What each red-team strategy submits for one lease: honest work, or a cheat of it.

Every strategy runs inside a simulated worker process (`redteam_agents`) that holds the
tiny model in the worker's own `HFEngine`. The cheats are the ones
`coderepair.worker.calibrate` measures, turned on real leases: unless the cheat *is*
another model or other weights, the doctored completion is re-proved with an honest
prefill of the leased policy (`calibrate._reprove`: valid TOPLOC proofs, correct
behaviour logprobs), so only the check aimed at the cheat can catch it.

`Maker.samples(strategy, lease)` returns the batch's `RolloutSample`s; strategies that
are not about the samples (replay, copy, Sybil, garbage, stale) drive the lease loop in
`redteam_agents` and use `honest` or a cheat here for the samples themselves.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from coderepair.protocol.patch import edits_between, render_edits
from coderepair.protocol.reward import RewardSpec
from coderepair.protocol.task import RepairTask
from coderepair.v1 import common_pb2
from coderepair.worker import calibrate
from coderepair.worker.engines.base import Generation, GenerationRequest, SamplingParams
from coderepair.worker.engines.hf import HFEngine
from coderepair.worker.models import build_tiny_model
from coderepair.worker.sandbox.base import Job, JobResult
from coderepair.worker.verify import EMPTY_LOG_SHA256, plan

# One model call at a time per process: torch runs one thread, the machine is shared.
_LOCK = threading.Lock()
_FINISH = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH}
_reprove = calibrate._reprove

# Strategies whose samples are made here (the rest only change how a batch is sent).


class TamperedSandbox:
    """A worker's sandbox doctored to say every test passed (it runs nothing)."""

    name = "tampered"

    def run(self, job: Job) -> JobResult:
        total = max(1, len(job.tests))
        return JobResult(
            status="ok",
            tests_passed=total,
            tests_total=total,
            per_test={name: True for name in job.tests} or {"test": True},
            log="all tests passed",
            log_sha256=EMPTY_LOG_SHA256,
            duration_s=0.01,
            backend=self.name,
        )


@dataclass
class Piece:
    """One completion before it becomes a sample: tokens, proofs, logprobs, text."""

    index: int
    completion: list[int]
    proofs: list[bytes]
    logprobs: list[float]
    finish: str


class Maker:
    """Generates with the policy (or a cheat's model) and builds rollout samples."""

    def __init__(self, policy: Path, strategy: str, workdir: Path, seed: int) -> None:
        # Loading is not thread-safe (transformers builds on the meta device): one at a time.
        with _LOCK:
            torch.set_num_threads(1)
            self.lock = _LOCK
            self.rng = random.Random(seed)
            # The leased policy: for proofs and re-proofs, and for honest generation.
            self.engine = HFEngine(num_threads=1)
            self.engine.load(policy)
            self.generator = self.engine
            if strategy == "wrong_model":
                other = build_tiny_model(
                    workdir / f"other-{seed}", seed=1000 + seed, tokenizer_dir=policy
                )
                self.generator = HFEngine(num_threads=1)
                self.generator.load(other)
            elif strategy == "perturbed_weights":
                self.generator = HFEngine(num_threads=1)
                self.generator.load(policy)
                noise = torch.Generator().manual_seed(seed)
                self.generator.apply_weights(
                    {
                        name: w * (1 + 0.01 * torch.randn(w.shape, generator=noise, dtype=w.dtype))
                        for name, w in self.generator.model.state_dict().items()
                        if w.is_floating_point()
                    }
                )

    # ------------------------------------------------------------ generation

    def requests(self, lease: common_pb2.Lease) -> list[GenerationRequest]:
        params = SamplingParams(
            temperature=lease.sampling.temperature,
            max_new_tokens=lease.sampling.max_new_tokens,
            stop_token_ids=self.engine.stop_token_ids,
        )
        return [
            GenerationRequest(
                prompt_ids=tuple(task.prompt_token_ids),
                seeds=tuple(task.seeds),
                sample_indices=tuple(range(len(task.seeds))),
                params=params,
            )
            for task in lease.tasks
        ]

    def _generate(self, engine: HFEngine, requests: list[GenerationRequest]) -> list[Generation]:
        with self.lock:
            return engine.generate(requests)

    def _reproved(self, request: GenerationRequest, index: int, ids: list[int]) -> Piece:
        with self.lock, torch.inference_mode():
            sub = _reprove(self.engine, request, index, ids)
        return Piece(index, ids, list(sub.proof), list(sub.behaviour_logprobs), "length")

    def pieces(self, strategy: str, lease: common_pb2.Lease) -> list[list[Piece]]:
        """Per task of the lease, the G completions the strategy submits."""
        requests = self.requests(lease)
        if strategy == "hinted_prompt":
            return [self._hinted(r) for r in requests]
        if strategy == "best_of_n":
            return [self._best_of_n(r) for r in requests]
        gens = self._generate(self.generator, requests)
        out: list[list[Piece]] = [[] for _ in requests]
        for g in gens:
            out[g.request_index].append(
                Piece(
                    g.sample_index,
                    list(g.completion_ids),
                    list(g.proofs),
                    list(g.logprobs),
                    g.finish_reason,
                )
            )
        if strategy in ("edited_tokens", "injected_text", "tampered_sandbox"):
            out = [
                [self._doctor(strategy, r, p, lease) for p in ps]
                for r, ps in zip(requests, out, strict=True)
            ]
        return out

    def _hinted(self, request: GenerationRequest) -> list[Piece]:
        hint = list(self.engine.tokenizer(calibrate.HINT, add_special_tokens=False)["input_ids"])
        # The hint goes before the generation prompt's last three tokens (the assistant
        # turn's header), as if the user had typed it.
        ids = list(request.prompt_ids)
        hinted = request.model_copy(update={"prompt_ids": tuple(ids[:-3] + hint + ids[-3:])})
        gens = self._generate(self.engine, [hinted])
        return [self._reproved(request, g.sample_index, list(g.completion_ids)) for g in gens]

    def _best_of_n(self, request: GenerationRequest) -> list[Piece]:
        extra = request.model_copy(
            update={
                "seeds": tuple((s + 7919 * k) % 2**64 for s in request.seeds for k in (1, 2, 3)),
                "sample_indices": tuple(i for i in request.sample_indices for _ in range(3)),
            }
        )
        gens = self._generate(self.engine, [extra])
        out = []
        for index in request.sample_indices:
            choices = [g for g in gens if g.sample_index == index]
            # Cherry-pick the likeliest of the other seeds' completions.
            pick = max(choices, key=lambda g: sum(g.logprobs))
            out.append(
                Piece(
                    index,
                    list(pick.completion_ids),
                    list(pick.proofs),
                    list(pick.logprobs),
                    pick.finish_reason,
                )
            )
        return out

    def _doctor(
        self, strategy: str, request: GenerationRequest, piece: Piece, lease: common_pb2.Lease
    ) -> Piece:
        ids = list(piece.completion)
        limit = request.params.max_new_tokens
        tok = self.engine.tokenizer
        if strategy == "edited_tokens":
            vocab = int(self.engine.model.config.vocab_size)
            j = self.rng.randrange(len(ids))
            ids[j] = (ids[j] + self.rng.randrange(1, vocab)) % vocab
        elif strategy == "injected_text":
            injected = list(tok(calibrate.INJECTED, add_special_tokens=False)["input_ids"])
            j = self.rng.randrange(len(ids) + 1)
            ids = [*ids[:j], *injected, *ids[j:]][:limit]
        else:  # tampered_sandbox: a wrong patch, written in as the completion
            task = _task(lease, request)
            ids = list(tok(wrong_patch(task), add_special_tokens=False)["input_ids"])[:limit]
        return self._reproved(request, piece.index, ids)

    # ------------------------------------------------------------ samples

    def samples(self, strategy: str, lease: common_pb2.Lease) -> list[common_pb2.RolloutSample]:
        spec = RewardSpec.from_json(bytes(lease.reward_spec_json))
        out = []
        for task_msg, pieces in zip(lease.tasks, self.pieces(strategy, lease), strict=True):
            task = RepairTask.model_validate_json(task_msg.task_json)
            for piece in pieces:
                out.append(self.sample(strategy, task_msg, task, piece, spec))
        return out

    def sample(
        self,
        strategy: str,
        task_msg: common_pb2.LeasedTask,
        task: RepairTask,
        piece: Piece,
        spec: RewardSpec,
    ) -> common_pb2.RolloutSample:
        text = self.engine.tokenizer.decode(piece.completion, skip_special_tokens=True)
        job_plan = plan(task, text, len(piece.completion), spec)
        result = None
        if job_plan.job is not None:
            if strategy != "tampered_sandbox":
                raise RuntimeError("the tiny model wrote a patch: run it in a real sandbox")
            result = TamperedSandbox().run(job_plan.job)
        reward = job_plan.reward(result, spec)
        total, components = reward.total, dict(reward.components)
        if strategy == "inflated_reward":
            total, components = spec.pass_reward, {"pass": spec.pass_reward}
        return common_pb2.RolloutSample(
            task_id=task_msg.task_id,
            sample_index=piece.index,
            seed=task_msg.seeds[piece.index],
            prompt_token_ids=task_msg.prompt_token_ids,
            completion_token_ids=piece.completion,
            behaviour_logprobs=[min(0.0, x) for x in piece.logprobs],
            completion_text=text,
            patch=job_plan.patch,
            reward=total,
            reward_components=components,
            test_log_sha256=result.log_sha256 if result is not None else EMPTY_LOG_SHA256,
            proof=b"".join(piece.proofs),
            finish_reason=_FINISH[piece.finish],
            timings=common_pb2.SampleTimings(generate_ms=5, reward_ms=1, proof_ms=1),
        )


def _task(lease: common_pb2.Lease, request: GenerationRequest) -> RepairTask:
    for t in lease.tasks:
        if tuple(t.prompt_token_ids) == request.prompt_ids:
            return RepairTask.model_validate_json(t.task_json)
    raise KeyError("no task of the lease has this prompt")


def wrong_patch(task: RepairTask) -> str:
    """A patch that applies to ``task`` and fails its tests (returns None instead)."""
    path, source = next(iter(sorted(task.files.items())))
    lines = source.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.strip().startswith("return"):
            indent = line[: len(line) - len(line.lstrip())]
            lines[i] = f"{indent}return None\n"
            break
    return render_edits(edits_between(task.files, {**task.files, path: "".join(lines)}))


def leak_record(sample: common_pb2.RolloutSample) -> dict[str, Any]:
    """What an honest worker's completion looks like to someone who copies it."""
    return {
        "task_id": sample.task_id,
        "sample_index": sample.sample_index,
        "sample": sample.SerializeToString().hex(),
    }


def copied(leaked: list[dict[str, Any]], task_msg: common_pb2.LeasedTask) -> list[Any]:
    """Another worker's samples for this task, re-labelled with this lease's seeds."""
    out = []
    for item in sorted(leaked, key=lambda x: x["sample_index"]):
        sample = common_pb2.RolloutSample.FromString(bytes.fromhex(item["sample"]))
        sample.seed = task_msg.seeds[sample.sample_index]
        out.append(sample)
    return out
