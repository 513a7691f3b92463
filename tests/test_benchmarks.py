"""The benchmark scripts' CPU path runs and prints the JSON that run_all.sh collects (smallest
sizes; the numbers themselves are not asserted, timing belongs to the benchmarks)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CASES = {
    "bench_train.py": (["--configs", "default", "--variants", "fp8_shadow", "--steps", "4", "--rounds", "1"],
                       "results"),
    "bench_step.py": (["--quick", "--rounds", "1", "--steps", "1"], "median_ratio"),
    "bench_checkpoint.py": (["--quick", "--reps", "1"], None),
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_script_prints_json(script, tmp_path):
    args, expected_key = CASES[script]
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert isinstance(report, dict) and (expected_key is None or expected_key in report), sorted(report)
