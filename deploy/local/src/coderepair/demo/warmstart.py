"""A short supervised warm start on verified repairs, before reinforcement learning.

GRPO learns only from groups whose rewards differ. A base model that never writes the
patch format gets the malformed reward on every sample, so every group is dropped and
the trainer never steps (the field notes measured 0% well-formed for base SmolLM2; a
random tiny model writes none either). The Repairity recipe is SFT, then RL: this
module fine-tunes the start model for a few steps on the oracle fixes of *training*
tasks (never held-out ones), rendered exactly as the coordinator renders prompts and as
`render_edits` writes answers. Sampling at temperature 1 from the result gives a mix
of well-formed and malformed patches, which is the signal GRPO needs.

The result is cached: the output directory carries a marker with the hash of the
inputs, and a matching marker means the directory is reused as is.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from coderepair.protocol.errors import ProtocolError
from coderepair.protocol.task import RepairTask

__all__ = ["WarmStartConfig", "WarmStartError", "oracle_answer", "warm_start"]

_MARKER = "warmstart.json"
# Files of a model directory that are not weights: copied so the result is a full policy.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


class WarmStartError(ProtocolError):
    """The warm start cannot run on these inputs; the message says what to change."""


@dataclass(frozen=True)
class WarmStartConfig:
    """How long and how hard to fine-tune (small on purpose: a nudge, not a solution)."""

    steps: int
    """Optimizer steps, one training example each."""
    learning_rate: float
    """AdamW learning rate (constant)."""
    seed: int = 0
    """Order of the examples."""
    max_tokens: int = 2048
    """Examples longer than this (prompt + answer, in tokens) are skipped."""


def oracle_answer(task: RepairTask) -> str:
    """The answer a perfect model would give: a short thought, then the oracle edits."""
    from coderepair.protocol.patch import edits_between, render_edits  # noqa: PLC0415

    edits = edits_between(task.files, task.oracle)
    if task.mutation is not None:
        think = f"The bug is a {task.mutation.operator.replace('_', ' ')} on line "
        think += f"{task.mutation.line}; fix that line."
    else:
        think = "Fix the line that breaks the failing test."
    return render_edits(edits, think=think)


def _fingerprint(model_dir: Path, tasks: list[RepairTask], cfg: WarmStartConfig) -> str:
    digest = hashlib.sha256()
    for name in sorted(p.name for p in model_dir.iterdir() if p.is_file()):
        digest.update(name.encode())
        digest.update(str((model_dir / name).stat().st_size).encode())
    for task in tasks:
        digest.update(task.task_id.encode())
    digest.update(json.dumps(asdict(cfg), sort_keys=True).encode())
    return digest.hexdigest()


def warm_start(
    model_dir: Path, tasks: list[RepairTask], out_dir: Path, cfg: WarmStartConfig
) -> tuple[Path, dict[str, Any]]:
    """Fine-tune ``model_dir`` on the oracle answers of ``tasks``; write ``out_dir``.

    Returns the directory and a report (steps, mean loss of the first and last tenth).
    ``tasks`` must be training tasks: held-out ones would leak the evaluation.
    """
    if any(t.split != "train" for t in tasks):
        raise WarmStartError(
            "the warm start was given held-out tasks: it may only see the 'train' split, "
            "or the held-out pass@1 would measure memorisation"
        )
    if not tasks:
        raise WarmStartError("no training tasks for the warm start: build a larger task set")
    fingerprint = _fingerprint(model_dir, tasks, cfg)
    marker = out_dir / _MARKER
    if marker.is_file():
        try:
            report: dict[str, Any] = json.loads(marker.read_text())
            if report.get("fingerprint") == fingerprint:
                return out_dir, report
        except (OSError, ValueError):
            pass  # a damaged marker: train again
    # Heavy imports only when there is work to do.
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    from coderepair.coordinator.tasks.prompts import render_prompt  # noqa: PLC0415

    tokenizer: Any = AutoTokenizer.from_pretrained(str(model_dir))
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    eos = tokenizer.eos_token or ""
    examples: list[tuple[list[int], int]] = []
    for task in tasks:
        messages = [dict(m) for m in render_prompt(task).messages]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(oracle_answer(task) + eos, add_special_tokens=False)["input_ids"]
        if len(prompt_ids) + len(answer_ids) <= cfg.max_tokens:
            examples.append(([*prompt_ids, *answer_ids], len(prompt_ids)))
    if not examples:
        raise WarmStartError(
            f"every training example is longer than {cfg.max_tokens} tokens: raise max_tokens"
        )
    rng = random.Random(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    model.train()
    losses: list[float] = []
    for _ in range(cfg.steps):
        ids, prompt_len = rng.choice(examples)
        input_ids = torch.tensor([ids])
        labels = input_ids.clone()
        labels[0, :prompt_len] = -100  # learn the answer, not the prompt
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
    tenth = max(1, len(losses) // 10)
    report = {
        "fingerprint": fingerprint,
        "steps": cfg.steps,
        "examples": len(examples),
        "loss_first": sum(losses[:tenth]) / tenth,
        "loss_last": sum(losses[-tenth:]) / tenth,
    }
    staging = out_dir.with_name(out_dir.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for path in model_dir.iterdir():
        if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(path, staging / path.name)
    model.eval()
    model.save_pretrained(staging)
    (staging / _MARKER).write_text(json.dumps(report, sort_keys=True) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return out_dir, report
