"""The study report on synthetic sweeps with known curves: one arm diverges at a known step, one
lags, one matches FP32. Every number in the tables and verdicts is fixed by construction."""

import json
import math

import pytest
import yaml

from altgrad_jax.study import figures, report
from altgrad_jax.loop.local_tracker import LocalTracker

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = range(1, 101)
EVALS = (0, 20, 40, 60, 80, 100)
LAYERS = ("h/0/attn/c_attn", "h/0/mlp/c_fc", "h/1/mlp/c_proj", "lm_head")


def fp32_loss(step, seed):
    return 5.0 - 0.028 * step + 0.1 * seed


def quant_metrics(step, overrides=None):
    """Every per-layer metric below its default threshold, then `overrides` {(metric, role, layer): (from, value)}."""
    metrics = {f"quant/{metric}/{role}/{layer}": value for layer in LAYERS for role in ("x", "w", "dy")
               for metric, value in (("underflow", 0.01), ("overflow", 0.0), ("rel_err", 0.1))}
    for (metric, role, layer), (start, value) in (overrides or {}).items():
        if step >= start:
            metrics[f"quant/{metric}/{role}/{layer}"] = value
    return metrics


def write_run(directory, *, seed, val, loss=fp32_loss, last_step=100, use_fp8=True, overrides=None,
              cosine=0.99, whatif=False):
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(yaml.safe_dump({"use_fp8": use_fp8, "seed": seed, "max_steps": 100,
                                                           "overflow_threshold": 0.01}))
    tracker = LocalTracker(directory)
    tracker.log_step(0, {"val_loss": val[0]})
    for step in range(1, last_step + 1):
        metrics = {"loss": loss(step, seed), "grad_cos_sim/global": cosine(step) if callable(cosine) else cosine,
                   "grad_cos_sim/mean": 0.5, "bit_stall_rate": 0.3}
        if use_fp8:
            metrics |= quant_metrics(step, overrides)
        if whatif and step % 10 == 0:
            metrics |= {f"whatif/E4M3/{role}/{metric}/{layer}": 0.1 * step / 100 for layer in LAYERS
                        for role in ("x", "dy") for metric in ("underflow", "overflow", "rel_err")}
        if step in val:
            metrics["val_loss"] = val[step]
        tracker.log_step(step, metrics)
    tracker.finish()


def diverging_loss(step, seed):
    if step >= 70:
        return math.nan
    return 3 * fp32_loss(step, seed) if step >= 61 else fp32_loss(step, seed)


DIVERGING_SIGNS = {("underflow", "dy", "h/1/mlp/c_proj"): (20, 0.62),  # the first sign
                   ("overflow", "x", "h/0/mlp/c_fc"): (30, 0.05),  # later
                   ("rel_err", "w", "lm_head"): (70, math.inf)}  # after the divergence: ignored
LAGGING_SIGNS = {("rel_err", "x", "h/0/attn/c_attn"): (5, 0.3),  # 0.3/0.25 beats 0.28/0.25 at step 5
                 ("rel_err", "w", "h/0/mlp/c_fc"): (5, 0.28),
                 ("underflow", "x", "lm_head"): (50, 0.6)}


def write_sweep(root, seeds=(0,)):
    for seed in seeds:
        shift = 0.1 * seed
        fp32_val = dict(zip(EVALS, (5.0 + shift, 4.0 + shift, 3.0 + shift, 2.6 + shift, 2.4 + shift, 2.2 + shift)))
        write_run(root / "FP32" / f"seed{seed}", seed=seed, val=fp32_val, use_fp8=False, cosine=1.0,
                  whatif=True)
        write_run(root / "E5M2" / f"seed{seed}", seed=seed,
                  val=dict(zip(EVALS, (5.0, 4.0, 3.0, 2.6, 2.2, 2.19))))
        write_run(root / "E3M4" / f"seed{seed}", seed=seed, overrides=LAGGING_SIGNS, cosine=0.95,
                  loss=lambda step, seed: fp32_loss(step, seed) + 0.3,
                  val=dict(zip(EVALS, (5.0, 4.2, 3.4, 2.9, 2.7, 2.5 + shift))))
        if seed == 0:
            write_run(root / "E7M0" / f"seed{seed}", seed=seed, loss=diverging_loss, last_step=72,
                      overrides=DIVERGING_SIGNS, cosine=lambda step: 0.8 if step >= 65 else 0.97,
                      val=dict(zip(EVALS[:4], (5.0, 4.0, 3.0, 2.6))))
        else:  # this seed does not diverge
            write_run(root / "E7M0" / f"seed{seed}", seed=seed, val=dict(zip(EVALS, (5, 4, 3, 2.6, 2.5, 2.4))))
    return root


def run_report(capsys, *argv):
    status = report.main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    assert status == 0, err
    return out


def section(text, title):
    return text.split(f"## {title}\n\n", 1)[1].split("\n\n", 1)[0].splitlines()


def test_one_seed_table_divergence_first_failure_and_verdicts(tmp_path, capsys):
    sweep = write_sweep(tmp_path / "sweep")
    printed = run_report(capsys, sweep)
    text = (sweep / "report" / "report.md").read_text()
    assert section(text, "Verdicts") == [
        "- FP32: baseline; final val_loss 2.2000, best 2.2000.",
        "- E3M4: lags FP32 by +0.3000 (final val_loss 2.5000 vs 2.2000); "
        "first sign: x rel_err 0.3 in h/0/attn/c_attn at step 5.",
        "- E5M2: matches FP32 (final val_loss 2.1900 vs 2.2000, gap -0.0100); "
        "reaches FP32's final val_loss at step 80.",
        "- E7M0: diverged at step 61; first sign: dy underflow 0.62 in h/1/mlp/c_proj at step 20, 41 steps before.",
    ]
    assert printed.splitlines()[:4] == [line[2:] for line in section(text, "Verdicts")]
    assert section(text, "Summary")[2:] == [
        "| FP32 | 0 | 2.2000 | 2.2000 | — | no | 100 | baseline |",
        "| E3M4 | 0 | 2.5000 | 2.5000 | +0.3000 | no | never | lags |",
        "| E5M2 | 0 | 2.1900 | 2.1900 | -0.0100 | no | 80 | matches |",
        "| E7M0 | 0 | — | 2.6000 | — | step 61 | never | diverged |",
    ]
    assert section(text, "First failure")[2:] == [
        "| E3M4 | 0 | 5 | rel_err | x | h/0/attn/c_attn | 0.3 | 0.25 | — |",
        "| E7M0 | 0 | 20 | underflow | dy | h/1/mlp/c_proj | 0.62 | 0.5 | 41 |",
    ]
    pngs = sorted(p.name for p in (sweep / "report").glob("*.png"))
    assert pngs == ["cosine.png", "heatmap_E3M4.png", "heatmap_E5M2.png", "heatmap_E7M0.png", "loss.png",
                    "update.png", "whatif_FP32_E4M3.png"]
    for name in pngs:
        assert (sweep / "report" / name).read_bytes()[:8] == PNG_SIGNATURE
        assert f"![{name[:-4]}]({name})" in text


def test_several_seeds_mean_std_and_partial_divergence(tmp_path, capsys, monkeypatch):
    sweep = write_sweep(tmp_path / "sweep", seeds=(0, 1))
    out = tmp_path / "out"
    monkeypatch.setattr(figures, "write_figures", lambda arms, summaries, baseline, out_dir: [out_dir / "loss.png"])
    run_report(capsys, sweep, "--out", out, "--markdown", tmp_path / "docs" / "study.md")
    text = (tmp_path / "docs" / "study.md").read_text()
    assert not (out / "report.md").exists() and "![loss](../out/loss.png)" in text
    assert section(text, "Summary")[2:] == [
        "| FP32 | 0, 1 | 2.2500 ± 0.0707 | 2.2500 ± 0.0707 | — | no | 100 (1/2) | baseline |",
        "| E3M4 | 0, 1 | 2.5500 ± 0.0707 | 2.5500 ± 0.0707 | +0.3000 | no | never | lags |",
        "| E5M2 | 0, 1 | 2.1900 ± 0.0000 | 2.1900 ± 0.0000 | -0.0600 | no | 80 ± 0 | beats |",
        "| E7M0 | 0, 1 | 2.4000 (1/2) | 2.5000 ± 0.1414 | +0.1500 | 1/2: step 61 | never | diverged |",
    ]
    verdicts = section(text, "Verdicts")
    assert verdicts[3] == ("- E7M0: diverged at step 61 (1/2 seeds: step 61); first sign: dy underflow 0.62 "
                           "in h/1/mlp/c_proj at step 20 (seed 0), 41 steps before.")
    assert verdicts[2] == ("- E5M2: beats FP32 (final val_loss 2.1900 vs 2.2500, gap -0.0600); "
                           "reaches FP32's final val_loss at step 80 ± 0.")
    assert section(text, "First failure")[2:] == [
        "| E3M4 | 0 | 5 | rel_err | x | h/0/attn/c_attn | 0.3 | 0.25 | — |",
        "| E3M4 | 1 | 5 | rel_err | x | h/0/attn/c_attn | 0.3 | 0.25 | — |",
        "| E7M0 | 0 | 20 | underflow | dy | h/1/mlp/c_proj | 0.62 | 0.5 | 41 |",
    ]


def test_run_dirs_given_one_by_one_and_thresholds_as_options(tmp_path, capsys):
    sweep = write_sweep(tmp_path / "sweep")
    out = tmp_path / "r"
    run_report(capsys, sweep / "FP32" / "seed0", sweep / "E7M0" / "seed0", "--out", out, "--underflow", "0.7",
               "--no-figures")
    verdicts = section((out / "report.md").read_text(), "Verdicts")
    assert verdicts == ["- FP32: baseline; final val_loss 2.2000, best 2.2000.",
                        "- E7M0: diverged at step 61; first sign: x overflow 0.05 in h/0/mlp/c_fc at step 30, "
                        "31 steps before."]


def test_without_a_baseline_divergence_is_a_non_finite_loss(tmp_path, capsys):
    sweep = write_sweep(tmp_path / "sweep")
    out = tmp_path / "r"
    run_report(capsys, sweep / "E5M2", sweep / "E7M0", "--out", out, "--no-figures")
    verdicts = section((out / "report.md").read_text(), "Verdicts")
    assert verdicts == ["- E5M2: final val_loss 2.1900 (no baseline arm to compare).",
                        "- E7M0: diverged at step 70; first sign: dy underflow 0.62 in h/1/mlp/c_proj at step 20, "
                        "50 steps before."]


def test_runs_cut_short_or_without_metrics_are_named(tmp_path, capsys):
    sweep = write_sweep(tmp_path / "sweep")
    write_run(sweep / "E5M2" / "seed1", seed=1, last_step=50, val=dict(zip(EVALS[:3], (5.0, 4.0, 3.0))))
    (sweep / "E4M3" / "seed0").mkdir(parents=True)
    (sweep / "E4M3" / "seed0" / "metrics.jsonl").write_text("")
    run_report(capsys, sweep, "--no-figures")
    text = (sweep / "report" / "report.md").read_text()
    assert "\nUnfinished runs: E5M2 seed 1 (last step 50).\n" in text  # E7M0 stopped on NaN: not listed
    assert f"\nRuns without metrics, left out: {sweep / 'E4M3' / 'seed0'}.\n" in text
    assert "| E5M2 | 0, 1 | 2.1900 (1/2) |" in text and not any("E4M3" in line for line in section(text, "Verdicts"))


@pytest.mark.parametrize("case", ["missing", "empty_dir", "corrupt", "unknown_baseline", "out_is_file", "no_args"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case):
    sweep = write_sweep(tmp_path / "sweep")
    out = tmp_path / "out"
    argv = [str(sweep), "--out", str(out)]
    if case == "missing":
        argv[0] = str(tmp_path / "nope")
    elif case == "empty_dir":
        (tmp_path / "empty").mkdir()
        argv[0] = str(tmp_path / "empty")
    elif case == "corrupt":
        (sweep / "E5M2" / "seed0" / "metrics.jsonl").write_text('{"step": 0}\n{oops\n{"step": 2}\n')
    elif case == "unknown_baseline":
        argv += ["--baseline", "E9M9"]
    elif case == "out_is_file":
        out.write_text("")
    else:
        argv = []
    before = sorted(tmp_path.rglob("*"))
    assert report.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("report: error: "), err
    assert sorted(tmp_path.rglob("*")) == before


def test_a_stalled_update_is_the_first_sign_of_a_lagging_master_weights_arm(tmp_path):
    fp32_val = dict(zip(EVALS, (5.0, 4.0, 3.0, 2.6, 2.4, 2.2)))
    write_run(tmp_path / "FP32" / "seed0", seed=0, val=fp32_val, use_fp8=False, cosine=1.0)
    stalled = tmp_path / "E5M2-master" / "seed0"
    write_run(stalled, seed=0, val=dict(zip(EVALS, (5.0, 4.8, 4.75, 4.73, 4.72, 4.72))))
    records = [line for line in (stalled / "metrics.jsonl").read_text().splitlines()]
    patched = []
    for line in records:  # the pooled update norm ratio: 0.9 until step 11, then 0.04 (stalled)
        record = json.loads(line)
        if record["step"] >= 1:
            record["update/norm_ratio"] = 0.04 if record["step"] >= 12 else 0.9
        patched.append(json.dumps(record))
    (stalled / "metrics.jsonl").write_text("\n".join(patched) + "\n")
    assert report.main([str(tmp_path), "--out", str(tmp_path / "out"), "--no-figures"]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "E5M2-master: lags FP32 by +2.5200" in text
    assert "first sign: applied/intended update norm 0.04 at step 12" in text
