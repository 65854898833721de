"""Training speed of the classic U-Net (base 64, depth 4, 2 classes) at 256x256, batch 4: images/s, and the
fraction of this machine's matmul peak that the training step reaches (a large matmul is timed in the same
run; the step's FLOPs are counted with FlopCounterMode). Runs train.py's own step (engine.StepRunner).
Example: python benchmarks/bench_train.py    (fp32, then the default precision and layout of this device,
                                             precision.choose_precision, when they differ; on CUDA with
                                             torch.compile too; add --channels-last for fp32 + NHWC)
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's modules (model, train, ...)

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import add_threads_arg, add_unet_args, use_threads
from losses import segmentation_loss
from model import IMAGENET_NORMALIZE, UNet
from engine import StepRunner
from precision import Precision, choose_precision
from utils import pick_device


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    add_unet_args(p, base_channels=64, depth=4)
    p.add_argument("--steps", type=int, default=2, help="timed training steps per configuration")
    p.add_argument("--channels-last", action="store_true", help="also time fp32 with channels_last")
    p.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', ...")
    add_threads_arg(p)
    return p.parse_args()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device, dtype):
    """FLOP/s of the best of several large square matmuls."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(10 if device.type == "cuda" else 3):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def conv_gemm_peak(device, dtype):
    """FLOP/s of a large 1x1 convolution in channels_last: a GEMM run by the convolution library (oneDNN on
    CPUs). On AMD CPUs torch.matmul goes through MKL, which skips AVX-512 there: this GEMM can be twice as fast,
    so the step's fraction of it is the stricter figure."""
    channels, side = 1024, 64
    x = torch.randn(1, channels, side, side, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(channels, channels, 1, 1, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        torch.nn.functional.conv2d(x, w)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * channels ** 2 * side ** 2 / best


def make_runner(args, device, amp_dtype=None, channels_last=False, compile=False):
    model = UNet(3, 2, args.base_channels, args.depth).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    step_model = torch.compile(model) if compile else model
    return StepRunner(model=step_model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                      criterion=segmentation_loss, normalize=IMAGENET_NORMALIZE,
                      precision=Precision(amp_dtype, channels_last, "bench_train.py's choice"))


def step_flops(args):
    """FLOPs of one forward + backward, counted on the meta device (shapes only, no arithmetic)."""
    model = UNet(3, 2, args.base_channels, args.depth).to("meta")
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device="meta")
    masks = torch.randint(0, 2, (args.batch_size, args.image_size, args.image_size), device="meta")
    with FlopCounterMode(display=False) as counter:
        segmentation_loss(model(x), masks).backward()
    return counter.get_total_flops()


def timed_steps(runner, images, masks, steps, device, warmup, peak_dtype):
    """[(seconds of one training step, matmul FLOP/s timed just before it)] after `warmup` steps: pairing each
    step with its own peak keeps the fraction honest on a machine whose load changes."""
    for _ in range(warmup):
        runner.forward_backward(images, masks)
        runner.update()
    results = []
    for _ in range(steps):
        peak = matmul_peak(device, peak_dtype)
        sync(device)
        start = time.perf_counter()
        runner.forward_backward(images, masks)
        runner.update()
        sync(device)
        results.append((time.perf_counter() - start, peak))
    return results


def main():
    args = parse_args()
    device = pick_device(args.device)
    threads = use_threads(args.threads)
    torch.manual_seed(0)
    size, batch = args.image_size, args.batch_size
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    masks = torch.randint(0, 2, (batch, size, size), device=device)
    flops = step_flops(args)
    print(f"UNet base {args.base_channels} depth {args.depth}, {size}x{size}, batch {batch}, device {device}"
          f"{'' if device.type == 'cuda' else f', {threads} threads'}: "
          f"{flops / 1e9:.1f} GFLOP per training step (forward + backward)")
    configs = [("fp32", {}, torch.float32)]
    if args.channels_last:
        configs.append(("fp32 channels_last", {"channels_last": True}, torch.float32))
    precision = choose_precision(device)
    print(f"precision: {precision.describe()}")
    default = {"amp_dtype": precision.dtype, "channels_last": precision.channels_last}
    if precision.dtype or precision.channels_last:
        configs.append((f"default: {precision.summary}", default, precision.dtype or torch.float32))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")  # as train.py: TF32 in fp32 runs
        configs.append(("default + compile", {**default, "compile": True}, precision.dtype or torch.float32))
    baseline = None
    for name, options, peak_dtype in configs:
        runner = make_runner(args, device, **options)
        warmup = 3 if options.get("compile") else 1  # compile, and cudnn.benchmark, settle in the first steps
        results = timed_steps(runner, images, masks, args.steps, device, warmup, peak_dtype)
        seconds = statistics.median(s for s, _ in results)
        fraction = statistics.median(flops / s / peak for s, peak in results)
        peak = statistics.median(peak for _, peak in results)
        gemm = conv_gemm_peak(device, peak_dtype)
        baseline = baseline or seconds
        print(f"{name:<40} {batch / seconds:8.2f} images/s  {seconds * 1e3:8.1f} ms/step  "
              f"{flops / seconds / 1e12:.3f} TFLOP/s = {fraction:.2f} of the "
              f"{str(peak_dtype).removeprefix('torch.')} matmul peak ({peak / 1e12:.3f} TFLOP/s), "
              f"{flops / seconds / gemm:.2f} of a 1x1-conv GEMM ({gemm / 1e12:.3f} TFLOP/s)  "
              f"{baseline / seconds:.2f}x fp32")


if __name__ == "__main__":
    main()
