"""Trainer: step throughput against plain TRL `GRPOTrainer`, and delta vs full bytes.

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

Then, in the same run, what workers download: our Trainer trains ``--delta-steps`` (20)
real GRPO steps at ``--delta-lr`` (1e-6) on fresh on-policy rollouts each step (new
random completions, behaviour logprobs from the start model so the importance ratio is
about 1, rewards that vary within every group so no group is dropped), and its
``on_step`` hook publishes every version through the real `Publisher` into a
`LocalDirectorySink`, once at float32 (as trained, publish_dtype 'keep') and once at
bfloat16 (bench/_support.py, shared with bench/weights.py). Version 0 (the start model)
is the full checkpoint, versions 1..N are deltas; reported per dtype: full bytes, mean and
max delta bytes, full/delta, and the fraction of elements whose published bits changed.

Run: .venv/bin/python bench/trainer.py [--threads 1] [--delta-steps 20] [--delta-lr 1e-6]
The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _support import DEFAULT_PUBLISH_DTYPE, DeltaMeter, delta_table

from coderepair.protocol.rollout import RolloutRecord


def _records(
    args: argparse.Namespace, vocab: int, *, seed: int = 0, version: int = 0
) -> list[RolloutRecord]:
    rng = random.Random(seed)
    hexes = "ab" * 32
    out = []
    for p in range(args.prompts):
        prompt = [rng.randrange(3, vocab) for _ in range(args.prompt_tokens)]
        for g in range(args.group):
            completion = [rng.randrange(3, vocab) for _ in range(args.completion_tokens)]
            out.append(
                RolloutRecord(
                    task_id=f"task-{seed}-{p}",
                    lease_id=f"lease-{seed}-{p}",
                    run_id="bench",
                    worker_key=hexes,
                    policy_version=version,
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


def _on_policy(model: Any, records: list[RolloutRecord]) -> list[RolloutRecord]:
    """`records` with behaviour logprobs of `model`, as a worker sampling from it reports."""
    from coderepair.trainer.batch import pack, token_logprobs

    packed = pack(records, torch.zeros(len(records)), pad_id=0)
    with torch.no_grad():
        logprobs, _ = token_logprobs(model, packed)
    out = []
    for i, record in enumerate(records):
        row = logprobs[i][packed.mask[i]].tolist()
        out.append(dataclasses.replace(record, behaviour_logprobs=row))
    return out


def bench_deltas(
    model_dir: Path, name: str, vocab: int, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train --delta-steps real GRPO steps, publishing every version at fp32 and bf16."""
    from transformers import AutoModelForCausalLM

    from coderepair.trainer.config import TrainerConfig
    from coderepair.trainer.loop import Trainer
    from coderepair.trainer.publish import LocalDirectorySink, tokenizer_sha256
    from coderepair.trainer.rollouts import InMemorySource

    steps = args.delta_steps
    start_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # Step s trains on rollouts sampled from version s (on-policy, never stale).
    records = [
        r
        for s in range(steps)
        for r in _on_policy(start_model, _records(args, vocab, seed=1 + s, version=s))
    ]
    with tempfile.TemporaryDirectory() as out:
        objects = Path(out) / "objects"
        meter = DeltaMeter(
            f"bench-{name}",
            lambda dtype: LocalDirectorySink(objects / dtype),
            full_every=steps + 1,  # version 0 full, then only deltas
            base_model=name,
            tokenizer_sha256=tokenizer_sha256(model_dir),
        )
        meter.publish(start_model.state_dict(), 0)  # what the run publishes first
        del start_model
        cfg = TrainerConfig(
            model=str(model_dir),
            output_dir=Path(out) / "run",
            max_steps=steps,
            prompts_per_step=args.prompts,
            group_size=args.group,
            micro_batch_size=args.prompts * args.group,
            max_staleness=1,
            learning_rate=args.delta_lr,
            checkpoint_every=steps,
            metrics={"backend": "jsonl"},
        )
        source = InMemorySource.from_records(records, group_size=args.group)
        result = Trainer(
            cfg, source, on_step=lambda version, model: meter.publish(model.state_dict(), version)
        ).run()
        metrics = (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()
        rows = [json.loads(x) for x in metrics]
        stored = {
            d: sum(f.stat().st_size for f in (objects / d).rglob("*") if f.is_file())
            for d in meter.publishers
        }
    training = {
        "steps": result.steps,
        "lr": args.delta_lr,
        "samples_per_step": min(r["samples"] for r in rows),
        "min_grad_norm": round(min(r["grad_norm"] for r in rows), 6),
        "mean_abs_log_ratio": round(sum(r["ratio/abs_log_mean"] for r in rows) / len(rows), 6),
        "stored_bytes_with_manifests": stored,
    }
    return [{"model": name, **row} for row in meter.rows()], training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="HF model dir (default: tiny)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=96)
    parser.add_argument("--completion-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--delta-steps", type=int, default=20, help="GRPO steps published (0: skip deltas)"
    )
    parser.add_argument("--delta-lr", type=float, default=1e-6, help="learning rate of those")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

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
        delta_rows: list[dict[str, Any]] = []
        training: dict[str, Any] = {}
        if args.delta_steps > 0:
            delta_rows, training = bench_deltas(model_dir, name, vocab, args)

    ratio = ours / trl_tps if trl_tps else None
    shape = f"{args.prompts}x{args.group} seqs, {args.prompt_tokens}+{args.completion_tokens} tok"
    print(f"\ntrainer step throughput on {name} ({shape}, {torch.get_num_threads()} threads)")
    print(f"{'trainer':<22}{'completion tok/s':>18}")
    print(f"{'coderepair (ours)':<22}{ours:>18.1f}")
    print(f"{'trl GRPOTrainer':<22}{(trl_tps or float('nan')):>18.1f}")
    print(f"{'ratio ours/trl':<22}{(ratio or float('nan')):>18.2f}")
    if delta_rows:
        print(
            f"\nbytes per published version over {training['steps']} GRPO steps at lr "
            f"{args.delta_lr:g} (version 0 full, then one delta per step; "
            f"publisher default publish_dtype={DEFAULT_PUBLISH_DTYPE!r})"
        )
        print("\n".join(delta_table(delta_rows)))
    delta_vs_full = {
        r["dtype"]: {
            k: r[k]
            for k in (
                "publish_dtype",
                "publisher_default",
                "full_bytes",
                "mean_delta_bytes",
                "max_delta_bytes",
                "ratio_full_over_delta",
                "ratio_full_over_max_delta",
                "ratio_fp32_full_over_delta",
                "changed_fraction",
                "publish_s_per_version",
            )
        }
        for r in delta_rows
    }
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
                "delta_steps": training.get("steps", 0),
                "delta_training": training,
                "publisher_default_dtype": DEFAULT_PUBLISH_DTYPE,
                "delta_vs_full": delta_vs_full,
                "deltas_10x_smaller_at_default": next(
                    (
                        r["ratio_full_over_delta"] >= 10
                        for r in delta_rows
                        if r["publisher_default"]
                    ),
                    None,
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
