"""The pass size beyond which a CPU gains no throughput: CPU seconds per megapixel of one forward pass of the
classic U-Net (random weights) for square tiles and batches, in the precision predict.py picks on this CPU.

    nice -n 19 python benchmarks/bench_cpu_pass.py          # a few minutes of CPU time with the default U-Net

It measures CPU time (time.process_time, one torch thread), not wall time, so the figures hold on a machine that
other jobs load. Each size runs once untimed (one-off weight layouts and buffers), then --repeats times. The last
line names the smallest pass within --within of the best per-pixel cost: memory.CPU_PASS_PIXELS comes from it.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's modules

import torch

from benchmarks.common import add_unet_args
from inference import forward_probs, preprocess
from model import UNet
from precision import choose_precision

NORMALIZE = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def cpu_seconds_per_megapixel(model, side, batch, amp_dtype, repeats):
    images = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8)
    forward_probs(model, preprocess(images, NORMALIZE), amp_dtype=amp_dtype)  # untimed: one-off costs
    start = time.process_time()
    for _ in range(repeats):
        forward_probs(model, preprocess(images, NORMALIZE), amp_dtype=amp_dtype)
    return (time.process_time() - start) / repeats / (batch * side * side / 1e6)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_unet_args(p, base_channels=64, depth=4)
    p.add_argument("--sides", type=int, nargs="+", default=[256, 512, 768, 1024, 1536])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--within", type=float, default=0.05, help="share of the best cost that counts as no worse")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    precision = choose_precision(torch.device("cpu"))
    model = precision.prepare(UNet(3, 2, args.base_channels, args.depth).eval())
    print(f"U-Net base {args.base_channels}, depth {args.depth}; {precision.describe()}; 1 thread; CPU time")
    costs = {}
    with torch.inference_mode():
        for side in args.sides:
            for batch in args.batches:
                costs[side, batch] = cpu_seconds_per_megapixel(model, side, batch, precision.dtype, args.repeats)
                print(f"{side}x{side} x {batch}: {batch * side * side / 1e6:.2f} Mpx a pass, "
                      f"{costs[side, batch]:.2f} CPU s per Mpx", flush=True)
    best = min(costs.values())
    side, batch = min((key for key, cost in costs.items() if cost <= best * (1 + args.within)),
                      key=lambda key: key[1] * key[0] ** 2)
    print(f"best {best:.2f} CPU s per Mpx; smallest pass within {args.within:.0%} of it: {side}x{side} x {batch} "
          f"({batch * side * side:,} pixels)")


if __name__ == "__main__":
    main()
