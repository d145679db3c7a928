"""Trainer step throughput: our GRPO step against plain TRL `GRPOTrainer`, same batch.

Both trainers get the same model (the tiny test model by default, or ``--model DIR``,
e.g. a converted SmolLM2-135M-Instruct), the same tokens and the same behaviour logprobs:
``--prompts`` × ``--group`` completions of ``--completion-tokens`` tokens after prompts
of ``--prompt-tokens`` tokens (random token ids: the timing does not depend on them).

* ours: `coderepair.trainer.loop.Trainer` fed from an `InMemorySource`, one micro-batch
  per step; the time of each step (logprobs, loss, backward, clipping, AdamW).
* TRL: `trl.GRPOTrainer` (CPU, no vLLM) driven through ``rollout_func`` with the same
  prompt/completion ids and logprobs, rewards passed through; the wall time between
  ``on_step_begin`` and ``on_step_end`` (rollout hand-over, forward, backward, AdamW).

Tokens/s counts trained completion tokens; the first ``--warmup`` steps are not timed.
Note what TRL does *not* do here: without vLLM it ignores the behaviour logprobs (its
importance ratio is taken against its own detached logprobs, so it is 1), which is one
reason the trainer has its own loop (trainer/README.md).

Run: .venv/bin/python bench/trainer.py   The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from coderepair.protocol.rollout import RolloutRecord


def _records(args: argparse.Namespace, vocab: int) -> list[RolloutRecord]:
    rng = random.Random(0)
    hexes = "ab" * 32
    out = []
    for p in range(args.prompts):
        prompt = [rng.randrange(3, vocab) for _ in range(args.prompt_tokens)]
        for g in range(args.group):
            completion = [rng.randrange(3, vocab) for _ in range(args.completion_tokens)]
            out.append(
                RolloutRecord(
                    task_id=f"task-{p}",
                    lease_id=f"lease-{p}",
                    run_id="bench",
                    worker_key=hexes,
                    policy_version=0,
                    sample_index=g,
                    seed=0,
                    prompt_ids=prompt,
                    completion_ids=completion,
                    behaviour_logprobs=[-rng.uniform(0.5, 8.0) for _ in completion],
                    completion_text="",
                    patch="",
                    reward=float(g % 3) + rng.random(),
                    reward_components={},
                    reward_spec_hash=hexes,
                    test_log_sha256=hexes,
                    proof=b"",
                    timings={},
                    created_at_ms=0,
                )
            )
    return out


def bench_ours(model_dir: Path, records: list[RolloutRecord], args: argparse.Namespace) -> float:
    from coderepair.trainer.config import TrainerConfig
    from coderepair.trainer.loop import Trainer
    from coderepair.trainer.rollouts import InMemorySource

    steps = args.steps + args.warmup
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainerConfig(
            model=str(model_dir),
            output_dir=Path(out),
            max_steps=steps,
            prompts_per_step=args.prompts,
            group_size=args.group,
            micro_batch_size=args.prompts * args.group,
            max_staleness=steps,
            learning_rate=1e-6,
            checkpoint_every=steps,
            metrics={"backend": "jsonl"},
        )
        Trainer(cfg, InMemorySource.from_records(records * steps, group_size=args.group)).run()
        rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    timed = rows[args.warmup :]
    tokens = sum(r["tokens"] for r in timed)
    return tokens / sum(r["time/step_s"] for r in timed)


def bench_trl(model_dir: Path, records: list[RolloutRecord], args: argparse.Namespace) -> float:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset  # type: ignore[import-untyped]
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    batch = len(records)
    cursor = {"i": 0}

    def rollout_func(prompts: list[Any], trainer: Any) -> dict[str, list[Any]]:
        # TRL hands over prompts already repeated G times: one record per prompt slot.
        chosen = [records[(cursor["i"] + k) % batch] for k in range(len(prompts))]
        cursor["i"] += len(prompts)
        return {
            "prompt_ids": [r.prompt_ids for r in chosen],
            "completion_ids": [r.completion_ids for r in chosen],
            "logprobs": [r.behaviour_logprobs for r in chosen],
            "record_reward": [r.reward for r in chosen],
        }

    def reward_passthrough(prompts: Any, completions: Any, record_reward: Any, **_: Any) -> Any:
        return record_reward

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.started = 0.0
            self.times: list[float] = []

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.started = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            self.times.append(time.perf_counter() - self.started)

    timer = Timer()
    steps = args.steps + args.warmup
    with tempfile.TemporaryDirectory() as out:
        grpo_args = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=batch,
            num_generations=args.group,
            max_completion_length=args.completion_tokens,
            max_steps=steps,
            learning_rate=1e-6,
            beta=0.0,
            loss_type="dapo",
            logging_steps=1000,  # keep its log dicts off stdout
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            bf16=False,
            disable_tqdm=True,
            seed=0,
        )
        trainer = GRPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
            reward_funcs=[reward_passthrough],
            args=grpo_args,
            train_dataset=Dataset.from_dict({"prompt": ["x"] * (batch * steps)}),
            processing_class=AutoTokenizer.from_pretrained(model_dir),
            rollout_func=rollout_func,
            callbacks=[timer],
        )
        trainer.train()
    tokens = args.completion_tokens * batch
    timed = timer.times[args.warmup :]
    return tokens * len(timed) / sum(timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="HF model dir (default: tiny)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=96)
    parser.add_argument("--completion-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            from coderepair.worker.models import build_tiny_model

            model_dir = build_tiny_model(Path(tmp) / "tiny")
            name = "tiny"
        else:
            model_dir, name = args.model, args.model.name
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(model_dir).vocab_size
        records = _records(args, vocab)
        ours = bench_ours(model_dir, records, args)
        try:
            trl_tps: float | None = bench_trl(model_dir, records, args)
        except ImportError as exc:
            print(f"TRL not installed ({exc}): pip install 'coderepair-trainer[bench]'")
            trl_tps = None

    ratio = ours / trl_tps if trl_tps else None
    shape = f"{args.prompts}x{args.group} seqs, {args.prompt_tokens}+{args.completion_tokens} tok"
    print(f"\ntrainer step throughput on {name} ({shape}, {torch.get_num_threads()} threads)")
    print(f"{'trainer':<22}{'completion tok/s':>18}")
    print(f"{'coderepair (ours)':<22}{ours:>18.1f}")
    print(f"{'trl GRPOTrainer':<22}{(trl_tps or float('nan')):>18.1f}")
    print(f"{'ratio ours/trl':<22}{(ratio or float('nan')):>18.2f}")
    print(
        json.dumps(
            {
                "bench": "trainer",
                "model": name,
                "prompts": args.prompts,
                "group": args.group,
                "prompt_tokens": args.prompt_tokens,
                "completion_tokens": args.completion_tokens,
                "timed_steps": args.steps,
                "ours_tokens_per_s": round(ours, 2),
                "trl_tokens_per_s": round(trl_tps, 2) if trl_tps else None,
                "ratio_ours_over_trl": round(ratio, 3) if ratio else None,
            }
        )
    )


if __name__ == "__main__":
    main()
