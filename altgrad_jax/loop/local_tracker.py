"""The local log of a run: `metrics.jsonl` (one object per logged step) and `alerts.jsonl`.

It always runs, W&B or not. Non-finite numbers are written as the strings "NaN", "Infinity" and
"-Infinity"; `read_jsonl` turns them back into floats.
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

from altgrad_jax.loop.tracker import Tracker, check_level, to_scalar

METRICS_FILE, ALERTS_FILE = "metrics.jsonl", "alerts.jsonl"
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _decode(value):
    return _NONFINITE.get(value, value) if isinstance(value, str) else value


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Entries of a metrics/alerts file, non-finite numbers decoded. A torn last line (a write cut
    short by a kill) is skipped; any other unparsable line raises ValueError naming it."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}: line {number} is not valid JSON") from None
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: line {number} is not a JSON object")
        entries.append({key: _decode(value) for key, value in entry.items()})
    return entries


def _truncate_jsonl(path: Path, keep_through_step: int) -> None:
    """Atomically drop entries whose "step" is > keep_through_step (and torn lines)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = entry.get("step") if isinstance(entry, dict) else None
        if step is None or step <= keep_through_step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


class LocalTracker(Tracker):
    """`<out_dir>/metrics.jsonl` (one object per logged step: "step" and every scalar) and
    `<out_dir>/alerts.jsonl`.

    `resume_step=S` keeps the entries with step <= S and appends after them, so no step appears
    twice; `resume_step=None` is a fresh start: entries left by an earlier run in the same
    directory are dropped. Both rewrites are atomic (temporary file, then rename).
    """

    def __init__(self, out_dir: str | os.PathLike, resume_step: int | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out_dir / METRICS_FILE
        self.alerts_path = self.out_dir / ALERTS_FILE
        keep = -1 if resume_step is None else int(resume_step)
        for path in (self.metrics_path, self.alerts_path):
            _truncate_jsonl(path, keep)
        self._metrics = open(self.metrics_path, "a", encoding="utf-8")
        self._alerts = open(self.alerts_path, "a", encoding="utf-8")

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        entry = {"step": int(step)}
        entry.update({name: to_scalar(name, value) for name, value in metrics.items()})
        self._write(self._metrics, entry)

    def alert(self, title: str, text: str, level: str = "INFO", *, step: int | None = None) -> None:
        check_level(level)
        entry = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "step": step, "level": level, "title": title, "text": text}
        self._write(self._alerts, entry)

    def finish(self, exit_code: int | None = None) -> None:
        self._metrics.close()
        self._alerts.close()

    @staticmethod
    def _write(file, entry: dict) -> None:
        line = json.dumps({k: _json_safe(v) for k, v in entry.items()}, allow_nan=False)
        file.write(line + "\n")
        file.flush()  # one whole line per write, so a kill leaves at most a torn last line
