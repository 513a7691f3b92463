"""SIGINT/SIGTERM become a request to stop at the next step boundary, so the loop can finish the
pending checkpoint write instead of dying in the middle of it. A second signal stops at once."""

from __future__ import annotations

import signal
import threading


class StopRequested:
    """Context manager; `requested` turns true on the first SIGINT/SIGTERM, and `exit_code` is then
    the shell convention 128 + signal number (130 for Ctrl-C, 143 for SIGTERM)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False
