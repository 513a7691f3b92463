"""What goes wrong with a checkpoint, as exceptions whose message is one line."""


class CheckpointError(Exception):
    """A checkpoint could not be saved or restored; the message is one line."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint on disk is unreadable (missing files, truncated data, bad JSON)."""


class CheckpointMismatchError(CheckpointError):
    """The restore target's structure, shapes or dtypes differ from the saved state."""


class CheckpointVersionWarning(UserWarning):
    """The checkpoint was written by other library versions than the running ones."""


def first_line(error: BaseException, limit: int = 240) -> str:
    """One short line from an exception: its type and the first line of its message."""
    text = (str(error).strip().splitlines() or [""])[0]
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}"
