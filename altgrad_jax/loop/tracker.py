"""What the training loop reports to: one `Tracker` interface for the local log, W&B and stderr.

Every tracker has the same three calls: `log_step(step, metrics)`, `alert(title, text, level)`
and `finish(exit_code)`. Metric values are Python, NumPy or JAX scalars (`to_scalar`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Mapping

import numpy as np

LEVELS = ("INFO", "WARN", "ERROR")


class Tracker(ABC):
    """What the training loop talks to. `step` on `alert` is optional context for the record."""

    @abstractmethod
    def log_step(self, step: int, metrics: Mapping[str, float]) -> None: ...

    @abstractmethod
    def alert(
        self, title: str, text: str, level: str = "INFO", *, step: int | None = None
    ) -> None: ...

    @abstractmethod
    def finish(self, exit_code: int | None = None) -> None: ...


def to_scalar(name: str, value) -> int | float:
    """A Python int/float from a Python, NumPy or JAX scalar (raises ValueError for arrays)."""
    array = np.asarray(value)
    if array.size != 1 or array.dtype.kind not in "biuf":
        raise ValueError(f"metric {name!r} is not a numeric scalar (shape {array.shape}, "
                         f"dtype {array.dtype})")
    return int(array.item()) if array.dtype.kind in "biu" else float(array.item())


def check_level(level: str) -> None:
    if level not in LEVELS:
        raise ValueError(f"alert level must be one of {LEVELS}, got {level!r}")
