"""The trainer end to end on the tiny model, with rollouts really sampled from it.

The behaviour logprobs are the model's own, so the first step is exactly on-policy
(importance ratio 1); training on the same batch again and again must then push the
clipped surrogate down, which is what "the loss falls on a fixed batch" means here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from coderepair.protocol.rollout import read_parquet, write_parquet
from coderepair.trainer.config import TrainerConfig
from coderepair.trainer.loop import Trainer
from coderepair.trainer.rollouts import ParquetSource
from coderepair.trainer.synthetic import sample_rollouts
from coderepair.worker.models import build_tiny_model


@pytest.mark.slow
def test_loss_falls_on_a_fixed_batch_from_parquet(tmp_path: Path) -> None:
    model_dir = build_tiny_model(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    batch = sample_rollouts(
        model, [[1, 40, 41, 42], [1, 50, 51]], group_size=4, max_new_tokens=8, seed=3
    )
    steps = 20
    files = []
    for i in range(steps):  # the same batch, once per step, as files in the object store
        path = tmp_path / f"rollouts-{i:03d}.parquet"
        write_parquet(batch, path)
        files.append(path)
    assert read_parquet(files[0]) == batch
    cfg = TrainerConfig(
        model=str(model_dir),
        output_dir=tmp_path / "run",
        max_steps=steps,
        prompts_per_step=2,
        group_size=4,
        max_staleness=steps,  # the fixed batch stays admissible
        learning_rate=3e-4,
        checkpoint_every=steps,
        metrics={"backend": "tensorboard"},
    )
    result = Trainer(cfg, ParquetSource(files, group_size=4)).run()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert result.steps == steps
    assert rows[0]["ratio/mean"] == pytest.approx(1.0, abs=1e-4)  # exactly on-policy
    assert losses[-1] < losses[0] - 0.05
    assert any((tmp_path / "run" / "tensorboard").iterdir())
