"""Child processes of a sweep: at most N at once, one accelerator each, output prefixed.

Children start in their own session, so a Ctrl-C at the terminal reaches the sweep alone and the
sweep passes each SIGINT/SIGTERM on to every running child exactly once (the trainer saves and
stops at the next step boundary; a second signal stops it at once); nothing new starts after a
signal. Accelerators are counted without importing jax (CUDA_VISIBLE_DEVICES, else nvidia-smi),
and each child sees one of them through CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TextIO

SIGNALS = (signal.SIGINT, signal.SIGTERM)
POLL_SECONDS = 0.05


@dataclass(frozen=True)
class Job:
    label: str  # prefix of the child's output lines
    command: list[str]
    env: Mapping[str, str]


def detect_gpus(env: Mapping[str, str] = os.environ) -> list[str]:
    """CUDA device ids a child may be given: none when JAX_PLATFORMS leaves out cuda/gpu; the
    CUDA_VISIBLE_DEVICES list (up to its first invalid entry, as CUDA reads it) when set; else
    one per `GPU n:` line of `nvidia-smi -L`; none without nvidia-smi."""
    platforms = env.get("JAX_PLATFORMS", "").lower()
    if platforms and "cuda" not in platforms and "gpu" not in platforms:
        return []
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = []
        for item in (part.strip() for part in visible.split(",")):
            if not item or item.startswith("-"):
                break
            ids.append(item)
        return ids
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    if listing.returncode != 0:
        return []
    count = sum(1 for line in listing.stdout.splitlines() if line.startswith("GPU "))
    return [str(index) for index in range(count)]


class _SignalQueue:
    """Records SIGINT/SIGTERM (main thread only) for the loop to pass on; restores on exit."""

    def __init__(self):
        self.received: list[int] = []
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def _record(self, signum, frame):
        self.received.append(signum)

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


def _copy_lines(pipe, prefix: str, stream: TextIO, lock: threading.Lock) -> None:
    for raw in iter(pipe.readline, b""):
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        with lock:
            print(prefix + line, file=stream, flush=True)
    pipe.close()


def run_jobs(jobs: Iterable[Job], slots: list[str | None], *,
             on_start: Callable[[Job, str | None], None],
             on_exit: Callable[[Job, int, bool], None],
             stream: TextIO | None = None, lock: threading.Lock | None = None) -> int | None:
    """Run `jobs` in order, one per free slot (a CUDA device id, or None for no pinning).

    `on_start(job, slot)` is called once the child runs, `on_exit(job, returncode, stopping)`
    once it has ended and its output is printed (`stopping`: a signal was passed on to it).
    Returns the first signal received (the sweep stopped), or None when every job ran.
    """
    pending, free = deque(jobs), list(slots)
    stream = sys.stdout if stream is None else stream
    running: list[tuple[Job, subprocess.Popen, threading.Thread, str | None]] = []
    lock = lock or threading.Lock()
    passed_on = 0
    with _SignalQueue() as signals:
        while pending or running:
            while pending and free and not signals.received:
                job, slot = pending.popleft(), free.pop(0)
                env = dict(job.env)
                if slot is not None:
                    env["CUDA_VISIBLE_DEVICES"] = slot
                process = subprocess.Popen(job.command, env=env, stdin=subprocess.DEVNULL,
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           start_new_session=True)
                reader = threading.Thread(target=_copy_lines, daemon=True,
                                          args=(process.stdout, f"[{job.label}] ", stream, lock))
                reader.start()
                running.append((job, process, reader, slot))
                on_start(job, slot)
            for signum in signals.received[passed_on:]:
                for _, process, _, _ in running:
                    try:
                        os.kill(process.pid, signum)
                    except ProcessLookupError:
                        pass
            passed_on = len(signals.received)
            for entry in list(running):
                job, process, reader, slot = entry
                if process.poll() is None:
                    continue
                reader.join()
                running.remove(entry)
                free.append(slot)
                on_exit(job, process.returncode, bool(signals.received))
            if signals.received and not running:
                break
            time.sleep(POLL_SECONDS)
    return signals.received[0] if signals.received else None
