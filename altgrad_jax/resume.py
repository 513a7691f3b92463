"""Where a run starts from: `--resume auto|never|PATH` resolved to a checkpoint, read-only."""

from __future__ import annotations

import dataclasses
import os

from .checkpoint import CheckpointError


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    directory: str  # the checkpoint manager's directory
    step: int | None  # None: the latest good step in `directory`


def committed_steps(directory: str) -> list[int]:
    """Finished checkpoint steps in `directory` (Orbax writes `<step>` dirs; unfinished ones carry a tmp suffix)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory)
                  if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


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
