"""Stopping a training run on purpose: Ctrl-C or SIGTERM asks it to stop and save a resumable checkpoint."""
import signal
import sys
import threading
import time
from contextlib import contextmanager


class RunInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped the run (exit status 130, as for SIGINT); the message, if any, is the line that
    says what was saved."""


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks the run to stop at the next step and save a resumable checkpoint.
    A second Ctrl-C aborts (KeyboardInterrupt) at once, unless it comes within a second (torchrun forwards the
    first one) or a checkpoint is being saved: the save completes first."""

    def __init__(self):
        self.requested_at = None
        self.previous = {}
        self.saving = False
        self.abort_after_save = False

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
            if not self.saving:
                raise KeyboardInterrupt
            self.abort_after_save = True

    @contextmanager
    def saving_checkpoint(self):
        """A second Ctrl-C during the save aborts once the save is complete, never halfway."""
        self.saving = True
        try:
            yield
        finally:
            self.saving = False
        if self.abort_after_save:
            raise KeyboardInterrupt
