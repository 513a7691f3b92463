"""The report's PNGs (matplotlib, imported when drawing): curves overlaid by arm, and layer x step
heatmaps of underflow, overflow and rel_err per role, from each arm's own format (`quant/...`,
first seed) and from every what-if format it logged (`whatif/<format>/...`). One colour per arm,
one line per seed; a dotted vertical line marks each divergence. A figure with no data is skipped.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from altgrad_jax.study.analysis import COSINE_NAMES, QUANT_METRICS, ROLES, ArmSummary, finite
from altgrad_jax.study.runs import Run

UPDATE_METRICS = ("bit_stall_rate", "update/norm_ratio", "update/below_half_ulp")


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)


def _layer_key(layer: str):
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in layer.split("/")]


def layer_grids(run: Run, source: str) -> dict[tuple[str, str], tuple[list[str], list[int], np.ndarray]]:
    """(metric, role) -> (layers, steps, layers x steps values, NaN where not logged), from
    `quant/<metric>/<role>/<layer>` (source "quant") or `whatif/<format>/<role>/<metric>/<layer>`
    (source = the format)."""
    cells: dict[tuple[str, str], dict[str, dict[int, float]]] = {}
    for name, (steps, values) in run.series.items():
        if source == "quant":
            parts = name.split("/", 3)
            ok = len(parts) == 4 and parts[0] == "quant"
            metric, role, layer = (parts[1], parts[2], parts[3]) if ok else (None, None, None)
        else:
            parts = name.split("/", 4)
            ok = len(parts) == 5 and parts[0] == "whatif" and parts[1] == source
            role, metric, layer = (parts[2], parts[3], parts[4]) if ok else (None, None, None)
        if ok and metric in QUANT_METRICS and role in ROLES:
            cells.setdefault((metric, role), {})[layer] = dict(zip(steps, values))
    grids = {}
    for key, by_layer in cells.items():
        layers = sorted(by_layer, key=_layer_key)
        steps = sorted({step for values in by_layer.values() for step in values})
        matrix = np.array([[by_layer[layer].get(step, math.nan) for step in steps] for layer in layers], dtype=float)
        grids[key] = (layers, steps, matrix)
    return grids


def whatif_formats(run: Run) -> list[str]:
    return sorted({name.split("/")[1] for name in run.series if name.startswith("whatif/") and name.count("/") >= 4})


def _edges(steps: list[int]) -> np.ndarray:
    points = np.asarray(steps, dtype=float)
    if len(points) == 1:
        return np.array([points[0] - 0.5, points[0] + 0.5])
    middle = (points[1:] + points[:-1]) / 2
    return np.concatenate([[2 * points[0] - middle[0]], middle, [2 * points[-1] - middle[-1]]])


def write_figures(arms: dict[str, list[Run]], summaries: list[ArmSummary], baseline: str | None,
                  out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {arm: f"C{index % 10}" for index, arm in enumerate(arms)}
    divergence = {s.arm: [step for step in s.divergence if step is not None] for s in summaries}
    written: list[Path] = []

    def save(fig, name):
        out_dir.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(out_dir / name)

    def curves(ax, pick, style):
        drawn = False
        for arm, runs in arms.items():
            for index, run in enumerate(runs):
                name = pick(run)
                if name in run.series:
                    ax.plot(*run.series[name], color=colors[arm], label=arm if index == 0 else None, **style)
                    drawn = True
            for step in divergence.get(arm, []):
                ax.axvline(step, color=colors[arm], ls=":", lw=1)
        return drawn

    fig, ax = plt.subplots(figsize=(9, 5))
    curves(ax, lambda run: "loss", {"lw": 1, "alpha": 0.8})
    for arm, runs in arms.items():
        for run in runs:
            if "val_loss" in run.series:
                ax.plot(*run.series["val_loss"], color=colors[arm], ls="--", marker="o", ms=3, lw=1)
    base_losses = [v for run in arms.get(baseline, []) for v in run.series.get("loss", ((), ()))[1] if finite(v)]
    if base_losses:
        ax.set_ylim(top=1.2 * max(base_losses))
    ax.set(title="loss by arm (solid: train, dashed: validation; dotted line: divergence)", xlabel="step",
           ylabel="loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(9, 4.5))
    pick = lambda run: next((name for name in COSINE_NAMES if name in run.series), "")  # noqa: E731
    if curves(ax, pick, {"lw": 1}):
        ax.set(title="cosine of the gradient to the FP32 shadow (grad_cos_sim/global, else /mean)",
               xlabel="step", ylabel="cosine")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        save(fig, "cosine.png")
    else:
        plt.close(fig)

    present = [name for name in UPDATE_METRICS if any(name in run.series for runs in arms.values() for run in runs)]
    if present:
        fig, axes = plt.subplots(len(present), 1, figsize=(9, 3 * len(present)), squeeze=False)
        for ax, name in zip(axes[:, 0], present):
            curves(ax, lambda run, name=name: name, {"lw": 1})
            ax.set(title=name, xlabel="step", ylabel="fraction" if name != "update/norm_ratio" else "ratio")
            ax.grid(alpha=0.3)
        axes[0, 0].legend(fontsize="small")
        save(fig, "update.png")

    for arm, runs in arms.items():
        run = runs[0]
        seed = f", seed {run.seed}" if run.seed is not None else ""
        for source in ["quant", *whatif_formats(run)]:
            grids = layer_grids(run, source)
            if not grids:
                continue
            title = f"{arm}{seed}: " + ("its own format" if source == "quant" else f"what-if {source}")
            name = f"heatmap_{safe_name(arm)}.png" if source == "quant" else \
                f"whatif_{safe_name(arm)}_{safe_name(source)}.png"
            save(_heatmap(plt, grids, title), name)
    return written


def _heatmap(plt, grids, title):
    n_layers = max(len(layers) for layers, _, _ in grids.values())
    fig, axes = plt.subplots(len(QUANT_METRICS), len(ROLES), squeeze=False,
                             figsize=(5 * len(ROLES), len(QUANT_METRICS) * (1.6 + 0.28 * n_layers)))
    for row, metric in enumerate(QUANT_METRICS):
        for col, role in enumerate(ROLES):
            ax = axes[row, col]
            ax.set_title(f"{role} {metric}", fontsize="small")
            if (metric, role) not in grids:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
                ax.set_axis_off()
                continue
            layers, steps, matrix = grids[(metric, role)]
            finite_values = matrix[np.isfinite(matrix)]
            top = float(finite_values.max()) if finite_values.size else 1.0
            mesh = ax.pcolormesh(_edges(steps), np.arange(len(layers) + 1) - 0.5, np.ma.masked_invalid(matrix),
                                 vmin=0.0, vmax=top if top > 0 else 1.0, cmap="viridis", shading="flat")
            ax.set_yticks(range(len(layers)), layers, fontsize="x-small")
            ax.invert_yaxis()
            ax.set_xlabel("step", fontsize="small")
            fig.colorbar(mesh, ax=ax)
    fig.suptitle(title)
    return fig
