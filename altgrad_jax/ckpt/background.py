"""One daemon thread that runs submitted jobs in order, for work the training loop must not wait on.

`submit` only queues the job: starting a thread per job would hand it the GIL at once, and the
caller would wait for it to give the GIL back (up to the 5 ms switch interval) before going on.
The thread is a daemon so that a process told to stop at once (a second Ctrl-C) is not kept
alive by a job; orderly shutdowns wait for the futures first.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from typing import Any, Callable


class BackgroundWorker:
    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], Any]) -> concurrent.futures.Future:
        """Queue `job`; its result or exception comes back through the returned future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((job, future))
        return future

    def close(self) -> None:
        """Wait for the jobs already queued, then end the thread. Joining matters: a job's last
        references (device buffers) are released on this thread, and a daemon thread still doing
        that in native code when the interpreter exits aborts the process."""
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, future = item
            del item
            if not future.set_running_or_notify_cancel():
                continue
            result, error = None, None
            try:
                result = job()
            except BaseException as caught:  # handed to whoever waits on the future
                error = caught
            # Drop the job (and the buffers it holds) before the waiter is told it is done, so
            # that they are not kept alive until the next job arrives.
            del job
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)
            del future, result, error
