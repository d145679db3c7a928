"""Shared by bench/weights.py and bench/trainer.py (not a bench: running it does nothing).

`DeltaMeter` publishes every version of a model through `coderepair.trainer.publish.Publisher`
at several published dtypes side by side (one Publisher, and one sink, per dtype) and sums
up what a worker downloads: the full checkpoint size, the mean and max delta size, their
ratio, the fraction of elements whose published bits changed, the publish time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from coderepair.protocol.identity import Identity
from coderepair.trainer.publish import ObjectSink, Publisher, PublisherConfig

PUBLISH_DTYPES = ("float32", "bfloat16")
"""Published dtypes the benches compare: as trained (fp32 master weights) and bf16."""

DEFAULT_PUBLISH_DTYPE: str = PublisherConfig.model_fields["publish_dtype"].default
"""What a trainer publishes when its [publish] section does not say ('keep': as trained)."""


class CountingSink:
    """An object sink that only counts bytes (when a bench measures sizes, not storage)."""

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}

    def put(self, key: str, data: bytes) -> None:
        self.sizes[key] = len(data)


def publish_dtype_setting(dtype: str) -> str:
    """`PublisherConfig.publish_dtype` for a bench dtype: fp32 master weights are 'keep'."""
    return "keep" if dtype == "float32" else dtype


class DeltaMeter:
    """Publishes each version at every dtype in `dtypes`; `rows()` sums up the sizes.

    The first version is full; with `full_every` above the number of versions all later
    ones are deltas against the version before, which is what `rows()` averages.
    """

    def __init__(
        self,
        run_id: str,
        sink_for: Callable[[str], ObjectSink],
        *,
        full_every: int,
        dtypes: tuple[str, ...] = PUBLISH_DTYPES,
        base_model: str = "bench",
        tokenizer_sha256: str = "0" * 64,
    ) -> None:
        identity = Identity.generate()
        self.publishers: dict[str, Publisher] = {}
        for dtype in dtypes:
            config = PublisherConfig(
                run_id=run_id,
                base_model=base_model,
                tokenizer_sha256=tokenizer_sha256,
                full_every=full_every,
                publish_dtype=publish_dtype_setting(dtype),  # type: ignore[arg-type]
            )
            self.publishers[dtype] = Publisher(config, identity, sink_for(dtype))
        self.full: dict[str, list[int]] = {d: [] for d in dtypes}
        self.deltas: dict[str, list[int]] = {d: [] for d in dtypes}
        self.changed: dict[str, list[float]] = {d: [] for d in dtypes}
        self.seconds: dict[str, float] = dict.fromkeys(dtypes, 0.0)

    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Publish `version` at every dtype; delta sizes and publish times are recorded."""
        for dtype, publisher in self.publishers.items():
            start = time.perf_counter()
            published = publisher.publish(state_dict, version)
            if published.kind == "full":
                self.full[dtype].append(published.shard_bytes)
                continue
            self.seconds[dtype] += time.perf_counter() - start
            self.deltas[dtype].append(published.shard_bytes)
            self.changed[dtype].append(published.changed_elements / published.total_elements)

    def rows(self) -> list[dict[str, Any]]:
        """One summary per dtype (needs at least one full and one delta version)."""
        fp32_full = self.full.get("float32", [0])[0]
        rows = []
        for dtype in self.publishers:
            deltas, full = self.deltas[dtype], self.full[dtype][0]
            mean_delta = sum(deltas) / len(deltas)
            setting = publish_dtype_setting(dtype)
            rows.append(
                {
                    "dtype": dtype,
                    "publish_dtype": setting,
                    "publisher_default": setting == DEFAULT_PUBLISH_DTYPE,
                    "deltas": len(deltas),
                    "full_bytes": full,
                    "mean_delta_bytes": round(mean_delta),
                    "max_delta_bytes": max(deltas),
                    "ratio_full_over_delta": round(full / mean_delta, 2),
                    "ratio_full_over_max_delta": round(full / max(deltas), 2),
                    "ratio_fp32_full_over_delta": (
                        round(fp32_full / mean_delta, 2) if fp32_full else None
                    ),
                    "changed_fraction": round(sum(self.changed[dtype]) / len(deltas), 5),
                    "min_changed_fraction": round(min(self.changed[dtype]), 5),
                    "publish_s_per_version": round(self.seconds[dtype] / len(deltas), 3),
                }
            )
        return rows


def delta_table(rows: list[dict[str, Any]]) -> list[str]:
    """The rows of `DeltaMeter.rows()` (each with a "model" key) as table lines."""
    header = (
        f"{'model':8} {'dtype':9} {'full MB':>9} {'delta MB':>9} {'max MB':>9} "
        f"{'full/delta':>10} {'fp32full/delta':>14} {'changed':>8} {'publish s':>9}"
    )
    lines = [header, "-" * len(header)]
    nan = float("nan")
    for r in rows:
        default = "  (publisher default)" if r["publisher_default"] else ""
        lines.append(
            f"{r['model']:8} {r['dtype']:9} {r['full_bytes'] / 1e6:9.2f} "
            f"{r['mean_delta_bytes'] / 1e6:9.3f} {r['max_delta_bytes'] / 1e6:9.3f} "
            f"{r['ratio_full_over_delta']:10.1f} {r['ratio_fp32_full_over_delta'] or nan:14.1f} "
            f"{100 * r['changed_fraction']:7.2f}% {r['publish_s_per_version']:9.2f}{default}"
        )
    return lines
