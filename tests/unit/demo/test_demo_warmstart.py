"""The supervised warm start: what it trains on, when it stops, what it reports."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from coderepair.coordinator.tasks.prompts import render_prompt
from coderepair.coordinator.tasks.repo import load_fixtures
from coderepair.demo.warmstart import WarmStartConfig, WarmStartError, oracle_answer, warm_start
from coderepair.protocol.task import RepairTask
from coderepair.worker.models import build_tiny_model


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("warm") / "base")


@pytest.fixture(scope="module")
def tasks() -> list[RepairTask]:
    return load_fixtures()[:2]


# The fixtures' prompts run past the default 2,048 tokens in the tiny tokenizer.
_FITS = 4096


def _answer_nll(model_dir: Path, task: RepairTask) -> float:
    """-log P(oracle answer | prompt) under the saved model, computed here afresh."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    messages = [dict(m) for m in render_prompt(task).messages]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer = tokenizer(oracle_answer(task) + tokenizer.eos_token, add_special_tokens=False)
    ids = torch.tensor([[*prompt_ids, *answer["input_ids"]]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
    targets = ids[0, 1:]
    picked = logprobs[torch.arange(len(targets)), targets][len(prompt_ids) - 1 :]
    return -float(picked.sum())


def test_a_target_stops_at_the_first_check_that_meets_it_and_reports_the_real_nll(
    base: Path, tasks: list[RepairTask], tmp_path: Path
) -> None:
    # A target every example already meets: training stops at the first measurement.
    cfg = WarmStartConfig(
        steps=100, learning_rate=1e-3, target_nll=1e9, check_every=5, max_tokens=_FITS
    )
    out, report = warm_start(base, tasks, tmp_path / "start", cfg)
    assert report["steps"] == 5 and report["examples"] == len(tasks)
    assert len(report["answer_nll"]) == len(tasks) == len(report["exact_answer_chance"])
    for task, nll, chance in zip(
        tasks, report["answer_nll"], report["exact_answer_chance"], strict=True
    ):
        # The reported NLL is that of the model written to disk (eval mode, summed over
        # the answer's tokens), and the chance is exp(-NLL).
        assert _answer_nll(out, task) == pytest.approx(nll, rel=1e-3, abs=1e-2)
        assert chance == pytest.approx(math.exp(-nll), rel=1e-3, abs=1e-4)


def test_an_unreached_target_is_an_error_and_writes_nothing(
    base: Path, tasks: list[RepairTask], tmp_path: Path
) -> None:
    cfg = WarmStartConfig(
        steps=4, learning_rate=1e-3, target_nll=1e-6, check_every=2, max_tokens=_FITS
    )
    with pytest.raises(WarmStartError, match="raise steps or the learning rate"):
        warm_start(base, tasks, tmp_path / "start", cfg)
    assert not (tmp_path / "start").exists()


def test_without_a_target_it_trains_exactly_the_steps_and_is_reused(
    base: Path, tasks: list[RepairTask], tmp_path: Path
) -> None:
    cfg = WarmStartConfig(steps=6, learning_rate=1e-3)
    out, report = warm_start(base, tasks, tmp_path / "start", cfg)
    assert report["steps"] == 6 and "answer_nll" not in report
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    again, second = warm_start(base, tasks, tmp_path / "start", cfg)
    assert again == out and second == report
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # not trained again
    # Another config is another fingerprint: trained anew.
    _, third = warm_start(base, tasks, tmp_path / "start", dataclasses.replace(cfg, steps=7))
    assert third["steps"] == 7


def test_held_out_tasks_are_refused(base: Path, tasks: list[RepairTask], tmp_path: Path) -> None:
    leaked = [tasks[0].model_copy(update={"split": "heldout"})]
    with pytest.raises(WarmStartError, match="held-out"):
        warm_start(base, leaked, tmp_path / "start", WarmStartConfig(steps=1, learning_rate=1e-3))
