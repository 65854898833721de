"""Re-measure the README's "What to expect" figures for `make demo` and `make test` on this machine, and print them
as the README's table rows with the machine they came from. Run it on an idle machine (about 5 minutes on 2 CPU
cores); other benchmarks in this folder give the speed and memory figures of docs/benchmarks.md.

    python benchmarks/readme_figures.py            # both
    python benchmarks/readme_figures.py --skip-tests
"""
import argparse
import csv
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# make demo's training command (Makefile), into a temporary checkpoint folder.
DEMO = ["train.py", "--dataset", "shapes", "--image-size", "64", "--num-train", "2000", "--num-val", "200",
        "--time", "1m", "--lr", "3e-3", "--base-channels", "16", "--depth", "3", "--name", "demo"]


def machine():
    """The CPU model, the cores this process may use, and the widest instructions torch's kernels use."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M)
        model = names[0] if names else model
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{model}, {cores} cores, {torch.backends.cpu.get_cpu_capability()}, {gpu}, torch {torch.__version__}"


def run(command):
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: {' '.join(command[:3])} failed:\n{result.stderr[-2000:]}")
    return result.stdout, time.perf_counter() - start


def demo_row():
    with tempfile.TemporaryDirectory() as runs:
        output, seconds = run(DEMO + ["--checkpoint-dir", runs])
        run_dir = next(Path(runs).glob("demo-*"))
        with open(run_dir / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    parameters = re.search(r"([\d.]+) M parameters", output).group(1)
    best = max(rows, key=lambda row: float(row["score"]))
    return (f"| `make demo` | U-Net `--base-channels 16 --depth 3` ({parameters} M parameters), `--time 1m` on "
            f"2,000 synthetic 64x64 images: {rows[-1]['step']} steps in {len(rows)} epochs, {seconds:.1f} s for the "
            f"training command, start-up included; best validation mIoU {float(best['miou']):.3f} (pixel accuracy "
            f"{float(best['pixel_acc']):.3f}) |")


def tests_row():
    output, seconds = run(["-m", "pytest", "-q", str(ROOT / "tests")])
    summary = output.strip().splitlines()[-1]
    return f"| `make test` (packages installed) | {summary.strip('= ')}: {seconds:.0f} s |"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-tests", action="store_true", help="measure make demo only")
    args = parser.parse_args()
    print(f"measured on: {machine()}")
    print(demo_row())
    if not args.skip_tests:
        print(tests_row())


if __name__ == "__main__":
    main()
