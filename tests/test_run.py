"""The command line end to end: real subprocesses, real Orbax checkpoints, W&B in offline mode."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from altgrad_jax import run
from altgrad_jax.loop.local_tracker import read_jsonl

pytestmark = pytest.mark.e2e  # starts processes: left out by `pytest -m "not e2e"`

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "default.yaml"
TINY = ["n_layer=1", "n_head=2", "n_embd=32", "block_size=16", "batch_size=8", "eval_iters=2",
        "warmup_steps=5", "learning_rate=3e-3", "log_interval=1", "wandb_mode=disabled"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "XDG_CACHE_HOME": str(cache), "WANDB_SILENT": "true",
            "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def command(out_dir, *overrides, config=DEFAULT_CONFIG, resume=None):
    args = [sys.executable, "-m", "altgrad_jax.run", "--config", str(config), "--set", f"out_dir={out_dir}"]
    for override in overrides:
        args += ["--set", override]
    if resume:
        args += ["--resume", resume]
    return args


def tiny(out_dir, text_file, *overrides):
    return command(out_dir, *TINY, f"data={text_file}", *overrides)


def run_to_end(args, env, timeout=300):
    return subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def losses(out_dir):
    return {record["step"]: record["loss"] for record in read_jsonl(Path(out_dir) / "metrics.jsonl")
            if "loss" in record}


def val_losses(out_dir):
    return [record["val_loss"] for record in read_jsonl(Path(out_dir) / "metrics.jsonl") if "val_loss" in record]


def test_default_config_end_to_end_with_wandb_offline(tmp_path, env):
    out_dir = tmp_path / "run"
    result = run_to_end(command(out_dir, "max_steps=40", "eval_interval=20", "checkpoint_interval=20",
                                "log_interval=10", "wandb_mode=offline"), env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out_dir / "config.yaml").is_file()
    assert sorted(p.name for p in (out_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["20", "40"]
    assert list((out_dir / "wandb").glob("offline-run-*/run-*.wandb")), "no offline W&B run written"
    assert "wandb sync" in result.stdout + result.stderr
    first, *_, last = val_losses(out_dir)
    assert last < 0.85 * first, (first, last)
    record = read_jsonl(out_dir / "metrics.jsonl")[-1]
    assert record["step"] == 40 and 0.5 < record["grad_cos_sim/mean"] <= 1.0 and "shadow_loss" in record


# bfloat16 master weights + Kahan resume bitwise in test_update_training.py (in process).
@pytest.mark.parametrize("storage", [
    (),
    ("master_weights=E5M2", "update_rounding=stochastic", "opt_state_dtype=E4M3"),
], ids=["float32", "e5m2-master-sr-fp8-moments"])
def test_sigkill_then_same_command_reproduces_uninterrupted_losses(tmp_path, env, text_file, storage):
    steps = ["max_steps=120", "checkpoint_interval=20", "eval_interval=100", "use_fp8=true", "use_shadow=true",
             *storage]
    reference = tmp_path / "reference"
    assert run_to_end(tiny(reference, text_file, *steps), env).returncode == 0

    out_dir = tmp_path / "killed"
    args = tiny(out_dir, text_file, *steps)
    process = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (out_dir / "checkpoints" / "40").is_dir():
        assert process.poll() is None and time.monotonic() < deadline, "run ended before its second checkpoint"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    resumed_from = max(int(p.name) for p in (out_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert resumed_from < 120

    result = run_to_end(args, env)
    assert result.returncode == 0, result.stderr[-3000:]
    expected, got = losses(reference), losses(out_dir)
    assert sorted(got) == list(range(1, 121)), "every step logged exactly once"
    steps_after = [s for s in got if s > resumed_from]
    assert steps_after and all(got[s] == expected[s] for s in steps_after)
    steps_logged = [r["step"] for r in read_jsonl(out_dir / "metrics.jsonl")]
    assert len(steps_logged) == len(set(steps_logged))


def test_nan_stops_with_anomaly_checkpoint_and_exit_3(tmp_path, env, text_file):
    out_dir = tmp_path / "nan"
    result = run_to_end(tiny(out_dir, text_file, "learning_rate=1e30", "warmup_steps=0", "grad_clip=0",
                             "nan_patience=3", "max_steps=50"), env)
    assert result.returncode == 3, result.stderr[-3000:]
    logged = losses(out_dir)
    bad_steps = [s for s, loss in logged.items() if not math.isfinite(loss)]
    assert bad_steps == list(range(bad_steps[0], bad_steps[0] + 3)) == sorted(logged)[-3:], \
        "stops exactly at nan_patience consecutive non-finite steps"
    alerts = read_jsonl(out_dir / "alerts.jsonl")
    assert [a["level"] for a in alerts if a["level"] == "ERROR"] == ["ERROR"]
    assert next(a for a in alerts if a["level"] == "ERROR")["step"] == bad_steps[-1]
    anomaly_steps = [int(p.name) for p in (out_dir / "checkpoints" / "anomaly").iterdir() if p.name.isdigit()]
    assert anomaly_steps == bad_steps[:1], "the anomaly checkpoint is that of the first non-finite step"
    from altgrad_jax.ckpt import CheckpointManager
    from altgrad_jax.config import load_config
    from altgrad_jax.train_state import abstract_train_state
    with CheckpointManager(out_dir / "checkpoints") as manager:
        state = manager.restore(anomaly_steps[0], abstract_train_state(load_config(out_dir / "config.yaml")),
                                anomaly=True)
    # Non-finite steps skip their update: the saved params are the (finite, exploded) ones that
    # produced the non-finite loss, not a model full of NaN.
    leaves = [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(state.params)]
    assert all(np.isfinite(leaf).all() for leaf in leaves) and max(np.abs(l).max() for l in leaves) > 1e20


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, env, text_file):
    out_dir = tmp_path_factory.mktemp("finished") / "run"
    result = run_to_end(tiny(out_dir, text_file, "max_steps=20", "checkpoint_interval=10", "eval_interval=10"), env)
    assert result.returncode == 0, result.stderr[-3000:]
    return out_dir


def tree_snapshot(root):
    return sorted((str(p), p.stat().st_size) for p in Path(root).rglob("*"))


def bad_input_cases(tmp, text_file, finished_run):
    empty = tmp / "empty.txt"
    empty.write_text("")
    short = tmp / "short.txt"
    short.write_text("abc")
    broken_yaml = tmp / "broken.yaml"
    broken_yaml.write_text("n_layer: [1,\n")
    all_unreadable = tmp / "all_unreadable"
    shutil.copytree(finished_run, all_unreadable)
    for marker in (all_unreadable / "checkpoints").glob("*/_CHECKPOINT_METADATA"):
        marker.write_text("garbage")
    other_run = tmp / "other_run"
    shutil.copytree(finished_run, other_run)
    fresh = tmp / "fresh"
    base = ["--config", str(DEFAULT_CONFIG), "--set", f"out_dir={fresh}"]
    finished = ["--config", str(DEFAULT_CONFIG), "--set", f"out_dir={finished_run}", "--set", f"data={text_file}"]
    finished += [arg for item in TINY for arg in ("--set", item)]
    return {
        "missing config": ["--config", str(tmp / "nope.yaml")],
        "yaml syntax": ["--config", str(broken_yaml)],
        "no --config": [],
        "unknown flag": base + ["--frobnicate"],
        "unknown key": base + ["--set", "n_layers=2"],
        "override without =": base + ["--set", "n_layer"],
        "bad value": base + ["--set", "n_layer=six"],
        "missing data": base + ["--set", f"data={tmp / 'missing.txt'}"],
        "empty data": base + ["--set", f"data={empty}"],
        "data shorter than a block": base + ["--set", f"data={short}"],
        "missing resume path": base + ["--resume", str(tmp / "no-checkpoints")],
        "resume never with checkpoints": finished + ["--resume", "never"],
        "checkpoint of another shape": finished + ["--set", "n_embd=64"],
        "too many devices": base + ["--set", "mesh.data_parallel=64"],
        "every checkpoint unreadable": [arg.replace(str(finished_run), str(all_unreadable)) for arg in finished],
        "resume into a directory with later steps": [arg.replace(str(finished_run), str(other_run)) for arg in finished]
        + ["--resume", str(finished_run / "checkpoints" / "10")],
    }


def test_every_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, text_file, finished_run, capsys):
    cases = bad_input_cases(tmp_path, text_file, finished_run)
    before = tree_snapshot(tmp_path), tree_snapshot(finished_run)
    for name, argv in cases.items():
        status = run.main(argv)
        err = capsys.readouterr().err
        assert status == 2, name
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, (name, err)
    assert (tree_snapshot(tmp_path), tree_snapshot(finished_run)) == before


def test_bad_input_from_a_subprocess_has_no_traceback(tmp_path, env):
    result = run_to_end(command(tmp_path / "out", "n_embd=100", "n_head=3"), env, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "n_embd" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_resume_auto_falls_back_past_a_corrupted_checkpoint(tmp_path, env, text_file, finished_run):
    out_dir = tmp_path / "copy"
    shutil.copytree(finished_run, out_dir)
    latest = out_dir / "checkpoints" / "20"
    for path in latest.rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    result = run_to_end(tiny(out_dir, text_file, "max_steps=20", "checkpoint_interval=10", "eval_interval=10"), env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "20" in result.stderr and "10" in result.stderr  # the warning names the bad and the good step
    assert losses(out_dir) == losses(finished_run)  # steps 11..20 trained again, bitwise as before


def start_past_first_checkpoint(out_dir, text_file, env) -> subprocess.Popen:
    """A long tiny run, returned once its checkpoint of step 20 is on disk."""
    args = tiny(out_dir, text_file, "max_steps=100000", "checkpoint_interval=20", "eval_interval=100000")
    process = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out_dir / "checkpoints" / "20").is_dir():
        assert process.poll() is None and time.monotonic() < deadline, "run ended before its first checkpoint"
        time.sleep(0.01)
    return process


def test_ctrl_c_finishes_the_save_and_exits_130(tmp_path, env, text_file):
    out_dir = tmp_path / "interrupted"
    process = start_past_first_checkpoint(out_dir, text_file, env)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    saved = max(int(p.name) for p in (out_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved >= 20 and max(losses(out_dir)) == saved, "the state after the last logged step was saved"
    assert not list((out_dir / "checkpoints").glob("*tmp*")), "no unfinished save left behind"


def test_a_second_ctrl_c_stops_at_once_and_the_run_resumes(tmp_path, env, text_file):
    out_dir = tmp_path / "interrupted"
    process = start_past_first_checkpoint(out_dir, text_file, env)
    process.send_signal(signal.SIGINT)
    time.sleep(0.005)  # two signals sent at once can arrive as one
    process.send_signal(signal.SIGINT)  # wherever it lands (loop, last save, its wait, teardown): 130
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "terminate called" not in stderr, stderr[-3000:]
    saved = max(int(p.name) for p in (out_dir / "checkpoints").iterdir() if p.name.isdigit())
    resumed = run_to_end(tiny(out_dir, text_file, f"max_steps={saved + 5}", "checkpoint_interval=20",
                              "eval_interval=100000"), env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming after step {saved}" in resumed.stderr
    assert not list((out_dir / "checkpoints").glob("*tmp*")), "the abandoned save was not cleaned up"
    assert max(losses(out_dir)) == saved + 5


def test_resume_from_an_earlier_step_directory_sets_later_steps_aside(tmp_path, env, text_file, finished_run):
    out_dir = tmp_path / "copy"
    shutil.copytree(finished_run, out_dir)
    args = tiny(out_dir, text_file, "max_steps=20", "checkpoint_interval=10", "eval_interval=10")
    result = run_to_end(args + ["--resume", str(out_dir / "checkpoints" / "10")], env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out_dir / "checkpoints" / "20.superseded").is_dir()  # kept, not deleted
    assert losses(out_dir) == losses(finished_run)  # steps 11..20 again, bitwise as before
