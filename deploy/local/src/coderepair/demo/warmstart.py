"""A short supervised warm start on verified repairs, before reinforcement learning.

GRPO learns only from groups whose rewards differ. A base model that never writes the
patch format gets the malformed reward on every sample, so every group is dropped and
the trainer never steps (the field notes measured 0% well-formed for base SmolLM2; a
random tiny model writes none either). The Repairity recipe is SFT, then RL: this
module fine-tunes the start model for a few steps on the oracle fixes of *training*
tasks (never held-out ones), rendered exactly as the coordinator renders prompts and as
`render_edits` writes answers. Sampling at temperature 1 from the result gives a mix
of well-formed and malformed patches, which is the signal GRPO needs.

How far to train is measured, not guessed, where it matters (the tiny model): the
training loss of an example is its answer's negative log-likelihood, and sampling at
temperature 1 writes that exact answer with probability exp(-NLL). With
``target_nll`` the warm start stops as soon as every example's NLL is at most the
target, so every task is answered exactly with at least that probability, on any CPU
(a fixed step count at a high learning rate is chaotic: on one machine 200 steps left
one of two tasks at 0 exact answers in 460 samples, on another at 5 in 16).

The result is cached: the output directory carries a marker with the hash of the
inputs, and a matching marker means the directory is reused as is.
"""

from __future__ import annotations

import hashlib
import json
import math
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
    target_nll: float | None = None
    """Stop once every example's answer NLL (nats, summed over its tokens; exp(-NLL) is
    the chance that temperature-1 sampling writes the answer exactly) is at most this;
    ``steps`` is then a cap, and not reaching the target is an error. None: train
    exactly ``steps`` steps."""
    check_every: int = 20
    """Steps between measurements of the examples' NLL (with ``target_nll``)."""


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

    def answer_nll() -> list[float]:
        """Each example's answer NLL under the model as it is now (eval mode)."""
        model.eval()
        with torch.no_grad():
            nll = []
            for ids, prompt_len in examples:
                input_ids = torch.tensor([ids])
                labels = input_ids.clone()
                labels[0, :prompt_len] = -100
                mean = float(model(input_ids=input_ids, labels=labels).loss)
                nll.append(mean * (len(ids) - prompt_len))
        model.train()
        return nll

    rng = random.Random(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    model.train()
    losses: list[float] = []
    nll: list[float] | None = None
    for step in range(1, cfg.steps + 1):
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
        if cfg.target_nll is not None and (step % cfg.check_every == 0 or step == cfg.steps):
            nll = answer_nll()
            if max(nll) <= cfg.target_nll:
                break
    if cfg.target_nll is not None and (nll is None or max(nll) > cfg.target_nll):
        raise WarmStartError(
            f"after {cfg.steps} steps the answers' NLL is {[round(x, 2) for x in nll or []]}, "
            f"not all at most the target {cfg.target_nll}: raise steps or the learning rate"
        )
    tenth = max(1, len(losses) // 10)
    report = {
        "fingerprint": fingerprint,
        "steps": len(losses),
        "examples": len(examples),
        "loss_first": sum(losses[:tenth]) / tenth,
        "loss_last": sum(losses[-tenth:]) / tenth,
    }
    if nll is not None:
        report["answer_nll"] = [round(x, 4) for x in nll]
        report["exact_answer_chance"] = [round(math.exp(-x), 4) for x in nll]
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
