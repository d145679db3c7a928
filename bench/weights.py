"""Bytes a worker downloads per policy version: sparse delta vs full checkpoint.

Runs real AdamW steps (a plain LM loss on a fixed text, at an RL-like learning rate) on
the tiny model and on SmolLM2-135M-Instruct (float32 master weights), publishing every
step through `coderepair.trainer.publish.Publisher` twice side by side: once at the
trained dtype (float32) and once rounded to bfloat16. For each it reports the full
checkpoint size, the mean and max delta size, their ratio, the fraction of elements whose
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
from _support import CountingSink, DeltaMeter, delta_table
from transformers import AutoModelForCausalLM, AutoTokenizer

from coderepair.worker.models import build_tiny_model, convert_smollm2

TEXT = (
    "def below_zero(operations: list[int]) -> bool:\n    balance = 0\n"
    "    for op in operations:\n        balance += op\n        if balance < 0:\n"
    "            return True\n    return False\n"
)


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
    # One full (v0), then only deltas.
    meter = DeltaMeter(f"bench-{name}", lambda _: CountingSink(), full_every=steps + 1)
    step_s = 0.0
    for version in range(steps + 1):
        if version:
            start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step_s += time.perf_counter() - start
        meter.publish(model.state_dict(), version)
    return [
        {
            "model": name,
            "lr": lr,
            "steps": steps,
            **row,
            "train_s_per_step": round(step_s / steps, 3),
        }
        for row in meter.rows()
    ]


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
    print(f"{args.steps} AdamW steps at lr {args.lr:g}, one version per step")
    print("\n".join(delta_table(rows)))
    print(json.dumps({"bench": "weights", "rows": rows}))


if __name__ == "__main__":
    main()
