"""The sweep: bad input refused before anything runs, outcomes of children, and a sweep stopped
with Ctrl-C then run again with the same command ending where an uninterrupted sweep ends."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from altgrad_jax.config import save_config
from altgrad_jax.study import launch, sweep
from altgrad_jax.study.launch import Job
from altgrad_jax.loop.local_tracker import read_jsonl

REPO = Path(__file__).resolve().parents[1]
TINY = """
n_layer: 1
n_head: 2
n_embd: 16
block_size: 16
batch_size: 4
eval_iters: 1
max_steps: 100
warmup_steps: 2
learning_rate: 3.0e-3
checkpoint_interval: 20
eval_interval: 100
log_interval: 1
use_fp8: true
use_shadow: false
wandb_mode: disabled
seed: 0
recipes:
  hybrid: {fp8_forward_format: E4M3, fp8_backward_format: E5M2}
  bad_key: {fp8_fromat: E4M3}
"""


@pytest.fixture
def study_config(tmp_path, text_file):
    path = tmp_path / "study.yaml"
    path.write_text(TINY + f"data: {text_file}\n")
    return path


def tree(root):
    return sorted(str(p) for p in Path(root).rglob("*"))


def bad_cases(tmp_path, config):
    wrong_key = tmp_path / "wrong_key.yaml"
    wrong_key.write_text(config.read_text().replace("n_layer:", "n_layers:"))
    shadowing = tmp_path / "shadowing.yaml"
    shadowing.write_text(config.read_text().replace("  hybrid:", "  e4m3:"))
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    base = ["--config", str(config), "--out", str(tmp_path / "out")]
    return {
        "unknown format": base + ["--formats", "E4M3,E9M9"],
        "unknown recipe": base + ["--formats", "nosuch"],
        "empty arm": base + ["--formats", "E4M3,,FP32"],
        "arm twice": base + ["--formats", "E4M3,e4m3"],
        "recipe with an unknown key": base + ["--formats", "bad_key"],
        "missing config": ["--config", str(tmp_path / "nope.yaml"), "--formats", "FP32"],
        "unknown key in the config": ["--config", str(wrong_key), "--formats", "FP32"],
        "recipe named like a format": ["--config", str(shadowing), "--formats", "FP32"],
        "bad --set": base + ["--formats", "FP32", "--set", "n_layer=two"],
        "--set out_dir": base + ["--formats", "FP32", "--set", "out_dir=x"],
        "missing data": base + ["--formats", "FP32", "--set", f"data={tmp_path / 'none.txt'}"],
        "no seeds": base + ["--formats", "FP32", "--seeds", "0"],
        "no parallel": base + ["--formats", "FP32", "--parallel", "0"],
        "out is a file": ["--config", str(config), "--out", str(not_a_dir), "--formats", "FP32"],
        "no --formats": ["--config", str(config)],
    }


def test_bad_input_is_one_line_exit_2_before_anything_runs(tmp_path, study_config, capsys):
    cases = bad_cases(tmp_path, study_config)
    before = tree(tmp_path)
    for name, argv in cases.items():
        assert sweep.main(argv) == 2, name
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("sweep: error: "), (name, err)
        assert "Traceback" not in err
    assert tree(tmp_path) == before


def test_a_directory_run_with_another_config_is_refused(tmp_path, study_config, capsys):
    argv = ["--config", str(study_config), "--formats", "FP32", "--out", str(tmp_path / "out")]
    runs = sweep.plan(sweep.parse_args(argv))
    save_config(runs[0].config.replace(learning_rate=1e-3), runs[0].directory / "config.yaml")
    before = tree(tmp_path)
    assert sweep.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "learning_rate: 0.001 there, 0.003 now" in err
    assert tree(tmp_path) == before
    save_config(runs[0].config.replace(max_steps=50), runs[0].directory / "config.yaml")
    sweep.plan(sweep.parse_args(argv))  # a run with fewer steps is extended, not refused


def test_arms_resolve_formats_fp32_and_recipes_over_the_sweep_overrides(tmp_path, study_config):
    args = sweep.parse_args(["--config", str(study_config), "--formats", "e3m4,FP32,hybrid", "--seeds", "2",
                             "--set", "fp8_format=E5M2", "--set", "seed=7", "--out", str(tmp_path / "o")])
    runs = sweep.plan(args)
    assert [run.label for run in runs] == ["E3M4/seed7", "FP32/seed7", "hybrid/seed7",
                                           "E3M4/seed8", "FP32/seed8", "hybrid/seed8"]
    e3m4, fp32, hybrid = (run.config for run in runs[:3])
    assert (e3m4.use_fp8, e3m4.fp8_format, e3m4.fp8_forward_format) == (True, "E3M4", None)
    assert fp32.use_fp8 is False
    assert (hybrid.fp8_format, hybrid.fp8_forward_format, hybrid.fp8_backward_format) == ("E5M2", "E4M3", "E5M2")
    assert runs[4].config.out_dir == str(tmp_path / "o" / "FP32" / "seed8") and runs[4].config.seed == 8
    assert not (tmp_path / "o").exists()


def fake_children(monkeypatch, exits):
    """Children that print a line and exit with exits[arm]."""
    def job(run, env):
        code = f"print('step 1 loss 5.0'); import sys; sys.exit({exits[run.arm.name]})"
        return Job(run.label, [sys.executable, "-c", code], env)
    monkeypatch.setattr(sweep, "_job", job)


@pytest.mark.e2e
def test_a_diverged_run_is_a_result_and_a_failed_one_is_rerun(tmp_path, study_config, capsys, monkeypatch):
    argv = ["--config", str(study_config), "--formats", "E4M3,E7M0,FP32", "--out", str(tmp_path / "out")]
    fake_children(monkeypatch, {"E4M3": 0, "E7M0": 3, "FP32": 1})
    assert sweep.main(argv) == 1
    out = capsys.readouterr().out
    assert "[E7M0/seed0] step 1 loss 5.0" in out and "sweep: E7M0/seed0 diverged (exit 3)" in out
    assert "sweep: done: 1 finished, 1 diverged, 1 failed" in out
    markers = {arm: json.loads((tmp_path / "out" / arm / "seed0" / sweep.MARKER).read_text())["status"]
               for arm in ("E4M3", "E7M0")}
    assert markers == {"E4M3": "finished", "E7M0": "diverged"}
    assert not (tmp_path / "out" / "FP32" / "seed0" / sweep.MARKER).exists()
    manifest = json.loads((tmp_path / "out" / sweep.MANIFEST).read_text())
    assert [arm["name"] for arm in manifest["arms"]] == ["E4M3", "E7M0", "FP32"] and manifest["seeds"] == [0]
    assert manifest["command"][1:] == ["-m", "altgrad_jax.study.sweep", *argv]

    fake_children(monkeypatch, {"E4M3": 1, "E7M0": 1, "FP32": 0})
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert "skip E4M3/seed0 (finished)" in out and "skip E7M0/seed0 (diverged)" in out
    assert "start [1/1] FP32/seed0" in out and "done: 1 finished, 0 diverged, 0 failed" in out


@pytest.mark.e2e
def test_one_child_per_gpu_through_cuda_visible_devices(tmp_path):
    assert launch.detect_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert launch.detect_gpus({"CUDA_VISIBLE_DEVICES": "1,-1,3"}) == ["1"]
    assert launch.detect_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert launch.detect_gpus({"CUDA_VISIBLE_DEVICES": "0,1", "JAX_PLATFORMS": "cpu"}) == []
    code = "import os, time; print(os.environ.get('CUDA_VISIBLE_DEVICES')); time.sleep(0.3)"
    jobs = [Job(f"job{i}", [sys.executable, "-c", code], dict(os.environ)) for i in range(3)]
    started, ended = [], []

    class Lines(list):
        def write(self, text):
            self.append(text)

        def flush(self):
            pass

    stream = Lines()
    stopped = launch.run_jobs(jobs, ["2", "3"], stream=stream, on_start=lambda job, slot: started.append(slot),
                              on_exit=lambda job, code, stopping: ended.append((job.label, code)))
    assert stopped is None and started[:2] == ["2", "3"] and started[2] in ("2", "3")
    assert sorted(ended) == [("job0", 0), ("job1", 0), ("job2", 0)]
    printed = sorted(line for line in "".join(stream).splitlines())
    assert printed == sorted(["[job0] 2", "[job1] 3", f"[job2] {started[2]}"])


@pytest.fixture(scope="module")
def env(tmp_path_factory, request):
    # The persistent compilation cache (under .pytest_cache) makes every run after the first of
    # each arm skip XLA's compile; results are the same programs' either way.
    cache = request.config.cache.mkdir("altgrad_jax_compilation_cache")
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
            "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("xdg")), "WANDB_SILENT": "true"}


def sweep_command(config, out, arms="FP32,hybrid"):
    return [sys.executable, "-m", "altgrad_jax.study.sweep", "--config", str(config), "--formats", arms,
            "--out", str(out)]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}


@pytest.mark.e2e
def test_ctrl_c_then_the_same_command_ends_as_an_uninterrupted_sweep(tmp_path, study_config, env):
    # Ctrl-C comes during the second arm (hybrid): the first (FP32) ran through once and must be
    # left as it is; hybrid must end as in a sweep that was never stopped.
    reference = tmp_path / "reference"
    done = subprocess.run(sweep_command(study_config, reference, "hybrid"), env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    out = tmp_path / "stopped"
    command = sweep_command(study_config, out)
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "hybrid" / "seed0" / "checkpoints" / "20").is_dir():
        assert process.poll() is None and time.monotonic() < deadline, "the second arm never reached step 20"
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stdout[-3000:] + stderr
    assert stderr.splitlines() == ["sweep: stopped by SIGINT; 1 of 2 runs unfinished, the same command resumes them"]
    assert "[hybrid/seed0] run interrupted at step" in stdout
    assert (out / "FP32" / "seed0" / sweep.MARKER).is_file()
    assert not (out / "hybrid" / "seed0" / sweep.MARKER).exists()
    fp32_metrics = (out / "FP32" / "seed0" / "metrics.jsonl").read_bytes()

    again = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "sweep: skip FP32/seed0 (finished)" in again.stdout
    resumed_from = int(again.stdout.split("hybrid/seed0 (resuming from step ")[1].split(")")[0])
    assert 20 <= resumed_from < 100
    assert (out / "FP32" / "seed0" / "metrics.jsonl").read_bytes() == fp32_metrics
    expected, got = losses(reference / "hybrid" / "seed0"), losses(out / "hybrid" / "seed0")
    assert sorted(got) == list(range(1, 101)) and got == expected
    assert sorted(losses(out / "FP32" / "seed0")) == list(range(1, 101))
    for arm in ("FP32", "hybrid"):
        assert json.loads((out / arm / "seed0" / sweep.MARKER).read_text())["status"] == "finished"
