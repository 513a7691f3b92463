"""SIGINT/SIGTERM become a request to stop at the next step boundary, so the loop can finish the
pending checkpoint write instead of dying in the middle of it. A second signal stops at once."""

from __future__ import annotations

import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def stop_at_once(signum, frame=None):
    """Signal handler: exit now with 128 + signum, after one line on stderr.

    It exits right here rather than raise KeyboardInterrupt: an exception raised from a signal
    handler can land in a callback that swallows it, and a normal interpreter exit aborts while
    a checkpoint thread is still in native code. Files written line by line (the metrics) are
    complete; an unfinished checkpoint is ignored and cleaned up on the next start.
    """
    print(f"{signal.Signals(signum).name}: stopped at once", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(128 + signum)


class _SignalHandlers:
    """Installs `self._handle` for SIGNALS on entry (main thread only), restores on exit."""

    def __init__(self):
        self._previous = {}

    def _handle(self, signum, frame):
        raise NotImplementedError

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


class StopAtOnce(_SignalHandlers):
    """Context manager: SIGINT/SIGTERM end the process at once (`stop_at_once`), without a
    traceback. For the work around the training loop, where there is nothing to finish."""

    def _handle(self, signum, frame):
        stop_at_once(signum, frame)


class StopRequested(_SignalHandlers):
    """Context manager; `requested` turns true on the first SIGINT/SIGTERM, and `exit_code` is then
    the shell convention 128 + signal number (130 for Ctrl-C, 143 for SIGTERM). A second signal
    stops at once."""

    def __init__(self):
        super().__init__()
        self.signum = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def _handle(self, signum, frame):
        if self.requested:
            stop_at_once(signum, frame)
        self.signum = signum
