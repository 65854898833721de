"""Training step time with each number of data-loader workers: train.py's own loop on a folder of images and masks
(ISBI 2012's 30 slices when they lie beside the repo), timed between optimizer steps after the first few, one
setting after the other in this process. It shows what utils.default_workers decides: on 2 CPU cores a worker
process takes CPU from the model's threads.
Example: python benchmarks/bench_workers.py --workers 0 1 --steps 40
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import engine  # noqa: E402
import train  # noqa: E402

ISBI = ROOT.parent / "shared" / "data" / "isbi2012" / "train"


def step_seconds(images, masks, workers, steps, skip=5):
    """Median seconds between optimizer steps of a `steps`-step run, leaving out the first `skip`."""
    stamps, update = [], engine.StepRunner.update

    def timed_update(runner, *args, **kwargs):
        result = update(runner, *args, **kwargs)
        stamps.append(time.perf_counter())
        return result

    engine.StepRunner.update = timed_update
    try:
        with tempfile.TemporaryDirectory() as runs:
            train.main(["--images", str(images), "--masks", str(masks), "--epochs", "1", "--steps-per-epoch",
                        str(steps), "--workers", str(workers), "--sample-every", "0", "--checkpoint-dir", runs])
    finally:
        engine.StepRunner.update = update
    return statistics.median(b - a for a, b in zip(stamps[skip:], stamps[skip + 1:]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default=str(ISBI / "image"))
    p.add_argument("--masks", default=str(ISBI / "label"))
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    results = [(workers, step_seconds(args.images, args.masks, workers, args.steps)) for workers in args.workers]
    for workers, seconds in results:
        print(f"--workers {workers}: {seconds:.3f} s per training step ({results[0][1] / seconds:.2f}x "
              f"--workers {results[0][0]})")


if __name__ == "__main__":
    main()
