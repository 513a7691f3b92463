"""Stability alerts: each step's metrics turned into an action and alerts sent to every tracker."""

from __future__ import annotations

import enum
import math
import sys
import time
from typing import Callable, Iterable, Mapping

from altgrad_jax.loop.tracker import Tracker, to_scalar


class Action(enum.StrEnum):
    """What `AlertMonitor.check` asks of the loop."""

    CONTINUE = "continue"
    SAVE_CHECKPOINT = "save_checkpoint"  # the first of a run of non-finite steps
    STOP = "stop"  # nan_patience non-finite steps in a row


class AlertMonitor:
    """Watches each step's metrics (`loss`, `update/norm_ratio`, `overflow_rate`).

    `check` returns `Action.SAVE_CHECKPOINT` on the first of a run of consecutive non-finite losses
    (with a WARN alert), `Action.STOP` once `config.nan_patience` consecutive losses are non-finite
    (with an ERROR alert; when that is the first bad step too, i.e. nan_patience == 1, the caller
    should still save the anomaly checkpoint before stopping), `Action.CONTINUE` otherwise.
    `overflow_rate > overflow_threshold`, and `update/norm_ratio < 1 - bit_stall_threshold` (the
    stored weights applied too little of the intended update; the metric exists only with narrow
    master_weights, since float32 master weights lose nothing worth an alert) send WARN
    alerts, each title at most once per `config.alert_wait_seconds` of `clock` (the ERROR alert
    is never held back). A layer whose whole gradient is dead (`dead_neuron_frac/<layer>` == 1,
    every element below `dead_neuron_threshold`) for `dead_neuron_window` consecutive checked
    steps sends a WARN alert too. Alerts go to every tracker.
    """

    def __init__(self, config, trackers: Iterable[Tracker] = (), *,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.trackers = list(trackers)
        self.clock = clock
        self.consecutive_nonfinite = 0
        self.consecutive_dead: dict[str, int] = {}
        self._last_sent: dict[str, float] = {}

    def check(self, step: int, metrics: Mapping[str, float]) -> Action:
        action = Action.CONTINUE
        if "loss" in metrics:
            loss = float(to_scalar("loss", metrics["loss"]))
            skipped = float(to_scalar("update_skipped", metrics.get("update_skipped", 0.0))) > 0
            if math.isfinite(loss) and not skipped:
                self.consecutive_nonfinite = 0
            else:
                self.consecutive_nonfinite += 1
                action = self._nonfinite_action(step, loss)
        if "overflow_rate" in metrics:
            value, threshold = float(to_scalar("overflow_rate", metrics["overflow_rate"])), self.config.overflow_threshold
            if value > threshold:
                self._send("High FP8 overflow rate", f"step {step}: overflow_rate {value:.4g} > overflow_threshold "
                                                     f"{threshold:g}", "WARN", step)
        if "update/norm_ratio" in metrics:  # only narrow master_weights can lose updates
            value = float(to_scalar("update/norm_ratio", metrics["update/norm_ratio"]))
            floor = 1.0 - self.config.bit_stall_threshold
            if value < floor:
                self._send("Stored weights lose updates",
                           f"step {step}: update/norm_ratio {value:.4g} < 1 - bit_stall_threshold = {floor:g}",
                           "WARN", step)
        self._check_dead_layers(step, metrics)
        return action

    def _check_dead_layers(self, step: int, metrics: Mapping[str, float]) -> None:
        prefix = "dead_neuron_frac/"
        for name, value in metrics.items():
            if not name.startswith(prefix) or name == prefix + "mean":
                continue
            dead = float(to_scalar(name, value)) >= 1.0
            self.consecutive_dead[name] = self.consecutive_dead.get(name, 0) + 1 if dead else 0
            if self.consecutive_dead[name] == self.config.dead_neuron_window:
                layer = name[len(prefix):]
                self._send(f"Dead layer {layer}", f"step {step}: every gradient element of {layer} has been "
                           f"below {self.config.dead_neuron_threshold:g} for "
                           f"{self.config.dead_neuron_window} steps", "WARN", step)

    def _nonfinite_action(self, step: int, loss: float) -> Action:
        patience = self.config.nan_patience
        if self.consecutive_nonfinite >= patience:
            self._send("Training stopped: non-finite loss",
                       f"step {step}: loss {loss} or its gradient not finite for {self.consecutive_nonfinite} consecutive "
                       f"steps (nan_patience {patience})", "ERROR", step, rate_limited=False)
            return Action.STOP
        if self.consecutive_nonfinite == 1:
            self._send("Non-finite loss",
                       f"step {step}: loss {loss} or its gradient not finite; saving an anomaly checkpoint, stopping "
                       f"after {patience} consecutive non-finite steps", "WARN", step)
            return Action.SAVE_CHECKPOINT
        return Action.CONTINUE

    def _send(self, title: str, text: str, level: str, step: int, *, rate_limited: bool = True):
        now = self.clock()
        last = self._last_sent.get(title)
        if rate_limited and last is not None and now - last < self.config.alert_wait_seconds:
            return
        self._last_sent[title] = now
        for tracker in self.trackers:
            tracker.alert(title, text, level, step=step)


class StderrTracker(Tracker):
    """Alerts as lines on stderr; the reporter of `check_alerts`' own monitor."""

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def alert(self, title: str, text: str, level: str = "INFO", *, step: int | None = None) -> None:
        print(f"[{level}] {title}: {text}", file=sys.stderr)

    def finish(self, exit_code: int | None = None) -> None:
        pass


_default_monitor: AlertMonitor | None = None


def check_alerts(step: int, metrics: Mapping[str, float], config,
                 monitor: AlertMonitor | None = None) -> Action:
    """`monitor.check(step, metrics)`. Without a monitor, one process-wide monitor with no
    tracker but `StderrTracker` (alerts printed to stderr) keeps the NaN count and rate limits; it is replaced
    when called with a different config object. Training loops should pass their own monitor."""
    global _default_monitor
    if monitor is None:
        if _default_monitor is None or _default_monitor.config is not config:
            _default_monitor = AlertMonitor(config, [StderrTracker()])
        monitor = _default_monitor
    return monitor.check(step, metrics)
