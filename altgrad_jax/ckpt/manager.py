"""Checkpoints over Orbax: the last N saves plus the best one, anomaly saves, exact restore.

Layout of a checkpoint directory::

    <directory>/<step>/state      the state pytree: state.safetensors (see safetensors_handler.py)
    <directory>/<step>/metadata   JSON: the caller's metadata, versions, leaf signatures (metadata.py)
    <directory>/<step>/metrics    JSON {"val_loss": float | null}, read by the retention policy
    <directory>/anomaly/<step>/   the same, written by `save_on_anomaly`, never rotated

`save_checkpoint(path, state)` writes one such step directory at `path`; `load_checkpoint` reads it.

Retention is Orbax's own: `AnyPreservationPolicy([LatestN(n), BestN(n=1)])`. BestN sorts with
`reverse=True` so that its kept tail is the *lowest* loss; a missing or non-finite val_loss is
stored as null and ranked as +inf, so it can never be the best. Among equal losses the newest wins.

Saves are asynchronous, one at a time. An error in a background write is raised as
`CheckpointError` by the next call that reads or writes checkpoints, never swallowed. A process
killed during a save leaves `<step>.orbax-checkpoint-tmp*`, never listed and removed when a
manager next opens the directory. The training loop runs inside the manager's `with` block, so a
stop (signal or NaN) waits for the save in flight; a second signal during that wait abandons it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import math
import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies

from altgrad_jax.ckpt.background import BackgroundWorker
from altgrad_jax.ckpt.errors import CheckpointCorruptError, CheckpointError, first_line
from altgrad_jax.ckpt.metadata import build_metadata, check_target, finite_or_none, warn_on_version_change
from altgrad_jax.ckpt.safetensors_handler import SafetensorsRestore, SafetensorsSave, snapshot
from altgrad_jax.ckpt.step_dirs import unreadable_step_dirs

STATE_ITEM = "state"
METADATA_ITEM = "metadata"
ANOMALY_SUBDIR = "anomaly"


def _save_args(state, step: int, metadata: dict | None, val_loss=None) -> ocp.args.Composite:
    """The items of one step directory; the state as host views taken now (before any donation)."""
    try:
        taken = snapshot(state)
    except ValueError as error:
        raise CheckpointError(f"cannot save step {step}: {error}") from None
    return ocp.args.Composite(**{
        STATE_ITEM: SafetensorsSave(taken),
        METADATA_ITEM: ocp.args.JsonSave(build_metadata(state, step, metadata, val_loss)),
    })


def _read_metadata(restore, where: str) -> dict:
    """The metadata item through `restore(composite_args)`; `where` names the step in errors."""
    try:
        saved = dict(restore(ocp.args.Composite(**{METADATA_ITEM: ocp.args.JsonRestore()}))[METADATA_ITEM])
    except Exception as error:
        raise CheckpointCorruptError(f"{where} has unreadable metadata: {first_line(error)}") from error
    if "state_leaves" not in saved or "prng_keys" not in saved:
        raise CheckpointCorruptError(f"{where} has metadata without 'state_leaves'/'prng_keys'")
    return saved


def _read_state(restore, saved: dict, target, where: str):
    """Check `target` against `saved`, then the state item through `restore(composite_args)`."""
    if target is not None:
        check_target(saved, target, where)
    warn_on_version_change(saved, where)
    try:
        return restore(ocp.args.Composite(**{STATE_ITEM: SafetensorsRestore(target)}))[STATE_ITEM]
    except Exception as error:  # Orbax and safetensors raise many types for damaged files.
        raise CheckpointCorruptError(f"{where} is unreadable: {first_line(error)}") from error


def _metric_for_ranking(metrics) -> float:
    value = None if metrics is None else metrics.get("val_loss")
    return math.inf if value is None else float(value)


@dataclasses.dataclass
class _PendingSave:
    manager: ocp.CheckpointManager  # the run's or the anomaly one
    step: int
    started: concurrent.futures.Future  # done once Orbax's save call has returned (or failed)


def _run_here(job) -> concurrent.futures.Future:
    """`job()` on this thread, its outcome in a future (the multi-process counterpart of the worker)."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    try:
        future.set_result(job())
    except Exception as error:
        future.set_exception(error)
    return future


class CheckpointManager:
    """Asynchronous checkpoints of a state pytree: the last `max_checkpoints` plus the best.

    `save(step, state, val_loss=...)` returns once it holds a host view of every array; the write
    goes on in the background. Queries (`all_steps`, `latest_step`, ...) wait for the save in
    flight. Use as a context manager, or call `close()`.

    One process: the whole Orbax save and its commit run on a background thread, so the loop
    waits for nothing but the host views. Several processes: Orbax's own asynchronous save is
    called from this thread, since its barriers are collectives that must come in the same order
    as the training step's.
    """

    def __init__(self, directory, max_checkpoints: int = 3):
        if not isinstance(max_checkpoints, int) or max_checkpoints < 1:
            raise CheckpointError(f"max_checkpoints must be a positive integer, got {max_checkpoints!r}")
        self.directory = Path(directory).expanduser().resolve()
        self.max_checkpoints = max_checkpoints
        preservation = ocp_policies.AnyPreservationPolicy([
            ocp_policies.LatestN(n=max_checkpoints),
            ocp_policies.BestN(
                get_metric_fn=_metric_for_ranking,
                reverse=True,  # sorted descending, BestN keeps the tail: the lowest loss
                n=1,
                keep_checkpoints_without_metrics=False,
            ),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation,
            best_fn=_metric_for_ranking,  # Orbax writes the metrics item only when best_fn is set
            best_mode="min",
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = self._open(self.directory, options)
        self._anomaly_manager = None
        self._worker = BackgroundWorker("altgrad_jax checkpoint") if jax.process_count() == 1 else None
        self._pending: _PendingSave | None = None
        self._closed = False  # by close(), or by an interrupted wait that abandoned the save in flight
        self._val_losses = {step: self._saved_val_loss(step) for step in self._manager.all_steps()}

    @staticmethod
    def _open(directory: Path, options) -> ocp.CheckpointManager:
        if directory.exists() and not directory.is_dir():
            raise CheckpointError(f"checkpoint directory {directory} exists and is not a directory")
        try:
            return ocp.CheckpointManager(directory, options=options)
        except Exception as error:
            unreadable = unreadable_step_dirs(directory)
            if unreadable:
                raise CheckpointCorruptError(
                    f"checkpoint step {unreadable[0].name} at {unreadable[0]} is unreadable: {first_line(error)}"
                ) from error
            raise CheckpointError(f"cannot open checkpoint directory {directory}: {first_line(error)}") from error

    def _saved_val_loss(self, step: int) -> float | None:
        try:
            metrics = self._manager.metrics(step)
        except Exception:  # a damaged metrics file: the step simply never counts as best
            return None
        return finite_or_none(None if metrics is None else metrics.get("val_loss"))

    # ---- queries -------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        self.wait_until_finished()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        self.wait_until_finished()
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """Step of the lowest finite val_loss among the kept steps (newest on ties), or None."""
        best = None
        for step in self.all_steps():
            loss = self._val_losses.get(step)
            if loss is not None and (best is None or loss <= self._val_losses[best]):
                best = step
        return best

    def anomaly_steps(self) -> list[int]:
        self.wait_until_finished()
        if self._anomaly_manager is None and not (self.directory / ANOMALY_SUBDIR).is_dir():
            return []
        return sorted(self._anomaly().all_steps())

    def step_path(self, step: int, *, anomaly: bool = False) -> Path:
        return (self.directory / ANOMALY_SUBDIR if anomaly else self.directory) / str(step)

    # ---- saving --------------------------------------------------------------------------

    def save(self, step: int, state, *, val_loss=None, metadata: dict | None = None) -> None:
        """Start an asynchronous save of `state` at `step` (which must be after the latest)."""
        step = int(step)
        latest = self.latest_step()  # waits for the save in flight and raises its error
        if latest is not None and step <= latest:
            raise CheckpointError(
                f"cannot save step {step} in {self.directory}: it is not after the latest saved step {latest}"
            )
        loss = finite_or_none(val_loss)
        self._start(self._manager, step, _save_args(state, step, metadata, loss), metrics={"val_loss": loss})
        self._val_losses[step] = loss

    def save_on_anomaly(self, step: int, state, *, metadata: dict | None = None) -> None:
        """Save `state` into `<directory>/anomaly/<step>` (never rotated; an existing step is kept)."""
        step = int(step)
        if step in self.anomaly_steps():
            warnings.warn(f"anomaly checkpoint for step {step} already exists at {self.step_path(step, anomaly=True)}; not overwritten")
            return
        self._start(self._anomaly(), step, _save_args(state, step, metadata), force=True)

    def _start(self, manager: ocp.CheckpointManager, step: int, args, **save_options) -> None:
        """The one save path: Orbax's save of `args`, on the worker thread (with its commit) or here."""
        if self._closed:
            raise CheckpointError(f"cannot save step {step}: the checkpoint manager for {self.directory} is closed")
        self.wait_until_finished()  # one save at a time, whichever manager it is for

        def save():
            manager.save(step, args=args, **save_options)
            if self._worker is not None:
                manager.wait_until_finished()  # the commit, still off the training thread

        started = self._worker.submit(save) if self._worker is not None else _run_here(save)
        self._pending = _PendingSave(manager, step, started)  # a failure is raised by the next wait

    def wait_until_finished(self) -> None:
        """Block until the save in flight is committed; raise CheckpointError if it failed.

        Interrupted (KeyboardInterrupt, e.g. a second Ctrl-C), the save is abandoned: `close`
        then returns at once and the save's temporary directory is removed on the next start.
        """
        pending = self._pending
        if pending is None:
            return
        try:
            pending.started.result()
            pending.manager.wait_until_finished()
        except Exception as error:
            self._pending = None
            self._forget_failed(pending.manager, pending.step)
            kind = "anomaly save" if pending.manager is not self._manager else "save"
            raise CheckpointError(f"asynchronous {kind} of step {pending.step} to "
                                  f"{pending.manager.directory / str(pending.step)} failed: {first_line(error)}") from error
        except BaseException:
            self._closed = True  # abandoned: nothing more is written, close() does not wait
            raise
        self._pending = None

    def _forget_failed(self, manager: ocp.CheckpointManager, step: int) -> None:
        if manager is self._manager:
            self._val_losses.pop(step, None)
        try:
            # Orbax dropped the steps it meant to rotate out from its in-memory list at save
            # time; after a failed save they are still on disk, so list them again.
            manager.reload()
        except Exception as error:  # the save's own error is the one to report
            warnings.warn(f"could not re-read {manager.directory} after a failed save: {first_line(error)}")

    def close(self) -> None:
        """Wait for the save in flight, then release the worker thread and Orbax's managers.

        After an interrupted wait it returns at once, leaving the save to die with the process.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self.wait_until_finished()
        except Exception:
            self._release()
            raise
        self._release()

    def _release(self) -> None:
        def close_managers():
            self._manager.close()
            if self._anomaly_manager is not None:
                self._anomaly_manager.close()

        if self._worker is None:
            close_managers()
            return
        # On the thread that ran the saves: Orbax re-raises a failed save's error once per
        # calling thread, and that thread has raised it already (reported by wait_until_finished).
        closed = self._worker.submit(close_managers)
        self._worker.close()
        closed.result()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---- restoring -----------------------------------------------------------------------

    def _anomaly(self) -> ocp.CheckpointManager:
        if self._anomaly_manager is None:
            options = ocp.CheckpointManagerOptions(cleanup_tmp_directories=True, create=True)
            self._anomaly_manager = self._open(self.directory / ANOMALY_SUBDIR, options)
        return self._anomaly_manager

    def _reader(self, step: int, anomaly: bool):
        """(restore(args) for `step`, where) after checking that the step exists."""
        self.wait_until_finished()
        manager = self._anomaly() if anomaly else self._manager
        if step not in manager.all_steps():
            area = "anomaly checkpoints" if anomaly else "checkpoints"
            raise CheckpointError(f"no step {step} among the {area} in {manager.directory} (have {sorted(manager.all_steps())})")
        return (lambda args: manager.restore(step, args=args)), f"checkpoint step {step} at {self.step_path(step, anomaly=anomaly)}"

    def metadata(self, step: int, *, anomaly: bool = False) -> dict:
        """The metadata dict saved with `step` (caller's keys plus versions, leaves, val_loss)."""
        return _read_metadata(*self._reader(step, anomaly))

    def restore(self, step: int | None = None, target=None, *, anomaly: bool = False):
        """The state saved at `step` (latest when None), shaped like `target` when given.

        `target` is a concrete state or an abstract one (`jax.eval_shape`); it gives the tree
        structure (optax states come back as their own types), dtypes and shardings. Without it
        containers come back as dicts/lists, typed PRNG keys are rewrapped.
        """
        if step is None:
            self.wait_until_finished()
            manager = self._anomaly() if anomaly else self._manager
            step = manager.latest_step()
            if step is None:
                raise CheckpointError(f"no checkpoint to restore in {manager.directory}")
        restore, where = self._reader(int(step), anomaly)
        return _read_state(restore, _read_metadata(restore, where), target, where)

    def restore_latest_good(self, target):
        """(step, state, metadata) of the newest readable checkpoint; None if there is none.

        Unreadable steps are skipped with a one-line warning each. A target that does not
        match (CheckpointMismatchError) is raised at once: older steps would not match either.
        """
        steps = self.all_steps()
        if not steps:
            return None
        failures = []
        for step in reversed(steps):
            try:
                restore, where = self._reader(step, anomaly=False)
                saved = _read_metadata(restore, where)
                return step, _read_state(restore, saved, target, where), saved
            except CheckpointCorruptError as error:
                failures.append(step)
                warnings.warn(f"{error}; falling back to an earlier step", stacklevel=2)
        raise CheckpointCorruptError(f"no readable checkpoint in {self.directory} (tried steps {failures})")


# ---- one step directory, synchronously ------------------------------------------------------


def _checkpointer() -> ocp.Checkpointer:
    """Orbax's synchronous writer of the same items a manager's step holds."""
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_checkpoint(path, state, metadata: dict | None = None) -> None:
    """Write `state` (and metadata) as one step directory at the new path `path`, and wait for it."""
    path = Path(path).expanduser().resolve()
    if path.exists():
        raise CheckpointError(f"cannot save checkpoint to {path}: it already exists")
    args = _save_args(state, int(getattr(state, "step", 0)), metadata)
    with _checkpointer() as checkpointer:
        try:
            checkpointer.save(path, args=args)
        except Exception as error:
            raise CheckpointError(f"save of checkpoint to {path} failed: {first_line(error)}") from error


@contextlib.contextmanager
def _one_off_reader(path):
    """(restore(args), where) for the step directory at `path`, like `CheckpointManager._reader`."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}")
    with _checkpointer() as checkpointer:
        yield (lambda args: checkpointer.restore(path, args=args)), f"checkpoint at {path}"


def load_checkpoint_metadata(path) -> dict:
    """The metadata saved by `save_checkpoint` at `path`."""
    with _one_off_reader(path) as (restore, where):
        return _read_metadata(restore, where)


def load_checkpoint(path, target=None):
    """The state saved by `save_checkpoint` at `path`, shaped like `target` when given."""
    with _one_off_reader(path) as (restore, where):
        return _read_state(restore, _read_metadata(restore, where), target, where)
