"""The dashboard's HTML: figures, tables and plots (inline SVG), rendered server-side.

Everything visible is rendered here, in Python, from a `StatsSnapshot`: the first page
load and every refresh (the page's script swaps in `render_panels` fetched from
/api/panels), so there is one renderer, testable without a browser, and the page needs
no network and no JavaScript library. Every string that comes from the database (run
ids, worker names, client versions, ban and rejection reasons, metric names) passes
through `_e` (HTML escaping) before it touches markup; numbers are formatted by us.

Plots are SVG paths: one `<path class="series">` per series, line charts as M/L
segments (a gap where a bucket has no value) and stacked bars as one path of rectangles
per outcome, so a browser test can check that they render by their `d` attributes.
"""

from __future__ import annotations

import html
import time
import zlib
from collections.abc import Sequence
from urllib.parse import quote

from coderepair.coordinator.dashboard.stats import ACCEPTED, StatsSnapshot

__all__ = ["render_page", "render_panels"]

_WIDTH, _HEIGHT = 560, 210
_LEFT, _RIGHT, _TOP, _BOTTOM = 52, 12, 26, 30
_ACCEPTED_COLOUR = "#2e9e44"
# Distinguishable on white; a reason keeps its colour across refreshes (hash, not order).
_PALETTE = (
    "#d62728",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#1f77b4",
    "#aa3377",
)


def _e(value: object) -> str:
    """HTML-escaped text (quotes too, so it is safe in attribute values)."""
    return html.escape(str(value), quote=True)


def _colour(outcome: str) -> str:
    if outcome == ACCEPTED:
        return _ACCEPTED_COLOUR
    return _PALETTE[zlib.crc32(outcome.encode()) % len(_PALETTE)]


def _clock(unix_ms: int | None) -> str:
    if unix_ms is None:
        return "–"
    return time.strftime("%H:%M:%S", time.gmtime(unix_ms / 1000))


def _datetime(unix_ms: int | None) -> str:
    if unix_ms is None:
        return "–"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(unix_ms / 1000)) + " UTC"


def _num(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _ago(now_ms: int, then_ms: int | None) -> str:
    if then_ms is None:
        return "–"
    seconds = max(now_ms - then_ms, 0) / 1000
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


# ---------------------------------------------------------------- plots


def _nice_max(value: float) -> float:
    # Round the axis top up to 1, 2 or 5 times a power of ten.
    if value <= 0:
        return 1.0
    magnitude = 10 ** len(str(int(value))) / 10 if value >= 1 else 1.0
    while magnitude > value:
        magnitude /= 10
    for step in (1, 2, 5, 10):
        if step * magnitude >= value:
            return step * magnitude
    return 10 * magnitude  # pragma: no cover - the loop always returns


def _frame(title: str, y_min: float, y_max: float, x_labels: Sequence[str], y_digits: int) -> str:
    plot_w, plot_h = _WIDTH - _LEFT - _RIGHT, _HEIGHT - _TOP - _BOTTOM
    parts = [
        f'<text class="title" x="{_LEFT}" y="16">{_e(title)}</text>',
        f'<rect class="plot" x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}"/>',
    ]
    for i in range(3):
        y = _TOP + plot_h - i * plot_h / 2
        value = y_min + (y_max - y_min) * i / 2
        parts.append(
            f'<line class="grid" x1="{_LEFT}" x2="{_WIDTH - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
        )
        parts.append(
            f'<text class="tick" x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{_num(value, y_digits)}</text>"
        )
    n = len(x_labels)
    for i, label in enumerate(x_labels):
        if n > 1 and i not in (0, n // 2, n - 1):
            continue
        x = _LEFT + (plot_w * (i + 0.5) / n if n else 0)
        anchor = "start" if i == 0 and n > 1 else "end" if i == n - 1 and n > 1 else "middle"
        parts.append(
            f'<text class="tick" x="{x:.1f}" y="{_HEIGHT - 10}" text-anchor="{anchor}">'
            f"{_e(label)}</text>"
        )
    return "".join(parts)


def _svg(chart_id: str, body: str, empty: bool) -> str:
    note = (
        f'<text class="empty" x="{_WIDTH / 2}" y="{_HEIGHT / 2}" text-anchor="middle">'
        "no data yet</text>"
        if empty
        else ""
    )
    return (
        f'<svg id="{_e(chart_id)}" class="chart" viewBox="0 0 {_WIDTH} {_HEIGHT}" '
        f'width="{_WIDTH}" height="{_HEIGHT}" role="img" xmlns="http://www.w3.org/2000/svg">'
        f"{body}{note}</svg>"
    )


def line_chart(
    chart_id: str,
    title: str,
    x_labels: Sequence[str],
    series: Sequence[tuple[str, str, Sequence[float | None]]],
    *,
    y_digits: int = 2,
    zero_based: bool = True,
) -> str:
    """A line chart: `series` are (name, colour, one value or None per x label)."""
    values = [v for _, _, ys in series for v in ys if v is not None]
    empty = not values
    low = 0.0 if zero_based or empty else min(values)
    high = max(values, default=0.0)
    if zero_based:
        high = _nice_max(high)
    elif high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    plot_w, plot_h = _WIDTH - _LEFT - _RIGHT, _HEIGHT - _TOP - _BOTTOM
    n = len(x_labels)
    parts = [_frame(title, low, high, x_labels, y_digits)]
    for name, colour, ys in series:
        commands: list[str] = []
        dots: list[str] = []
        pen_down = False
        for i, value in enumerate(ys):
            if value is None:
                pen_down = False
                continue
            x = _LEFT + plot_w * (i + 0.5) / n
            y = _TOP + plot_h - (value - low) / (high - low) * plot_h
            commands.append(f"{'L' if pen_down else 'M'}{x:.1f} {y:.1f}")
            dots.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}"/>')
            pen_down = True
        if commands:
            parts.append(
                f'<path class="series" data-series="{_e(name)}" fill="none" '
                f'stroke="{colour}" stroke-width="2" d="{" ".join(commands)}"/>'
            )
            if n <= 60:
                parts.extend(dots)
    return _svg(chart_id, "".join(parts), empty)


def stacked_bars(
    chart_id: str, title: str, x_labels: Sequence[str], stacks: Sequence[dict[str, int]]
) -> str:
    """Stacked bars: one dict outcome -> count per x label; one path per outcome."""
    totals = [sum(stack.values()) for stack in stacks]
    empty = not any(totals)
    high = _nice_max(float(max(totals, default=0)))
    plot_w, plot_h = _WIDTH - _LEFT - _RIGHT, _HEIGHT - _TOP - _BOTTOM
    n = len(x_labels)
    slot = plot_w / n if n else plot_w
    bar = max(slot * 0.8, 1.0)
    outcomes = sorted({k for stack in stacks for k in stack}, key=lambda k: (k != ACCEPTED, k))
    paths: dict[str, list[str]] = {k: [] for k in outcomes}
    for i, stack in enumerate(stacks):
        x = _LEFT + slot * i + (slot - bar) / 2
        base = 0
        for outcome in outcomes:
            count = stack.get(outcome, 0)
            if not count:
                continue
            y_top = _TOP + plot_h - (base + count) / high * plot_h
            h = count / high * plot_h
            paths[outcome].append(f"M{x:.1f} {y_top:.1f}h{bar:.1f}v{h:.1f}h{-bar:.1f}Z")
            base += count
    parts = [_frame(title, 0.0, high, x_labels, 0)]
    for outcome in outcomes:
        parts.append(
            f'<path class="series" data-series="{_e(outcome)}" fill="{_colour(outcome)}" '
            f'd="{"".join(paths[outcome])}"/>'
        )
    return _svg(chart_id, "".join(parts), empty)


def _legend(outcomes: Sequence[str]) -> str:
    items = "".join(
        f'<li><span class="swatch" data-colour="{_colour(o)}">'
        f'<svg width="10" height="10"><rect width="10" height="10" fill="{_colour(o)}"/></svg>'
        f"</span>{_e(o)}</li>"
        for o in outcomes
    )
    return f'<ul class="legend">{items}</ul>'


# ---------------------------------------------------------------- panels


def _card(card_id: str, label: str, value: str, detail: str = "") -> str:
    return (
        f'<div class="card"><div class="label">{_e(label)}</div>'
        f'<div class="value" id="{card_id}">{value}</div>'
        f'<div class="detail">{detail}</div></div>'
    )


def _table(table_id: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A table; cells must already be escaped or formatted by us."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    if not rows:
        body = f'<tr><td class="none" colspan="{len(headers)}">none</td></tr>'
    else:
        body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _cards(snap: StatsSnapshot) -> str:
    run = snap.run()
    workers, audits = snap.workers, snap.audits
    oldest = _ago(snap.generated_unix_ms, audits.oldest_pending_unix_ms)
    return "".join(
        (
            _card(
                "stat-workers-online",
                "workers online",
                f"{workers.online}",
                f"{workers.registered} registered, {workers.banned} banned",
            ),
            _card(
                "stat-rollouts-per-s",
                "rollouts / s",
                _num(snap.rollouts_per_s),
                f"last {snap.window.rate_window_s} s",
            ),
            _card(
                "stat-reward",
                "mean reward",
                _num(snap.reward_mean_recent, 3),
                f"last {snap.window.rate_window_s} s",
            ),
            _card(
                "stat-rollouts-total",
                "rollouts accepted",
                f"{run.head_cursor if run else 0:,}",
                f"trainer at cursor {run.acked_cursor if run else 0:,}",
            ),
            _card(
                "stat-policy",
                "policy version",
                f"{run.latest_policy_version if run else 0}",
                _e(f"run {snap.run_id}") if snap.run_id else "no run yet",
            ),
            _card(
                "stat-leases",
                "open leases",
                f"{snap.leases.open}",
                f"{snap.leases.overdue} past deadline",
            ),
            _card(
                "stat-audit-backlog",
                "validator backlog",
                f"{audits.pending + audits.claimed + audits.retrying}",
                f"{audits.pending} pending, {audits.claimed} claimed, "
                f"{audits.retrying} retrying; oldest {oldest}",
            ),
        )
    )


def _outcomes(snap: StatsSnapshot) -> list[str]:
    return sorted(snap.outcome_totals, key=lambda k: (k != ACCEPTED, k))


def _charts(snap: StatsSnapshot) -> str:
    labels = [_clock(b.start_unix_ms) for b in snap.rollout_series]
    batch_labels = [_clock(b.start_unix_ms) for b in snap.batch_series]
    versions = sorted(snap.policies, key=lambda p: p.version)
    figures = (
        line_chart(
            "chart-rollouts",
            "rollouts accepted per second",
            labels,
            [("rollouts/s", "#1f77b4", [b.rate_per_s for b in snap.rollout_series])],
        ),
        stacked_bars(
            "chart-outcomes",
            "batches by outcome (accepted, rejection reasons)",
            batch_labels,
            [dict(b.outcomes) for b in snap.batch_series],
        )
        + _legend(_outcomes(snap)),
        line_chart(
            "chart-reward-time",
            "mean reward over time",
            labels,
            [("reward", "#9467bd", [b.reward_mean for b in snap.rollout_series])],
            y_digits=3,
            zero_based=False,
        ),
        line_chart(
            "chart-reward-version",
            "reward curve: mean reward per policy version",
            [f"v{p.version}" for p in versions],
            [("reward", "#d62728", [p.reward_mean for p in versions])],
            y_digits=3,
            zero_based=False,
        ),
    )
    return "".join(f'<figure class="panel">{f}</figure>' for f in figures)


def _tables(snap: StatsSnapshot) -> str:
    now, workers = snap.generated_unix_ms, snap.workers
    outcome_rows = [[_e(o), f"{snap.outcome_totals[o]:,}"] for o in _outcomes(snap)]
    policy_rows = [
        [
            f"v{p.version}",
            _e(p.kind),
            "–" if p.parent_version is None else f"v{p.parent_version}",
            f"{p.trainer_step:,}",
            f"{p.rollouts:,}",
            _num(p.reward_mean, 3),
            _e(_datetime(p.published_unix_ms)),
            _e(", ".join(f"{k}={v:.4g}" for k, v in sorted(p.metrics.items())[:4])),
        ]
        for p in snap.policies
    ]
    backlog_rows = [
        [_e(kind), *(f"{states.get(s, 0):,}" for s in ("pending", "claimed", "error"))]
        for kind, states in sorted(snap.audits.by_kind.items())
    ]
    online_rows = [
        [
            _e(w.display_name),
            f"<code>{_e(w.worker_id)}</code>",
            _e(w.client_version),
            _ago(now, w.last_seen_unix_ms),
            f"{w.batches_accepted:,} / {w.batches_rejected:,} / {w.batches_voided:,}",
            f"{w.valid_streak}",
            f"{w.credit_granted:,} (+{w.credit_pending:,} pending)",
        ]
        for w in workers.online_workers
    ]
    banned_rows = [
        [
            _e(w.display_name),
            f"<code>{_e(w.worker_id)}</code>",
            _e(w.reason),
            "until lifted"
            if w.banned_until_unix_ms is None
            else _e(_datetime(w.banned_until_unix_ms)),
            f"{w.audits_failed}",
        ]
        for w in workers.banned_workers
    ]
    return "".join(
        (
            f"<h2>batch outcomes, last {snap.window.history_s} s</h2>",
            _table("table-outcomes", ["outcome", "batches"], outcome_rows),
            "<h2>policy versions</h2>",
            _table(
                "table-policies",
                [
                    "version",
                    "kind",
                    "parent",
                    "step",
                    "rollouts",
                    "mean reward",
                    "published",
                    "metrics",
                ],
                policy_rows,
            ),
            "<h2>validator backlog</h2>",
            _table("table-backlog", ["audit", "pending", "claimed", "retrying"], backlog_rows),
            f"<h2>workers online ({workers.online})</h2>",
            _table(
                "table-workers",
                [
                    "name",
                    "id",
                    "client",
                    "last seen",
                    "accepted / rejected / voided",
                    "streak",
                    "credit",
                ],
                online_rows,
            ),
            f"<h2>banned workers ({workers.banned})</h2>",
            _table(
                "table-banned", ["name", "id", "reason", "banned", "failed audits"], banned_rows
            ),
        )
    )


def render_panels(snap: StatsSnapshot) -> str:
    """The dashboard's content (everything inside <main>), from one snapshot."""
    runs = "".join(
        f'<a href="/?run={quote(r.run_id, safe="")}" '
        f'class="run{" selected" if r.run_id == snap.run_id else ""}">{_e(r.run_id)}</a>'
        for r in snap.runs
    )
    now = snap.generated_unix_ms
    return (
        f'<nav class="runs">runs: {runs or "none yet"}</nav>'
        f'<section class="cards">{_cards(snap)}</section>'
        f'<section class="charts">{_charts(snap)}</section>'
        f'<section class="tables">{_tables(snap)}</section>'
        f'<footer id="generated" data-generated-ms="{now}">'
        f"figures of {_e(_datetime(now))}</footer>"
    )


def render_page(snap: StatsSnapshot, *, refresh_s: float) -> str:
    """The whole page: the panels plus the script that refreshes them in place."""
    source = "/api/panels" + (f"?run={quote(snap.run_id, safe='')}" if snap.run_id else "")
    return (
        "<!doctype html>"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>coderepair coordinator</title>"
        '<link rel="stylesheet" href="/static/dashboard.css">'
        '<script src="/static/dashboard.js" defer></script>'
        "</head><body>"
        "<header><h1>coderepair coordinator</h1>"
        '<span id="status" class="status">live</span></header>'
        f'<main id="panels" data-src="{_e(source)}" data-refresh-ms="{int(refresh_s * 1000)}">'
        f"{render_panels(snap)}</main>"
        "</body></html>"
    )
