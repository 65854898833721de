"""GPU check: one command that runs every CUDA path of the project on a GPU machine, meant to take under 8
minutes (not yet timed on one), and prints one line per check: PASS with its figures, or FAIL with the reason.

    python benchmarks/gpu_check.py                    # every check, in order
    python benchmarks/gpu_check.py --only oom ddp     # these checks only (--list names them all)
    python benchmarks/gpu_check.py --quick            # shorter: a 1-minute budget, a 4,000 x 4,000 image, ...
    python benchmarks/gpu_check.py --logs gpu-logs    # also keep each check's full output, gpu-logs/NAME.log

Each check runs in a fresh process under its own time limit, so that a CUDA error, a hang or the memory cap of
one check cannot touch the next; the exit status is 1 when any check failed. The checks use the project's own
code: train.py, eval.py and predict.py as a user runs them, and the library functions they call. Without CUDA
the script says so in one line and exits 0 after checking its arguments, so that CI can run it.
What each check does and what it must find: docs/benchmarks.md.
"""
import argparse
import json
import math
import os
import re
import runpy
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo's modules (train, inference, ...)

import numpy as np
import torch
from PIL import Image

from errors import ConfigError, one_line
from utils import count, pick_device

SCRIPT = Path(__file__).resolve()
RESULT = "gpu_check result: "  # starts the line of a check's process that carries its result, as JSON
WORKER_RESULT = "gpu_check worker: "  # the same for a torchrun worker
MIB = 2 ** 20


class CheckFailed(Exception):
    """A check ran, but what it found is wrong; the message says what."""


@dataclass(frozen=True)
class Options:
    device: str = "cuda"
    quick: bool = False


@dataclass(frozen=True)
class Check:
    name: str
    what: str  # one line, for --list
    run: Callable  # run(Options) -> its figures (str); raises when the check fails
    limit: int  # seconds its process may take


@dataclass
class Result:
    name: str
    passed: bool
    text: str  # figures, or the reason of the failure
    seconds: float

    def line(self):
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name:<13} {self.text}  ({self.seconds:.0f} s)"


def expect(condition, reason):
    if not condition:
        raise CheckFailed(reason)


def last_line(text):
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def error_of(output):
    """The line that says why a process failed: its last 'error: ...' or exception line (also one of a torchrun
    worker, '[rank1]: ...'; torchrun's own summary left out), else its last line."""
    said = [line.strip() for line in output.splitlines()
            if re.match(r"(\[rank\d+\]:\s*)?(error:|[\w.]+(Error|Exception)\b)", line.strip())
            and "ChildFailedError" not in line]
    return said[-1] if said else last_line(output)


def run_script(args, timeout=None, env=None):
    """python ARGS (a script of the repository, or -m module) as a user runs it; its output goes to this check's
    log. Returns the completed process; CheckFailed with its last error line when it fails."""
    args = [str(arg) for arg in args]
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    print(f"$ python {' '.join(args)}\n{result.stdout}{result.stderr}", flush=True)
    if result.returncode != 0:
        name = args[1] if args[0] == "-m" else Path(args[0]).name
        raise CheckFailed(f"{name} exited with status {result.returncode}: {error_of(result.stderr)}")
    return result


def only_file(folder, pattern, what):
    """The one file of `folder` that matches `pattern`; CheckFailed saying that `what` made none (or several)."""
    found = sorted(Path(folder).glob(pattern))
    expect(len(found) == 1, f"{what} left {len(found)} {pattern} files in {folder}, not one")
    return found[0]


def reported(stdout, prefix=RESULT):
    """The JSON a process printed after `prefix`."""
    lines = [line for line in stdout.splitlines() if line.startswith(prefix)]
    expect(lines, f"no result line in the output ({error_of(stdout)})")
    return json.loads(lines[-1][len(prefix):])


# --- training steps: engine.StepRunner (train.py's step), through bench_train.make_runner -------------------------

STEP_MODEL = SimpleNamespace(base_channels=16, depth=3)  # a small U-Net: the checks test paths, not speed
LEARNING_PER_STEP = 0.003  # the fixed batch's loss must fall by this share a step (about 0.0075 measured on a CPU)
LOSS_TOLERANCE = 0.02  # bf16 and fp16 first losses, compiled and channels_last ones, against the reference


def shapes_batch(device, batch=16, size=64):
    """A fixed batch of synthetic shapes: uint8 images, masks of shape (1) against background (0), on `device`."""
    from synthetic import Shapes

    images, masks = zip(*(Shapes(batch, size, 0, "train")[i] for i in range(batch)))
    return torch.stack(images).to(device), (torch.stack(masks) > 0).long().to(device)


def train_steps(options, steps, amp_dtype=None, channels_last=False, compile=False):
    """`steps` optimisation steps of train.py's StepRunner (engine.py; bench_train.make_runner builds it) on one
    fixed batch, from the same initial weights whatever the options. Returns (losses, seconds of each step, runner,
    the dtypes of the model's outputs and whether its inputs were channels_last: seen through a hook, without
    compile)."""
    from benchmarks.bench_train import make_runner, sync

    device = torch.device(options.device)
    if device.type == "cuda":  # as train.py
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    torch.manual_seed(0)
    runner = make_runner(STEP_MODEL, device, amp_dtype, channels_last, compile)
    seen = set()
    if not compile:
        runner.model.register_forward_hook(lambda module, inputs, output: seen.add(
            (output.dtype, inputs[0].is_contiguous(memory_format=torch.channels_last))))
    images, masks = shapes_batch(device)
    losses, seconds = [], []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        losses.append(runner.forward_backward(images, masks).item())
        runner.update()
        sync(device)
        seconds.append(time.perf_counter() - start)
    expect(all(map(math.isfinite, losses)), f"non-finite training losses: {losses}")
    return losses, seconds, runner, seen


def step_count(options):
    return 10 if options.quick else 30


def expect_learning(losses):
    expect(losses[-1] <= losses[0] * (1 - LEARNING_PER_STEP * len(losses)),
           f"the loss of a fixed batch fell only from {losses[0]:.4f} to {losses[-1]:.4f} in {len(losses)} steps")


def expect_close(loss, reference, what):
    expect(abs(loss - reference) <= LOSS_TOLERANCE * reference,
           f"{what}: first loss {loss:.4f}, more than {LOSS_TOLERANCE:.0%} from {reference:.4f}")


def milliseconds(seconds):
    """The median step time after the first (which sets up kernels, or compiles), in ms."""
    later = sorted(seconds[1:] or seconds)
    return later[len(later) // 2] * 1e3


def check_precision(options, name):
    """Training steps in fp32, or under bf16 or fp16 autocast (fp16 with the GradScaler)."""
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    losses, seconds, runner, seen = train_steps(options, step_count(options), dtype)
    expect({output for output, _ in seen} == {dtype or torch.float32},
           f"the model's outputs were {sorted(map(str, seen))}: autocast did not run the forward pass in {name}")
    expect_learning(losses)
    figure = f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {len(losses)} steps, {milliseconds(seconds):.1f} ms/step"
    if dtype is None:
        return figure
    reference = train_steps(options, 1)[0][0]
    expect_close(losses[0], reference, name)
    figure += f"; first loss {losses[0]:.4f} against fp32's {reference:.4f}"
    if dtype == torch.float16:
        scaler = runner.scaler
        expect(scaler.is_enabled(), "fp16 training runs without its GradScaler")
        scale = scaler.get_scale()
        skipped = round(math.log2(2 ** 16 / scale))  # the scale starts at 2^16 and halves at each skipped step
        expect(skipped < len(losses) // 2, f"{skipped} of {len(losses)} steps skipped for infinite gradients")
        figure += f"; GradScaler scale {scale:g} ({skipped} step(s) skipped)"
    return figure


def check_channels_last(options):
    """bf16 steps with the model and its inputs in channels_last, against the same steps contiguous."""
    steps = step_count(options)
    plain_losses, plain_seconds, _, _ = train_steps(options, steps, torch.bfloat16)
    losses, seconds, runner, seen = train_steps(options, steps, torch.bfloat16, channels_last=True)
    expect(seen == {(torch.bfloat16, True)},
           f"the model's inputs were not channels_last under bf16 (dtype, channels_last: {seen})")
    kernels = [p for p in runner.model.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    expect(all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels),
           "convolution weights left channels_last during the steps")
    expect_close(losses[0], plain_losses[0], "channels_last")
    expect_learning(losses)
    return (f"{milliseconds(seconds):.1f} ms/step against {milliseconds(plain_seconds):.1f} contiguous "
            f"({milliseconds(plain_seconds) / milliseconds(seconds):.2f}x); first loss {losses[0]:.4f} against "
            f"{plain_losses[0]:.4f}; weights still channels_last after {steps} steps")


# --- train.py, eval.py, predict.py --------------------------------------------------------------------------------

TINY_RUN = ["--dataset", "shapes", "--image-size", "32", "--num-train", "64", "--base-channels", "8", "--depth", "2",
            "--batch-size", "4"]


def check_compile(options):
    """The StepRunner with torch.compile against eager, both in the device's default precision, then train.py
    --compile for a few steps: its checkpoint must load."""
    from checkpoints import load_model
    from precision import choose_precision

    precision = choose_precision(options.device)
    steps = 5 if options.quick else 10
    eager, eager_seconds, _, _ = train_steps(options, steps, precision.dtype, precision.channels_last)
    losses, seconds, _, _ = train_steps(options, steps, precision.dtype, precision.channels_last, compile=True)
    for step, (loss, reference) in enumerate(zip(losses[:3], eager[:3])):
        expect(abs(loss - reference) <= LOSS_TOLERANCE * reference,
               f"compiled step {step + 1}: loss {loss:.4f}, eager {reference:.4f}")
    expect_learning(losses)
    with tempfile.TemporaryDirectory() as work:
        run_script(["train.py", *TINY_RUN, "--num-val", "8", "--compile", "--epochs", "1", "--steps-per-epoch", "5",
                    "--device", options.device, "--checkpoint-dir", work])
        # the plain model's keys, not those of the compiled wrapper (_orig_mod.*)
        load_model(only_file(work, "*/last.pth", "train.py --compile"))
    return (f"{precision.summary}: first step {seconds[0]:.1f} s (compiling), then {milliseconds(seconds):.1f} "
            f"ms/step against {milliseconds(eager_seconds):.1f} eager, losses within {LOSS_TOLERANCE:.0%} of "
            f"eager's; train.py --compile: 5 steps, its last.pth loads")


def mask_agreement(predicted_folder, truth_folder):
    """Share of pixels where the predicted label images (predict.py) hold the true masks' values."""
    same = total = 0
    for truth in sorted(Path(truth_folder).glob("*.png")):
        with Image.open(truth) as t, Image.open(Path(predicted_folder) / f"{truth.stem}_mask.png") as p:
            same += int((np.array(t) == np.array(p)).sum())
            total += t.width * t.height
    expect(total, f"no true masks in {truth_folder}")
    return same / total


def check_budget(options):
    """train.py --time on the synthetic shapes, then eval.py and predict.py with its best.pth."""
    from checkpoints import load_checkpoint

    budget = 60 if options.quick else 120
    device = ["--device", options.device]
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        start = time.monotonic()
        run_script(["train.py", "--dataset", "shapes", "--time", f"{budget}s", *device, "--checkpoint-dir",
                    work / "runs"])
        seconds = time.monotonic() - start
        expect(seconds <= budget * 1.05, f"train.py --time {budget}s took {seconds:.0f} s")
        best = only_file(work / "runs", "*/best.pth", f"train.py --time {budget}s")
        trained = load_checkpoint(best)
        run_script(["eval.py", "-m", best, "--dataset", "shapes", "--split", "val", "--json", work / "scores.json",
                    *device])
        miou, validation = json.loads((work / "scores.json").read_text())["miou"], trained["metrics"]["miou"]
        expect(miou >= 0.5, f"eval.py scored mIoU {miou:.3f} after {budget} s of training")
        expect(abs(miou - validation) <= 0.01, f"eval.py's mIoU {miou:.4f} is not training's {validation:.4f}")
        run_script(["synthetic.py", "--out", work / "samples", "--count", "4", "--image-size", "64"])
        run_script(["predict.py", "-m", best, "-i", work / "samples" / "images", "-o", work / "predicted", *device])
        accuracy = mask_agreement(work / "predicted", work / "samples" / "masks")
        expect(accuracy >= 0.8, f"predict.py's masks match the truth on only {accuracy:.1%} of the pixels")
    return (f"train.py --time {budget}s: {seconds:.0f} s, {count(trained['step'], 'step')}, validation mIoU "
            f"{validation:.4f}; eval.py mIoU {miou:.4f}; predict.py on 4 new images: pixel accuracy {accuracy:.3f}")


def huge_side(options):
    return 4000 if options.quick else 10000


def predict_peak(argv, device):
    """predict.main(argv) in this process: (seconds, peak GPU memory allocated in MiB)."""
    import predict

    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    predict.main([str(arg) for arg in argv])
    return time.perf_counter() - start, torch.cuda.max_memory_allocated(device) / MIB


def check_tiled(options):
    """predict.py --tile 1024 of a 10,000 x 10,000 image, and of a 2,048 x 2,048 one: the peak GPU memory must
    not grow with the image (tiles go to the GPU a batch at a time, the probabilities stay on the CPU)."""
    from benchmarks.bench_predict import synthetic_photo, write_checkpoint

    side = huge_side(options)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        model = write_checkpoint(work / "model.pth", 16, 4)
        figures = {}
        for size in (2048, side):
            synthetic_photo(work / f"{size}.jpg", size, size, size)
            figures[size] = predict_peak(["-m", work / "model.pth", "-i", work / f"{size}.jpg", "-o", work / "out",
                                          "--tile", "1024", "--device", options.device], options.device)
        with Image.open(work / "out" / f"{side}_mask.png") as mask:
            expect(mask.size == (side, side), f"the mask of the {side}x{side} image is {mask.size}")
    (small_seconds, small_peak), (seconds, peak) = figures[2048], figures[side]
    expect(peak <= 1.25 * small_peak + 64, f"peak GPU memory {peak:.0f} MiB for {side}x{side} against "
                                           f"{small_peak:.0f} MiB for 2048x2048: it grows with the image")
    return (f"{side}x{side}, --tile 1024 ({model}): {seconds:.1f} s, peak GPU memory {peak:.0f} MiB "
            f"(2048x2048: {small_seconds:.1f} s, {small_peak:.0f} MiB)")


def check_whole(options):
    """predict.py without --tile on a 10,000 x 10,000 image with the classic U-Net (base 64): the whole image
    in one pass, or the fall-back to tiles when it does not fit; never an error."""
    from benchmarks.bench_predict import synthetic_photo, write_checkpoint

    side = huge_side(options)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        write_checkpoint(work / "model.pth", 64, 4)
        synthetic_photo(work / "huge.jpg", side, side, 1)
        start = time.perf_counter()
        result = run_script(["predict.py", "-m", work / "model.pth", "-i", work / "huge.jpg", "-o", work / "out",
                             "--device", options.device])
        seconds = time.perf_counter() - start
        with Image.open(work / "out" / "huge_mask.png") as mask:
            expect(mask.size == (side, side), f"the mask of the {side}x{side} image is {mask.size}")
    fallback = re.findall(r"falling back to --tile \d+", result.stderr)
    return f"{side}x{side} in {seconds:.1f} s: " + (", then ".join(fallback) if fallback else "whole, no fall-back")


def balance_labels(model, probs):
    """Shift a random U-Net's output bias so that it labels about half of the image each class: its labels are
    otherwise one class everywhere (probabilities all near 0.58), and comparing them would tell nothing."""
    foreground = probs[:, 1].double().clamp(1e-12, 1 - 1e-12)
    with torch.no_grad():
        model.outc.bias[1] -= (foreground / (1 - foreground)).log().median().item()


def check_oom(options):
    """The out-of-memory fall-back: whole-image prediction under a memory cap of half its peak
    (torch.cuda.set_per_process_memory_fraction) must fall back to tiles and give those tiles' labels. In fp32,
    whose fine logits let the labels' split follow the image rather than bf16's rounding."""
    from benchmarks.bench_predict import synthetic_photo, write_checkpoint
    from checkpoints import load_model
    from images import read_image
    from inference import InferenceConfig, predict_probs, predict_probs_or_tile, probs_to_labels, use_precision

    device, side = torch.device(options.device), 3072 if options.quick else 4096
    with tempfile.TemporaryDirectory() as work:
        write_checkpoint(Path(work) / "model.pth", 16, 4)
        synthetic_photo(Path(work) / "image.jpg", side, side, 0)
        model, checkpoint = load_model(Path(work) / "model.pth", device)
        image = read_image(Path(work) / "image.jpg")[None]
    settings = {**use_precision(model, InferenceConfig(amp="off"), log=print).options(), "batch_size": 4}

    def probs(**more):
        return predict_probs(model, image, checkpoint["normalize"], **{**settings, **more})

    balance_labels(model, probs())
    torch.cuda.reset_peak_memory_stats(device)
    whole = probs_to_labels(probs()).cpu()
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(peak / 2 / torch.cuda.get_device_properties(device).total_memory, device)
    said = []
    try:
        fallback, used = predict_probs_or_tile(model, image, checkpoint["normalize"], log=said.append, **settings)
        fallback = probs_to_labels(fallback).cpu()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    expect(said, f"no out-of-memory error under a cap of {peak / 2 / MIB:.0f} MiB: nothing fell back")
    same_as_tiles = (fallback == probs_to_labels(probs(tile=used["tile"])).cpu()).double().mean().item()
    same_as_whole = (fallback == whole).double().mean().item()
    expect(same_as_tiles >= 0.9999, f"the fall-back's labels match --tile {used['tile']}'s on only {same_as_tiles:.4%}")
    expect(same_as_whole >= 0.95, f"the fall-back's labels match the whole image's on only {same_as_whole:.2%}")
    return (f"{side}x{side} whole, fp32: peak {peak / MIB:.0f} MiB; capped at half: {said[-1]}; labels ("
            f"{whole.double().mean().item():.0%} foreground) = --tile {used['tile']}'s on {same_as_tiles:.2%} of "
            f"the pixels, the whole image's on {same_as_whole:.2%}")


# --- torchrun and NCCL: two processes, on two GPUs or sharing one --------------------------------------------------

def torchrun(args, processes=2):
    """`python -m torch.distributed.run` (torchrun) of this script's worker in `processes` processes. On fewer GPUs
    than processes they share them (the worker maps LOCAL_RANK onto the GPUs), which NCCL refuses unless
    NCCL_MULTI_RANK_GPU_ENABLE=1."""
    env = {"OMP_NUM_THREADS": "1"}
    if torch.cuda.device_count() < processes:
        env["NCCL_MULTI_RANK_GPU_ENABLE"] = "1"
    return run_script(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", SCRIPT,
                       "--worker", *args], env=env)


def worker(argv):
    """One torchrun process: `train ARGS...` runs train.py with ARGS, `syncbn DEVICE` the SyncBatchNorm check.
    distributed.init_distributed takes GPU LOCAL_RANK: with fewer GPUs than processes, LOCAL_RANK wraps around."""
    gpus = torch.cuda.device_count()
    if gpus:
        os.environ["LOCAL_RANK"] = str(int(os.environ["LOCAL_RANK"]) % gpus)
    kind, *args = argv
    if kind == "train":
        sys.argv = [str(ROOT / "train.py"), *args]
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    elif kind == "syncbn":
        syncbn_worker(*args)
    else:
        raise ValueError(f"unknown worker {kind}")


def sharing():
    gpus = torch.cuda.device_count()
    return f"2 processes on {'2 GPUs' if gpus >= 2 else 'one GPU'} (NCCL {nccl_version()})"


def check_ddp(options):
    """train.py --sync-bn under torchrun with NCCL: DDP steps, validation shared by the processes; the checkpoint's
    scores must be those of one process scoring the checkpoint on the whole validation set. In fp32 without TF32
    (--amp off, NVIDIA_TF32_OVERRIDE=0 for both), so that no label flips with the convolution algorithm chosen."""
    from checkpoints import load_model
    from inference import evaluate
    from synthetic import Shapes

    os.environ["NVIDIA_TF32_OVERRIDE"] = "0"  # read by cuBLAS and cuDNN, here and in torchrun's processes
    device = torch.device(options.device)
    with tempfile.TemporaryDirectory() as work:
        result = torchrun(["train", *TINY_RUN, "--num-val", "7", "--epochs", "2", "--steps-per-epoch", "4",
                           "--amp", "off", "--sync-bn", "--device", device.type, "--checkpoint-dir", work])
        expect(len(re.findall(r"device \S+ x 2,", result.stdout)) == 1, "not one 'device ... x 2' line from rank 0")
        model, checkpoint = load_model(only_file(work, "*/last.pth", "train.py under torchrun"), device)
    loader = torch.utils.data.DataLoader(Shapes(7, 32, 0, "val"), batch_size=1)
    single = evaluate(model, loader, 4, checkpoint["normalize"], checkpoint["ignore_index"], device)
    trained = checkpoint["metrics"]
    expect(checkpoint["step"] == 8, f"the run made {checkpoint['step']} steps, not 2 epochs of 4")
    expect(abs(trained["miou"] - single["miou"]) <= 0.005 and abs(trained["pixel_acc"] - single["pixel_acc"]) <= 1e-3,
           f"validation under torchrun: mIoU {trained['miou']:.4f}, pixel accuracy {trained['pixel_acc']:.4f}; one "
           f"process: {single['miou']:.4f}, {single['pixel_acc']:.4f}")
    return (f"{sharing()}, fp32, --sync-bn: 8 steps; validation mIoU {trained['miou']:.4f}, pixel accuracy "
            f"{trained['pixel_acc']:.4f} = one process's {single['miou']:.4f}, {single['pixel_acc']:.4f}")


def relative_difference(pairs):
    """||a - b|| / ||b|| over all the (a, b) tensor pairs taken as one vector each (the floating-point ones): a
    tensor that is nearly zero on both sides cannot blow it up."""
    pairs = [(a.flatten().double(), b.flatten().double()) for a, b in pairs if b.is_floating_point()]
    if not pairs:
        return 0.0
    a, b = torch.cat([a for a, _ in pairs]), torch.cat([b for _, b in pairs])
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def syncbn_worker(device_name):
    """Each process runs its half of a batch through engine.prepare_model's SyncBatchNorm U-Net in DDP; outputs,
    BatchNorm statistics and gradients must equal those of one plain U-Net on the whole batch (fp32, no TF32)."""
    import copy

    from distributed import all_gather_objects, init_distributed
    from inference import preprocess
    from losses import segmentation_loss
    from model import IMAGENET_NORMALIZE, UNet
    from precision import choose_precision
    from engine import prepare_model, wrap_for_steps
    from utils import pick_device

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    device, rank, world_size = init_distributed(pick_device(device_name))
    images, masks = shapes_batch(device, batch=4 * world_size, size=32)
    x, mine = preprocess(images, IMAGENET_NORMALIZE), slice(4 * rank, 4 * rank + 4)
    torch.manual_seed(0)
    single = UNet(3, 2, 8, 2).to(device)
    fp32 = choose_precision(device, amp="off", channels_last="off")
    synced = prepare_model(copy.deepcopy(single), True, fp32, device, world_size)
    step_model, _ = wrap_for_steps(synced, False, device, world_size)
    outputs = step_model(x[mine])
    segmentation_loss(outputs, masks[mine]).backward()
    reference = single(x)
    segmentation_loss(reference, masks).backward()
    gradients = [(a.grad, b.grad) for a, b in zip(synced.parameters(), single.parameters())]
    difference = max(relative_difference(pairs) for pairs in ([(outputs, reference[mine])], gradients,
                                                              list(zip(synced.buffers(), single.buffers()))))
    converted = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    found = all_gather_objects((converted, difference))
    if rank == 0:
        result = {"converted": min(c for c, _ in found), "difference": max(d for _, d in found)}
        print(WORKER_RESULT + json.dumps(result))
    torch.distributed.destroy_process_group()


def check_syncbn(options):
    """SyncBatchNorm under torchrun: the numbers of syncbn_worker (the ddp check runs train.py --sync-bn)."""
    found = reported(torchrun(["syncbn", options.device]).stdout, WORKER_RESULT)
    expect(found["converted"] > 0, "engine.prepare_model made no SyncBatchNorm layer")
    expect(found["difference"] <= 1e-4, f"SyncBatchNorm in DDP differs from BatchNorm on the whole batch by "
                                        f"{found['difference']:.2e} (relative)")
    return (f"{sharing()}: {found['converted']} SyncBatchNorm layers; outputs, statistics and DDP gradients "
            f"= one BatchNorm over the whole batch (largest relative difference {found['difference']:.1e})")


# --- data loading and the matmul peak -------------------------------------------------------------------------------

def copy_bandwidth(tensor, device, repeats=5):
    """GB/s of the fastest of `repeats` host-to-device copies of `tensor` (non_blocking, as training copies)."""
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        tensor.to(device, non_blocking=True)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return tensor.numel() * tensor.element_size() / best / 1e9


def check_pinned(options):
    """sampling.make_loader's batches (train.py's loader) are in pinned memory and arrive whole after a
    non_blocking copy; the pinned and pageable copy speeds."""
    from sampling import EpochSampler, SeededItems, make_loader
    from synthetic import Shapes
    from train import TrainConfig

    device, batches = torch.device(options.device), 8
    dataset = Shapes(64, 64, 0, "train")
    sampler = EpochSampler(len(dataset), 8, seed=0)
    sampler.set_epoch(1, batches)
    seen = 0
    for images, masks in make_loader(SeededItems(dataset), sampler, 8, TrainConfig(workers=2), device):
        expect(images.is_pinned() and masks.is_pinned(), "the training loader's batches are not in pinned memory")
        copies = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        expect(torch.equal(copies[0].cpu(), images) and torch.equal(copies[1].cpu(), masks),
               "a batch copied with non_blocking=True differs from the loader's")
        seen += 1
    expect(seen == batches, f"the loader gave {seen} batches, not {batches}")
    pageable = torch.randint(0, 256, (256 * MIB,), dtype=torch.uint8)
    pinned, plain = copy_bandwidth(pageable.pin_memory(), device), copy_bandwidth(pageable, device)
    return (f"{batches} batches pinned, identical after non_blocking copies; host to GPU: pinned {pinned:.1f} GB/s, "
            f"pageable {plain:.1f} GB/s")


BENCH_ROW = re.compile(r"^(?P<name>\S.*?)\s+(?P<speed>[\d.]+) images/s .*= (?P<fraction>[\d.]+) of the "
                       r"(?P<dtype>\w+) matmul peak \((?P<peak>[\d.]+) TFLOP/s\)")


def check_matmul(options):
    """benchmarks/bench_train.py on the GPU (batch 16, as train.py's recipe): each configuration's share of the
    matmul peak of its dtype, which bench_train.py measures with a large matmul on the same GPU."""
    from recipe import GPU_BATCH

    result = run_script(["benchmarks/bench_train.py", "--device", options.device, "--batch-size", GPU_BATCH,
                         "--steps", 1 if options.quick else 2])
    rows = [match.groupdict() for match in map(BENCH_ROW.match, result.stdout.splitlines()) if match]
    expect(any(row["dtype"] == "bfloat16" for row in rows),
           f"no bf16 row in bench_train.py's output ({len(rows)} rows)")
    for row in rows:
        expect(0 <= float(row["fraction"]) <= 1, f"{row['name']}: {row['fraction']} of the matmul peak is impossible")
    return "; ".join(f"{row['name']}: {row['speed']} images/s, {row['fraction']} of the "
                     f"{row['dtype'].replace('bfloat16', 'bf16').replace('float32', 'fp32 (TF32)')} matmul peak "
                     f"({float(row['peak']):.0f} TFLOP/s)" for row in rows)


CHECKS = [
    Check("fp32", "training steps in fp32 (TF32, as train.py): the loss of a fixed batch falls",
          lambda options: check_precision(options, "fp32"), 120),
    Check("bf16", "training steps under bf16 autocast: outputs in bf16, first loss as fp32's, the loss falls",
          lambda options: check_precision(options, "bf16"), 120),
    Check("fp16", "training steps under fp16 autocast with the GradScaler: as bf16, few steps skipped",
          lambda options: check_precision(options, "fp16"), 120),
    Check("channels_last", "bf16 steps in channels_last against contiguous: same loss, weights stay NHWC, speed",
          check_channels_last, 120),
    Check("compile", "torch.compile'd steps against eager, then a train.py --compile run whose checkpoint loads",
          check_compile, 300),
    Check("budget", "train.py --time 2m on shapes, eval.py of its best.pth (= training's score), predict.py",
          check_budget, 360),
    Check("tiled", "predict.py --tile 1024 of a 10,000 x 10,000 image: peak GPU memory as for a 2,048 one",
          check_tiled, 300),
    Check("whole", "predict.py of a 10,000 x 10,000 image without --tile (U-Net base 64): whole or fall-back",
          check_whole, 240),
    Check("oom", "a memory cap of half the whole image's peak: the fall-back to tiles gives the tiles' labels",
          check_oom, 180),
    Check("ddp", "train.py --sync-bn under torchrun (NCCL, 2 processes): scores = one process's on the checkpoint",
          check_ddp, 240),
    Check("syncbn", "SyncBatchNorm in DDP under torchrun = one BatchNorm over the whole batch", check_syncbn, 180),
    Check("pinned", "the training loader's pinned batches and non_blocking copies; copy speeds",
          check_pinned, 120),
    Check("matmul", "bench_train.py on the GPU: each configuration's share of its dtype's matmul peak",
          check_matmul, 300),
]
NAMES = [check.name for check in CHECKS]


# --- running the checks ---------------------------------------------------------------------------------------------

def run_checks(checks, run_one, out=print):
    """Run each check with run_one(check) -> its figures; any exception is that check's FAIL line, and the next
    check still runs. Prints (through `out`) and returns each Result."""
    results = []
    for check in checks:
        start = time.monotonic()
        try:
            result = Result(check.name, True, run_one(check), 0.0)
        except Exception as e:
            result = Result(check.name, False, one_line(e, 400), 0.0)
        result.seconds = time.monotonic() - start
        out(result.line())
        results.append(result)
    return results


def process_tree(pid):
    """`pid` and every process below it, from Linux's /proc: torchrun starts its workers in sessions of their own,
    out of reach of a kill of the process group."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # a process that ended meanwhile
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def kill_tree(pid):
    for process in process_tree(pid):  # listed before any is killed: orphans would leave the tree
        try:
            os.kill(process, signal.SIGKILL)
        except ProcessLookupError:
            pass


def in_child(options, logs=None):
    """run_one for run_checks: the check in a fresh process of this script, killed with every process below it
    (the scripts it runs, torchrun's workers) after the check's time limit. Its output goes to LOGS/NAME.log."""

    def run_one(check):
        child = subprocess.Popen([sys.executable, str(SCRIPT), "--child", check.name, options.device,
                                  str(int(options.quick))], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        try:
            output, _ = child.communicate(timeout=check.limit)
        except subprocess.TimeoutExpired:
            kill_tree(child.pid)
            output, _ = child.communicate()
            output += f"\n{RESULT}{json.dumps({'passed': False, 'text': f'timed out after {check.limit} s'})}"
        if logs:
            Path(logs).mkdir(parents=True, exist_ok=True)
            (Path(logs) / f"{check.name}.log").write_text(output)
        return child_result(output, child.returncode)

    return run_one


def child_result(output, returncode):
    """A check's figures from its process's output; CheckFailed with its reason when it failed or died."""
    try:
        found = reported(output)
    except CheckFailed:
        raise CheckFailed(f"its process died (status {returncode}): {error_of(output)}") from None
    if not found["passed"]:
        raise CheckFailed(found["text"])
    return found["text"]


def child(name, options):
    """The body of a check's process: runs it and prints its result line."""
    check = CHECKS[NAMES.index(name)]
    try:
        result = {"passed": True, "text": check.run(options)}
    except SystemExit as e:  # a script's main (predict.main) ends with sys.exit("error: ...")
        result = {"passed": False, "text": one_line(e.code if isinstance(e.code, str) else f"exit status {e.code}")}
    except Exception as e:
        import traceback

        traceback.print_exc()  # into the log
        result = {"passed": False, "text": f"{type(e).__name__}: {one_line(e, 400)}"}
    print(RESULT + json.dumps(result), flush=True)


def nccl_version():
    version = torch.cuda.nccl.version() if torch.distributed.is_nccl_available() else None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def describe_gpu(device):
    props = torch.cuda.get_device_properties(device)
    return (f"{props.name} ({props.total_memory / 2 ** 30:.0f} GiB, compute capability {props.major}.{props.minor}), "
            f"{torch.cuda.device_count()} GPU(s); torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
            f"{torch.backends.cudnn.version()}, NCCL {nccl_version()}")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=NAMES, default=None, metavar="NAME",
                   help=f"run only these checks: {', '.join(NAMES)}")
    p.add_argument("--quick", action="store_true",
                   help="shorter checks: --time 1m, 4,000 x 4,000 images, fewer steps")
    p.add_argument("--device", default="cuda", help="the GPU to check: cuda or cuda:N (torchrun checks: GPUs 0, 1)")
    p.add_argument("--logs", default=None, metavar="DIR", help="write each check's full output to DIR/NAME.log")
    p.add_argument("--list", action="store_true", help="list the checks and exit")
    args = p.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type != "cuda":
        p.error(f"--device {args.device}: the checks run on a CUDA GPU; give cuda or cuda:N")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        for check in CHECKS:
            print(f"{check.name:<13} {check.what}")
        return 0
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): nothing to check")
        return 0
    try:
        device = pick_device(args.device)  # the scripts' own check: a GPU this machine has
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"GPU: {describe_gpu(device)}", flush=True)
    checks = [check for check in CHECKS if args.only is None or check.name in args.only]
    start = time.monotonic()
    results = run_checks(checks, in_child(Options(args.device, args.quick), args.logs),
                         out=lambda line: print(line, flush=True))
    failed = [result.name for result in results if not result.passed]
    print(f"{len(results) - len(failed)} of {len(results)} checks passed in {(time.monotonic() - start) / 60:.1f} min"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], Options(sys.argv[3], sys.argv[4] == "1"))
    elif sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
    else:
        sys.exit(main())
