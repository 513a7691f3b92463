"""Sweep arms over seeds: `python -m altgrad_jax.study.sweep --config C --formats E5M2,FP32,hybrid
[--seeds N] [--set key=value]... [--out runs/sweep] [--parallel N|auto] [--compile-cache DIR|none]`.

Every arm x seed is an ordinary run directory `<out>/<arm>/seed<seed>` (seeds: the config's seed
and the N-1 after it), trained by `altgrad_jax.run --resume auto` in a child process, all arms of
the first seed before the next seed. A child that exits 0, or 3 (the NaN stop: a diverged arm is
a result), gets `sweep_done.json` (exit status and resolved config); the same command later skips
a run whose marker holds the config it would run now and starts every other one again, which
resumes it from its checkpoints (raising max_steps extends finished runs the same way).
Exit status: 0 every run finished or diverged; 1 some run failed; 2 bad input, one line on
stderr, before anything runs; 130/143 after SIGINT/SIGTERM, once every child has saved and stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from altgrad_jax.config import ConfigError, TrainConfig, load_config, save_config
from altgrad_jax.study.arms import Arm, SweepError, load_study_config, parse_arms, run_config, sweep_base
from altgrad_jax.study.launch import Job, detect_gpus, run_jobs

MARKER, MANIFEST, RUN_CONFIG = "sweep_done.json", "sweep.json", "sweep_config.yaml"
OUTCOMES = {0: "finished", 3: "diverged"}  # child exit status -> a run with a result
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
_NOT_COMPARED = ("out_dir",)  # the same directory, written relative to another working directory


@dataclass(frozen=True)
class PlannedRun:
    arm: Arm
    seed: int
    directory: Path
    config: TrainConfig

    @property
    def label(self) -> str:
        return f"{self.arm.name}/seed{self.seed}"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise SweepError(f"command line: {message}")


def parse_args(argv):
    parser = _Parser(prog="python -m altgrad_jax.study.sweep",
                     description="Train every arm x seed as an ordinary run directory; rerun to resume.")
    parser.add_argument("--config", required=True, help="study config: a TrainConfig YAML with an optional "
                        "'recipes: {name: {key: value, ...}}' section")
    parser.add_argument("--formats", required=True, metavar="ARMS",
                        help="comma-separated arms: format names, FP32, recipe names")
    parser.add_argument("--seeds", type=int, default=1, metavar="N", help="seeds per arm (default 1)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field in every run (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"), help="sweep directory (default runs/sweep)")
    parser.add_argument("--parallel", default="auto", metavar="N|auto",
                        help="runs at once; auto (default): one per GPU, 1 without GPUs")
    parser.add_argument("--compile-cache", default=None, metavar="DIR|none",
                        help="JAX persistent compilation cache shared by the runs (default <out>/jax_cache, "
                             "or $JAX_COMPILATION_CACHE_DIR when set); none: off")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        raise SweepError(f"--seeds must be >= 1, got {args.seeds}")
    if args.parallel != "auto" and (not args.parallel.isdigit() or int(args.parallel) < 1):
        raise SweepError(f"--parallel must be 'auto' or a count >= 1, got {args.parallel!r}")
    return args


def plan(args) -> list[PlannedRun]:
    """Every run of the sweep with its config, validated; writes nothing."""
    if args.out.exists() and not args.out.is_dir():
        raise SweepError(f"--out {args.out} exists and is not a directory")
    base, recipes = load_study_config(args.config)
    arms = parse_arms(args.formats, recipes)
    base = sweep_base(base, args.overrides)
    seeds = [base.seed + k for k in range(args.seeds)]
    runs = []
    for seed in seeds:
        for arm in arms:
            directory = args.out / arm.name / f"seed{seed}"
            runs.append(PlannedRun(arm, seed, directory, run_config(base, arm, seed, directory)))
    _check_data({(r.config.data, r.config.vocab_size, r.config.block_size) for r in runs})
    for run in runs:
        _check_existing(run)
    return runs


def _check_data(specs) -> None:
    """Load each dataset once here: bad data fails before anything runs, and parallel children
    find the pystdlib cache already built."""
    from altgrad_jax.data import DataError, load_dataset

    for data, vocab_size, block_size in sorted(specs):
        try:
            load_dataset(data, vocab_size=vocab_size, block_size=block_size, progress=sys.stderr.isatty())
        except (DataError, OSError) as error:
            raise SweepError(str(error)) from None


def _comparable(config: TrainConfig) -> dict:
    settings = json.loads(json.dumps(config.to_dict()))
    return {key: value for key, value in settings.items() if key not in _NOT_COMPARED}


def _check_existing(run: PlannedRun) -> None:
    """Refuse a directory that holds a run of another config (max_steps aside: raising it extends)."""
    saved = run.directory / "config.yaml"
    if not saved.is_file():
        return
    try:
        old = _comparable(load_config(saved))
    except ConfigError as error:
        raise SweepError(f"{run.directory} holds a run this version cannot read ({error})") from None
    new = _comparable(run.config)
    for key, value in new.items():
        if key != "max_steps" and old.get(key) != value:
            raise SweepError(f"{run.directory} holds a run with another config ({key}: {old.get(key)!r} there, "
                             f"{value!r} now); use another --out or remove that directory")


def marker(run: PlannedRun) -> dict | None:
    try:
        return json.loads((run.directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_finished(run: PlannedRun) -> bool:
    found = marker(run)
    return isinstance(found, dict) and found.get("config") == _comparable(run.config)


def _write_json(path: Path, data: dict) -> None:
    temporary = path.with_name(f"{path.name}.tmp{os.getpid()}")
    temporary.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def _write_marker(run: PlannedRun, returncode: int) -> None:
    _write_json(run.directory / MARKER, {"status": OUTCOMES[returncode], "exit_code": returncode,
                                         "arm": run.arm.name, "seed": run.seed,
                                         "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                         "config": _comparable(run.config)})


def write_manifest(args, runs: list[PlannedRun], argv: list[str], slots) -> None:
    arms = list({run.arm.name: run.arm for run in runs}.values())
    _write_json(args.out / MANIFEST, {
        "command": [sys.executable, "-m", "altgrad_jax.study.sweep", *argv], "cwd": os.getcwd(),
        "config": str(args.config), "sets": args.overrides,
        "arms": [{"name": arm.name, "kind": arm.kind, "overrides": dict(arm.overrides)} for arm in arms],
        "seeds": sorted({run.seed for run in runs}), "parallel": len(slots),
        "devices": [slot for slot in slots if slot is not None],
        "runs": [{"arm": run.arm.name, "seed": run.seed, "dir": str(run.directory.relative_to(args.out))}
                 for run in runs]})


def _slots(parallel: str) -> tuple[list[str | None], str]:
    gpus = detect_gpus()
    if not gpus:
        count = 1 if parallel == "auto" else int(parallel)
        return [None] * count, f"{count} at a time"
    count = len(gpus) if parallel == "auto" else min(int(parallel), len(gpus))
    note = " (capped at one run per GPU)" if parallel != "auto" and int(parallel) > len(gpus) else ""
    return gpus[:count], f"{count} at a time, one GPU each{note}"


def _child_env(args) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cache = args.compile_cache
    if cache is None and "JAX_COMPILATION_CACHE_DIR" not in env:
        cache = str((args.out / "jax_cache").resolve())
    if cache is not None and cache.lower() == "none":
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
    elif cache is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(Path(cache).resolve())
    return env


def _job(run: PlannedRun, env) -> Job:
    command = [sys.executable, "-m", "altgrad_jax.study.child", "--parent", str(os.getpid()),
               "--config", str(run.directory / RUN_CONFIG), "--resume", "auto"]
    return Job(run.label, command, env)


def _resume_note(run: PlannedRun) -> str:
    steps = [int(p.name) for p in (run.directory / "checkpoints").glob("*") if p.name.isdigit()]
    return f"resuming from step {max(steps)}" if steps else "new"


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(sys.argv[1:] if argv is None else list(argv))
    except KeyboardInterrupt:  # before or after the runs: nothing to stop
        print("sweep: stopped by SIGINT", file=sys.stderr)
        return 128 + signal.SIGINT


def _main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
        runs = plan(args)
        slots, pace = _slots(args.parallel)
        args.out.mkdir(parents=True, exist_ok=True)
        write_manifest(args, runs, argv, slots)
    except SweepError as error:
        print(f"sweep: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as error:
        print(f"sweep: error: {error.filename or '--out'}: {error.strerror or error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return execute(args, runs, slots, pace)


def execute(args, runs: list[PlannedRun], slots: list[str | None], pace: str) -> int:
    """Skip the finished runs, run the others (children), report each start and end."""
    todo = [run for run in runs if not is_finished(run)]
    print(f"sweep: {len(runs)} runs in {args.out}; {len(runs) - len(todo)} finished already, "
          f"{len(todo)} to run, {pace}", flush=True)
    for run in runs:
        if run not in todo:
            print(f"sweep: skip {run.label} ({marker(run).get('status')})", flush=True)
        else:
            save_config(run.config, run.directory / RUN_CONFIG)
    by_label = {run.label: run for run in todo}
    started: dict[str, float] = {}
    outcomes: dict[str, str] = {}

    def on_start(job: Job, slot):
        started[job.label] = time.monotonic()
        where = f" on GPU {slot}" if slot is not None else ""
        print(f"sweep: start [{len(started)}/{len(todo)}] {job.label} "
              f"({_resume_note(by_label[job.label])}){where}", flush=True)

    def on_exit(job: Job, returncode: int, stopping: bool):
        run = by_label[job.label]
        if returncode in OUTCOMES:
            _write_marker(run, returncode)
            outcome = OUTCOMES[returncode]
        else:
            outcome = "interrupted" if stopping else "failed"
        outcomes[job.label] = outcome
        seconds = time.monotonic() - started[job.label]
        print(f"sweep: {job.label} {outcome} (exit {returncode}) after {seconds:.0f} s", flush=True)

    env = _child_env(args)
    stopped_by = run_jobs([_job(run, env) for run in todo], slots, on_start=on_start, on_exit=on_exit)
    if stopped_by is not None:
        unfinished = sum(1 for run in runs if not is_finished(run))
        print(f"sweep: stopped by {signal.Signals(stopped_by).name}; {unfinished} of {len(runs)} runs "
              "unfinished, the same command resumes them", file=sys.stderr, flush=True)
        return 128 + stopped_by
    counts = {name: list(outcomes.values()).count(name) for name in ("finished", "diverged", "failed")}
    print(f"sweep: done: {counts['finished']} finished, {counts['diverged']} diverged, {counts['failed']} failed "
          f"this time; report: {sys.executable} -m altgrad_jax.study.report {args.out}", flush=True)
    return EXIT_FAILED if counts["failed"] else EXIT_OK


if __name__ == "__main__":
    from altgrad_jax.hugepages import restart_with_hugepages

    restart_with_hugepages()  # the runs inherit it (hugepages.py)
    sys.exit(main())
