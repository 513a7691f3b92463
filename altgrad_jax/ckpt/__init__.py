"""Checkpoints: the train state on disk, written without stalling the loop, and restored exactly.

manager.py             CheckpointManager (last N + best, anomaly saves), save_checkpoint / load_checkpoint
safetensors_handler.py the state's arrays as one safetensors file, inside Orbax's step directories
metadata.py            what is saved beside the arrays (versions, leaf signatures) and the checks on restore
background.py          the thread that writes a save while the loop goes on
step_dirs.py           step directories on disk: listing, damaged ones, setting steps aside
resume.py              `--resume auto|never|PATH`: where a run starts from
errors.py              CheckpointError and its kinds
"""

from altgrad_jax.ckpt.errors import (CheckpointCorruptError, CheckpointError, CheckpointMismatchError,
                                     CheckpointVersionWarning)
from altgrad_jax.ckpt.manager import CheckpointManager, load_checkpoint, load_checkpoint_metadata, save_checkpoint

__all__ = ["CheckpointCorruptError", "CheckpointError", "CheckpointManager", "CheckpointMismatchError",
           "CheckpointVersionWarning", "load_checkpoint", "load_checkpoint_metadata", "save_checkpoint"]
