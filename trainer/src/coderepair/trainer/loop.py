"""The training loop: rollouts in, optimizer steps out, one readable class.

`Trainer.run` reads top to bottom in the order things happen (torchtitan style):

1. ``_setup``: seed, load the policy (and a frozen reference only if KL is on), AdamW,
   a warm-up scheduler, metrics; or ``_resume`` all of that from the latest checkpoint.
2. ``_next_batch``: pull rows from the `RolloutSource`, assemble GRPO groups, and take
   ``prompts_per_step`` groups for step *n*, dropping (and counting) groups older than
   ``n - max_staleness``, groups from versions the trainer has not produced yet, and
   groups whose rewards are all equal (no signal; taking them would only shrink the
   useful batch). A watchdog logs while the trainer waits for rollouts, and a wait acks
   the rows consumed so far (``ack(checkpointed, consumed=...)``): a coordinator holds
   new leases back while too many rows are ahead of the trainer, and rows dropped
   before the step's first checkpoint would otherwise count as ahead for good.
3. ``_train_step``: advantages per group, micro-batched forward/backward of the GRPO loss
   (token-level normalisation over the whole step), gradient clipping; a step whose
   gradient norm is not finite is skipped and counted instead of poisoning the weights.
4. ``on_step(step, model)``: the publisher's hook, every ``publish_every`` steps.
5. ``_log`` metrics, and ``_save_checkpoint`` every ``checkpoint_every`` steps and at the
   end, after which the source is acknowledged up to the consumed cursor.

Step numbers are policy versions: the model starts as version 0 and optimizer step *n*
(counting from 0) turns it into version *n + 1*. A checkpoint records the cursor of the
last row whose fate is decided (trained on or dropped); a resumed run reopens the source
after it, so it consumes exactly the rows an uninterrupted run would have.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from coderepair.protocol.errors import ProtocolError
from coderepair.protocol.rollout import RolloutRecord
from coderepair.trainer.batch import pack, token_logprobs
from coderepair.trainer.config import TrainerConfig
from coderepair.trainer.loss import group_advantages, grpo_loss
from coderepair.trainer.metrics import MetricsLogger
from coderepair.trainer.rollouts import GroupAssembler, RolloutGroup, RolloutSource

__all__ = ["CheckpointError", "OnStep", "TrainResult", "Trainer", "TrainerError"]

log = logging.getLogger(__name__)

OnStep = Callable[[int, torch.nn.Module], None]
"""Called as on_step(version, model) after the optimizer step that produced ``version``."""

_STATE_FILE = "trainer_state.pt"
_CHECKPOINTS = "checkpoints"
# How long one read() may block before the loop checks the watchdog again.
_READ_TIMEOUT_S = 1.0


class TrainerError(ProtocolError):
    """The trainer cannot start or continue; the message says why and what to do."""


class CheckpointError(TrainerError):
    """A checkpoint is missing, incomplete or belongs to another run."""


@dataclass
class StepBatch:
    """The groups one optimizer step trains on, and the cursor they end at."""

    groups: list[RolloutGroup]
    cursor: int


@dataclass
class TrainResult:
    """How a run ended."""

    steps: int
    """Optimizer steps done (= the policy version of the final weights)."""
    cursor: int
    """Cursor of the last row consumed."""
    reason: str
    """'max_steps' or 'source_ended'."""


@dataclass
class _Counters:
    """Running totals since the start of the run (restored on resume)."""

    stale_rows: int = 0
    future_rows: int = 0
    zero_variance_groups: int = 0
    trained_rows: int = 0
    skipped_steps: int = 0
    skipped_tokens: int = 0
    wait_s: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


class Trainer:
    """Asynchronous GRPO on rollouts from a `RolloutSource`."""

    def __init__(
        self,
        config: TrainerConfig,
        source: RolloutSource,
        *,
        on_step: OnStep | None = None,
        resume: bool = False,
    ) -> None:
        self.config = config
        self.source = source
        self.on_step = on_step
        self.resume = resume
        self.step = 0
        self.cursor = 0
        self._checkpointed = 0
        """Cursor of the last checkpoint (``cursor`` runs ahead when checkpoint_every > 1)."""
        self._consumed_acked = 0
        """Largest consumed cursor acknowledged to the source."""
        self.counters = _Counters()
        self._assembler = GroupAssembler()
        self._ready: deque[RolloutGroup] = deque()
        self._source_ended = False
        self.model: Any = None
        self.ref_model: Any = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.metrics: MetricsLogger | None = None

    # ------------------------------------------------------------------ 0. the loop

    def run(self) -> TrainResult:
        """Train until ``max_steps`` or until the source ends; checkpoint at the end."""
        self._setup()
        reason = "max_steps"
        try:
            while self.step < self.config.max_steps:
                batch = self._next_batch()
                if batch is None:
                    reason = "source_ended"
                    break
                started = time.perf_counter()
                stats = self._train_step(batch)
                stats["time/step_s"] = time.perf_counter() - started
                self.cursor = batch.cursor
                self.step += 1
                if self.on_step is not None and self.step % self.config.publish_every == 0:
                    self.on_step(self.step, self.model)
                self._log(batch, stats)
                if self.step % self.config.checkpoint_every == 0:
                    self._save_checkpoint()
            if self.step % self.config.checkpoint_every != 0:
                self._save_checkpoint()
        finally:
            if self.metrics is not None:
                self.metrics.close()
            self.source.close()
        return TrainResult(steps=self.step, cursor=self.cursor, reason=reason)

    # ------------------------------------------------------------------ 1. setup / resume

    def _setup(self) -> None:
        cfg = self.config
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        (cfg.output_dir / "config.json").write_text(cfg.model_dump_json(indent=2) + "\n")
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        checkpoint = self._latest_checkpoint() if self.resume else None
        if self.resume and checkpoint is None:
            log.info("no checkpoint under %s: starting a new run", cfg.output_dir)
        weights = str(checkpoint) if checkpoint is not None else cfg.model
        try:
            self.model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32)
            if cfg.loss.kl_coef > 0:
                self.ref_model = AutoModelForCausalLM.from_pretrained(
                    cfg.model, dtype=torch.float32
                )
                self.ref_model.eval().requires_grad_(False)
        except OSError as exc:
            raise TrainerError(
                f"cannot load the model from {weights}: {exc}; `model` must be a Hugging Face "
                "model directory (config.json + weights)"
            ) from exc
        self.model.train()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=cfg.learning_rate,
            betas=cfg.adam_betas,
            weight_decay=cfg.weight_decay,
        )
        warmup = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)) if warmup else 1.0
        )
        if checkpoint is not None:
            self._resume(checkpoint)
        self.metrics = MetricsLogger(
            cfg.metrics, cfg.output_dir, run_config=cfg.model_dump(mode="json")
        )
        self.source.open(self.cursor)

    def _resume(self, checkpoint: Path) -> None:
        assert self.optimizer is not None and self.scheduler is not None
        try:
            state = torch.load(checkpoint / _STATE_FILE, weights_only=True)
        except (OSError, RuntimeError, EOFError) as exc:
            raise CheckpointError(
                f"checkpoint {checkpoint} cannot be read ({exc}); delete that directory to "
                "resume from the previous checkpoint"
            ) from exc
        if state.get("model") != self.config.model:
            raise CheckpointError(
                f"checkpoint {checkpoint} was trained from {state.get('model')!r}, this config "
                f"starts from {self.config.model!r}: use another output_dir or the same model"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(_tupled(state["python_rng"]))
        self.step = int(state["step"])
        self.cursor = int(state["cursor"])
        counters = state["counters"]
        extra = counters.pop("extra", {})
        self.counters = _Counters(**counters, extra=dict(extra))
        self._checkpointed = self._consumed_acked = self.cursor
        log.info("resumed %s at step %d, cursor %d", checkpoint, self.step, self.cursor)

    # ------------------------------------------------------------------ 2. rollouts → batch

    def _next_batch(self) -> StepBatch | None:
        """``prompts_per_step`` usable groups for this step, or None if the source ended."""
        cfg = self.config
        oldest = self.step - cfg.max_staleness
        taken: list[RolloutGroup] = []
        cursor = self.cursor
        waited = 0.0
        warned_at = 0.0
        while len(taken) < cfg.prompts_per_step:
            if not self._ready:
                if self._source_ended:
                    return None
                started = time.perf_counter()
                rows = self.source.read(cfg.samples_per_step, _READ_TIMEOUT_S)
                waited += time.perf_counter() - started
                if rows is None:
                    self._source_ended = True
                    self._ready.extend(self._assembler.flush())
                else:
                    self._ready.extend(self._assembler.push(rows))
                    if not rows:
                        self._ack_consumed(cursor)
                    if not rows and waited - warned_at >= cfg.rollout_wait_warn_s:
                        warned_at = waited
                        log.warning(
                            "step %d has waited %.0f s for rollouts (%d of %d groups so far, "
                            "%d stale rows and %d zero-variance groups dropped in this run)",
                            self.step,
                            waited,
                            len(taken),
                            cfg.prompts_per_step,
                            self.counters.stale_rows,
                            self.counters.zero_variance_groups,
                        )
                continue
            group = self._ready.popleft()
            # The group's fate is decided here, whichever it is: everything up to its last
            # row is consumed once this step is checkpointed.
            cursor = group.last_cursor
            version = group.policy_version
            if version < oldest:
                self.counters.stale_rows += len(group.rows)
            elif version > self.step:
                self.counters.future_rows += len(group.rows)
            elif len({row.record.reward for row in group.rows}) < 2:
                self.counters.zero_variance_groups += 1
            else:
                taken.append(group)
        self.counters.wait_s += waited
        self.counters.extra["last_wait_s"] = waited
        return StepBatch(groups=taken, cursor=cursor)

    def _ack_consumed(self, cursor: int) -> None:
        """While waiting: every row up to ``cursor`` is decided or held for this step.

        Without it, a coordinator's back-pressure (``max_rollouts_ahead``) counts the
        rows this trainer dropped as still ahead of it; once they fill the limit no lease
        is granted, no usable group comes, no step is checkpointed, and the run stalls.
        """
        # A lost ack (coordinator restarting) is sent again at the next empty read: the
        # room it frees is what the rows this trainer waits for need.
        if cursor > self._consumed_acked and self.source.ack(self._checkpointed, consumed=cursor):
            self._consumed_acked = cursor

    # ------------------------------------------------------------------ 3. the update

    def _train_step(self, batch: StepBatch) -> dict[str, float]:
        assert self.optimizer is not None and self.scheduler is not None
        cfg = self.config
        records: list[RolloutRecord] = [row.record for g in batch.groups for row in g.rows]
        group_ids = torch.tensor(
            [i for i, g in enumerate(batch.groups) for _ in g.rows], dtype=torch.long
        )
        rewards = torch.tensor([r.reward for r in records], dtype=torch.float64)
        adv = group_advantages(rewards, group_ids, eps=cfg.loss.advantage_eps)
        kept = [i for i in range(len(records)) if bool(adv.keep[i])]
        total_tokens = sum(len(records[i].completion_ids) for i in kept)
        pad_id = _pad_id(self.model)
        sums: dict[str, float] = {}
        loss_value = 0.0
        self.optimizer.zero_grad(set_to_none=True)
        for start in range(0, len(kept), cfg.micro_batch_size):
            idx = kept[start : start + cfg.micro_batch_size]
            packed = pack([records[i] for i in idx], adv.advantages[idx], pad_id)
            if packed.targets.shape[1] == 0:
                continue  # only empty completions: nothing to score
            want_entropy = cfg.loss.entropy_coef > 0
            logprobs, entropy = token_logprobs(
                self.model, packed, temperature=cfg.temperature, with_entropy=want_entropy
            )
            ref = None
            if self.ref_model is not None:
                with torch.no_grad():
                    ref, _ = token_logprobs(self.ref_model, packed, temperature=cfg.temperature)
            out = grpo_loss(
                logprobs,
                packed.behaviour_logprobs,
                packed.advantages,
                packed.mask,
                cfg.loss,
                token_normaliser=float(total_tokens),
                ref_logprobs=ref,
                entropy=entropy,
            )
            out.loss.backward()
            loss_value += float(out.loss.detach())
            for name, value in out.stats.items():
                sums[name] = (
                    max(sums.get(name, 0.0), value)
                    if name == "ratio_max"
                    else (sums.get(name, 0.0) + value)
                )
        grad_norm = float(
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        )
        if torch.isfinite(torch.tensor(grad_norm)):
            self.optimizer.step()
        else:
            self.counters.skipped_steps += 1
            log.warning("step %d: gradient norm is %s; step skipped", self.step, grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.counters.trained_rows += len(kept)
        self.counters.skipped_tokens += int(sums.get("skipped_tokens", 0.0))
        tokens = max(sums.get("tokens", 0.0), 1.0)
        return {
            "loss": loss_value,
            "grad_norm": grad_norm,
            "lr": float(self.scheduler.get_last_lr()[0]),
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std()) if len(records) > 1 else 0.0,
            "tokens": sums.get("tokens", 0.0),
            "samples": float(len(kept)),
            "clip/low_frac": sums.get("clipped_low", 0.0) / tokens,
            "clip/high_frac": sums.get("clipped_high", 0.0) / tokens,
            "clip/delta_frac": sums.get("delta_capped", 0.0) / tokens,
            "ratio/mean": sums.get("ratio_sum", 0.0) / tokens,
            "ratio/max": sums.get("ratio_max", 0.0),
            "ratio/abs_log_mean": sums.get("abs_log_ratio_sum", 0.0) / tokens,
            "dropped/zero_variance_in_step": float(adv.dropped_groups),
            "dropped/nonfinite_tokens_in_step": sums.get("skipped_tokens", 0.0),
        }

    # ------------------------------------------------------------------ 5. metrics, checkpoints

    def _log(self, batch: StepBatch, stats: dict[str, float]) -> None:
        assert self.metrics is not None
        c = self.counters
        step_s = stats.get("time/step_s", 0.0)
        scalars = dict(stats)
        scalars.update(
            {
                "cursor": float(batch.cursor),
                "tokens_per_s": stats["tokens"] / step_s if step_s > 0 else 0.0,
                "time/wait_s": c.extra.get("last_wait_s", 0.0),
                "time/wait_total_s": c.wait_s,
                "rollouts/trained_total": float(c.trained_rows),
                "dropped/stale_rows_total": float(c.stale_rows),
                "dropped/future_rows_total": float(c.future_rows),
                "dropped/zero_variance_groups_total": float(c.zero_variance_groups),
                "dropped/partial_groups_total": float(self._assembler.partial_groups),
                "skipped/steps_total": float(c.skipped_steps),
                "skipped/tokens_total": float(c.skipped_tokens),
            }
        )
        staleness = [float(self.step - 1 - g.policy_version) for g in batch.groups]
        self.metrics.log(self.step, scalars, {"staleness": staleness})

    def _checkpoint_root(self) -> Path:
        return self.config.output_dir / _CHECKPOINTS

    def _latest_checkpoint(self) -> Path | None:
        root = self._checkpoint_root()
        if not root.is_dir():
            return None
        done = sorted(p for p in root.glob("step-*") if (p / _STATE_FILE).is_file())
        return done[-1] if done else None

    def _save_checkpoint(self) -> None:
        """Write model + trainer state atomically, then acknowledge the cursor."""
        assert self.optimizer is not None and self.scheduler is not None
        root = self._checkpoint_root()
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{self.step:08d}"
        staging = root / f".{final.name}.tmp"
        if staging.exists():
            shutil.rmtree(staging)
        self.model.save_pretrained(staging)
        counters = {
            "stale_rows": self.counters.stale_rows,
            "future_rows": self.counters.future_rows,
            "zero_variance_groups": self.counters.zero_variance_groups,
            "trained_rows": self.counters.trained_rows,
            "skipped_steps": self.counters.skipped_steps,
            "skipped_tokens": self.counters.skipped_tokens,
            "wait_s": self.counters.wait_s,
            "extra": dict(self.counters.extra),
        }
        torch.save(
            {
                "model": self.config.model,
                "step": self.step,
                "cursor": self.cursor,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(),
                "counters": counters,
            },
            staging / _STATE_FILE,
        )
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        self.source.ack(self.cursor)
        self._checkpointed = self.cursor
        self._consumed_acked = max(self._consumed_acked, self.cursor)
        done = sorted(p for p in root.glob("step-*") if (p / _STATE_FILE).is_file())
        for old in done[: -self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)


def _pad_id(model: Any) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config, "eos_token_id", None)
    if isinstance(pad, list):
        pad = pad[0] if pad else None
    # Padded positions are masked out of attention and loss: any valid id will do.
    return int(pad) if pad is not None else 0


def _tupled(value: Any) -> Any:
    """random.setstate needs tuples; torch.load may give lists back."""
    if isinstance(value, list | tuple):
        return tuple(_tupled(v) for v in value)
    return value
