"""Report on runs: `python -m altgrad_jax.study.report RUN_OR_SWEEP_DIR... [--out DIR] [--markdown FILE]
[--baseline ARM] [--underflow F] [--overflow F] [--rel-err F] [--cosine F] [--divergence-factor F]
[--lag-tolerance F] [--no-figures]`.

Writes report.md (in --out, default `<sweep>/report` for one directory, else ./report; or
--markdown FILE, its image links relative to it) and the PNGs of study/figures.py into --out:
a table per arm (final and best val_loss over seeds, gap to the baseline, divergence, steps to
the baseline's final val_loss), the first failure of every arm that diverged or lags, and one
verdict line per arm. Definitions and defaults: study/analysis.py. The baseline is the arm named
FP32 unless --baseline says otherwise. Bad input: one line on stderr, exit 2, nothing written;
exit 1 without matplotlib.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from altgrad_jax.study.analysis import (ArmSummary, Localised, Stat, Thresholds, choose_baseline, finite,
                                        summarize)
from altgrad_jax.study.runs import ReportError, Run, load_runs

REPORT_FILE = "report.md"


def fmt_loss(value: float | None) -> str:
    if value is None:
        return "—"
    return "NaN" if math.isnan(value) else f"{value:.4f}"


def fmt_stat(value: Stat) -> str:
    if value.finite == 0:
        return "—"
    text = fmt_loss(value.mean) + (f" ± {value.std:.4f}" if value.std is not None else "")
    return text + (f" ({value.finite}/{value.total})" if value.finite < value.total else "")


def fmt_divergence(summary: ArmSummary) -> str:
    steps = [step for step in summary.divergence if step is not None]
    if not steps:
        return "no"
    if len(summary.divergence) == 1:
        return f"step {steps[0]}"
    return f"{len(steps)}/{len(summary.divergence)}: step{'s' if len(steps) > 1 else ''} " + \
        ", ".join(map(str, steps))


def fmt_reach(summary: ArmSummary) -> str:
    reached = [step for step in summary.steps_to_baseline if step is not None]
    if not summary.steps_to_baseline:
        return "—"
    if not reached:
        return "never"
    text = fmt_stat_steps(reached)
    return text + (f" ({len(reached)}/{len(summary.steps_to_baseline)})"
                   if len(reached) < len(summary.steps_to_baseline) else "")


def fmt_stat_steps(steps: list[int]) -> str:
    if len(steps) == 1:
        return str(steps[0])
    mean = sum(steps) / len(steps)
    std = math.sqrt(sum((s - mean) ** 2 for s in steps) / (len(steps) - 1))
    return f"{mean:.0f} ± {std:.0f}"


def fmt_sign(item: Localised | None, several_seeds: bool, diverged: bool) -> str:
    if item is None:
        return "no threshold crossed before it" if diverged else "no threshold crossed"
    c = item.crossing
    if c.metric == "cosine":
        where = f"gradient cosine {c.value:.3g}"
    elif c.metric == "update":
        where = f"applied/intended update norm {c.value:.3g}"
    else:
        where = f"{c.role} {c.metric} {c.value:.3g} in {c.layer}"
    text = f"first sign: {where} at step {c.step}" + (f" (seed {item.seed})" if several_seeds else "")
    return text + (f", {item.steps_before} steps before" if diverged else "")


def verdict(summary: ArmSummary, base: ArmSummary | None) -> str:
    """One plain-language line from the summary's numbers."""
    several = len(summary.seeds) > 1
    final = fmt_loss(summary.final.mean)
    if summary.status == "baseline":
        text = f"{summary.arm}: baseline; final val_loss {final}, best {fmt_loss(summary.best.mean)}"
        if any(step is not None for step in summary.divergence):
            text += f"; diverged ({fmt_divergence(summary)})"
        return text + "."
    if summary.status == "diverged":
        steps = [step for step in summary.divergence if step is not None]
        text = f"{summary.arm}: diverged at step {min(steps)}"
        if several:
            text += f" ({len(steps)}/{len(summary.seeds)} seeds: step{'s' if len(steps) > 1 else ''} " \
                    f"{', '.join(map(str, steps))})"
        return f"{text}; {fmt_sign(summary.first_failure, several, True)}."
    if summary.status == "no baseline":
        return f"{summary.arm}: final val_loss {final} (no baseline arm to compare)."
    if summary.status == "incomplete":
        return f"{summary.arm}: incomplete (no run evaluated at its last step)."
    against = f"final val_loss {final} vs {fmt_loss(base.final.mean)}"
    if summary.status == "lags":
        sign = fmt_sign(summary.first_failure, several, False)
        return f"{summary.arm}: lags {base.arm} by {summary.gap:+.4f} ({against}); {sign}."
    reached = [step for step in summary.steps_to_baseline if step is not None]
    if not reached:
        reach = f"does not reach {base.arm}'s final val_loss"
    else:
        reach = f"reaches {base.arm}'s final val_loss at step {fmt_stat_steps(reached)}"
        if len(reached) < len(summary.seeds):
            reach += f" in {len(reached)}/{len(summary.seeds)} seeds"
    head = "matches" if summary.status == "matches" else "beats"
    return f"{summary.arm}: {head} {base.arm} ({against}, gap {summary.gap:+.4f}); {reach}."


def summary_table(summaries: list[ArmSummary], base: ArmSummary | None) -> list[str]:
    name = base.arm if base else "baseline"
    lines = [f"| arm | seeds | final val_loss | best val_loss | gap to {name} | diverged | "
             f"steps to {name} final | verdict |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in summaries:
        seeds = ", ".join("?" if seed is None else str(seed) for seed in s.seeds)
        gap = "—" if s.gap is None else f"{s.gap:+.4f}"
        lines.append(f"| {s.arm} | {seeds} | {fmt_stat(s.final)} | {fmt_stat(s.best)} | {gap} | "
                     f"{fmt_divergence(s)} | {fmt_reach(s)} | {s.status} |")
    return lines


def failure_table(summaries: list[ArmSummary]) -> list[str]:
    lines = ["| arm | seed | step | metric | role | layer | value | threshold | steps before divergence |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in summaries:
        for item in s.localised:
            c = item.crossing
            before = "—" if item.steps_before is None else str(item.steps_before)
            if c is None:
                lines.append(f"| {s.arm} | {item.seed} | — | none crossed | | | | | — |")
            else:
                lines.append(f"| {s.arm} | {item.seed} | {c.step} | {c.metric} | {c.role or '—'} | {c.layer} | "
                             f"{c.value:.3g} | {c.threshold:.3g} | {before} |")
    return lines if len(lines) > 2 else []


def markdown(arms: dict[str, list[Run]], summaries: list[ArmSummary], baseline: str | None,
             thresholds: Thresholds, images: list[str], skipped: list[Path] = ()) -> str:
    base = next((s for s in summaries if s.arm == baseline), None)
    overflow = "each run's overflow_threshold" if thresholds.overflow is None else f"{thresholds.overflow:g}"
    lines = ["# Format study report", "",
             f"{len(arms)} arms, {sum(len(r) for r in arms.values())} runs; baseline: {baseline or 'none'}. "
             f"Diverged: loss not finite, or above {thresholds.divergence_factor:g}x the baseline's loss at the "
             f"same step; lags: final val_loss more than {thresholds.lag_tolerance:.0%} above the baseline's. "
             f"Thresholds of the first failure: underflow > {thresholds.underflow:g}, overflow > {overflow}, "
             f"rel_err > {thresholds.rel_err:g}, cosine < {thresholds.cosine:g}, "
             f"update norm ratio < {thresholds.update_norm_ratio:g}. Values: mean ± std over seeds.",
             "", "## Verdicts", ""]
    lines += [f"- {verdict(s, base)}" for s in summaries]
    lines += ["", "## Summary", "", *summary_table(summaries, base)]
    unfinished = [f"{run.arm} seed {run.seed} (last step {run.last_step})" for runs in arms.values() for run in runs
                  if run.outcome is None and run.config.get("max_steps") not in (None, run.last_step)
                  and finite(run.values("loss").get(run.last_step))]  # not a NaN stop
    if unfinished:
        lines += ["", "Unfinished runs: " + ", ".join(unfinished) + "."]
    if skipped:
        lines += ["", "Runs without metrics, left out: " + ", ".join(map(str, skipped)) + "."]
    failures = failure_table(summaries)
    if failures:
        lines += ["", "## First failure", "", *failures]
    if images:
        lines += ["", "## Figures", ""] + [f"![{Path(image).stem}]({image})" for image in images]
    return "\n".join(lines) + "\n"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ReportError(f"command line: {message}")


def parse_args(argv):
    parser = _Parser(prog="python -m altgrad_jax.study.report",
                     description="Tables, verdicts, first failures and PNGs of a format study's runs.")
    parser.add_argument("paths", nargs="+", type=Path, metavar="RUN_OR_SWEEP_DIR")
    parser.add_argument("--out", type=Path, help="directory for report.md and the PNGs")
    parser.add_argument("--markdown", type=Path, help="write the markdown here instead of <out>/report.md")
    parser.add_argument("--baseline", help="the arm to compare against (default: FP32)")
    parser.add_argument("--no-figures", action="store_true", help="the markdown only, no PNGs")
    defaults = Thresholds()
    for flag, field_name in (("--underflow", "underflow"), ("--overflow", "overflow"), ("--rel-err", "rel_err"),
                             ("--cosine", "cosine"), ("--divergence-factor", "divergence_factor"),
                             ("--lag-tolerance", "lag_tolerance"), ("--update-norm-ratio", "update_norm_ratio")):
        default = getattr(defaults, field_name)
        parser.add_argument(flag, dest=field_name, type=float, default=default,
                            help=f"default {default if default is not None else 'each run’s overflow_threshold'}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        skipped: list[Path] = []
        arms = load_runs(args.paths, skipped)
        one_dir = len(args.paths) == 1 and not (args.paths[0] / "metrics.jsonl").is_file()
        out_dir = args.out or (args.paths[0] / "report" if one_dir else Path("report"))
        if out_dir.exists() and not out_dir.is_dir():
            raise ReportError(f"--out {out_dir} exists and is not a directory")
        if args.markdown is not None and args.markdown.is_dir():
            raise ReportError(f"--markdown {args.markdown} is a directory")
        baseline = choose_baseline(arms, args.baseline)
        if args.baseline is not None and baseline is None:
            raise ReportError(f"--baseline {args.baseline}: no such arm (arms: {', '.join(arms)})")
        if baseline is not None:
            arms = {baseline: arms[baseline], **arms}  # the baseline first
    except ReportError as error:
        print(f"report: error: {error}", file=sys.stderr)
        return 2
    if not args.no_figures:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("report: error: matplotlib is not installed (pip install 'altgrad_jax[plot]'; "
                  "or --no-figures)", file=sys.stderr)
            return 1
    from altgrad_jax.study import figures

    thresholds = Thresholds(args.underflow, args.overflow, args.rel_err, args.cosine, args.divergence_factor,
                            args.lag_tolerance, args.update_norm_ratio)
    summaries = summarize(arms, baseline, thresholds)
    images = [] if args.no_figures else figures.write_figures(arms, summaries, baseline, out_dir)
    markdown_path = args.markdown or out_dir / REPORT_FILE
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    links = [os.path.relpath(image, markdown_path.parent) for image in images]
    markdown_path.write_text(markdown(arms, summaries, baseline, thresholds, links, skipped), encoding="utf-8")
    for summary in summaries:
        print(verdict(summary, next((s for s in summaries if s.arm == baseline), None)))
    print(f"wrote {markdown_path}" + (f" and {len(images)} PNGs in {out_dir}" if images else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
