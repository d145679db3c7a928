"""Training metrics: a JSONL file always, plus TensorBoard (default) or W&B.

The JSONL file (``<output_dir>/metrics.jsonl``, one object per step) is the record a
test, the demo or a script can read without any backend. TensorBoard is used when the
``tensorboard`` package is installed (torch's SummaryWriter needs it); if it is not, the
run continues on JSONL with a warning rather than dying an hour in. W&B is imported
only when configured, and a missing ``wandb`` package is a clear error at start.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from coderepair.trainer.config import ConfigError, MetricsConfig

__all__ = ["MetricsLogger"]

log = logging.getLogger(__name__)


class MetricsLogger:
    """Writes one step's scalars (and histograms) to the configured backends."""

    def __init__(
        self, config: MetricsConfig, output_dir: Path, run_config: dict[str, Any] | None = None
    ) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / "metrics.jsonl"
        self._jsonl = self.path.open("a", encoding="utf-8")
        self._tb: Any = None
        self._wandb: Any = None
        if config.backend == "tensorboard":
            if importlib.util.find_spec("tensorboard") is None:
                log.warning(
                    "metrics.backend is 'tensorboard' but the tensorboard package is not "
                    "installed; writing only %s (pip install tensorboard to get event files)",
                    self.path,
                )
            else:
                # Imported here: it needs the optional tensorboard package.
                from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

                self._tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        elif config.backend == "wandb":
            if importlib.util.find_spec("wandb") is None:
                raise ConfigError(
                    "metrics.backend is 'wandb' but the wandb package is not installed: "
                    "`pip install wandb`, or set metrics.backend = 'tensorboard'"
                )
            wandb: Any = importlib.import_module("wandb")
            self._wandb = wandb.init(
                project=config.wandb_project,
                entity=config.wandb_entity,
                dir=str(output_dir),
                config=run_config or {},
                resume="allow",
            )

    def log(
        self,
        step: int,
        scalars: dict[str, float],
        histograms: dict[str, list[float]] | None = None,
    ) -> None:
        """Record ``scalars`` (non-finite values are written as null) at ``step``."""
        row: dict[str, Any] = {"step": step}
        for name, value in scalars.items():
            row[name] = value if math.isfinite(value) else None
        for name, values in (histograms or {}).items():
            row[name] = values
        self._jsonl.write(json.dumps(row, sort_keys=True) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(name, value, step)
            for name, values in (histograms or {}).items():
                if values:
                    self._tb.add_histogram(name, _as_array(values), step)
        if self._wandb is not None:
            self._wandb.log(dict(scalars), step=step)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _as_array(values: list[float]) -> Any:
    return np.asarray(values, dtype=np.float64)
