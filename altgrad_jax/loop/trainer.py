"""The training loop around the jitted step: batches, one-step-late metrics, evaluation,
checkpoints, alerts and progress. Everything numerical happens in `train_step`."""

from __future__ import annotations

import os
import sys

import jax
import numpy as np

from .checkpoint import CheckpointManager
from .config import TrainConfig, save_config
from .data import Dataset, eval_batches, get_batch
from .interrupts import StopRequested
from .progress import Progress
from .sharding import put_batch
from .tracking import AlertMonitor, LocalTracker, WandbTracker, read_jsonl
from .train_step import make_eval_step, make_train_step

EXIT_OK, EXIT_NAN_STOP = 0, 3


class Evaluator:
    """Mean loss over a fixed set of validation batches (the same batches at every evaluation)."""

    def __init__(self, config: TrainConfig, dataset: Dataset, mesh):
        self._step = make_eval_step(config, mesh)
        self._batches = [put_batch(batch, mesh) for batch in eval_batches(
            dataset.val, seed=config.seed, n_batches=config.eval_iters,
            batch_size=config.batch_size, block_size=config.block_size)]

    def __call__(self, state) -> float:
        losses = [self._step(state, batch)["loss"] for batch in self._batches]
        return float(np.mean(jax.device_get(losses)))


def to_host_scalars(metrics) -> dict[str, float]:
    return {name: float(value) for name, value in jax.device_get(metrics).items()}


def make_trackers(config: TrainConfig, out_dir: str, start_step: int, run_id: str | None, is_logger: bool):
    if not is_logger:
        return []  # other processes still decide save/stop alike (replicated metrics), silently
    logged_through = last_logged_step(out_dir) if start_step else None  # read before the truncation
    return [LocalTracker(out_dir, resume_step=start_step or None),
            WandbTracker(config, run_id=run_id, out_dir=out_dir, logged_through=logged_through)]


def last_logged_step(out_dir: str) -> int | None:
    path = os.path.join(out_dir, "metrics.jsonl")
    steps = [entry["step"] for entry in read_jsonl(path)] if os.path.exists(path) else []
    return max(steps, default=None)


def train(config: TrainConfig, dataset: Dataset, mesh, state, start_step: int, metadata: dict) -> int:
    """Train from `state` (after `start_step` steps) to `config.max_steps`; returns the exit status."""
    is_logger = jax.process_index() == 0
    out_dir = config.out_dir
    if is_logger:
        os.makedirs(out_dir, exist_ok=True)
        save_config(config, os.path.join(out_dir, "config.yaml"))
    trackers = make_trackers(config, out_dir, start_step, metadata.get("wandb_run_id"), is_logger)
    wandb_run_id = next((t.run_id for t in trackers if isinstance(t, WandbTracker)), None)
    monitor = AlertMonitor(config, trackers)
    checkpoint_metadata = {"config": config.to_dict(), "wandb_run_id": wandb_run_id,
                           "data": dataset.description}
    train_step = make_train_step(config, mesh)
    evaluate = Evaluator(config, dataset, mesh)
    tokens_per_step = config.batch_size * config.block_size
    progress = Progress(config, start_step, tokens_per_step, enabled=is_logger)

    def publish(step, metrics, extra) -> bool:
        """Host side of one step, run while the next step computes: log and check alerts.
        True when the run must stop (nan_patience non-finite steps in a row)."""
        scalars = to_host_scalars(metrics) | extra
        if config.whatif_interval and step % config.whatif_interval:  # zeros between what-if steps
            scalars = {name: value for name, value in scalars.items() if not name.startswith("whatif/")}
        action = monitor.check(step, scalars)
        if step % config.log_interval == 0 or extra or step == config.max_steps:
            for tracker in trackers:
                tracker.log_step(step, scalars)
            progress.update(step, scalars)
        return action == "stop"

    in_nonfinite_run = False

    def save_if_first_nonfinite(step, metrics) -> None:
        """Run before `state`, the result of `step`, is donated to the next step or the loop ends.

        A non-finite step skips its update, so `state` then holds the params, optimizer and quant
        state that produced the non-finite loss; the next step may change them. Its one flag is
        therefore read here, before the next dispatch (the other metrics are read one step late),
        and the first of a run of skipped steps is saved as the anomaly checkpoint. Every process
        reads the same replicated flag, so all take the same decision (the save is collective).
        """
        nonlocal in_nonfinite_run
        skipped = bool(jax.device_get(metrics["update_skipped"]))
        if skipped and not in_nonfinite_run:
            manager.save_on_anomaly(step, state, metadata=checkpoint_metadata)
        in_nonfinite_run = skipped

    exit_code = EXIT_OK
    with CheckpointManager(config.checkpoint_path, max_checkpoints=config.max_checkpoints) as manager, \
            StopRequested() as stop:
        if start_step == 0:
            first_val = evaluate(state)
            for tracker in trackers:
                tracker.log_step(0, {"val_loss": first_val})
            progress.note(f"step 0: val_loss {first_val:.4f}")
        pending = unchecked = None
        step = start_step
        for batch_index in range(start_step, config.max_steps):
            batch = put_batch(get_batch(dataset.train, seed=config.seed, step=batch_index,
                                        batch_size=config.batch_size, block_size=config.block_size), mesh)
            if unchecked:
                save_if_first_nonfinite(*unchecked)
            state, metrics = train_step(state, batch)
            step = batch_index + 1
            unchecked = (step, metrics)
            if pending and publish(*pending):
                exit_code = EXIT_NAN_STOP
                break
            checkpoint_due = step % config.checkpoint_interval == 0 or step == config.max_steps
            extra = {}
            if step % config.eval_interval == 0 or checkpoint_due:  # every checkpoint can be ranked
                extra["val_loss"] = evaluate(state)
            pending = (step, metrics, extra)
            if checkpoint_due:
                # Publish this step before saving it, so a run killed after the save has logged
                # every step up to the checkpoint it resumes from.
                stop_now, pending = publish(*pending), None
                if stop_now:
                    exit_code = EXIT_NAN_STOP
                    break
                manager.save(step, state, val_loss=extra.get("val_loss"), metadata=checkpoint_metadata)
            if stop.requested:
                exit_code = stop.exit_code
                break
        if unchecked:
            save_if_first_nonfinite(*unchecked)
        if pending and exit_code != EXIT_NAN_STOP and publish(*pending):
            exit_code = EXIT_NAN_STOP
        if stop.requested and manager.latest_step() != step:
            manager.save(step, state, metadata=checkpoint_metadata)
        if exit_code:
            progress.note("waiting for the last checkpoint to be written")
        manager.wait_until_finished()
    progress.close()
    for tracker in trackers:
        tracker.finish(exit_code)
    if is_logger:
        print_summary(config, exit_code, step)
    return exit_code


def print_summary(config: TrainConfig, exit_code: int, step: int) -> None:
    outcome = {EXIT_OK: "finished", EXIT_NAN_STOP: "stopped by the NaN alert"}.get(exit_code, "interrupted")
    print(f"run {outcome} at step {step}; run directory: {config.out_dir}", file=sys.stderr)
    print(f"  plot:   {python_command()} -m altgrad_jax.plot {config.out_dir}", file=sys.stderr)
    if exit_code == EXIT_OK:
        print("  resume: the same command with --set max_steps=<more> continues from the last checkpoint",
              file=sys.stderr)
    elif exit_code == EXIT_NAN_STOP:
        print(f"  anomaly checkpoint: {os.path.join(config.checkpoint_path, 'anomaly')}; "
              f"alerts: {os.path.join(config.out_dir, 'alerts.jsonl')}", file=sys.stderr)
    else:
        print("  resume: the same command again continues from the last checkpoint (--resume auto)",
              file=sys.stderr)


def python_command() -> str:
    """This interpreter, relative when it lives under the working directory (e.g. .venv/bin/python)."""
    relative = os.path.relpath(sys.executable)
    return sys.executable if relative.startswith("..") else relative
