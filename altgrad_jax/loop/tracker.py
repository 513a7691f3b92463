"""Experiment tracking: a local JSON-lines log, Weights & Biases, and the stability alerts.

Every tracker has the same three calls: `log_step(step, metrics)`, `alert(title, text, level)`
and `finish()`. `LocalTracker` always runs; `WandbTracker` adds W&B when it is installed and
wanted, and never stops training when W&B fails. `AlertMonitor` turns each step's metrics into
"continue" / "save_checkpoint" / "stop" and sends its alerts to every tracker, so alerts are
recorded locally whether or not W&B is on.

JSON encoding of non-finite numbers (metrics.jsonl and alerts.jsonl): NaN is written as the
string "NaN", +inf as "Infinity", -inf as "-Infinity"; `read_jsonl` turns them back into floats.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
import sys
import time
import warnings
from abc import ABC, abstractmethod
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Mapping
from urllib.parse import urlsplit

import numpy as np

LEVELS = ("INFO", "WARN", "ERROR")
CONTINUE, SAVE_CHECKPOINT, STOP = "continue", "save_checkpoint", "stop"
METRICS_FILE, ALERTS_FILE = "metrics.jsonl", "alerts.jsonl"
WANDB_INIT_TIMEOUT_S = 60.0
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class Tracker(ABC):
    """What the training loop talks to. `step` on `alert` is optional context for the record."""

    @abstractmethod
    def log_step(self, step: int, metrics: Mapping[str, float]) -> None: ...

    @abstractmethod
    def alert(
        self, title: str, text: str, level: str = "INFO", *, step: int | None = None
    ) -> None: ...

    @abstractmethod
    def finish(self, exit_code: int | None = None) -> None: ...


# --- JSON lines ------------------------------------------------------------------------------


def to_scalar(name: str, value) -> int | float:
    """A Python int/float from a Python, NumPy or JAX scalar (raises ValueError for arrays)."""
    array = np.asarray(value)
    if array.size != 1 or array.dtype.kind not in "biuf":
        raise ValueError(f"metric {name!r} is not a numeric scalar (shape {array.shape}, "
                         f"dtype {array.dtype})")
    return int(array.item()) if array.dtype.kind in "biu" else float(array.item())


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _decode(value):
    return _NONFINITE.get(value, value) if isinstance(value, str) else value


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Entries of a metrics/alerts file, non-finite numbers decoded. A torn last line (a write cut
    short by a kill) is skipped; any other unparsable line raises ValueError naming it."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}: line {number} is not valid JSON") from None
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: line {number} is not a JSON object")
        entries.append({key: _decode(value) for key, value in entry.items()})
    return entries


def _truncate_jsonl(path: Path, keep_through_step: int) -> None:
    """Atomically drop entries whose "step" is > keep_through_step (and torn lines)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = entry.get("step") if isinstance(entry, dict) else None
        if step is None or step <= keep_through_step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


# --- local -----------------------------------------------------------------------------------


class LocalTracker(Tracker):
    """`<out_dir>/metrics.jsonl` (one object per logged step: "step" and every scalar) and
    `<out_dir>/alerts.jsonl`.

    `resume_step=S` keeps the entries with step <= S and appends after them, so no step appears
    twice; `resume_step=None` is a fresh start: entries left by an earlier run in the same
    directory are dropped. Both rewrites are atomic (temporary file, then rename).
    """

    def __init__(self, out_dir: str | os.PathLike, resume_step: int | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out_dir / METRICS_FILE
        self.alerts_path = self.out_dir / ALERTS_FILE
        keep = -1 if resume_step is None else int(resume_step)
        for path in (self.metrics_path, self.alerts_path):
            _truncate_jsonl(path, keep)
        self._metrics = open(self.metrics_path, "a", encoding="utf-8")
        self._alerts = open(self.alerts_path, "a", encoding="utf-8")

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        entry = {"step": int(step)}
        entry.update({name: to_scalar(name, value) for name, value in metrics.items()})
        self._write(self._metrics, entry)

    def alert(self, title: str, text: str, level: str = "INFO", *, step: int | None = None) -> None:
        _check_level(level)
        entry = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "step": step, "level": level, "title": title, "text": text}
        self._write(self._alerts, entry)

    def finish(self, exit_code: int | None = None) -> None:
        self._metrics.close()
        self._alerts.close()

    @staticmethod
    def _write(file, entry: dict) -> None:
        line = json.dumps({k: _json_safe(v) for k, v in entry.items()}, allow_nan=False)
        file.write(line + "\n")
        file.flush()  # one whole line per write, so a kill leaves at most a torn last line


# --- Weights & Biases --------------------------------------------------------------------------


def has_wandb_credentials(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether wandb 0.31 would find credentials without prompting: WANDB_API_KEY,
    WANDB_IDENTITY_TOKEN_FILE, or a netrc entry (file $NETRC, else ~/.netrc or ~/_netrc) for the
    host of WANDB_BASE_URL (default api.wandb.ai)."""
    if environ.get("WANDB_API_KEY") or environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    import netrc

    host = urlsplit(environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    candidates = [environ["NETRC"]] if environ.get("NETRC") else ["~/.netrc", "~/_netrc"]
    for candidate in candidates:
        path = Path(candidate).expanduser()
        if path.is_file():
            try:
                entry = netrc.netrc(path).authenticators(host)
            except (netrc.NetrcParseError, OSError):
                return False
            return bool(entry and entry[2])
    return False


def resolve_wandb_mode(config, environ: Mapping[str, str] = os.environ) -> str:
    """"disabled" if `config.project` is empty or WANDB_MODE=disabled (a kill switch that wins
    over the config); else `config.wandb_mode` if set; else WANDB_MODE=online/offline if set;
    else "online" with credentials, "offline" without."""
    env_mode = (environ.get("WANDB_MODE") or "").strip().lower()
    if env_mode == "dryrun":
        env_mode = "offline"
    if not config.project or env_mode == "disabled":
        return "disabled"
    if config.wandb_mode:
        return config.wandb_mode  # validated by TrainConfig
    if env_mode in ("online", "offline"):
        return env_mode
    return "online" if has_wandb_credentials(environ) else "offline"


def new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


class WandbTracker(Tracker):
    """W&B run that resumes (`resume="allow"`) the run `run_id` (a new id when None), writing
    under `out_dir` (default `config.out_dir`); `self.run_id` is what to store in checkpoints.

    The mode is decided before `wandb.init` (see `resolve_wandb_mode`). Missing wandb, a failed
    init, or a failing log/alert prints one warning and turns this tracker into a no-op; the
    local tracker is unaffected. Steps are logged with an explicit `step=`, and a step <= the
    last one W&B already holds (e.g. after a resume) is skipped instead of re-logged. Console
    capture is off so W&B does not interleave with the progress bar.
    """

    def __init__(self, config, run_id: str | None = None, out_dir: str | os.PathLike | None = None,
                 logged_through: int | None = None):
        """`logged_through`: the last step an earlier process of this run already sent (its local
        metrics file says which); offline runs cannot ask W&B, so those steps are not sent again."""
        self.config = config
        self.run_id = run_id or new_run_id()
        self.out_dir = Path(out_dir if out_dir is not None else config.out_dir)
        self.mode = resolve_wandb_mode(config)
        self.run = None
        self.sync_dir: Path | None = None  # the run's local directory (what `wandb sync` takes)
        self._wandb = None
        self._last_step: int | None = logged_through
        self._warned = False
        if self.mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            self._disable("wandb is not installed")
            return
        self._wandb = wandb
        self._init()

    @property
    def enabled(self) -> bool:
        return self.run is not None

    def _init(self) -> None:
        wandb, config = self._wandb, self.config
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                project=config.project,
                name=config.run_name,
                tags=list(config.tags or ()),
                config=config.to_dict() if hasattr(config, "to_dict") else None,
                id=self.run_id,
                resume="allow",
                dir=str(self.out_dir),
                mode=self.mode,
                settings=wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S, console="off", quiet=True),
            )
        except Exception as e:  # W&B must never stop training: any init failure disables it
            self._disable(f"wandb.init failed ({type(e).__name__}: {_one_line(e)})")
            return
        self.sync_dir = Path(self.run.settings.sync_dir)
        if self.mode == "online" and self.run.resumed:
            next_step = self._guarded(lambda: self.run.step, "run.step")
            if next_step is not _FAILED:
                self._last_step = max(int(next_step) - 1, self._last_step or -1)
        if self.mode == "offline":
            print(f"W&B is offline; upload this run later with: wandb sync {self.sync_dir}")

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        if self.run is None:
            return
        step = int(step)
        if self._last_step is not None and step <= self._last_step:
            return
        values = {name: to_scalar(name, value) for name, value in metrics.items()}
        if self._guarded(lambda: self.run.log(values, step=step), "run.log") is not _FAILED:
            self._last_step = step

    def alert(self, title: str, text: str, level: str = "INFO", *, step: int | None = None) -> None:
        _check_level(level)
        if self.run is None:
            return
        wait = float(self.config.alert_wait_seconds)
        self._guarded(
            lambda: self.run.alert(title=title, text=text,
                                   level=self._wandb.AlertLevel(level), wait_duration=wait),
            "run.alert",
        )

    def finish(self, exit_code: int | None = None) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        try:
            run.finish(exit_code=exit_code)
        except Exception as e:
            self._warn(f"W&B run.finish failed ({type(e).__name__}: {_one_line(e)})")

    def _guarded(self, call: Callable, what: str = "W&B"):
        try:
            return call()
        except Exception as e:
            self._disable(f"{what} failed ({type(e).__name__}: {_one_line(e)})")
            return _FAILED

    def _disable(self, reason: str) -> None:
        self._warn(f"{reason}; W&B tracking is off for this run, the local log goes on")
        run, self.run = self.run, None
        self.mode = "disabled"
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:
                pass

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(message, RuntimeWarning, stacklevel=3)


_FAILED = object()


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:200]


def _check_level(level: str) -> None:
    if level not in LEVELS:
        raise ValueError(f"alert level must be one of {LEVELS}, got {level!r}")


# --- alerts ----------------------------------------------------------------------------------


class AlertMonitor:
    """Watches each step's metrics (`loss`, `update/norm_ratio`, `overflow_rate`).

    `check` returns "save_checkpoint" on the first of a run of consecutive non-finite losses
    (with a WARN alert), "stop" once `config.nan_patience` consecutive losses are non-finite
    (with an ERROR alert; when that is the first bad step too, i.e. nan_patience == 1, the caller
    should still save the anomaly checkpoint before stopping), "continue" otherwise.
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

    def check(self, step: int, metrics: Mapping[str, float]) -> str:
        action = CONTINUE
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

    def _nonfinite_action(self, step: int, loss: float) -> str:
        patience = self.config.nan_patience
        if self.consecutive_nonfinite >= patience:
            self._send("Training stopped: non-finite loss",
                       f"step {step}: loss {loss} or its gradient not finite for {self.consecutive_nonfinite} consecutive "
                       f"steps (nan_patience {patience})", "ERROR", step, rate_limited=False)
            return STOP
        if self.consecutive_nonfinite == 1:
            self._send("Non-finite loss",
                       f"step {step}: loss {loss} or its gradient not finite; saving an anomaly checkpoint, stopping "
                       f"after {patience} consecutive non-finite steps", "WARN", step)
            return SAVE_CHECKPOINT
        return CONTINUE

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
                 monitor: AlertMonitor | None = None) -> str:
    """`monitor.check(step, metrics)`. Without a monitor, one process-wide monitor with no
    tracker but `StderrTracker` (alerts printed to stderr) keeps the NaN count and rate limits; it is replaced
    when called with a different config object. Training loops should pass their own monitor."""
    global _default_monitor
    if monitor is None:
        if _default_monitor is None or _default_monitor.config is not config:
            _default_monitor = AlertMonitor(config, [StderrTracker()])
        monitor = _default_monitor
    return monitor.check(step, metrics)
