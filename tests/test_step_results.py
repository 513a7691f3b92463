"""StepResults, the host side of each step, without a model: what is logged when, the what-if
filter, the NaN stop and the anomaly save on the first of a run of skipped steps."""

import math

import numpy as np

from altgrad_jax.config import TrainConfig
from altgrad_jax.loop.progress import Progress
from altgrad_jax.loop.trainer import EXIT_NAN_STOP, EXIT_OK, StepResults


class Recorder:
    def __init__(self):
        self.logged, self.alerts = {}, []

    def log_step(self, step, metrics):
        self.logged[step] = dict(metrics)

    def alert(self, title, text, level="INFO", *, step=None):
        self.alerts.append((step, level))

    def finish(self, exit_code=None):
        pass


class AnomalySaves:
    def __init__(self):
        self.steps = []

    def save_on_anomaly(self, step, state, *, metadata=None):
        self.steps.append((step, state))


def results_for(**fields):
    config = TrainConfig(project="", warmup_steps=0, **fields)
    recorder, saves = Recorder(), AnomalySaves()
    results = StepResults(config, [recorder], Progress(config, 0, 1, enabled=False), saves, {})
    return results, recorder, saves


def metrics(loss=1.0, skipped=0.0, **extra):
    return {"loss": np.float32(loss), "update_skipped": np.float32(skipped),
            **{name: np.float32(value) for name, value in extra.items()}}


def test_steps_are_published_one_late_on_log_interval_with_val_loss_or_at_the_end():
    results, recorder, _ = results_for(log_interval=3, max_steps=7)
    for step in range(1, 8):
        results.dispatched(step, metrics())
        assert set(recorder.logged) <= set(range(1, step))  # never the step just dispatched
        if step == 5:
            results.add_val_loss(2.5)
    assert 7 not in recorder.logged
    assert results.publish() is None  # step 7, the last one, which has no val_loss
    assert sorted(recorder.logged) == [3, 5, 6, 7]
    assert recorder.logged[5]["val_loss"] == 2.5 and "val_loss" not in recorder.logged[6]


def test_publish_returns_the_val_loss_of_the_step_it_publishes():
    results, recorder, _ = results_for(max_steps=10)
    results.dispatched(1, metrics())
    results.add_val_loss(3.0)
    assert results.publish() == 3.0 and recorder.logged[1]["val_loss"] == 3.0
    assert results.publish() is None  # nothing left


def test_whatif_metrics_are_dropped_between_whatif_steps():
    results, recorder, _ = results_for(whatif_interval=2, max_steps=10)
    for step in (1, 2, 3):
        results.dispatched(step, metrics(**{"whatif/E4M3/x/underflow/lm_head": 0.25}))
    results.publish()
    assert "whatif/E4M3/x/underflow/lm_head" not in recorder.logged[1]
    assert recorder.logged[2]["whatif/E4M3/x/underflow/lm_head"] == 0.25
    assert "whatif/E4M3/x/underflow/lm_head" not in recorder.logged[3]


def test_nan_patience_sets_the_exit_code_and_nothing_is_published_after():
    results, recorder, _ = results_for(nan_patience=2, max_steps=10)
    for step, loss in enumerate([1.0, math.nan, math.nan, 1.0], start=1):
        results.dispatched(step, metrics(loss, skipped=float(not math.isfinite(loss))))
    assert results.exit_code == EXIT_NAN_STOP and sorted(recorder.logged) == [1, 2, 3]
    assert [level for _, level in recorder.alerts] == ["WARN", "ERROR"]
    results.publish()
    assert 4 not in recorder.logged


def test_the_first_of_a_run_of_skipped_steps_is_saved_with_the_state_before_the_next_step():
    results, _, saves = results_for(max_steps=10)
    for step, skipped in enumerate([0, 1, 1, 0, 1], start=1):
        results.save_if_first_nonfinite(f"state after {step - 1}")
        results.dispatched(step, metrics(skipped=skipped))
    results.save_if_first_nonfinite("state after 5")
    results.save_if_first_nonfinite("state after 5")  # read once: no second save
    assert saves.steps == [(2, "state after 2"), (5, "state after 5")]
    assert results.exit_code == EXIT_OK
