"""Collects run_all.sh's per-benchmark outputs into results/<device>.json and a readable results/<device>.md.

    python benchmarks/summarize.py WORK_DIR OUT_DIR DEVICE BACKEND MODE BENCH [BENCH...]

WORK_DIR holds, per benchmark, <bench>.json (its stdout), <bench>.stderr and <bench>.status
("exit_status milliseconds args"), or <bench>.skipped (why it did not run).
"""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

# Headline fields shown in the table, by benchmark (others still land in the JSON).
HEADLINES = {
    "bench_quantize": ("worst_ratio_to_copy", "target_ratio_to_copy", "meets_target"),
    "bench_metrics": ("ratio_median", "metrics_ms", "baseline_ms", "elements"),
    "bench_step": ("median_ratio", "research_ms_per_step", "plain_ms_per_step", "research_tokens_per_s",
                   "target_ratio_max"),
    "bench_checkpoint": ("state_megabytes", "save_blocking_s", "save_total_s", "numpy_save_s", "blocking_fraction",
                         "total_over_numpy"),
}


def _git_commit(root: Path) -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "safetensors", "ml_dtypes"):
        try:
            module = __import__(name, fromlist=["__version__"])
            versions[name] = getattr(module, "__version__", "?")
        except ImportError:
            versions[name] = None
    return versions


def collect(work: Path, bench: str) -> dict:
    skipped = work / f"{bench}.skipped"
    if skipped.exists():
        return {"status": "skipped", "note": skipped.read_text().strip()}
    status_line = (work / f"{bench}.status").read_text().split(maxsplit=2)
    exit_status, millis = int(status_line[0]), int(status_line[1])
    args = status_line[2].strip() if len(status_line) > 2 else ""
    entry = {"status": "ok" if exit_status == 0 else "failed", "exit_status": exit_status,
             "seconds": millis / 1e3, "args": args}
    stdout = (work / f"{bench}.json").read_text().strip()
    entry["result"] = None
    for candidate in (stdout, stdout.splitlines()[-1] if stdout else ""):  # one object, indented or one line
        try:
            entry["result"] = json.loads(candidate)
            break
        except json.JSONDecodeError:
            continue
    if entry["result"] is None:
        entry["stdout_tail"] = stdout[-2000:]
    if exit_status != 0 or entry["result"] is None:
        entry["status"] = "failed"
        entry["stderr_tail"] = (work / f"{bench}.stderr").read_text()[-2000:]
    return entry


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _scalar_headlines(bench: str, result: dict) -> list[tuple[str, object]]:
    wanted = HEADLINES.get(bench)
    scalars = [(k, v) for k, v in result.items() if isinstance(v, (int, float))]
    if wanted:
        chosen = [(k, result[k]) for k in wanted if k in result]
        if chosen:
            return chosen
    return scalars[:8]


def markdown(summary: dict) -> str:
    lines = [f"# Benchmarks on {summary['device']} ({summary['backend']}, {summary['mode']} sizes)", "",
             f"{summary['date']}, commit {summary['git_commit']}, " +
             ", ".join(f"{k} {v}" for k, v in summary["versions"].items() if v), "",
             "| benchmark | status | seconds | headline figures |", "| --- | --- | --- | --- |"]
    for bench, entry in summary["benchmarks"].items():
        if entry["status"] == "skipped":
            lines.append(f"| {bench} | skipped | | {entry['note']} |")
            continue
        figures = ""
        if entry.get("result") and bench != "bench_train":
            figures = ", ".join(f"{k} {_fmt(v)}" for k, v in _scalar_headlines(bench, entry["result"]))
        elif entry.get("result"):
            figures = f"worst loop/bare ratio {_fmt(entry['result'].get('worst_ratio'))} (table below)"
        lines.append(f"| {bench} | {entry['status']} | {entry['seconds']:.0f} | {figures} |")

    train = summary["benchmarks"].get("bench_train", {}).get("result")
    if train:
        lines += ["", "## Full training loop vs bare step (bench_train)", "",
                  f"Target: loop/bare <= {train['target_ratio_max']}. ms/step over the steady window "
                  "(periodic eval and checkpoint included); startup/teardown apart.", "",
                  "| config | variant | sizes (L/d/T/B/V) | loop ms/step | bare ms/step | ratio | steady ms/step | "
                  "eval extra s | save extra s | ratio at config's ckpt interval | loop tok/s | startup s | "
                  "teardown s | MFU (loop, vs bf16 peak) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in train["results"]:
            s = r["sizes"]
            mfu = r.get("mfu_loop_vs_bf16_peak")
            lines.append(f"| {r['config']} | {r['variant']} | {s['n_layer']}/{s['n_embd']}/{s['block_size']}/"
                         f"{s['batch_size']}/{s['vocab_size']} | {r['loop_ms_per_step']:.1f} | "
                         f"{r['bare_ms_per_step']:.1f} | {r['median_ratio']:.3f} | {r['steady_ms_per_step']:.1f} | "
                         f"{r['eval_extra_s']:.3f} | {r['checkpoint_extra_s']:.3f} | "
                         f"{r['ratio_at_config_checkpoint_interval']:.3f} (every {r['config_checkpoint_interval']}) | "
                         f"{r['loop_tokens_per_s']:.0f} | {r['startup_s']:.2f} | {r['teardown_s']:.2f} | "
                         f"{'n/a' if mfu is None else f'{mfu:.1%}'} |")
        breakdowns = [r for r in train["results"] if "host_s_per_step" in r]
        if breakdowns:
            lines += ["", "Host milliseconds per step in each part of the loop (last round; includes waiting "
                      "for the device where that part synchronises):", ""]
            parts = sorted({k for r in breakdowns for k in r["host_s_per_step"]})
            lines += ["| config | variant | " + " | ".join(parts) + " |", "| --- | --- |" + " --- |" * len(parts)]
            for r in breakdowns:
                cells = " | ".join(f"{r['host_s_per_step'].get(p, 0) * 1e3:.2f}" for p in parts)
                lines.append(f"| {r['config']} | {r['variant']} | {cells} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    work, out_dir, device, backend, mode, *benches = argv
    work, out_dir = Path(work), Path(out_dir)
    summary = {
        "device": device, "backend": backend, "mode": mode,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(out_dir), "versions": _versions(),
        "benchmarks": {bench: collect(work, bench) for bench in benches},
    }
    (out_dir / f"{device}.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out_dir / f"{device}.md").write_text(markdown(summary))
    print(f"wrote {out_dir / f'{device}.json'} and {out_dir / f'{device}.md'}", file=sys.stderr)
    failed = [b for b, e in summary["benchmarks"].items() if e["status"] == "failed"]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
