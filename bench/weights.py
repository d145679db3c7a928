"""Bytes a worker downloads per policy version: sparse delta vs full checkpoint.

Runs real AdamW steps (a plain LM loss on a fixed text, at an RL-like learning rate) on
the tiny model and on SmolLM2-135M-Instruct (float32 master weights), publishing every
step through `coderepair.trainer.publish.Publisher` twice side by side: once at the
trained dtype (float32) and once rounded to bfloat16. For each it reports the full
checkpoint size, the mean delta size, their ratio, the fraction of elements whose
published bits changed per step, and the publish time. Prints a table, then one JSON
object as the last line.

    .venv/bin/python bench/weights.py [--steps 20] [--lr 1e-6] [--models tiny,smollm2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from coderepair.protocol.identity import Identity
from coderepair.trainer.publish import Publisher, PublisherConfig
from coderepair.worker.models import build_tiny_model, convert_smollm2

TEXT = (
    "def below_zero(operations: list[int]) -> bool:\n    balance = 0\n"
    "    for op in operations:\n        balance += op\n        if balance < 0:\n"
    "            return True\n    return False\n"
)


class CountingSink:
    """An object sink that only counts bytes (the bench measures sizes, not storage)."""

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}

    def put(self, key: str, data: bytes) -> None:
        self.sizes[key] = len(data)


def model_dir(name: str, scratch: Path) -> Path:
    if name == "tiny":
        return build_tiny_model(scratch / "tiny")
    if name == "smollm2":
        return convert_smollm2()
    raise SystemExit(f"unknown model {name!r}: use tiny or smollm2")


def bench_model(name: str, steps: int, lr: float, scratch: Path) -> list[dict[str, Any]]:
    path = model_dir(name, scratch)
    torch.manual_seed(0)
    model: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    ids = AutoTokenizer.from_pretrained(str(path))(TEXT, return_tensors="pt").input_ids
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    identity = Identity.generate()
    publishers = {}
    for dtype in ("float32", "bfloat16"):
        config = PublisherConfig(
            run_id=f"bench-{name}",
            base_model=name,
            tokenizer_sha256="0" * 64,
            full_every=steps + 1,  # one full (v0), then only deltas
            publish_dtype="keep" if dtype == "float32" else dtype,
        )
        publishers[dtype] = Publisher(config, identity, CountingSink())
    full: dict[str, int] = {}
    deltas: dict[str, list[int]] = {d: [] for d in publishers}
    changed: dict[str, list[float]] = {d: [] for d in publishers}
    seconds: dict[str, float] = dict.fromkeys(publishers, 0.0)
    step_s = 0.0
    for version in range(steps + 1):
        if version:
            start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step_s += time.perf_counter() - start
        for dtype, publisher in publishers.items():
            start = time.perf_counter()
            published = publisher.publish(model.state_dict(), version)
            if version:
                seconds[dtype] += time.perf_counter() - start
                deltas[dtype].append(published.shard_bytes)
                changed[dtype].append(published.changed_elements / published.total_elements)
            else:
                full[dtype] = published.shard_bytes
    rows = []
    for dtype in publishers:
        mean_delta = sum(deltas[dtype]) / steps
        rows.append(
            {
                "model": name,
                "dtype": dtype,
                "lr": lr,
                "steps": steps,
                "full_bytes": full[dtype],
                "mean_delta_bytes": round(mean_delta),
                "max_delta_bytes": max(deltas[dtype]),
                "ratio_full_over_delta": round(full[dtype] / mean_delta, 2),
                "ratio_fp32_full_over_delta": round(full["float32"] / mean_delta, 2),
                "changed_fraction": round(sum(changed[dtype]) / steps, 5),
                "publish_s_per_version": round(seconds[dtype] / steps, 3),
                "train_s_per_step": round(step_s / steps, 3),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--models", default="tiny,smollm2")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models.split(","):
            rows += bench_model(name, args.steps, args.lr, Path(scratch))
    header = (
        f"{'model':8} {'dtype':9} {'full MB':>9} {'delta MB':>9} {'full/delta':>10} "
        f"{'fp32full/delta':>14} {'changed':>8} {'publish s':>9}"
    )
    print(f"{args.steps} AdamW steps at lr {args.lr:g}, one version per step")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['model']:8} {r['dtype']:9} {r['full_bytes'] / 1e6:9.2f} "
            f"{r['mean_delta_bytes'] / 1e6:9.3f} {r['ratio_full_over_delta']:10.1f} "
            f"{r['ratio_fp32_full_over_delta']:14.1f} {100 * r['changed_fraction']:7.2f}% "
            f"{r['publish_s_per_version']:9.2f}"
        )
    print(json.dumps({"bench": "weights", "rows": rows}))


if __name__ == "__main__":
    main()
