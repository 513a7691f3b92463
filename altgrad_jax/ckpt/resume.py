"""Where a run starts from: `--resume auto|never|PATH` resolved to a checkpoint, and the state
restored from it (or a fresh one). Nothing here writes, except setting steps aside (step_dirs.py)
when a run continues in its own checkpoint directory past unreadable or later steps."""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from pathlib import Path

import jax
from jax.experimental import multihost_utils

from altgrad_jax.ckpt.errors import CheckpointCorruptError, CheckpointError
from altgrad_jax.ckpt.manager import CheckpointManager
from altgrad_jax.ckpt.step_dirs import (SUPERSEDED_SUFFIX, UNREADABLE_SUFFIX, committed_steps, set_aside_step_dir,
                                        unreadable_step_dirs)
from altgrad_jax.config import TrainConfig
from altgrad_jax.sharding import put_state, with_shardings
from altgrad_jax.train_state import abstract_train_state, init_train_state


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    directory: str  # the checkpoint manager's directory
    step: int | None  # None: the latest good step in `directory`


def find_resume_point(mode: str, checkpoint_dir: str) -> ResumePoint | None:
    if mode == "never":
        if committed_steps(checkpoint_dir):
            raise CheckpointError(
                f"--resume never: checkpoints already exist in {checkpoint_dir}; "
                "use --resume auto or another out_dir")
        return None
    if mode == "auto":
        return ResumePoint(checkpoint_dir, None) if committed_steps(checkpoint_dir) else None
    path = os.path.normpath(mode)
    if not os.path.isdir(path):
        raise CheckpointError(f"--resume {mode}: no such checkpoint directory")
    if committed_steps(path):
        return ResumePoint(path, None)
    name = os.path.basename(path)
    if name.isdigit() and int(name) in committed_steps(os.path.dirname(path)):
        return ResumePoint(os.path.dirname(path), int(name))
    raise CheckpointError(f"--resume {mode}: neither a checkpoint directory nor a step directory")


def _set_aside(step_dirs, why: str, suffix: str) -> None:
    """Rename steps to `<step><suffix>` (kept as evidence), on process 0 while the others wait."""
    if jax.process_index() == 0:
        for step_dir in step_dirs:
            warnings.warn(f"checkpoint step {step_dir.name} at {step_dir} {why}; set aside as "
                          f"{set_aside_step_dir(step_dir, suffix).name}")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("altgrad_jax set aside checkpoints")


def restore_or_init(config: TrainConfig, resume: ResumePoint | None, mesh):
    """(state, start_step, metadata), restored against an abstract target so that types (optax
    states) and shardings match. Continuing in the run's own checkpoint directory past unreadable
    or later steps sets those aside, since the run will save those steps again."""
    if resume is None:
        return put_state(init_train_state(config), mesh), 0, {}
    own = os.path.abspath(config.checkpoint_path)
    continues_here = os.path.abspath(resume.directory) == own
    target = with_shardings(abstract_train_state(config), mesh)
    if resume.step is None and continues_here:
        unreadable = unreadable_step_dirs(resume.directory)
        if len(unreadable) == len(committed_steps(resume.directory)):
            raise CheckpointCorruptError(f"no readable checkpoint in {resume.directory} "
                                         f"(unreadable steps: {', '.join(d.name for d in unreadable)})")
        _set_aside(unreadable, "is unreadable", UNREADABLE_SUFFIX)
    with CheckpointManager(resume.directory, max_checkpoints=config.max_checkpoints) as manager:
        if resume.step is None:
            found = manager.restore_latest_good(target)
            if found is None:
                raise CheckpointCorruptError(f"no readable checkpoint in {resume.directory}")
            step, state, metadata = found
        else:
            step, state, metadata = resume.step, manager.restore(resume.step, target), manager.metadata(resume.step)
        source = manager.step_path(step)
    later = [s for s in committed_steps(own) if s > step]
    if later and not continues_here:
        raise CheckpointError(f"{own} already holds checkpoints after step {step} (steps {later}); "
                              "resume into another out_dir or checkpoint_dir")
    _set_aside([Path(own, str(s)) for s in later], f"is later than the resumed step {step}", SUPERSEDED_SUFFIX)
    if jax.process_index() == 0:
        print(f"resuming after step {step} from {source}", file=sys.stderr)
    return state, int(step), metadata or {}
