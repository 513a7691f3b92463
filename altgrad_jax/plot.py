"""Plot runs: `python -m altgrad_jax.plot RUN_DIR [RUN_DIR...] [--out DIR]`.

Reads each run's `metrics.jsonl` and writes PNGs with the runs overlaid (one colour per run):
loss (train solid, `val_loss` dashed with markers, `shadow_loss` dotted), `grad_cos_sim/global` (with /mean, /min),
`bit_stall_rate`, `overflow_rate`/`underflow_rate`, and one panel per layer of `grad_norm_l2/*`.
A figure is skipped when no run has its metrics. Default output: `RUN_DIR/plots` for one run,
`./plots` for several. Bad input prints one line on stderr and exits 2 with nothing written;
exit 1 when matplotlib is missing.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from altgrad_jax.loop.local_tracker import METRICS_FILE, read_jsonl

GRAD_NORM_PREFIX = "grad_norm_l2/"


class PlotError(ValueError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise PlotError(message)


def load_run(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """metric name -> (steps, values) for one run directory, non-finite values as NaN."""
    path = run_dir / METRICS_FILE
    if not run_dir.is_dir():
        raise PlotError(f"run directory not found: {run_dir}")
    if not path.is_file():
        raise PlotError(f"{run_dir} has no {METRICS_FILE}")
    try:
        entries = read_jsonl(path)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PlotError(f"cannot read {path}: {e}") from None
    series: dict[str, tuple[list[int], list[float]]] = {}
    for number, entry in enumerate(entries, 1):
        step = entry.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise PlotError(f"{path}: entry {number} has no integer \"step\"")
        for name, value in entry.items():
            if name == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            steps, values = series.setdefault(name, ([], []))
            steps.append(step)
            values.append(float(value) if math.isfinite(value) else math.nan)
    if not series:
        raise PlotError(f"{path} holds no metrics")
    return series


def run_labels(run_dirs: list[Path]) -> list[str]:
    names = [d.resolve().name for d in run_dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in run_dirs]


def write_plots(runs: dict[str, dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {label: f"C{i % 10}" for i, label in enumerate(runs)}
    written = []

    def save(fig, name):
        out_dir.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    def line_figure(name, title, styles, ylabel, logy=False):
        if not any(metric in series for series in runs.values() for metric in styles):
            return
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for label, series in runs.items():
            for metric, style in styles.items():
                if metric in series:
                    ax.plot(*series[metric], color=colors[label], label=f"{label} {metric}",
                            **style)
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        save(fig, name)

    line_figure("loss.png", "loss: train, validation and FP32 shadow",
                {"loss": {"lw": 1}, "val_loss": {"ls": "--", "marker": "o", "ms": 3},
                 "shadow_loss": {"ls": ":", "lw": 1}}, "loss")
    line_figure("grad_cos_sim.png", "cosine of the gradient to the FP32 shadow gradient",
                {"grad_cos_sim/global": {"lw": 1.5}, "grad_cos_sim/mean": {"lw": 1}, "grad_cos_sim/min": {"ls": ":", "lw": 1}},
                "cosine similarity")
    line_figure("bit_stall_rate.png", "bit-stall rate (weights whose FP8 value did not change)",
                {"bit_stall_rate": {"lw": 1}}, "fraction")
    line_figure("quant_rates.png", "FP8 overflow and underflow rates",
                {"overflow_rate": {"lw": 1}, "underflow_rate": {"ls": "--", "lw": 1}}, "fraction")

    layers = sorted({m[len(GRAD_NORM_PREFIX):] for s in runs.values() for m in s
                     if m.startswith(GRAD_NORM_PREFIX)})
    if layers:
        ncols = min(4, len(layers))
        nrows = math.ceil(len(layers) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 2.8 * nrows), squeeze=False)
        for ax, layer in zip(axes.flat, layers):
            for label, series in runs.items():
                if GRAD_NORM_PREFIX + layer in series:
                    ax.plot(*series[GRAD_NORM_PREFIX + layer], color=colors[label], lw=1,
                            label=label)
            ax.set_title(layer, fontsize="small")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
        for ax in axes.flat[len(layers):]:
            ax.set_visible(False)
        axes.flat[0].legend(fontsize="small")
        fig.suptitle("per-layer gradient L2 norm")
        save(fig, "grad_norm_l2.png")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m altgrad_jax.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, default=None, help="directory for the PNGs")
    try:
        args = parser.parse_args(argv)
        runs = dict(zip(run_labels(args.run_dirs), map(load_run, args.run_dirs)))
        out_dir = args.out or (args.run_dirs[0] / "plots" if len(runs) == 1 else Path("plots"))
        if out_dir.exists() and not out_dir.is_dir():
            raise PlotError(f"--out {out_dir} exists and is not a directory")
    except PlotError as e:
        print(f"plot: error: {e}", file=sys.stderr)
        return 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plot: error: matplotlib is not installed (pip install 'altgrad_jax[plot]')",
              file=sys.stderr)
        return 1
    written = write_plots(runs, out_dir)
    print(f"wrote {len(written)} plots to {out_dir}: " + ", ".join(p.name for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
