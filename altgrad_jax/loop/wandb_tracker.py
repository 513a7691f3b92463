"""Weights & Biases as a tracker: the mode decided before `wandb.init`, and never a reason to stop.

Missing wandb, a failed init or a failing call prints one warning and turns the tracker into a
no-op; the local log goes on.
"""

from __future__ import annotations

import os
import secrets
import string
import warnings
from pathlib import Path
from typing import Callable, Mapping
from urllib.parse import urlsplit

from altgrad_jax.loop.tracker import Tracker, check_level, to_scalar

WANDB_INIT_TIMEOUT_S = 60.0


def has_wandb_credentials(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether wandb would find credentials without prompting: WANDB_API_KEY,
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
        check_level(level)
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
