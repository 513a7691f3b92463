"""A checkpoint directory's step directories as files on disk, apart from Orbax.

Orbax writes `<directory>/<step>` when a save commits (an unfinished one carries a tmp suffix).
A resume lists them, finds the ones Orbax would fail to open, and sets steps aside by renaming
them to names Orbax does not list (`<step>.unreadable`, `<step>.superseded`; never deleted).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

UNREADABLE_SUFFIX = ".unreadable"  # unreadable steps set aside by a resume that falls back past them
SUPERSEDED_SUFFIX = ".superseded"  # readable steps after the one a run resumed from
# JSON files Orbax parses for every step when a manager opens the directory: one that is damaged
# stops the whole directory from opening.
_READ_ON_OPEN = ("_CHECKPOINT_METADATA", "metrics/metrics")


def committed_steps(directory) -> list[int]:
    """Finished checkpoint steps in `directory`, ascending."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory)
                  if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def unreadable_step_dirs(directory) -> list[Path]:
    """Step directories with a damaged file of `_READ_ON_OPEN`, by step."""
    bad = []
    for step in committed_steps(directory):
        step_dir = Path(directory, str(step))
        for name in _READ_ON_OPEN:
            path = step_dir / name
            try:
                if path.is_file():
                    json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError, OSError):
                bad.append(step_dir)
                break
    return bad


def set_aside_step_dir(step_dir: Path, suffix: str = UNREADABLE_SUFFIX) -> Path:
    """Rename `<dir>/<step>` to `<dir>/<step><suffix>`, never over an existing one."""
    target = step_dir.with_name(f"{step_dir.name}{suffix}")
    number = 1
    while target.exists():
        target = step_dir.with_name(f"{step_dir.name}{suffix}.{number}")
        number += 1
    step_dir.rename(target)
    return target
