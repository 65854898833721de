"""Stopping a training run on purpose: Ctrl-C or SIGTERM asks it to stop and save a resumable checkpoint."""
import signal
import sys
import threading
import time


class RunInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped the run after saving a resumable checkpoint (exit status 130, as for SIGINT)."""


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks the run to stop at the next step and save a resumable checkpoint.
    A second Ctrl-C aborts at once, unless it comes within a second: torchrun forwards the first one."""

    def __init__(self):
        self.requested_at = None
        self.previous = {}

    @property
    def requested(self):
        return self.requested_at is not None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame):
        now = time.monotonic()
        if self.requested_at is None:
            self.requested_at = now
            print("\nstopping after this step to save a resumable checkpoint (Ctrl-C again to abort)",
                  file=sys.stderr)
        elif now - self.requested_at > 1.0:
            raise KeyboardInterrupt
