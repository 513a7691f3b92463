"""Run directories for the report: their metrics, config and sweep outcome, grouped by arm.

A path is a run directory (it holds metrics.jsonl) or a directory searched for them (a sweep).
A run in `<arm>/seed<k>` is seed k of arm <arm>; any other run is an arm of its own, named after
its directory. An arm found under two of the given paths is named `<path name>/<arm>`. Arms keep
a sweep manifest's order, then the order found. Metrics are read by altgrad_jax.plot.load_run.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from altgrad_jax.plot import PlotError, load_run
from altgrad_jax.loop.local_tracker import METRICS_FILE

SEED_DIR = re.compile(r"seed(\d+)")
MANIFEST, MARKER = "sweep.json", "sweep_done.json"


class ReportError(ValueError):
    """Bad report input: one line on stderr, exit 2."""


@dataclass(frozen=True)
class Run:
    arm: str
    seed: int | None
    path: Path
    series: dict[str, tuple[list[int], list[float]]]  # metric -> (steps, values), non-finite as NaN
    config: dict = field(default_factory=dict)  # the run's config.yaml ({} when absent)
    outcome: str | None = None  # the sweep marker's status (finished, diverged), None without one

    def values(self, name: str) -> dict[int, float]:
        steps, values = self.series.get(name, ((), ()))
        return dict(zip(steps, values))

    @property
    def last_step(self) -> int:
        return max(steps[-1] for steps, _ in self.series.values())


def _run_dirs(path: Path) -> list[Path]:
    if not path.exists():
        raise ReportError(f"not found: {path}")
    if (path / METRICS_FILE).is_file():
        return [path]
    if not path.is_dir():
        raise ReportError(f"{path} is neither a run directory nor a directory of runs")
    found = sorted(metrics.parent for metrics in path.rglob(METRICS_FILE))
    if not found:
        raise ReportError(f"no run directories (with {METRICS_FILE}) under {path}")
    return found


def _has_metrics(directory: Path) -> bool:
    """False for a run that stopped before logging anything (an empty metrics file)."""
    try:
        return bool((directory / METRICS_FILE).read_text(encoding="utf-8").strip())
    except (OSError, UnicodeDecodeError):
        return True  # load_run reports it


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _manifest_order(root: Path) -> list[str]:
    arms = _read_json(root / MANIFEST).get("arms", [])
    return [arm["name"] for arm in arms if isinstance(arm, dict) and isinstance(arm.get("name"), str)]


def load_runs(paths: list[Path], skipped: list[Path] | None = None) -> dict[str, list[Run]]:
    """Arm name -> its runs (seed order). Runs with an empty metrics file found under a directory
    are left out (appended to `skipped`); raises ReportError on a bad path, unreadable metrics,
    or no run left."""
    found: dict[tuple[Path, str], list[Path]] = {}
    order: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for root in paths:
        manifest = _manifest_order(root) if root.is_dir() else []
        keys = []
        for directory in _run_dirs(root):
            if directory.resolve() in seen:
                continue
            seen.add(directory.resolve())
            if directory != root and not _has_metrics(directory):
                if skipped is not None:
                    skipped.append(directory)
                continue
            seed_match = SEED_DIR.fullmatch(directory.name)
            arm = directory.resolve().parent.name if seed_match else directory.name
            found.setdefault((root, arm), []).append(directory)
            if (root, arm) not in keys:
                keys.append((root, arm))
        rank = {name: index for index, name in enumerate(manifest)}
        order += sorted(keys, key=lambda key: rank.get(key[1], len(rank)))
    if not order:
        raise ReportError("no run with metrics under " + ", ".join(map(str, paths)))
    names = [arm for _, arm in order]
    arms: dict[str, list[Run]] = {}
    for root, arm in order:
        label = arm if names.count(arm) == 1 else f"{root.resolve().name}/{arm}"
        label = label if label not in arms else f"{root}/{arm}"
        runs = [_load(directory, label) for directory in found[(root, arm)]]
        arms[label] = sorted(runs, key=lambda run: (run.seed is None, run.seed or 0, str(run.path)))
    return arms


def _load(directory: Path, arm: str) -> Run:
    try:
        series = load_run(directory)
    except PlotError as error:
        raise ReportError(str(error)) from None
    config = _read_yaml(directory / "config.yaml")
    seed_match = SEED_DIR.fullmatch(directory.name)
    seed = int(seed_match.group(1)) if seed_match else config.get("seed")
    seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else None
    outcome = _read_json(directory / MARKER).get("status")
    return Run(arm, seed, directory, series, config, outcome if isinstance(outcome, str) else None)
