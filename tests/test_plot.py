import math
import subprocess
import sys

import pytest

from altgrad_jax.plot import main
from altgrad_jax.loop.local_tracker import LocalTracker

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir, n_steps=30, shadow=True, nan_at=None):
    tracker = LocalTracker(run_dir)
    for step in range(n_steps):
        loss = 5.0 * math.exp(-step / 10)
        metrics = {"loss": math.nan if step == nan_at else loss, "learning_rate": 3e-4,
                   "grad_norm_l2/h/0/mlp/c_fc/kernel": 1.0 / (step + 1),
                   "grad_norm_l2/lm_head/kernel": 2.0 / (step + 1)}
        if shadow:
            metrics.update({"shadow_loss": loss * 0.99, "grad_cos_sim/mean": 0.98,
                            "grad_cos_sim/min": 0.9, "bit_stall_rate": 0.4,
                            "overflow_rate": 0.001 * step, "underflow_rate": 0.01})
        if step % 10 == 9:
            metrics["val_loss"] = loss * 1.1
        tracker.log_step(step, metrics)
    tracker.finish()
    return run_dir


def test_plots_of_two_runs_are_pngs(tmp_path, capsys):
    a = write_run(tmp_path / "e5m2", nan_at=12)
    b = write_run(tmp_path / "fp32", shadow=False)
    out = tmp_path / "plots"
    assert main([str(a), str(b), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["bit_stall_rate.png", "grad_cos_sim.png", "grad_norm_l2.png", "loss.png",
                     "quant_rates.png"]
    for path in out.iterdir():
        assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 1000
    assert str(out) in capsys.readouterr().out


def test_one_run_defaults_to_its_plots_dir_and_skips_missing_metrics(tmp_path):
    run = write_run(tmp_path / "run", shadow=False)
    assert main([str(run)]) == 0
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["grad_norm_l2.png", "loss.png"]


@pytest.mark.parametrize("case", ["missing", "no_metrics", "corrupt", "no_step", "empty", "no_args",
                                  "out_is_file"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, case):
    good = write_run(tmp_path / "good", n_steps=3)
    bad = tmp_path / "bad"
    bad.mkdir()
    argv = [str(good), str(bad), "--out", str(tmp_path / "out")]
    if case == "missing":
        argv[1] = str(tmp_path / "nope")
    elif case == "corrupt":
        (bad / "metrics.jsonl").write_text('{"step": 0}\n{oops\n{"step": 2}\n')
    elif case == "no_step":
        (bad / "metrics.jsonl").write_text('{"loss": 1.0}\n')
    elif case == "empty":
        (bad / "metrics.jsonl").write_text("")
    elif case == "no_args":
        argv = []
    elif case == "out_is_file":
        argv = [str(good), "--out", str(good / "metrics.jsonl")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("plot: error: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and not (good / "plots").exists()


@pytest.mark.e2e
def test_module_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "altgrad_jax.plot", str(tmp_path / "nope")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "run directory not found" in result.stderr
