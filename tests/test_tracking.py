import json
import math
import struct
import time
import warnings

import numpy as np
import pytest

from altgrad_jax.config import TrainConfig as Config
from altgrad_jax.loop.alerts import Action, AlertMonitor, check_alerts
from altgrad_jax.loop.local_tracker import LocalTracker, read_jsonl
from altgrad_jax.loop.wandb_tracker import WandbTracker, has_wandb_credentials, resolve_wandb_mode


def test_train_config_works_with_the_real_wandb_offline(tmp_path, clean_wandb_env):
    config = Config(out_dir=str(tmp_path), tags=("a", "b"))
    tracker = WandbTracker(config)
    assert tracker.mode == "offline" and tracker.enabled
    tracker.log_step(1, {"loss": 1.0})
    tracker.finish()
    assert tracker.sync_dir.parent == tmp_path / "wandb"


class RecordingTracker:
    def __init__(self):
        self.alerts = []

    def alert(self, title, text, level="INFO", *, step=None):
        self.alerts.append((step, level, title))


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


# --- LocalTracker ------------------------------------------------------------------------------


def test_local_tracker_writes_one_json_object_per_step(tmp_path):
    tracker = LocalTracker(tmp_path / "run")
    tracker.log_step(0, {"loss": np.float32(2.5), "grad_norm_l2/h/0/mlp": np.array(0.25),
                         "param_nan_count": np.int32(0)})
    tracker.log_step(1, {"loss": float("nan"), "overflow_rate": float("inf"),
                         "underflow_rate": -math.inf})
    tracker.alert("Non-finite loss", "step 1: nan", "WARN", step=1)
    tracker.finish()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 0, "loss": 2.5, "grad_norm_l2/h/0/mlp": 0.25, "param_nan_count": 0},
        {"step": 1, "loss": "NaN", "overflow_rate": "Infinity", "underflow_rate": "-Infinity"},
    ]
    decoded = read_jsonl(tmp_path / "run" / "metrics.jsonl")[1]
    assert math.isnan(decoded["loss"]) and decoded["overflow_rate"] == math.inf
    assert decoded["underflow_rate"] == -math.inf
    (alert,) = read_jsonl(tmp_path / "run" / "alerts.jsonl")
    assert (alert["step"], alert["level"], alert["title"]) == (1, "WARN", "Non-finite loss")


def test_local_tracker_rejects_non_scalars_and_bad_levels(tmp_path):
    tracker = LocalTracker(tmp_path)
    with pytest.raises(ValueError, match="'weights' is not a numeric scalar"):
        tracker.log_step(0, {"weights": np.zeros(3)})
    with pytest.raises(ValueError, match="level"):
        tracker.alert("t", "x", "DEBUG")
    tracker.finish()


def test_local_tracker_resume_truncates_later_steps(tmp_path):
    tracker = LocalTracker(tmp_path)
    for step in range(6):
        tracker.log_step(step, {"loss": 10.0 - step})
        tracker.alert("High bit-stall rate", f"step {step}", "WARN", step=step)
    tracker.finish()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss"')  # torn line from a kill mid-write
    resumed = LocalTracker(tmp_path, resume_step=3)
    for step in range(4, 8):
        resumed.log_step(step, {"loss": float(step)})
    resumed.finish()
    entries = read_jsonl(tmp_path / "metrics.jsonl")
    assert [e["step"] for e in entries] == list(range(8))
    assert [e["loss"] for e in entries] == [10.0, 9.0, 8.0, 7.0, 4.0, 5.0, 6.0, 7.0]
    assert [a["step"] for a in read_jsonl(tmp_path / "alerts.jsonl")] == [0, 1, 2, 3]
    assert not list(tmp_path.glob("*.tmp"))
    # a fresh start (no resume step) drops what an earlier run left
    LocalTracker(tmp_path).finish()
    assert read_jsonl(tmp_path / "metrics.jsonl") == []


def test_read_jsonl_rejects_a_corrupt_middle_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\nnot json\n{"step": 1}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(path)


# --- AlertMonitor ------------------------------------------------------------------------------


def test_nan_loss_saves_on_the_first_and_stops_after_patience(tmp_path):
    local, recorder = LocalTracker(tmp_path), RecordingTracker()
    monitor = AlertMonitor(Config(nan_patience=3), [local, recorder], clock=FakeClock())
    losses = [2.0, math.nan, math.inf, 1.5, math.nan, -math.inf, math.nan, 1.0]
    actions = [monitor.check(step, {"loss": np.float32(loss)}) for step, loss in enumerate(losses)]
    assert actions == [Action.CONTINUE, Action.SAVE_CHECKPOINT, Action.CONTINUE, Action.CONTINUE,
                       Action.SAVE_CHECKPOINT, Action.CONTINUE, Action.STOP, Action.CONTINUE]
    assert [(s, lvl) for s, lvl, _ in recorder.alerts] == [(1, "WARN"), (6, "ERROR")]
    local.finish()
    recorded = read_jsonl(tmp_path / "alerts.jsonl")
    assert [(a["step"], a["level"], a["title"]) for a in recorded] == recorder.alerts


def test_nan_patience_one_stops_at_once():
    monitor = AlertMonitor(Config(nan_patience=1), clock=FakeClock())
    assert monitor.check(0, {"loss": math.nan}) == Action.STOP


def test_warn_alerts_are_rate_limited_per_title():
    clock, recorder = FakeClock(), RecordingTracker()
    monitor = AlertMonitor(Config(alert_wait_seconds=300.0), [recorder], clock=clock)
    high_both = {"loss": 1.0, "update/norm_ratio": 0.4, "overflow_rate": 0.5}
    assert monitor.check(0, high_both) == Action.CONTINUE
    clock.now += 100
    monitor.check(1, high_both)
    monitor.check(2, {"loss": 1.0, "update/norm_ratio": 0.5, "overflow_rate": 0.01})  # not beyond
    clock.now += 200  # 300 s after the first alerts
    monitor.check(3, {"update/norm_ratio": 0.4})
    clock.now += 299
    monitor.check(4, high_both)
    assert recorder.alerts == [
        (0, "WARN", "High FP8 overflow rate"),
        (0, "WARN", "Stored weights lose updates"),
        (3, "WARN", "Stored weights lose updates"),
        (4, "WARN", "High FP8 overflow rate"),
    ]


def test_bit_stall_never_alerts_without_narrow_master_weights():
    recorder = RecordingTracker()
    monitor = AlertMonitor(Config(alert_wait_seconds=0.0), [recorder], clock=FakeClock())
    for step in range(3):  # float32 master weights: a high stall of the FP8 copy is no lost update
        monitor.check(step, {"loss": 1.0, "bit_stall_rate": 0.99, "zero_update_frac": 0.9})
    assert recorder.alerts == []


def test_error_alert_is_never_rate_limited():
    recorder = RecordingTracker()
    monitor = AlertMonitor(Config(nan_patience=1), [recorder], clock=FakeClock())
    assert [monitor.check(s, {"loss": math.nan}) for s in range(3)] == [Action.STOP] * 3
    assert [lvl for _, lvl, _ in recorder.alerts] == ["ERROR"] * 3


def test_check_alerts_keeps_state_per_config(capsys):
    config = Config(nan_patience=2)
    assert check_alerts(0, {"loss": math.nan}, config) == Action.SAVE_CHECKPOINT
    assert check_alerts(1, {"loss": math.nan}, config) == Action.STOP
    assert "[ERROR]" in capsys.readouterr().err
    # a new config object starts a new default monitor
    assert check_alerts(0, {"loss": math.nan}, Config(nan_patience=2)) == Action.SAVE_CHECKPOINT
    own = AlertMonitor(config, clock=FakeClock())
    assert check_alerts(5, {"loss": math.nan}, config, monitor=own) == Action.SAVE_CHECKPOINT


# --- W&B mode --------------------------------------------------------------------------------


@pytest.fixture
def clean_wandb_env(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL",
                 "WANDB_DISABLED", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    return monkeypatch


def test_wandb_mode_resolution(tmp_path, clean_wandb_env):
    env = clean_wandb_env
    assert resolve_wandb_mode(Config()) == "offline"
    assert resolve_wandb_mode(Config(project="")) == "disabled"
    assert resolve_wandb_mode(Config(wandb_mode="online")) == "online"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "a" * 40 + "\n")
    env.setenv("NETRC", str(netrc))
    assert has_wandb_credentials() and resolve_wandb_mode(Config()) == "online"
    env.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    assert not has_wandb_credentials()
    env.setenv("NETRC", str(tmp_path / "no-netrc"))
    env.delenv("WANDB_BASE_URL")
    env.setenv("WANDB_API_KEY", "b" * 40)
    assert resolve_wandb_mode(Config()) == "online"
    env.setenv("WANDB_MODE", "disabled")  # the environment kill switch beats the config
    assert resolve_wandb_mode(Config(wandb_mode="online")) == "disabled"
    env.setenv("WANDB_MODE", "offline")
    assert resolve_wandb_mode(Config()) == "offline"


# --- W&B for real, offline -------------------------------------------------------------------


def read_finished_wandb_run(path, timeout_s=30.0):
    """The records of a finished run's .wandb file. wandb 0.31's `run.finish()` can return before
    its service has flushed the file (measured: header only right after finish, complete 0.1 s
    later), so wait for the closing "exit" record."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_wandb_records(path)
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        assert time.monotonic() < deadline, f"{path} has no exit record after {timeout_s} s"
        time.sleep(0.05)


def read_wandb_records(path):
    """Records of a .wandb file (a LevelDB-style log of protobuf `Record`s in 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data, block, records, pending, pos = path.read_bytes(), 32768, [], b"", 7
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a header: padding
            pos += block - pos % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if (kind == 0 and length == 0) or pos + 7 + length > len(data):
            break  # zero padding, or a record still being written
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_holds_steps_and_alerts(tmp_path, clean_wandb_env, capsys):
    out = tmp_path / "run"
    tracker = WandbTracker(Config(out_dir=str(out), tags=("test",)), run_id="abc123xy")
    assert tracker.mode == "offline" and tracker.enabled and tracker.run_id == "abc123xy"
    assert f"wandb sync {tracker.sync_dir}" in capsys.readouterr().out
    tracker.log_step(0, {"loss": np.float32(3.0), "grad_cos_sim/mean": 0.99})
    tracker.log_step(1, {"loss": 2.0})
    tracker.log_step(1, {"loss": 9.0})  # a step W&B already holds: skipped
    tracker.log_step(0, {"loss": 9.0})
    tracker.log_step(2, {"loss": float("nan")})
    AlertMonitor(Config(), [tracker]).check(3, {"overflow_rate": 0.5})
    tracker.finish()
    tracker.finish()  # idempotent
    run_dirs = list((out / "wandb").glob("offline-run-*-abc123xy"))
    assert run_dirs == [tracker.sync_dir]
    records = read_finished_wandb_run(run_dirs[0] / "run-abc123xy.wandb")
    history = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            history.append((record.history.step.num, items.get("loss")))
    assert [step for step, _ in history] == [0, 1, 2]
    assert [loss for _, loss in history][:2] == [3.0, 2.0] and math.isnan(history[2][1])
    alerts = [r.alert for r in records if r.WhichOneof("record_type") == "alert"]
    assert [(a.title, a.level, a.wait_duration) for a in alerts] == [
        ("High FP8 overflow rate", "WARN", 300_000)]


def test_wandb_resume_reuses_the_run_id(tmp_path, clean_wandb_env):
    config = Config(out_dir=str(tmp_path))
    first = WandbTracker(config)
    first.log_step(0, {"loss": 1.0})
    first.log_step(1, {"loss": 0.7})
    first.finish()
    # The resumed process restarts from a checkpoint at step 0, but step 1 already went to W&B.
    again = WandbTracker(config, run_id=first.run_id, logged_through=1)
    again.log_step(1, {"loss": 0.7})
    again.log_step(2, {"loss": 0.5})
    again.finish()
    assert again.run_id == first.run_id and again.sync_dir != first.sync_dir
    # offline dirs are named offline-run-<time>-<run id>, with "-1" added when the time clashes
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{first.run_id}*"))
    assert sorted(runs) == sorted([first.sync_dir, again.sync_dir])
    steps = [r.history.step.num for r in read_finished_wandb_run(again.sync_dir / f"run-{first.run_id}.wandb")
             if r.WhichOneof("record_type") == "history"]
    assert steps == [2], "a step the first process sent must not be sent twice"


def test_wandb_disabled_is_a_no_op(tmp_path, clean_wandb_env):
    out = tmp_path / "run"
    tracker = WandbTracker(Config(project="", out_dir=str(out)))
    assert tracker.mode == "disabled" and not tracker.enabled and tracker.run_id
    tracker.log_step(0, {"loss": 1.0})
    tracker.alert("t", "x", "WARN")
    tracker.finish()
    assert not out.exists()
    clean_wandb_env.setenv("WANDB_MODE", "disabled")
    assert WandbTracker(Config(out_dir=str(out))).mode == "disabled"


def test_wandb_failure_warns_once_and_training_goes_on(tmp_path, clean_wandb_env):
    # a real wandb.init failure: "online" forced with no credentials raises UsageError
    local = LocalTracker(tmp_path / "run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = WandbTracker(Config(out_dir=str(tmp_path / "run"), wandb_mode="online"))
        monitor = AlertMonitor(Config(), [tracker, local])
        for step in range(3):
            for t in (tracker, local):
                t.log_step(step, {"loss": 1.0})
            monitor.check(step, {"loss": 1.0, "update/norm_ratio": 0.1})
        tracker.finish()
        local.finish()
    assert tracker.mode == "disabled" and not tracker.enabled
    messages = [str(w.message) for w in caught if "W&B tracking is off" in str(w.message)]
    assert len(messages) == 1 and "wandb.init failed (UsageError" in messages[0]
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 3
    assert len(read_jsonl(tmp_path / "run" / "alerts.jsonl")) == 1


def test_wandb_missing_package_acts_disabled(tmp_path, clean_wandb_env):
    import sys

    clean_wandb_env.setitem(sys.modules, "wandb", None)  # what `import wandb` sees without it
    with pytest.warns(RuntimeWarning, match="wandb is not installed"):
        tracker = WandbTracker(Config(out_dir=str(tmp_path)))
    assert tracker.mode == "disabled"
    tracker.log_step(0, {"loss": 1.0})
    tracker.finish()


def test_dead_layer_alert_after_window_consecutive_fully_dead_steps():
    recorder = RecordingTracker()
    monitor = AlertMonitor(Config(dead_neuron_window=3), [recorder], clock=FakeClock())
    alive, dead = {"dead_neuron_frac/a/kernel": 0.2}, {"dead_neuron_frac/a/kernel": 1.0}
    for step, metrics in enumerate([dead, dead, alive, dead, dead], start=1):
        assert monitor.check(step, metrics | {"dead_neuron_frac/mean": 1.0}) == Action.CONTINUE
    assert recorder.alerts == []  # interrupted at step 3: never 3 in a row
    monitor.check(6, dead)
    assert recorder.alerts == [(6, "WARN", "Dead layer a/kernel")]
