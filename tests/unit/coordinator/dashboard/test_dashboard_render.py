"""The dashboard page rendered from a real snapshot: escaping of database strings, and
plots that draw their data."""

from __future__ import annotations

import re

from dashboard_world import T0, make_world

from coderepair.coordinator.dashboard.config import StatsWindow
from coderepair.coordinator.dashboard.render import line_chart, render_page, stacked_bars
from coderepair.coordinator.dashboard.stats import collect_stats
from coderepair.coordinator.storage import audits
from coderepair.coordinator.storage.db import Database

WINDOW = StatsWindow(history_s=60, bucket_s=10)
HOSTILE = '<script>alert("x")</script>&'


def _paths(page: str, chart_id: str) -> list[str]:
    svg = re.search(rf'<svg id="{chart_id}".*?</svg>', page, re.S)
    assert svg is not None, chart_id
    return re.findall(r'<path class="series"[^>]* d="([^"]*)"', svg.group(0))


def test_strings_from_the_database_are_escaped(storage_db: Database) -> None:
    world = make_world(storage_db)
    mallory = world.worker(HOSTILE, 2)
    world.worker("bob", 3)
    audits.ban_worker(
        storage_db,
        mallory.worker_id,
        reason=f"reason {HOSTILE}",
        until_ms=None,
        void_pending=False,
        now_ms=T0,
    )
    page = render_page(collect_stats(storage_db, WINDOW, now_ms=T0 + 1), refresh_s=2)
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;" in page
    # The only script is the page's own file.
    assert re.findall(r"<script[^>]*>", page) == ['<script src="/static/dashboard.js" defer>']
    assert 'data-refresh-ms="2000"' in page


def test_hostile_run_ids_are_escaped_in_links_and_text(storage_db: Database) -> None:
    make_world(storage_db, run_id='"><img src=x onerror=alert(1)>')
    page = render_page(collect_stats(storage_db, WINDOW, now_ms=T0 + 1), refresh_s=3)
    assert "<img" not in page
    assert "/?run=%22%3E%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E" in page


def test_plots_draw_one_point_per_bucket_with_data(storage_db: Database) -> None:
    world = make_world(storage_db)
    alice, bob = world.worker("alice", 2), world.worker("bob", 3)
    world.accept(alice, [1.0, 0.0, 1.0, 0.0], T0 - 25_000)
    world.accept(alice, [1.0, 1.0, 1.0, 0.0], T0)
    world.reject(bob, "DUPLICATE", T0)
    world.publish(1, T0)
    world.accept(alice, [1.0, 1.0, 1.0, 1.0], T0 + 1, policy_version=1)
    page = render_page(collect_stats(storage_db, WINDOW, now_ms=T0 + 2), refresh_s=3)

    (rate,) = _paths(page, "chart-rollouts")
    assert rate.count("M") == 1 and rate.count("L") == WINDOW.n_buckets - 1
    (reward,) = _paths(page, "chart-reward-time")
    # Buckets without rollouts leave gaps: the curve restarts at each data point.
    assert reward.count("M") == 2
    outcomes = _paths(page, "chart-outcomes")
    assert len(outcomes) == 2 and all(d.endswith("Z") for d in outcomes)
    (curve,) = _paths(page, "chart-reward-version")
    assert curve.startswith("M") and curve.count("L") == 1  # versions 0 and 1
    assert "no data yet" not in page
    assert 'id="stat-rollouts-total">12<' in page


def test_empty_plots_say_so_and_draw_no_series() -> None:
    svg = line_chart("c", "title", ["a", "b"], [("s", "#000", [None, None])])
    assert "no data yet" in svg and 'class="series"' not in svg
    bars = stacked_bars("b", "title", ["a"], [{}])
    assert "no data yet" in bars


def test_a_flat_series_still_gets_a_visible_scale() -> None:
    svg = line_chart("c", "t", ["a", "b"], [("s", "#000", [0.5, 0.5])], zero_based=False)
    ys = {float(y) for y in re.findall(r'cy="([\d.]+)"', svg)}
    assert len(ys) == 1 and all(0 < y < 210 for y in ys)
