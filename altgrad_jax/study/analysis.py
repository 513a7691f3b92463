"""The report's numbers from runs grouped by arm: pure functions, no files and no plots.

- final val_loss: the `val_loss` logged at the run's last logged step; NaN when the run did not
  evaluate there (stopped by the NaN alert, or cut short). best: the lowest finite `val_loss`.
  Over seeds: mean and sample std of the finite values, with the count.
- divergence: the first logged step whose `loss` is not finite or exceeds `divergence_factor` x
  the baseline's loss at that step (the baseline run of the same seed, as it saw the same
  batches; else the mean over the baseline's seeds).
- lag: final val_loss above the baseline's by more than `lag_tolerance` x the baseline's.
- steps to baseline: the first evaluation whose val_loss <= the baseline's final val_loss.
- first failure (runs that diverged, or of an arm that lags): the earliest step, up to the
  divergence, at which one of the run's own per-layer metrics crosses its threshold:
  `quant/underflow|overflow|rel_err/<role>/<layer>` above `underflow` / `overflow` (default:
  the run's `overflow_threshold`, else 0.01) / `rel_err`, or the cosine to the shadow
  (`grad_cos_sim/global`, else `/mean`) below `cosine`, or the applied / intended update norm
  (`update/norm_ratio`, narrow master weights only) below `update_norm_ratio`. Ties at one step
  go to the largest value / threshold (for the two ratios below a floor, (1 - value) /
  (1 - threshold)), then the name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from altgrad_jax.study.runs import Run

QUANT_METRICS = ("underflow", "overflow", "rel_err")
ROLES = ("x", "w", "dy")
COSINE_NAMES = ("grad_cos_sim/global", "grad_cos_sim/mean")
DEFAULT_OVERFLOW = 0.01  # TrainConfig.overflow_threshold's default


@dataclass(frozen=True)
class Thresholds:
    underflow: float = 0.5  # fraction of a tensor's non-zero elements flushed to zero
    overflow: float | None = None  # fraction saturated; None: the run's overflow_threshold
    rel_err: float = 0.25  # ||q(t) - t|| / ||t||
    cosine: float = 0.9  # cosine of the quantized to the FP32 shadow gradient
    divergence_factor: float = 2.0  # loss above this x the baseline's loss: diverged
    lag_tolerance: float = 0.02  # final val_loss above the baseline's by this fraction: lags
    update_norm_ratio: float = 0.5  # ||applied update|| / ||intended||: the stall alert's floor


@dataclass(frozen=True)
class Stat:
    mean: float  # of the finite values; NaN when there is none
    std: float | None  # sample std, with at least two finite values
    finite: int
    total: int


@dataclass(frozen=True)
class Crossing:
    step: int
    metric: str  # underflow, overflow, rel_err, cosine or update
    role: str | None  # x, w, dy (None for the cosine)
    layer: str  # the layer, or the cosine's metric name
    value: float
    threshold: float


@dataclass(frozen=True)
class Localised:
    """The first failure of one run: what crossed first (None: nothing) and its divergence step."""

    seed: int | None
    divergence: int | None
    crossing: Crossing | None

    @property
    def steps_before(self) -> int | None:
        if self.divergence is None or self.crossing is None:
            return None
        return self.divergence - self.crossing.step


@dataclass
class ArmSummary:
    arm: str
    seeds: list[int | None]
    final: Stat
    best: Stat
    divergence: list[int | None]  # per seed
    steps_to_baseline: list[int | None]  # per seed; empty without a baseline
    status: str = "no baseline"  # baseline, diverged, lags, beats, matches, incomplete, no baseline
    gap: float | None = None  # final mean - the baseline's final mean
    localised: list[Localised] = field(default_factory=list)  # diverged seeds, or every seed of a lag

    @property
    def first_failure(self) -> Localised | None:
        """The earliest crossing over the localised seeds (ties: the first seed)."""
        found = [item for item in self.localised if item.crossing is not None]
        return min(found, key=lambda item: item.crossing.step, default=None)


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def stat(values: list[float]) -> Stat:
    good = [v for v in values if finite(v)]
    mean = float(np.mean(good)) if good else math.nan
    std = float(np.std(good, ddof=1)) if len(good) > 1 else None
    return Stat(mean, std, len(good), len(values))


def final_val_loss(run: Run) -> float:
    steps, values = run.series.get("val_loss", ((), ()))
    return values[-1] if steps and steps[-1] == run.last_step else math.nan


def best_val_loss(run: Run) -> float:
    return min((v for v in run.series.get("val_loss", ((), ()))[1] if finite(v)), default=math.nan)


def reference_losses(baseline: list[Run], seed: int | None) -> dict[int, float]:
    """The baseline's loss per step: its run of `seed`, else the mean over its seeds."""
    same = [run for run in baseline if run.seed == seed]
    if same:
        return same[0].values("loss")
    per_step: dict[int, list[float]] = {}
    for run in baseline:
        for step, loss in run.values("loss").items():
            if finite(loss):
                per_step.setdefault(step, []).append(loss)
    return {step: float(np.mean(losses)) for step, losses in per_step.items()}


def divergence_step(run: Run, reference: dict[int, float] | None, factor: float) -> int | None:
    for step, loss in sorted(run.values("loss").items()):
        if not finite(loss):
            return step
        expected = reference.get(step) if reference else None
        if finite(expected) and loss > factor * expected:
            return step
    return None


def steps_to_reach(run: Run, target: float) -> int | None:
    if not finite(target):
        return None
    return next((step for step, v in sorted(run.values("val_loss").items()) if finite(v) and v <= target), None)


def _parse(name: str) -> tuple[str, str, str] | None:
    """(metric, role, layer) of `quant/<metric>/<role>/<layer>`, else None."""
    parts = name.split("/", 3)
    if len(parts) == 4 and parts[0] == "quant" and parts[1] in QUANT_METRICS and parts[2] in ROLES:
        return parts[1], parts[2], parts[3]
    return None


FLOOR_METRICS = ("cosine", "update")  # crossed by falling below the threshold
UPDATE_NAME = "update/norm_ratio"


def _severity(metric: str, value: float, limit: float) -> float:
    if metric in FLOOR_METRICS:
        return (1 - value) / max(1 - limit, 1e-12)
    return value / limit if limit > 0 else math.inf


def first_crossing(run: Run, thresholds: Thresholds, until: int | None) -> Crossing | None:
    """The first threshold the run's own metrics cross at or before step `until` (None: any)."""
    overflow = thresholds.overflow
    if overflow is None:
        configured = run.config.get("overflow_threshold")
        overflow = float(configured) if finite(configured) else DEFAULT_OVERFLOW
    limits = {"underflow": thresholds.underflow, "overflow": overflow, "rel_err": thresholds.rel_err}
    cosine = next((name for name in COSINE_NAMES if name in run.series), None)
    found = []
    for name, (steps, values) in run.series.items():
        parsed = _parse(name)
        if parsed:
            metric, role, layer = parsed
            limit = limits[metric]
        elif name == cosine:
            metric, role, layer, limit = "cosine", None, name, thresholds.cosine
        elif name == UPDATE_NAME:
            metric, role, layer, limit = "update", None, name, thresholds.update_norm_ratio
        else:
            continue
        for step, value in zip(steps, values):
            if until is not None and step > until:
                break
            if finite(value) and (value < limit if metric in FLOOR_METRICS else value > limit):
                found.append((step, -_severity(metric, value, limit), name,
                              Crossing(step, metric, role, layer, value, limit)))
                break
    return min(found, key=lambda item: item[:3])[3] if found else None


def choose_baseline(arms: dict[str, list[Run]], requested: str | None = None) -> str | None:
    """`requested`, else the arm named FP32, else the first arm whose runs all have use_fp8 false."""
    if requested is not None:
        return requested if requested in arms else None
    for name in arms:
        if name.rsplit("/", 1)[-1].upper() == "FP32":
            return name
    return next((name for name, runs in arms.items()
                 if all(run.config.get("use_fp8") is False for run in runs)), None)


def summarize(arms: dict[str, list[Run]], baseline: str | None, thresholds: Thresholds) -> list[ArmSummary]:
    base_runs = arms.get(baseline) if baseline else None
    base_final = stat([final_val_loss(run) for run in base_runs]).mean if base_runs else math.nan
    summaries = []
    for arm, runs in arms.items():
        is_base = arm == baseline
        references = [None if is_base or not base_runs else reference_losses(base_runs, run.seed) for run in runs]
        divergence = [divergence_step(run, ref, thresholds.divergence_factor) for run, ref in zip(runs, references)]
        summary = ArmSummary(
            arm, [run.seed for run in runs], stat([final_val_loss(run) for run in runs]),
            stat([best_val_loss(run) for run in runs]), divergence,
            [steps_to_reach(run, base_final) for run in runs] if base_runs else [])
        if base_runs and not is_base and finite(summary.final.mean) and finite(base_final):
            summary.gap = summary.final.mean - base_final
        tolerance = thresholds.lag_tolerance * abs(base_final) if finite(base_final) else math.nan
        if is_base:
            summary.status = "baseline"
        elif any(step is not None for step in divergence):
            summary.status = "diverged"
        elif not base_runs:
            summary.status = "no baseline"
        elif summary.gap is None:
            summary.status = "incomplete"  # no seed evaluated at its last step
        elif summary.gap > tolerance:
            summary.status = "lags"
        else:
            summary.status = "beats" if summary.gap < -tolerance else "matches"
        if summary.status in ("diverged", "lags"):
            for run, step in zip(runs, divergence):
                if summary.status == "lags" or step is not None:
                    summary.localised.append(Localised(run.seed, step, first_crossing(run, thresholds, step)))
        summaries.append(summary)
    return summaries
