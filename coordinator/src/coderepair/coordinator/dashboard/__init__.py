"""The operators' view: web dashboard, JSON figures and Prometheus metrics.

- `config`: `DashboardConfig` (bind address, refresh, history window);
- `stats`: read-only queries giving a typed `StatsSnapshot` of the database;
- `metrics`: `CoordinatorMetrics` (the service's counters) and `StatsCollector` (the
  snapshot as gauges), both on a `CollectorRegistry` the caller owns;
- `render`: the page and its SVG plots, rendered server-side from a snapshot;
- `http`: `DashboardServer`, the asyncio HTTP server for /, /api/stats, /metrics,
  /healthz.
"""
