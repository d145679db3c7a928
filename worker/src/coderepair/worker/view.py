"""What a volunteer sees while `join` runs: a rich live panel, or JSON lines.

The work loop only updates a `WorkerStats` and reports events (`View.event`); a view
renders them. `LiveView` redraws a small table a few times a second (policy version,
tokens/s, rollouts submitted / accepted / rejected with the last rejection reason,
sandbox throughput, credit) with progress bars for downloads. `JsonView` (``--json-logs``)
prints one JSON object per event and a ``stats`` object every few seconds on stdout,
for headless machines and log collectors.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TextIO

__all__ = ["JsonView", "LiveView", "View", "WorkerStats"]


@dataclass
class WorkerStats:
    """Counters of one `join` session, updated by the work loop."""

    started: float = field(default_factory=time.monotonic)
    coordinator: str = ""
    worker_id: str = ""
    run_id: str = ""
    engine: str = ""
    sandbox: str = ""
    policy_version: int = 0
    state: str = "starting"
    leases: int = 0
    rollouts_generated: int = 0
    rollouts_submitted: int = 0
    rollouts_accepted: int = 0
    rollouts_rejected: int = 0
    batches_accepted: int = 0
    batches_rejected: int = 0
    last_rejection: str = ""
    tokens_generated: int = 0
    tokens_per_second: float = 0.0
    sandbox_jobs: int = 0
    sandbox_seconds: float = 0.0
    mean_reward: float = 0.0
    credit_granted: int = 0
    credit_pending: int = 0
    retries: int = 0
    reconnects: int = 0

    @property
    def sandbox_jobs_per_minute(self) -> float:
        elapsed = time.monotonic() - self.started
        return 60.0 * self.sandbox_jobs / elapsed if elapsed > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("started")
        out["uptime_s"] = round(time.monotonic() - self.started, 1)
        out["sandbox_jobs_per_minute"] = round(self.sandbox_jobs_per_minute, 2)
        out["tokens_per_second"] = round(self.tokens_per_second, 2)
        out["mean_reward"] = round(self.mean_reward, 4)
        return out


class View(Protocol):
    """Where the loop's events and counters go."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def event(self, kind: str, message: str, **fields: Any) -> None: ...

    def download(self, name: str, total_bytes: int) -> None: ...

    def downloaded(self, name: str, done_bytes: int) -> None: ...

    def refresh(self) -> None: ...


class JsonView:
    """One JSON object per line on ``stream``: events, and stats every ``every_s``."""

    def __init__(self, stats: WorkerStats, stream: TextIO | None = None, every_s: float = 5.0):
        self.stats = stats
        self._stream = stream or sys.stdout
        self._every = every_s
        self._last = 0.0

    def _emit(self, entry: dict[str, Any]) -> None:
        self._stream.write(json.dumps({"ts": round(time.time(), 3), **entry}) + "\n")
        self._stream.flush()

    def start(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self._emit({"event": "stats", **self.stats.to_dict()})

    def event(self, kind: str, message: str, **fields: Any) -> None:
        self._emit({"event": kind, "message": message, **fields})

    def download(self, name: str, total_bytes: int) -> None:
        self.event("download", f"downloading {name}", name=name, total_bytes=total_bytes)

    def downloaded(self, name: str, done_bytes: int) -> None:
        self.event("downloaded", f"downloaded {name}", name=name, bytes=done_bytes)

    def refresh(self) -> None:
        now = time.monotonic()
        if now - self._last >= self._every:
            self._last = now
            self._emit({"event": "stats", **self.stats.to_dict()})


class LiveView:
    """A rich `Live` panel on the terminal, redrawn ``refresh_per_second`` times."""

    def __init__(self, stats: WorkerStats, console: Any = None, refresh_per_second: float = 4):
        from rich.console import Console  # noqa: PLC0415
        from rich.progress import (  # noqa: PLC0415
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TransferSpeedColumn,
        )

        self.stats = stats
        self.console = console or Console(highlight=False)
        self._rate = refresh_per_second
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=self.console,
        )
        self._tasks: dict[str, Any] = {}
        self._events: list[str] = []
        self._live: Any = None

    def _render(self) -> Any:
        from rich.console import Group  # noqa: PLC0415
        from rich.markup import escape  # noqa: PLC0415
        from rich.table import Table  # noqa: PLC0415

        s = self.stats
        table = Table(title="coderepair-worker", show_header=False, title_justify="left")
        table.add_column("what", style="bold", no_wrap=True)
        table.add_column("value", overflow="fold")
        table.add_row("coordinator", f"{s.coordinator}  run {s.run_id or '-'}  ({s.state})")
        table.add_row("worker", s.worker_id or "-")
        table.add_row("policy", f"v{s.policy_version}  engine {s.engine or '-'}")
        table.add_row("tokens/s", f"{s.tokens_per_second:.1f}  ({s.tokens_generated} tokens)")
        table.add_row(
            "rollouts",
            f"{s.rollouts_submitted} submitted  [green]{s.rollouts_accepted} accepted[/]  "
            f"[red]{s.rollouts_rejected} rejected[/]  (mean reward {s.mean_reward:+.3f})",
        )
        if s.last_rejection:
            table.add_row("last rejection", f"[red]{escape(s.last_rejection)}[/]")
        table.add_row(
            "sandbox",
            f"{s.sandbox or '-'}  {s.sandbox_jobs} jobs  {s.sandbox_jobs_per_minute:.1f}/min",
        )
        table.add_row("credit", f"{s.credit_granted} granted  {s.credit_pending} pending")
        if s.retries or s.reconnects:
            table.add_row("network", f"{s.retries} retries  {s.reconnects} reconnects")
        parts: list[Any] = [table]
        if self._tasks:
            parts.append(self._progress)
        parts.extend(escape(line) for line in self._events[-5:])
        return Group(*parts)

    def start(self) -> None:
        from rich.live import Live  # noqa: PLC0415

        self._live = Live(
            self._render(),
            console=self.console,
            refresh_per_second=self._rate,
            transient=False,
        )
        self._live.start()

    def stop(self) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.stop()
            self._live = None

    def event(self, kind: str, message: str, **fields: Any) -> None:
        self._events.append(f"{time.strftime('%H:%M:%S')} {message}")
        del self._events[:-20]
        self.refresh()

    def download(self, name: str, total_bytes: int) -> None:
        self._tasks[name] = self._progress.add_task(name, total=total_bytes)
        self.refresh()

    def downloaded(self, name: str, done_bytes: int) -> None:
        task = self._tasks.get(name)
        if task is not None:
            self._progress.update(task, completed=done_bytes)
        self.refresh()

    def refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._render())
