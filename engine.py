"""The step engine of train.py: the model on its device and wrapped for the steps (DDP, torch.compile), the
optimizer, the learning-rate schedule, the loss, one optimisation step (StepRunner, which
benchmarks/bench_train.py times too) and the weights a run starts from (--load, --resume)."""
import copy
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel

from errors import CheckpointError, ConfigError, one_line
from inference import predict_probs, preprocess
from losses import segmentation_loss
from model import parameter_groups
from precision import Precision
from recipe import epoch_end_estimate

FP32 = Precision(None, False, "fp32")


@dataclass
class StepRunner:
    """The forward, backward and update of one optimisation step; benchmarks/bench_train.py times the same code."""
    model: torch.nn.Module  # what the forward pass calls: possibly wrapped by DDP and torch.compile
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: Callable
    normalize: dict
    precision: Precision = FP32  # autocast dtype and memory layout of the inputs
    clip_grad: float = 0.0
    ddp: DistributedDataParallel = None

    def forward_backward(self, images, masks, loss_scale=1.0, sync_gradients=True):
        """Adds this batch's gradients (times loss_scale); returns the detached loss."""
        x = preprocess(images, self.normalize)
        if self.precision.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with nullcontext() if sync_gradients or self.ddp is None else self.ddp.no_sync():
            with self.precision.autocast(x.device.type):
                logits = self.model(x)
            loss = self.criterion(logits.float(), masks)  # softmax and the Dice sums in fp32, not in bf16/fp16
            self.scaler.scale(loss * loss_scale).backward()
        return loss.detach()

    def update(self):
        if self.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()


def build_optimizer(model, config, encoder_lr_factor):
    groups = parameter_groups(model, config.lr, encoder_lr_factor=encoder_lr_factor)
    # The fused update is one kernel over all the weights: on a 2-core CPU it takes 9 ms of a ResNet-18 U-Net's
    # step against 50 ms for the per-tensor loop (fused exists for CPU and CUDA tensors only).
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                               fused=fused)
    optimizer_class = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return optimizer_class(groups, lr=config.lr, weight_decay=config.weight_decay, fused=fused)


def build_scheduler(optimizer, schedule, plan):
    """Per-step factor on every group's learning rate: linear warm-up, then poly, cosine or constant to the
    plan's last step. It reads the plan at every step, so a re-planned budget moves the end of the decay."""

    def factor(step):
        if step < plan.warmup_steps:
            return (step + 1) / plan.warmup_steps
        progress = min(1.0, (step - plan.warmup_steps) / max(1, plan.total_steps - plan.warmup_steps))
        if schedule == "poly":
            return (1 - progress) ** 0.9
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_criterion(loss, class_weights, num_logits, ignore_index, device):
    weights = class_weights
    if weights is not None:
        expected = max(num_logits, 2)
        if len(weights) != expected:
            raise ConfigError(f"--class-weights needs {expected} values (one per class, background first), "
                              f"got {len(weights)}")
        weights = torch.tensor(weights, dtype=torch.float32, device=device)

    def criterion(logits, masks):
        return segmentation_loss(logits, masks, loss, ignore_index, weights)

    return criterion


def prepare_model(model, sync_bn, precision, device, world_size):
    """The model on its device, in the precision's memory format, with synchronised BatchNorm across processes
    if asked."""
    if sync_bn and world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return precision.prepare(model.to(device))


def wrap_for_steps(model, compile_model, device, world_size):
    """(what the training step calls, the DDP wrapper or None): the model itself, or it wrapped in DDP and/or
    torch.compile; checkpoints always save the plain model. DDP averages the gradients of the parameters that
    require them when it is built, and only those: a frozen encoder is left out (no find_unused_parameters, no
    search over the graph at every step), and the wrapper must be rebuilt when the encoder thaws."""
    ddp = None
    if world_size > 1:
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step_model = ddp or model
    return (torch.compile(step_model) if compile_model else step_model), ddp


def load_weights(model, path, checkpoint, num_logits):
    """--load: every tensor of the checkpoint, but for those that depend on the number of classes when the new data
    has another: they keep their initial values. Any other difference is another architecture: CheckpointError."""
    own, theirs = model.state_dict(), checkpoint["model"]
    their_logits = checkpoint["model_args"]["num_classes"]
    matching = {k: v for k, v in theirs.items() if k in own and own[k].shape == v.shape}
    per_class = [k for k in own if k in theirs and k not in matching
                 and classes_only_differ(own[k].shape, theirs[k].shape, num_logits, their_logits)]
    other = sorted(set(own) - set(matching) - set(per_class)) + sorted(set(theirs) - set(own))
    if other:
        raise CheckpointError(f"--load {path} holds another architecture ({len(other)} tensor(s) differ in name or "
                              f"shape, such as {other[0]}); its own is {checkpoint['model_args']}: leave out the "
                              f"architecture flags to take it")
    model.load_state_dict(matching, strict=False)
    kept = f"; {len(per_class)} that depend on the number of classes ({their_logits} -> {num_logits}) start afresh"
    print(f"loaded {len(matching)} of {len(own)} tensors from {path}" + (kept if per_class else ""))


def classes_only_differ(shape, their_shape, num_logits, their_logits):
    """Two tensor shapes that differ only where one holds the new number of logits and the other the old."""
    return len(shape) == len(their_shape) and all(
        a == b or (a, b) == (num_logits, their_logits) for a, b in zip(shape, their_shape))


def time_training_step(runner, model, batch_size, crop_size, fp, num_logits, accumulate, device, repeats=2):
    """(seconds of one optimisation step on random data, seconds the first pass took beyond them: setting up the
    kernels, and compiling a torch.compile'd `runner.model`). Nothing is updated, and the weights and BatchNorm
    statistics are restored afterwards."""
    saved = copy.deepcopy(model.state_dict())
    height, width = (crop_size, crop_size) if crop_size else fp.median_size
    channels = len(runner.normalize["mean"])
    images = torch.randint(0, 256, (batch_size, channels, height, width), dtype=torch.uint8, device=device)
    masks = torch.randint(0, max(2, num_logits), (batch_size, height, width), device=device)
    model.train()
    seconds = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        runner.forward_backward(images, masks).item()  # .item() waits for the device
        seconds.append(time.perf_counter() - start)
    runner.optimizer.zero_grad(set_to_none=True)
    model.load_state_dict(saved)
    step = min(seconds[1:])
    return step * accumulate, seconds[0] - step


def time_epoch_end(model, normalize, amp_dtype, image_pixels, val_images, optimizer_name, largest_side=256):
    """Seconds of a validation and its saves, foreseen before one ran (recipe.epoch_end_estimate): a whole-image
    forward pass at the validation images' mean size (`image_pixels`), times the `val_images` this process scores;
    and the bytes of last.pth (weights and optimizer moments) and best.pth. The pass is the fastest of three (the
    first two set up the kernels on CPUs), on at most `largest_side` pixels a side, scaled by the pixel count
    beyond (a convolutional network's time grows with it), so that the probe costs little of any budget."""
    device = next(model.parameters()).device
    side = max(32, min(largest_side, round(math.sqrt(image_pixels) / 32) * 32))
    image = torch.zeros(1, len(normalize["mean"]), side, side, dtype=torch.uint8, device=device)
    seconds = []
    model.eval()
    for _ in range(3):
        start = time.perf_counter()
        predict_probs(model, image, normalize, amp_dtype=amp_dtype).sum().item()  # .item() waits for the device
        seconds.append(time.perf_counter() - start)
    forward = min(seconds) * max(1.0, image_pixels / side ** 2)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    moments = {"adam": 2, "adamw": 2, "sgd": 1}[optimizer_name]
    return epoch_end_estimate(forward, val_images, 2 * weights + moments * parameters)


def load_all_weights(model, path, checkpoint):
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        raise CheckpointError(f"--resume {path} holds another architecture ({one_line(e)})") from None


def restore_training(checkpoint, optimizer, scheduler, scaler, rank, world_size):
    """--resume: the optimizer, scheduler and scaler states; returns the run's progress and this process's
    RNG states at the time of the save."""
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    if checkpoint["scaler"]:
        scaler.load_state_dict(checkpoint["scaler"])
    elif scaler.is_enabled():  # saved by a run without fp16: the scaler starts afresh
        print("note: the checkpoint has no fp16 loss-scaler state; the loss scale starts afresh")
    run = {key: checkpoint[key] for key in ("epoch", "best_score", "metrics", "epoch_progress")}
    if run["epoch_progress"] and "plan" not in checkpoint:
        print("note: the checkpoint predates planned epochs, so the interrupted epoch starts again")
        run["epoch_progress"] = None
    return run, checkpoint["rng"][rank] if len(checkpoint["rng"]) == world_size else None


def build_runner(model, config, encoder_lr_factor, precision, meta, device):
    """The StepRunner of a run (TrainConfig `config`); its scheduler is set once the steps are planned."""
    optimizer = build_optimizer(model, config, encoder_lr_factor)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.needs_grad_scaler)
    criterion = build_criterion(config.loss, config.class_weights, meta["model_args"]["num_classes"],
                                meta["ignore_index"], device)
    return StepRunner(model, optimizer, None, scaler, criterion, meta["normalize"], precision, config.clip_grad)
