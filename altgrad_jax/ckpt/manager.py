"""Checkpoints over Orbax: the last N saves plus the best one, anomaly saves, exact resume.

Layout of a checkpoint directory::

    <directory>/<step>/state      the state pytree: state.safetensors (see safetensors_handler.py)
    <directory>/<step>/metadata   JSON: the caller's metadata, library versions, PRNG key
                                  implementations and the shape/dtype of every state leaf
    <directory>/<step>/metrics    JSON {"val_loss": float | null}, read by the retention policy
    <directory>/anomaly/<step>/   the same, written by `save_on_anomaly`, never rotated

Retention is Orbax's own: `AnyPreservationPolicy([LatestN(n), BestN(n=1)])`. BestN sorts
with `reverse=True` so that its kept tail is the *lowest* loss; a missing or non-finite
val_loss is stored as null and ranked as +inf, so it can never be the best (when every
kept loss is +inf, BestN keeps the newest one, which LatestN keeps anyway). Among equal
losses the newest is the best.

Saves are asynchronous. An error in a background write is raised as `CheckpointError` by
the next call that reads or writes checkpoints (`save`, the step queries, `restore`,
`wait_until_finished`, `close`), never swallowed. A process
killed during a save leaves `<step>.orbax-checkpoint-tmp*`, which is never listed and is
removed when a manager next opens the directory.

Signals: the training loop runs inside `interrupts.StopRequested` *inside* the manager's
`with` block; SIGTERM/SIGINT stop it at a step boundary, the `with` block closes the manager,
which waits for the save in flight, and the process exits non-zero. A second signal during
that wait abandons the save (its temporary directory is cleaned up on the next start).
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import math
import platform
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies

from altgrad_jax.background import BackgroundWorker
from altgrad_jax.safetensors_handler import (SafetensorsRestore, SafetensorsSave, Snapshot, dtype_name, is_typed_key,
                                             named_leaves, snapshot)

STATE_ITEM = "state"
METADATA_ITEM = "metadata"
ANOMALY_SUBDIR = "anomaly"
UNREADABLE_SUFFIX = ".unreadable"  # unreadable steps set aside by a resume that falls back past them
SUPERSEDED_SUFFIX = ".superseded"  # readable steps after the one a run resumed from
# Keys this module adds to the caller's metadata dict.
RESERVED_METADATA_KEYS = ("versions", "prng_keys", "state_leaves", "val_loss", "step")
_VERSIONED_DISTRIBUTIONS = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "safetensors", "numpy")


class CheckpointError(Exception):
    """A checkpoint could not be saved or restored; the message is one line."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint on disk is unreadable (missing files, truncated data, bad JSON)."""


class CheckpointMismatchError(CheckpointError):
    """The restore target's structure, shapes or dtypes differ from the saved state."""


class CheckpointVersionWarning(UserWarning):
    """The checkpoint was written by other library versions than the running ones."""


@functools.cache
def _installed_versions() -> tuple[tuple[str, str], ...]:
    versions = {name: importlib.metadata.version(name) for name in _VERSIONED_DISTRIBUTIONS}
    versions["python"] = platform.python_version()
    return tuple(versions.items())


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide how a state is computed and stored."""
    return dict(_installed_versions())


def leaf_signatures(tree) -> dict[str, list]:
    """{leaf name: [shape, dtype name]} for arrays, ShapeDtypeStructs or scalars."""
    signatures = {}
    for name, _, leaf in named_leaves(tree):
        dtype = getattr(leaf, "dtype", None)
        signatures[name] = [list(getattr(leaf, "shape", ())), dtype_name(dtype) if dtype is not None else type(leaf).__name__]
    return signatures


def _prng_key_impls(tree) -> dict[str, str]:
    return {name: str(jax.random.key_impl(leaf)) for name, _, leaf in named_leaves(tree) if is_typed_key(leaf)}


def _finite_or_none(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def build_metadata(state, step: int, metadata: dict | None, val_loss=None) -> dict:
    """The caller's dict plus versions, PRNG key implementations and leaf signatures."""
    user = dict(metadata or {})
    clashes = sorted(set(user) & set(RESERVED_METADATA_KEYS))
    if clashes:
        raise CheckpointError(f"metadata keys {clashes} are reserved by the checkpoint module")
    result = {
        **user,
        "step": int(step),
        "val_loss": _finite_or_none(val_loss),
        "versions": library_versions(),
        "prng_keys": _prng_key_impls(state),
        "state_leaves": leaf_signatures(state),
    }
    try:
        json.dumps(result)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"metadata for step {step} is not JSON-serializable: {error}") from None
    return result


def _first_line(error: BaseException, limit: int = 240) -> str:
    """One short line from an exception."""
    text = (str(error).strip().splitlines() or [""])[0]
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}"


def check_target(saved: dict, target, where: str) -> None:
    """Raise CheckpointMismatchError when `target` does not match the saved leaves."""
    saved_leaves = saved["state_leaves"]
    target_leaves = leaf_signatures(target)
    missing = [name for name in saved_leaves if name not in target_leaves]
    extra = [name for name in target_leaves if name not in saved_leaves]
    if any(name.startswith("quant_state/") and name.endswith("/scale") for name in missing):
        raise CheckpointMismatchError(
            f"{where}: written by an altgrad_jax before the three-slot FP8 recipe (its quant_state "
            "holds one weight scale per layer, not x/w/dy amax histories); start a fresh run")
    if missing or extra:
        raise CheckpointMismatchError(
            f"{where}: the target's structure differs from the saved state "
            f"(only in checkpoint: {missing[:3]}{'...' if len(missing) > 3 else ''}; "
            f"only in target: {extra[:3]}{'...' if len(extra) > 3 else ''})"
        )
    for name, (shape, dtype) in saved_leaves.items():
        target_shape, target_dtype = target_leaves[name]
        if shape != target_shape or dtype != target_dtype:
            raise CheckpointMismatchError(
                f"{where}: leaf '{name}' is {tuple(shape)} {dtype} in the checkpoint but "
                f"{tuple(target_shape)} {target_dtype} in the target (did the config change?)"
            )


def warn_on_version_change(saved: dict, where: str) -> None:
    saved_versions = saved.get("versions", {})
    changed = [
        f"{name} {saved_versions.get(name)} -> {version}"
        for name, version in library_versions().items()
        if saved_versions.get(name) != version
    ]
    if changed:
        warnings.warn(
            f"{where} was written with other library versions: {', '.join(changed)}",
            CheckpointVersionWarning,
            stacklevel=3,
        )


def _read_state(read_item, saved: dict, target, where: str):
    """Check `target` against `saved`, then read the state with `read_item(args)`."""
    if target is not None:
        check_target(saved, target, where)
    warn_on_version_change(saved, where)
    try:
        state = read_item(SafetensorsRestore(target))
    except Exception as error:  # Orbax and safetensors raise many types for damaged files.
        raise CheckpointCorruptError(f"{where} is unreadable: {_first_line(error)}") from error
    return state


def _snapshot_or_error(state, step: int) -> Snapshot:
    try:
        return snapshot(state)
    except ValueError as error:
        raise CheckpointError(f"cannot save step {step}: {error}") from None


def _metric_for_ranking(metrics) -> float:
    value = None if metrics is None else metrics.get("val_loss")
    return math.inf if value is None else float(value)


class CheckpointManager:
    """Asynchronous checkpoints of a state pytree: the last `max_checkpoints` plus the best.

    `save(step, state, val_loss=...)` returns once it holds a host view of every array;
    the write goes on in the background. Queries (`all_steps`, `latest_step`, ...) wait for
    the save in flight. Use as a context manager, or call `close()`.

    In a single process the whole Orbax save runs on a background thread, so that the training
    loop waits for nothing but the host views. With several processes Orbax's own asynchronous
    save is used from the calling thread, because its barriers are collectives over all devices
    and must come in the same order as the training step's.
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
            # Orbax writes the metrics item only when best_fn is set.
            best_fn=_metric_for_ranking,
            best_mode="min",
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = self._open(self.directory, options)
        self._anomaly_manager = None
        self._pending = None  # (Orbax manager, step) of the save in flight
        self._worker = BackgroundWorker("altgrad_jax checkpoint") if jax.process_count() == 1 else None
        self._in_flight = None  # the worker's future for that save
        self._abandoned = False  # a wait for the save in flight was interrupted
        self._closed = False
        self._val_losses = {}
        for step in self._manager.all_steps():
            try:
                self._val_losses[step] = _finite_or_none(_metric_or_none(self._manager.metrics(step)))
            except Exception:  # a damaged metrics file: the step simply never counts as best
                self._val_losses[step] = None

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
                    f"checkpoint step {unreadable[0].name} at {unreadable[0]} is unreadable: {_first_line(error)}"
                ) from error
            raise CheckpointError(f"cannot open checkpoint directory {directory}: {_first_line(error)}") from error

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
        loss = _finite_or_none(val_loss)
        args = ocp.args.Composite(**{
            STATE_ITEM: SafetensorsSave(_snapshot_or_error(state, step)),
            METADATA_ITEM: ocp.args.JsonSave(build_metadata(state, step, metadata, loss)),
        })
        self._start(self._manager, step, args, metrics={"val_loss": loss})
        self._val_losses[step] = loss

    def save_on_anomaly(self, step: int, state, *, metadata: dict | None = None) -> None:
        """Save `state` into `<directory>/anomaly/<step>` (never rotated; an existing step is kept)."""
        step = int(step)
        if step in self.anomaly_steps():
            warnings.warn(f"anomaly checkpoint for step {step} already exists at {self.step_path(step, anomaly=True)}; not overwritten")
            return
        args = ocp.args.Composite(**{
            STATE_ITEM: SafetensorsSave(_snapshot_or_error(state, step)),
            METADATA_ITEM: ocp.args.JsonSave(build_metadata(state, step, metadata)),
        })
        self._start(self._anomaly(), step, args, force=True)

    def _start(self, manager: ocp.CheckpointManager, step: int, args, **save_options) -> None:
        """Hand the save to the worker thread, or start Orbax's asynchronous save here."""
        if self._closed:
            raise CheckpointError(f"cannot save step {step}: the checkpoint manager for {self.directory} is closed")
        self.wait_until_finished()  # one save at a time, whichever manager it is for
        self._pending = (manager, step)
        if self._worker is not None:
            def save_and_commit():
                manager.save(step, args=args, **save_options)
                manager.wait_until_finished()

            self._in_flight = self._worker.submit(save_and_commit)
            return
        try:
            manager.save(step, args=args, **save_options)
        except Exception as error:
            self._pending = None
            self._forget_failed(manager, step)
            raise CheckpointError(f"save of step {step} to {manager.directory / str(step)} failed: {_first_line(error)}") from error

    def anomaly_steps(self) -> list[int]:
        self.wait_until_finished()
        if self._anomaly_manager is None and not (self.directory / ANOMALY_SUBDIR).is_dir():
            return []
        return sorted(self._anomaly().all_steps())

    def _anomaly(self) -> ocp.CheckpointManager:
        if self._anomaly_manager is None:
            options = ocp.CheckpointManagerOptions(cleanup_tmp_directories=True, create=True)
            self._anomaly_manager = self._open(self.directory / ANOMALY_SUBDIR, options)
        return self._anomaly_manager

    def wait_until_finished(self) -> None:
        """Block until the save in flight is committed; raise CheckpointError if it failed.

        Interrupted (KeyboardInterrupt, e.g. a second Ctrl-C), the save is abandoned: `close`
        then returns at once and the save's temporary directory is removed on the next start.
        """
        if self._pending is None:
            return
        manager, step = self._pending
        try:
            if self._in_flight is not None:
                self._in_flight.result()
            manager.wait_until_finished()
        except Exception as error:
            self._pending = self._in_flight = None
            self._forget_failed(manager, step)
            kind = "anomaly save" if manager is not self._manager else "save"
            raise CheckpointError(
                f"asynchronous {kind} of step {step} to {manager.directory / str(step)} failed: {_first_line(error)}"
            ) from error
        except BaseException:
            self._abandoned = True
            raise
        self._pending = self._in_flight = None

    def _forget_failed(self, manager: ocp.CheckpointManager, step: int) -> None:
        if manager is self._manager:
            self._val_losses.pop(step, None)
        try:
            # Orbax dropped the steps it meant to rotate out from its in-memory list at save
            # time; after a failed save they are still on disk, so list them again.
            manager.reload()
        except Exception as error:  # the save's own error is the one to report
            warnings.warn(f"could not re-read {manager.directory} after a failed save: {_first_line(error)}")

    def close(self) -> None:
        """Wait for the save in flight, then release the worker thread and Orbax's managers.

        After an interrupted wait it returns at once, leaving the save to die with the process.
        """
        if self._closed or self._abandoned:
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

    def metadata(self, step: int, *, anomaly: bool = False) -> dict:
        """The metadata dict saved with `step` (caller's keys plus versions, leaves, val_loss)."""
        self.wait_until_finished()
        manager = self._anomaly() if anomaly else self._manager
        self._require_step(manager, step, anomaly)
        where = f"checkpoint step {step} at {self.step_path(step, anomaly=anomaly)}"
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**{METADATA_ITEM: ocp.args.JsonRestore()}))
            saved = dict(restored[METADATA_ITEM])
        except Exception as error:
            raise CheckpointCorruptError(f"{where} has unreadable metadata: {_first_line(error)}") from error
        if "state_leaves" not in saved or "prng_keys" not in saved:
            raise CheckpointCorruptError(f"{where} has metadata without 'state_leaves'/'prng_keys'")
        return saved

    def restore(self, step: int | None = None, target=None, *, anomaly: bool = False):
        """The state saved at `step` (latest when None), shaped like `target` when given.

        `target` is a concrete state or an abstract one (`jax.eval_shape`); it gives the tree
        structure (optax states come back as their own types), dtypes and shardings. Without it
        containers come back as dicts/lists, typed PRNG keys are rewrapped.
        """
        self.wait_until_finished()
        manager = self._anomaly() if anomaly else self._manager
        if step is None:
            step = manager.latest_step()
            if step is None:
                raise CheckpointError(f"no checkpoint to restore in {manager.directory}")
        step = int(step)
        saved = self.metadata(step, anomaly=anomaly)
        where = f"checkpoint step {step} at {self.step_path(step, anomaly=anomaly)}"

        def read_item(args):
            return manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: args}))[STATE_ITEM]

        return _read_state(read_item, saved, target, where)

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
                saved = self.metadata(step)
                return step, self.restore(step, target), saved
            except CheckpointCorruptError as error:
                failures.append(step)
                warnings.warn(f"{error}; falling back to an earlier step", stacklevel=2)
        raise CheckpointCorruptError(f"no readable checkpoint in {self.directory} (tried steps {failures})")

    @staticmethod
    def _require_step(manager, step: int, anomaly: bool) -> None:
        if step not in manager.all_steps():
            area = "anomaly checkpoints" if anomaly else "checkpoints"
            raise CheckpointError(f"no step {step} among the {area} in {manager.directory} (have {sorted(manager.all_steps())})")


# JSON files Orbax parses for every step when a manager opens the directory: one that is damaged
# stops the whole directory from opening.
_READ_ON_OPEN = ("_CHECKPOINT_METADATA", "metrics/metrics")


def unreadable_step_dirs(directory) -> list[Path]:
    """Step directories with a damaged file of `_READ_ON_OPEN`, by step."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    bad = []
    for child in sorted((p for p in directory.iterdir() if p.name.isdigit() and p.is_dir()), key=lambda p: int(p.name)):
        for name in _READ_ON_OPEN:
            path = child / name
            try:
                if path.is_file():
                    json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError, OSError):
                bad.append(child)
                break
    return bad


def set_aside_step_dir(step_dir: Path, suffix: str = UNREADABLE_SUFFIX) -> Path:
    """Rename `<dir>/<step>` to `<dir>/<step><suffix>` (a name Orbax does not list), never over
    an existing one."""
    target = step_dir.with_name(f"{step_dir.name}{suffix}")
    number = 1
    while target.exists():
        target = step_dir.with_name(f"{step_dir.name}{suffix}.{number}")
        number += 1
    step_dir.rename(target)
    return target


def _metric_or_none(metrics):
    return None if metrics is None else metrics.get("val_loss")


# ---- one-off helpers ---------------------------------------------------------------------


def save_checkpoint(path, state, metadata: dict | None = None) -> None:
    """Synchronously save `state` (and metadata) to a new directory `path`."""
    path = Path(path).expanduser().resolve()
    if path.exists():
        raise CheckpointError(f"cannot save checkpoint to {path}: it already exists")
    step = int(getattr(state, "step", 0))
    args = ocp.args.Composite(**{
        STATE_ITEM: SafetensorsSave(state),
        METADATA_ITEM: ocp.args.JsonSave(build_metadata(state, step, metadata)),
    })
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        try:
            checkpointer.save(path, args=args)
        except Exception as error:
            raise CheckpointError(f"save of checkpoint to {path} failed: {_first_line(error)}") from error


def load_checkpoint_metadata(path) -> dict:
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        try:
            restored = checkpointer.restore(path, args=ocp.args.Composite(**{METADATA_ITEM: ocp.args.JsonRestore()}))
        except Exception as error:
            raise CheckpointCorruptError(f"checkpoint at {path} has unreadable metadata: {_first_line(error)}") from error
    return dict(restored[METADATA_ITEM])


def load_checkpoint(path, target=None):
    """The state saved by `save_checkpoint` at `path`, shaped like `target`."""
    path = Path(path).expanduser().resolve()
    saved = load_checkpoint_metadata(path)

    def read_item(args):
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            return checkpointer.restore(path, args=ocp.args.Composite(**{STATE_ITEM: args}))[STATE_ITEM]

    return _read_state(read_item, saved, target, f"checkpoint at {path}")
