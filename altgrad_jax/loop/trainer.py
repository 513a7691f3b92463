"""The training loop around the jitted step: batches, one-step-late metrics, evaluation,
checkpoints, alerts and progress. Everything numerical happens in `train_step`.

The host never waits for the step it has just dispatched: a step's metrics are read while the
next one computes (`StepResults.publish`). The one exception is each step's `update_skipped`
flag, read before the next dispatch so that the anomaly checkpoint holds the state that
produced the first non-finite loss.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from altgrad_jax.ckpt.manager import CheckpointManager
from altgrad_jax.config import TrainConfig, save_config
from altgrad_jax.data import Dataset, eval_batches, get_batch
from altgrad_jax.loop.alerts import Action, AlertMonitor
from altgrad_jax.loop.interrupts import StopRequested
from altgrad_jax.loop.local_tracker import METRICS_FILE, LocalTracker, read_jsonl
from altgrad_jax.loop.progress import Progress
from altgrad_jax.loop.summary import EXIT_NAN_STOP, EXIT_OK, print_summary
from altgrad_jax.loop.tracker import Tracker
from altgrad_jax.loop.wandb_tracker import WandbTracker
from altgrad_jax.sharding import put_batch
from altgrad_jax.train_step import make_eval_step, make_train_step

__all__ = ["EXIT_NAN_STOP", "EXIT_OK", "Evaluator", "StepResults", "make_trackers", "train"]


def train(config: TrainConfig, dataset: Dataset, mesh, state, start_step: int, metadata: dict) -> int:
    """Train from `state` (after `start_step` steps) to `config.max_steps`; returns the exit status."""
    is_logger = jax.process_index() == 0  # other processes decide alike (replicated metrics), silently
    if is_logger:
        os.makedirs(config.out_dir, exist_ok=True)
        save_config(config, os.path.join(config.out_dir, "config.yaml"))
    trackers = make_trackers(config, config.out_dir, start_step, metadata.get("wandb_run_id"), is_logger)
    wandb_run_id = next((t.run_id for t in trackers if isinstance(t, WandbTracker)), None)
    checkpoint_metadata = {"config": config.to_dict(), "wandb_run_id": wandb_run_id, "data": dataset.description}
    train_step, evaluate = make_train_step(config), Evaluator(config, dataset, mesh)
    progress = Progress(config, start_step, config.batch_size * config.block_size, enabled=is_logger)

    with CheckpointManager(config.checkpoint_path, max_checkpoints=config.max_checkpoints) as manager, \
            StopRequested() as stop:
        results = StepResults(config, trackers, progress, manager, checkpoint_metadata)
        if start_step == 0:
            results.log_start(evaluate(state))
        step = start_step
        for step in range(start_step + 1, config.max_steps + 1):
            batch = put_batch(get_batch(dataset.train, seed=config.seed, step=step - 1,
                                        batch_size=config.batch_size, block_size=config.block_size), mesh)
            results.save_if_first_nonfinite(state)  # before `state` is donated to the next step
            state, metrics = train_step(state, batch)
            results.dispatched(step, metrics)  # publishes the step before, while this one computes
            if results.exit_code == EXIT_NAN_STOP:
                break
            checkpoint_due = step % config.checkpoint_interval == 0 or step == config.max_steps
            if step % config.eval_interval == 0 or checkpoint_due:  # every checkpoint can be ranked
                results.add_val_loss(evaluate(state))
            if checkpoint_due:
                # Published before the save, so a run killed after it has logged every step up to it.
                val_loss = results.publish()
                if results.exit_code == EXIT_NAN_STOP:
                    break
                manager.save(step, state, val_loss=val_loss, metadata=checkpoint_metadata)
            if stop.requested:
                results.exit_code = stop.exit_code
                break
        results.save_if_first_nonfinite(state)
        results.publish()
        if stop.requested and manager.latest_step() != step:
            manager.save(step, state, metadata=checkpoint_metadata)
        if results.exit_code:
            progress.note("waiting for the last checkpoint to be written")
        manager.wait_until_finished()

    progress.close()
    for tracker in trackers:
        tracker.finish(results.exit_code)
    if is_logger:
        print_summary(config, results.exit_code, step)
    return results.exit_code


@dataclasses.dataclass
class _Dispatched:
    step: int
    metrics: dict  # device arrays, not read yet
    val_loss: float | None = None


class StepResults:
    """What the host does with each dispatched step, and the exit code it leads to.

    - `save_if_first_nonfinite(state)`: reads the last step's `update_skipped` flag before the
      next dispatch and saves the anomaly checkpoint on the first of a run of skipped steps.
    - `publish()`: the last step's metrics to the trackers and progress, and through the alert
      monitor, one step late; `Action.STOP` sets the exit code to EXIT_NAN_STOP.
    """

    def __init__(self, config: TrainConfig, trackers: list[Tracker], progress: Progress,
                 manager: CheckpointManager, checkpoint_metadata: dict):
        self.config = config
        self.trackers = trackers
        self.progress = progress
        self.monitor = AlertMonitor(config, trackers)
        self.manager = manager
        self.checkpoint_metadata = checkpoint_metadata
        self.exit_code = EXIT_OK
        self._unchecked: _Dispatched | None = None  # its update_skipped flag not read yet
        self._unpublished: _Dispatched | None = None
        self._in_nonfinite_run = False

    def log_start(self, val_loss: float) -> None:
        for tracker in self.trackers:
            tracker.log_step(0, {"val_loss": val_loss})
        self.progress.note(f"step 0: val_loss {val_loss:.4f}")

    def dispatched(self, step: int, metrics: dict) -> None:
        """Record the step just dispatched; publish the one before it."""
        self.publish()
        self._unchecked = self._unpublished = _Dispatched(step, metrics)

    def add_val_loss(self, val_loss: float) -> None:
        self._unpublished.val_loss = val_loss

    def save_if_first_nonfinite(self, state) -> None:
        """Run before `state`, the result of the unchecked step, is donated or the loop ends.

        A non-finite step skips its update, so `state` then holds the params, optimizer and quant
        state that produced the non-finite loss; the next step may change them. Its flag is
        therefore read here, before the next dispatch, and the first of a run of skipped steps is
        saved as the anomaly checkpoint. Every process reads the same replicated flag, so all take
        the same decision (the save is collective).
        """
        if self._unchecked is None:
            return
        done, self._unchecked = self._unchecked, None
        skipped = bool(jax.device_get(done.metrics["update_skipped"]))
        if skipped and not self._in_nonfinite_run:
            self.manager.save_on_anomaly(done.step, state, metadata=self.checkpoint_metadata)
        self._in_nonfinite_run = skipped

    def publish(self) -> float | None:
        """Log the unpublished step and check its alerts; returns its val_loss. Nothing after a NaN stop."""
        if self._unpublished is None or self.exit_code == EXIT_NAN_STOP:
            return None
        done, self._unpublished = self._unpublished, None
        scalars = to_host_scalars(done.metrics)
        if done.val_loss is not None:
            scalars["val_loss"] = done.val_loss
        if self.config.whatif_interval and done.step % self.config.whatif_interval:  # zeros between what-if steps
            scalars = {name: value for name, value in scalars.items() if not name.startswith("whatif/")}
        action = self.monitor.check(done.step, scalars)
        if done.step % self.config.log_interval == 0 or done.val_loss is not None or done.step == self.config.max_steps:
            for tracker in self.trackers:
                tracker.log_step(done.step, scalars)
            self.progress.update(done.step, scalars)
        if action is Action.STOP:
            self.exit_code = EXIT_NAN_STOP
        return done.val_loss


class Evaluator:
    """Mean loss over a fixed set of validation batches (the same batches at every evaluation)."""

    def __init__(self, config: TrainConfig, dataset: Dataset, mesh):
        self._step = make_eval_step(config)
        self._batches = [put_batch(batch, mesh) for batch in eval_batches(
            dataset.val, seed=config.seed, n_batches=config.eval_iters,
            batch_size=config.batch_size, block_size=config.block_size)]

    def __call__(self, state) -> float:
        losses = [self._step(state, batch)["loss"] for batch in self._batches]
        return float(np.mean(jax.device_get(losses)))


def to_host_scalars(metrics) -> dict[str, float]:
    return {name: float(value) for name, value in jax.device_get(metrics).items()}


def make_trackers(config: TrainConfig, out_dir: str, start_step: int, run_id: str | None,
                  is_logger: bool) -> list[Tracker]:
    if not is_logger:
        return []
    logged_through = last_logged_step(out_dir) if start_step else None  # read before the truncation
    return [LocalTracker(out_dir, resume_step=start_step or None),
            WandbTracker(config, run_id=run_id, out_dir=out_dir, logged_through=logged_through)]


def last_logged_step(out_dir: str) -> int | None:
    path = os.path.join(out_dir, METRICS_FILE)
    steps = [entry["step"] for entry in read_jsonl(path)] if os.path.exists(path) else []
    return max(steps, default=None)
