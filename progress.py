"""Progress of long jobs: a tqdm bar on a terminal; in a log file or a cluster job's output, where a bar would be
thousands of carriage returns, a plain line every `every` seconds with what is done, the rate and the time left."""
import sys
import time

from tqdm import tqdm

from utils import progress_bars

PLAIN_EVERY = 30.0  # seconds between plain progress lines


def duration(seconds):
    """'45s', '3m07s', '2h05m'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Counts `total` units (images, tiles, batches) of the job `desc`, `done` of them done before (a resumed
    epoch: the rate counts only this session's). bar None: a tqdm bar where stderr is a terminal
    (utils.progress_bars), plain lines to `out` (stdout) every `every` seconds (PLAIN_EVERY) otherwise. Use as a
    context manager, or call close()."""

    def __init__(self, total, desc, unit, bar=None, every=None, clock=time.monotonic, out=None, leave=True,
                 position=None, done=0):
        self.total, self.desc, self.unit, self.clock = total, desc, unit, clock
        self.every = PLAIN_EVERY if every is None else every
        self.out = out or sys.stdout
        self.done = self.first_done = done
        self.start = self.last_line = clock()
        use_bar = progress_bars() if bar is None else bar
        self.bar = tqdm(total=total, desc=desc, unit=f" {unit}", leave=leave, position=position) if use_bar else None

    def update(self, count=1):
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
            return
        now = self.clock()
        if now - self.last_line >= self.every:
            self.last_line = now
            print(self.line(now), file=self.out, flush=True)

    def line(self, now):
        """'predict: 12/100 images (12%), 0.41 images/s, 3m35s left'."""
        rate = (self.done - self.first_done) / max(now - self.start, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = duration(left) if left != float("inf") else "unknown"
        return (f"{self.desc}: {self.done}/{self.total} {self.unit} ({self.done / max(self.total, 1):.0%}), "
                f"{rate:.2f} {self.unit}/s, {eta} left")

    def write(self, message):
        """A line of output that does not break the bar."""
        if self.bar is not None:
            self.bar.write(message, file=self.out)
        else:
            print(message, file=self.out)

    def close(self):
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
