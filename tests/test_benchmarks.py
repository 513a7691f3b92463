"""The benchmark scripts' CPU path runs and prints the JSON that run_all.sh collects (smallest
sizes). Timings are not compared with targets here, only checked to be sane: positive, finite,
and consistent with the ratios reported beside them."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # starts processes: left out by `pytest -m "not e2e"`

REPO = Path(__file__).resolve().parents[1]


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def check_train(report):
    assert report["benchmark"] == "train_loop" and len(report["results"]) == 1
    result = report["results"][0]
    assert (result["config"], result["variant"], result["steps"]) == ("default", "fp8_shadow", 4)
    for key in ("loop_ms_per_step", "bare_ms_per_step", "steady_ms_per_step", "median_ratio", "compile_s",
                "loop_tokens_per_s", "bare_tokens_per_s", "matmul_params", "model_tflop_per_step"):
        assert positive(result[key]), key
    # One round: the median ratio is that round's loop / bare.
    assert result["median_ratio"] == pytest.approx(result["loop_ms_per_step"] / result["bare_ms_per_step"], rel=1e-9)
    assert report["worst_ratio"] == result["median_ratio"]


def check_step(report):
    assert report["benchmark"] == "train_step" and report["rounds"] == 1
    for key in ("median_ratio", "research_ms_per_step", "plain_ms_per_step", "research_tokens_per_s",
                "plain_tokens_per_s", "research_compile_s"):
        assert positive(report[key]), key
    assert report["median_ratio"] == pytest.approx(
        report["research_ms_per_step"] / report["plain_ms_per_step"], rel=1e-9)
    assert report["median_ratio"] > 1, "the research step (two gradients and every metric) beat a plain step"


def check_checkpoint(report):
    assert report["benchmark"] == "checkpoint" and report["reps"] == 1
    for key in ("state_megabytes", "n_leaves", "save_total_s", "numpy_save_s", "numpy_save_per_leaf_s",
                "total_over_numpy"):
        assert positive(report[key]), key
    assert 0 <= report["save_blocking_s"] <= report["save_total_s"]  # values are rounded to 0.1 ms
    assert 0 <= report["blocking_fraction"] <= 1
    assert report["total_over_numpy"] == pytest.approx(report["save_total_s"] / report["numpy_save_s"], rel=0.1)


CASES = {
    "bench_train.py": (["--configs", "default", "--variants", "fp8_shadow", "--steps", "4", "--rounds", "1"],
                       check_train),
    "bench_step.py": (["--quick", "--rounds", "1", "--steps", "1"], check_step),
    "bench_checkpoint.py": (["--quick", "--reps", "1"], check_checkpoint),
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_script_prints_sane_json(script, tmp_path):
    args, check = CASES[script]
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["backend"] == "cpu"
    check(report)
