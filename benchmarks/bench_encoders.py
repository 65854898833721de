"""Parameter counts and CPU training speed of every architecture, against the classic U-Net timed in the same run.

Example: python benchmarks/bench_encoders.py --size 256 --batch-size 2 --steps 2

Speed is images per second through a whole training step (forward, cross-entropy, backward, AdamW step with the
encoder's learning-rate group), timed over --steps steps after --warmup untimed ones, with random weights (the
speed does not depend on them). It is given twice: per second of wall-clock time, and per second of CPU time
used by this process; on a machine shared with other work, the second is the steadier one (with --threads 1
it is the single-core speed). Prints a markdown table (the one in docs/benchmarks.md).
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's modules (model, ...)

import torch
import torch.nn.functional as F

from benchmarks.common import add_threads_arg, use_threads
from model import ENCODERS, ModelConfig, build_model, count_parameters, parameter_groups


def architectures():
    """(label, ModelConfig) of the classic U-Net, every encoder U-Net (default decoder) and FCN-8s, as train.py's
    flags would give them (random encoder weights: the speed does not depend on them)."""
    yield "U-Net (classic, base 64)", ModelConfig(base_channels=64, depth=4)
    for encoder in ENCODERS:
        yield f"U-Net {encoder}", ModelConfig(encoder=encoder, encoder_weights="none")
    yield "FCN-8s vgg13", ModelConfig(arch="fcn", encoder="vgg13", encoder_weights="none")


def training_speed(model, batch_size, size, num_classes, steps, warmup):
    """Images per second of wall-clock time and per second of this process's CPU time, over whole training steps."""
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model, 1e-4, encoder_lr_factor=0.1))
    images = torch.randn(batch_size, 3, size, size)
    masks = torch.randint(0, num_classes, (batch_size, size, size))
    for step in range(warmup + steps):
        if step == warmup:
            wall, cpu = time.perf_counter(), time.process_time()
        loss = F.cross_entropy(model(images), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    images = batch_size * steps
    return images / (time.perf_counter() - wall), images / (time.process_time() - cpu)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="square image side")
    p.add_argument("--batch-size", type=int, default=2, help="images per step")
    p.add_argument("--steps", type=int, default=2, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--classes", type=int, default=21, help="number of classes (21: Pascal VOC)")
    add_threads_arg(p)
    p.add_argument("--only", nargs="+", default=None, metavar="WORD",
                   help="time only models whose label holds one of these words (the classic U-Net always)")
    args = p.parse_args(argv)
    threads = use_threads(args.threads)
    print(f"CPU training at {args.size}x{args.size}, batch {args.batch_size}, {args.classes} classes, "
          f"{threads} threads, {args.steps} timed steps after {args.warmup}\n")
    print("| model | parameters | images/s (wall) | images per CPU second | vs classic U-Net (CPU time) |")
    print("|---|---:|---:|---:|---:|")
    baseline, rows = None, []
    for label, config in architectures():
        if baseline is not None and args.only and not any(word in label for word in args.only):
            continue
        torch.manual_seed(0)
        model = build_model(config.check().model_args(args.classes))
        wall, cpu = training_speed(model, args.batch_size, args.size, args.classes, args.steps, args.warmup)
        baseline = baseline or cpu
        rows.append((label, count_parameters(model), wall, cpu))
        print(f"| {label} | {count_parameters(model):,} | {wall:.2f} | {cpu:.3f} | {cpu / baseline:.2f}x |",
              flush=True)
    return rows


if __name__ == "__main__":
    main()
