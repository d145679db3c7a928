"""Task pools: which tasks a lease gets, rendered to exact prompt token ids, with seeds.

The coordinator, not the worker, chooses prompts and per-sample seeds, so work cannot be
precomputed or cherry-picked. Each run has a `TaskPool` over its task set's split:
tasks are handed out round-robin in a seeded shuffled order, and a task held by an open
lease is not handed out again until the lease ends (submitted, released, expired or
revoked). Which tasks are held is re-read from the database's open leases on every
sweep (`resync`), so a lease closed by any path, or by another replica, frees its
tasks; leases being created right now are kept as reservations across a resync.

Prompts are rendered once per task at start-up (`PromptEncoder`): the chat template of
the run's tokenizer applied to `tasks.prompts.render_prompt`'s messages, with a
generation prompt. Seeds are 64 random bits each, from the OS's CSPRNG.
"""

from __future__ import annotations

import hashlib
import random
import secrets
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coderepair.coordinator.tasks.prompts import render_prompt
from coderepair.protocol.errors import ProtocolError
from coderepair.protocol.task import RepairTask, read_taskset

__all__ = [
    "PooledTask",
    "PromptEncoder",
    "Reservation",
    "SchedulerError",
    "TaskPool",
    "load_pool",
    "new_seeds",
]


class SchedulerError(ProtocolError):
    """A run's tasks or tokenizer cannot be loaded."""


@dataclass(frozen=True)
class PooledTask:
    """A task ready to lease: its prompt as text and exact token ids, and its JSON."""

    task_id: str
    prompt_text: str
    prompt_ids: tuple[int, ...]
    task_json: bytes


class PromptEncoder:
    """Renders tasks with a Hugging Face tokenizer's chat template."""

    def __init__(self, tokenizer_path: Path) -> None:
        # transformers is heavy: imported only when a coordinator actually serves.
        from transformers import AutoTokenizer  # noqa: PLC0415

        try:
            self._tokenizer: Any = AutoTokenizer.from_pretrained(str(tokenizer_path))
        except (OSError, ValueError) as exc:
            raise SchedulerError(
                f"no tokenizer could be loaded from {tokenizer_path} ({exc}): point "
                "runs.tokenizer_path at the policy's tokenizer directory"
            ) from exc
        template = getattr(self._tokenizer, "chat_template", None)
        if not isinstance(template, str) or not template:
            raise SchedulerError(
                f"the tokenizer in {tokenizer_path} has no chat template: use the policy's "
                "instruct tokenizer"
            )
        self.chat_template_sha256 = hashlib.sha256(template.encode()).hexdigest()

    def encode(self, task: RepairTask) -> tuple[str, tuple[int, ...]]:
        """The rendered prompt text and its token ids."""
        messages = [dict(m) for m in render_prompt(task).messages]
        text: str = self._tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        return text, tuple(int(i) for i in ids)


def load_pool(tasks_path: Path, split: str, encoder: PromptEncoder, *, seed: int = 0) -> TaskPool:
    """A pool over one split of a task-set file."""
    try:
        taskset = read_taskset(tasks_path)
    except OSError as exc:
        raise SchedulerError(
            f"cannot read the task set {tasks_path}: {exc.strerror}; build one with "
            "`coderepair-coordinator tasks build --out PATH`"
        ) from exc
    chosen = [t for t in taskset.tasks if t.split == split]
    if not chosen:
        raise SchedulerError(f"task set {tasks_path} has no tasks in split {split!r}")
    pooled = []
    for task in chosen:
        text, ids = encoder.encode(task)
        pooled.append(
            PooledTask(
                task_id=task.task_id,
                prompt_text=text,
                prompt_ids=ids,
                task_json=task.to_json_line().encode(),
            )
        )
    return TaskPool(pooled, chat_template_sha256=encoder.chat_template_sha256, seed=seed)


def new_seeds(n: int) -> list[int]:
    """``n`` fresh uint64 sampling seeds."""
    return [secrets.randbits(64) for _ in range(n)]


@dataclass(frozen=True)
class Reservation:
    """Tasks set aside for a lease that is being created."""

    token: int
    tasks: tuple[PooledTask, ...]


class TaskPool:
    """Round-robin over a run's tasks, skipping tasks held by open leases. Thread-safe."""

    def __init__(
        self, tasks: Sequence[PooledTask], *, chat_template_sha256: str, seed: int = 0
    ) -> None:
        if not tasks:
            raise SchedulerError("a task pool needs at least one task")
        self.chat_template_sha256 = chat_template_sha256
        self._by_id = {t.task_id: t for t in tasks}
        self._order = list(self._by_id)
        random.Random(seed).shuffle(self._order)
        self._next = 0
        self._lock = threading.Lock()
        self._leased: dict[str, str] = {}  # task_id -> lease_id (open leases)
        # The same, per lease: a lease ending frees its tasks without a scan of all held
        # tasks, and a resync need not re-read the tasks of leases this pool bound.
        self._by_lease: dict[str, tuple[str, ...]] = {}
        self._reserved: dict[int, tuple[str, ...]] = {}  # token -> task ids
        self._tokens = 0
        # Generation of each bind, so a resync from an older database snapshot keeps
        # leases bound after that snapshot was read.
        self._generation = 0
        self._bound_at: dict[str, int] = {}  # lease_id -> generation of its bind

    def __len__(self) -> int:
        return len(self._order)

    def get(self, task_id: str) -> PooledTask | None:
        return self._by_id.get(task_id)

    def free_count(self) -> int:
        with self._lock:
            return len(self._order) - len(self._busy())

    def held_count(self) -> int:
        """Tasks held by open leases or reserved for leases being created."""
        with self._lock:
            return len(self._busy())

    def _busy(self) -> set[str]:
        busy = set(self._leased)
        for ids in self._reserved.values():
            busy.update(ids)
        return busy

    def reserve(self, n: int) -> Reservation | None:
        """Set aside up to ``n`` free tasks; None when every task is held."""
        with self._lock:
            busy = self._busy()
            picked: list[str] = []
            for _ in range(len(self._order)):
                if len(picked) >= n:
                    break
                task_id = self._order[self._next]
                self._next = (self._next + 1) % len(self._order)
                if task_id not in busy:
                    picked.append(task_id)
            if not picked:
                return None
            self._tokens += 1
            self._reserved[self._tokens] = tuple(picked)
            return Reservation(self._tokens, tuple(self._by_id[t] for t in picked))

    def bind(self, reservation: Reservation, lease_id: str) -> None:
        """The lease was created: its tasks are held until it ends."""
        with self._lock:
            self._generation += 1
            self._bound_at[lease_id] = self._generation
            task_ids = self._reserved.pop(reservation.token, ())
            for task_id in task_ids:
                self._leased[task_id] = lease_id
            self._by_lease[lease_id] = self._by_lease.get(lease_id, ()) + task_ids

    def cancel(self, reservation: Reservation) -> None:
        """The lease was not created: its tasks are free again."""
        with self._lock:
            self._reserved.pop(reservation.token, None)

    def give_back(self, lease_id: str) -> None:
        """The lease ended: free its tasks at once (the next resync would too)."""
        with self._lock:
            for task_id in self._by_lease.pop(lease_id, ()):
                if self._leased.get(task_id) == lease_id:
                    del self._leased[task_id]

    def leases(self) -> dict[str, tuple[str, ...]]:
        """The open leases this pool holds tasks for: lease_id -> task ids (a copy)."""
        with self._lock:
            return dict(self._by_lease)

    def generation(self) -> int:
        """Take this before reading the open leases that are passed to `resync`."""
        with self._lock:
            return self._generation

    def resync(self, open_leases: Mapping[str, Iterable[str]], generation: int) -> None:
        """Hold exactly the tasks of these open leases (lease_id -> task ids), read after
        `generation()` returned ``generation``, plus those bound since."""
        with self._lock:
            leased = {
                task_id: lease_id
                for lease_id, task_ids in open_leases.items()
                for task_id in task_ids
                if task_id in self._by_id
            }
            for task_id, lease_id in self._leased.items():
                if self._bound_at.get(lease_id, 0) > generation:
                    leased[task_id] = lease_id
            self._leased = leased
            by_lease: dict[str, list[str]] = {}
            for task_id, lease_id in leased.items():
                by_lease.setdefault(lease_id, []).append(task_id)
            self._by_lease = {k: tuple(v) for k, v in by_lease.items()}
            live = set(by_lease)
            self._bound_at = {k: g for k, g in self._bound_at.items() if k in live}
