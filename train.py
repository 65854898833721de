"""Train a U-Net. Example: python train.py --dataset shapes --epochs 10 --base-channels 16
Several GPUs: torchrun --nproc_per_node=4 train.py ... (--batch-size is per process)."""
import time

STARTED = time.monotonic()  # a --time budget counts from here: the start-up is part of it

import argparse
import copy
import csv
import dataclasses
import json
import math
import shutil
import signal
import sys
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from checkpoints import load_checkpoint, save_checkpoint
from datasets import DataConfig, build_dataset, load_scale, resolve_data
from distributed import all_gather_objects, all_reduce_sum, average_across_processes, init_distributed, \
    is_distributed
from drawing import plot_curves, sample_grid
from errors import CheckpointError, ConfigError, DatasetError, UserError, check_at_least, error_line, one_line
from flags import add_augment_args, add_dataset_args, add_model_args, add_precision_args, config_from
from inference import evaluate, predict_probs, preprocess, probs_to_labels
from losses import segmentation_loss
from precision import choose_precision
from recipe import CPU_BATCH, GPU_BATCH, MAX_VALIDATIONS, MIN_STEPS_PER_EPOCH, WARMUP_SHARE, Deadline, Plan, \
    default_batch_and_crop, default_elastic, duration_text, fingerprint, parse_duration, plan_budget, plan_epochs
from model import ModelConfig, build_model, count_parameters, input_normalization, parameter_groups, \
    set_encoder_frozen
from transforms import AugmentConfig
from utils import check_folder, default_workers, derived_seed, pick_device, progress_bars, rng_states, \
    seed_everything, set_rng_states

try:
    from torch.utils.tensorboard import SummaryWriter
except ImportError:  # TensorBoard is optional
    SummaryWriter = None


def parse_args(argv=None):
    """The run's configs, every flag checked (argparse's usage line and status 2 otherwise), and the flags as a
    dict, which the run saves: (TrainConfig, DataConfig, AugmentConfig, ModelConfig, flags)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataset_args(p)
    add_augment_args(p)
    add_model_args(p)
    o = p.add_argument_group("optimisation")
    o.add_argument("--time", type=parse_duration, default=None, metavar="DURATION",
                   help="wall-clock budget of the whole run (90s, 10m, 2h): the run plans its steps to end within it")
    o.add_argument("--epochs", type=int, default=None,
                   help=f"train for this many epochs instead of a --time budget (default without --time: "
                        f"{DEFAULT_EPOCHS})")
    o.add_argument("--steps-per-epoch", type=int, default=None,
                   help=f"steps between two validations (default: a pass over the data, at least "
                        f"{MIN_STEPS_PER_EPOCH}; with --time, up to {MAX_VALIDATIONS} validations in the budget)")
    o.add_argument("--batch-size", type=int, default=None,
                   help=f"images per step and process (default: {CPU_BATCH} on CPUs; on GPUs {GPU_BATCH} at crop "
                        f"256, fewer for larger crops)")
    o.add_argument("--accumulate", type=int, default=1, help="batches whose gradients add up to one step")
    o.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    o.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay")
    o.add_argument("--optimizer", default="adamw", choices=["sgd", "adam", "adamw"], help="optimizer")
    o.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    o.add_argument("--scheduler", default="poly", choices=["poly", "cosine", "constant"],
                   help="learning-rate decay over the run, per step (poly: (1 - t/T)^0.9)")
    o.add_argument("--warmup-epochs", type=float, default=None,
                   help=f"linear learning-rate warm-up (default: {WARMUP_SHARE * 100:g}%% of the steps)")
    o.add_argument("--clip-grad", type=float, default=0.0, help="clip the gradient norm to this (0: off)")
    o.add_argument("--loss", default="ce+dice", choices=["ce", "dice", "ce+dice"],
                   help="cross-entropy (BCE for a single logit), soft Dice, or their sum (nnU-Net's default)")
    o.add_argument("--class-weights", type=float, nargs="+", default=None, metavar="W",
                   help="cross-entropy weight of each class, background first (two for a single logit)")
    o.add_argument("--metric", default="miou", choices=["miou", "dice"],
                   help="validation score that picks best.pth (dice: foreground Dice for two classes)")
    s = p.add_argument_group("speed")
    add_precision_args(s)
    s.add_argument("--compile", action="store_true", help="torch.compile the model")
    s.add_argument("--sync-bn", action="store_true", help="synchronise BatchNorm statistics across GPUs")
    r = p.add_argument_group("run")
    r.add_argument("--name", default=None, help="run name (default: the dataset); the run folder adds a timestamp")
    r.add_argument("--checkpoint-dir", default="checkpoints", help="folder that holds the run folders")
    r.add_argument("--resume", default=None, metavar="PATH",
                   help="continue a run from its checkpoint, in its folder (flags not given come from it)")
    r.add_argument("--load", default=None, metavar="PATH", help="start from these weights (fine-tuning)")
    r.add_argument("--sample-every", type=int, default=5, help="save a sample grid every N epochs (0: never)")
    r.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1'...")
    r.add_argument("--workers", type=int, default=None,
                   help="data-loader worker processes (default: usable CPU cores - 1, at most 4; 0 when the model "
                        "runs on 2 CPU cores or fewer)")
    r.add_argument("--seed", type=int, default=0, help="seed of the weights and the data order")
    args = p.parse_args(argv)
    if args.resume and args.load:
        p.error("--resume continues a run, --load starts a new one from its weights: give only one")
    flags = vars(args)
    try:
        if args.resume:  # the run's own arguments, overridden by the flags given now
            saved = resume_defaults(p, args.resume)
            p.set_defaults(**saved)
            flags = vars(p.parse_args(argv))
            check_same_data(saved, flags, args.resume)
        elif args.load:  # the architecture of the loaded model, unless flags name another
            model_flags = {field.name for field in dataclasses.fields(ModelConfig)}
            p.set_defaults(**{k: v for k, v in resume_defaults(p, args.load, "--load").items() if k in model_flags})
            flags = vars(p.parse_args(argv))
        configs = [config_from(kind, flags).check()
                   for kind in (TrainConfig, DataConfig, AugmentConfig, ModelConfig)]
    except (ConfigError, CheckpointError) as e:
        p.error(str(e))
    return (*configs, flags)


def check_same_data(saved, flags, path):
    """A resumed run goes on with its own data: a data flag that names other data is refused."""
    for field in dataclasses.fields(DataConfig):
        name = field.name
        if name in saved and flags[name] != saved[name] and name not in ("download", "verify", "skip_bad"):
            raise ConfigError(f"--resume {path} continues a run on its own data (--{name.replace('_', '-')} "
                              f"{saved[name]}), not {flags[name]}; to train on other data start a new run with "
                              f"--load {path}")


def resume_defaults(parser, path, flag="--resume"):
    """The flags the run of checkpoint `path` was started with (for --resume, and --load's architecture)."""
    try:
        saved = load_checkpoint(path).get("args", {})
    except CheckpointError as e:
        raise CheckpointError(f"{flag}: {e}") from None
    known = {action.dest for action in parser._actions}
    return {key: value for key, value in saved.items() if key in known and key not in ("resume", "load")}


@dataclass
class TrainConfig:
    """The optimisation, speed and run flags of train.py."""
    # how long: a wall-clock budget in seconds, or a number of epochs (None and None: DEFAULT_EPOCHS)
    time: float | None = None
    epochs: int | None = None
    steps_per_epoch: int | None = None  # None: planned (recipe.py)
    # optimisation
    batch_size: int | None = None  # None: planned
    accumulate: int = 1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    momentum: float = 0.9
    scheduler: str = "poly"
    warmup_epochs: float | None = None  # None: planned
    clip_grad: float = 0.0
    # what is minimised, and what picks best.pth
    loss: str = "ce+dice"
    class_weights: list | None = None
    metric: str = "miou"
    # speed
    amp: str = "auto"
    channels_last: str = "auto"
    compile: bool = False
    sync_bn: bool = False
    # the run: where it is saved, where it starts from, what it runs on
    name: str | None = None
    checkpoint_dir: str = "checkpoints"
    resume: str | None = None
    load: str | None = None
    sample_every: int = 5
    device: str = "auto"
    workers: int | None = None  # None: utils.default_workers for the device
    seed: int = 0

    def check(self):
        if self.time is not None and self.epochs is not None:
            raise ConfigError(f"give --time or --epochs, not both (--time {duration_text(self.time)}, "
                              f"--epochs {self.epochs})")
        planned = {"epochs": self.epochs, "steps_per_epoch": self.steps_per_epoch, "batch_size": self.batch_size}
        check_at_least(1, accumulate=self.accumulate, **{k: v for k, v in planned.items() if v is not None})
        if self.warmup_epochs is not None and self.epochs is not None and self.warmup_epochs >= self.epochs:
            raise ConfigError(f"--warmup-epochs ({self.warmup_epochs:g}) must be shorter than --epochs "
                              f"({self.epochs})")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        check_at_least(0, weight_decay=self.weight_decay, momentum=self.momentum,
                       warmup_epochs=self.warmup_epochs or 0, clip_grad=self.clip_grad, workers=self.workers or 0,
                       sample_every=self.sample_every)
        if self.class_weights and min(self.class_weights) < 0:
            raise ConfigError(f"--class-weights cannot be negative, got {self.class_weights}")
        pick_device(self.device)
        return self


DEFAULT_EPOCHS = 10


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite."""


class RunInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped the run after saving a resumable checkpoint (exit status 130, as for SIGINT)."""


class TrainingError(UserError):
    """The run cannot go on (a NaN loss); the message says where the last good checkpoint is."""


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


@dataclass
class StepRunner:
    """The forward, backward and update of one optimisation step; benchmarks/bench_train.py times the same code."""
    model: torch.nn.Module  # what the forward pass calls: possibly wrapped by DDP and torch.compile
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: Callable
    normalize: dict
    amp_dtype: torch.dtype = None
    channels_last: bool = False
    clip_grad: float = 0.0
    ddp: DistributedDataParallel = None

    def forward_backward(self, images, masks, loss_scale=1.0, sync_gradients=True):
        """Adds this batch's gradients (times loss_scale); returns the detached loss."""
        x = preprocess(images, self.normalize)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with nullcontext() if sync_gradients or self.ddp is None else self.ddp.no_sync():
            with autocast(x.device, self.amp_dtype):
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


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def build_optimizer(model, config, encoder_lr_factor):
    groups = parameter_groups(model, config.lr, encoder_lr_factor=encoder_lr_factor)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    optimizer_class = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return optimizer_class(groups, lr=config.lr, weight_decay=config.weight_decay)


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


def wrap_for_steps(model, compile_model, device, world_size, encoder_frozen=False):
    """(what the training step calls, the DDP wrapper or None): the model itself, or it wrapped in DDP and/or
    torch.compile; checkpoints always save the plain model. While the encoder is frozen its parameters get no
    gradients, which DDP must be told (find_unused_parameters, a search over the graph at every step): the
    wrapper is rebuilt without it once the encoder thaws."""
    ddp = None
    if world_size > 1:
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=encoder_frozen)
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


class EpochSampler(torch.utils.data.Sampler):
    """This process's share of an epoch of `steps` batches, from a given batch on, as (index, seed) keys.
    An epoch runs through random passes over the dataset (each a new permutation, the same in every process)
    and is cut at its length: a small dataset is seen several times an epoch, and no pass drops its last
    items. The order is a pure function of (run seed, epoch), and each item's random augmentation runs from a
    seed of (run seed, epoch, position), so a resumed epoch sees exactly the items an uninterrupted one would,
    whichever worker loads them: one loader with persistent workers serves the whole run."""

    def __init__(self, dataset_size, batch_size, seed, rank=0, world_size=1):
        self.size, self.batch_size, self.seed = dataset_size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.steps, self.start = 0, 0, 0

    def set_epoch(self, epoch, steps, start_batch=0):
        self.epoch, self.steps, self.start = epoch, steps, start_batch * self.batch_size

    def __len__(self):
        return self.steps * self.batch_size - self.start

    def __iter__(self):
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        wanted = self.steps * self.batch_size * self.world_size
        order = torch.cat([torch.randperm(self.size, generator=generator)
                           for _ in range(math.ceil(wanted / self.size))])
        positions = range(self.rank, wanted, self.world_size)
        for position in positions[self.start:]:
            yield int(order[position]), derived_seed(self.seed, self.epoch, position)


class SeededItems(torch.utils.data.Dataset):
    """Loads the (index, seed) keys of EpochSampler: the item's augmentation draws from its own seed."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with torch.random.fork_rng(devices=[]):  # leaves the caller's random state alone (--workers 0)
            torch.default_generator.manual_seed(seed)  # the CPU generator alone: fork_rng restores only that
            return self.dataset[index]


def make_loader(dataset, sampler, batch_size, config, device):
    """Persistent workers (started once, not every epoch: slow on Windows and macOS, which spawn them), pinned
    memory only with CUDA; workers ignore Ctrl-C, which the main process handles."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=config.workers,
        pin_memory=device.type == "cuda", persistent_workers=config.workers > 0,
        generator=torch.Generator().manual_seed(config.seed), worker_init_fn=ignore_sigint)


def ignore_sigint(worker_id):
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def train_one_epoch(runner, loader, epoch, epochs, accumulate, device, stop, progress, main_process,
                    out_of_time=lambda: False):
    """Trains on the loader's batches. `progress` ({"batch", "batches", "loss_sum", "images"}) says where in
    the epoch the loader starts (after a resume) and is kept up to date. Returns "stop" when a stop was
    requested, "time" when `out_of_time()` said the budget has no room for another step (both after a whole
    step; any process's word counts), else "done". Raises NonFiniteLoss, before any update, for a NaN or
    infinite loss."""
    runner.model.train()
    bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", total=progress["batches"], initial=progress["batch"],
               leave=False, disable=not (main_process and progress_bars()))
    for images, masks in bar:
        images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        batch = progress["batch"]
        group_start = batch - batch % accumulate
        group_size = min(accumulate, progress["batches"] - group_start)
        ends_step = batch + 1 == group_start + group_size
        loss = runner.forward_backward(images, masks, 1 / group_size, sync_gradients=ends_step)
        # One sync per batch: the loss summed over processes, and whether any process was asked to stop.
        flags = torch.tensor([len(images), stop.requested, ends_step and out_of_time()], dtype=torch.float32,
                             device=device)
        totals = torch.cat([(loss.float() * len(images)).view(1), flags])
        batch_loss, batch_images, stop_votes, time_votes = all_reduce_sum(totals).tolist()
        if not math.isfinite(batch_loss):
            raise NonFiniteLoss(f"the training loss is {batch_loss} at epoch {epoch}, batch {batch + 1}")
        progress.update(batch=batch + 1, loss_sum=progress["loss_sum"] + batch_loss,
                        images=progress["images"] + int(batch_images))
        bar.set_postfix(loss=f"{batch_loss / batch_images:.4f}")
        if ends_step:
            runner.update()
            if batch + 1 < progress["batches"]:  # at the epoch's end, finish it: validate, save
                if stop_votes:
                    return "stop"
                if time_votes:
                    return "time"
    return "done"


def any_process(flag, device):
    return all_reduce_sum(torch.tensor(float(flag), device=device)).item() > 0


def score_of(metrics, name, num_classes):
    if name == "dice":
        return metrics["fg_dice"] if num_classes <= 2 else metrics["mean_dice"]
    return metrics["miou"]


@contextmanager
def removed_if_unsaved(run_dir):
    """A run folder this run created is removed if the run fails before saving a checkpoint in it."""
    try:
        yield
    except BaseException:
        if run_dir is not None and not any(run_dir.glob("*.pth")):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


@contextmanager
def resume_hint_on_bad_data(last_good):
    """A file that went bad or is truncated, met during the run: its one line says how to go on from the last
    good checkpoint (`last_good()`, or None before the first save)."""
    try:
        yield
    except DatasetError as e:
        fix = (f"fix or remove the file and continue with --resume {last_good()}" if last_good()
               else "fix or remove the file and start again")
        raise TrainingError(f"{error_line(e)}; {fix} (or add --skip-bad to leave out unreadable pairs)") from None


def new_run_dir(checkpoint_dir, name):
    run_dir = Path(checkpoint_dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 1
    while run_dir.exists():  # two runs started in the same second never share a folder
        run_dir = run_dir.with_name(f"{run_dir.name.rsplit('.', 1)[0]}.{suffix}")
        suffix += 1
    run_dir.mkdir(parents=True)
    return run_dir


def number(text):
    """A metrics.csv cell: integer columns (epoch, step) stay integers across a resume."""
    return int(text) if text.lstrip("-").isdigit() else float(text)


class RunLog:
    """metrics.csv (one row per epoch), curves.png, TensorBoard events when installed. Rank 0 only.
    A resumed run keeps the rows of the epochs its checkpoint had finished."""

    def __init__(self, run_dir, metric, resumed_epoch=0):
        self.csv_path, self.curves_path, self.metric = run_dir / "metrics.csv", run_dir / "curves.png", metric
        self.history = []
        if resumed_epoch and self.csv_path.is_file():
            with open(self.csv_path, newline="") as f:
                rows = [{k: number(v) for k, v in row.items()} for row in csv.DictReader(f)]
            self.history = [row for row in rows if row["epoch"] <= resumed_epoch]
        self.rewrite()
        self.tensorboard = SummaryWriter(run_dir / "tensorboard") if SummaryWriter else None

    def rewrite(self):
        with open(self.csv_path, "w", newline="") as f:
            if self.history:
                writer = csv.DictWriter(f, fieldnames=list(self.history[0]))
                writer.writeheader()
                writer.writerows(self.history)

    def append(self, row):
        self.history.append(row)
        with open(self.csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if len(self.history) == 1:
                writer.writeheader()
            writer.writerow(row)
        plot_curves(self.history, self.curves_path, self.metric)
        if self.tensorboard:
            for key, value in row.items():
                self.tensorboard.add_scalar(key, value, int(row["epoch"]))
            self.tensorboard.flush()


def save_samples(model, dataset, normalize, scale, amp_dtype, device, path, count=4):
    """image | truth | prediction for the first `count` images of `dataset` (whole validation images)."""
    model.eval()
    images, truths, _ = zip(*(dataset[i] for i in range(min(count, len(dataset)))))
    predictions = [probs_to_labels(predict_probs(model, image[None].to(device), normalize, scale=scale,
                                                 amp_dtype=amp_dtype))[0].cpu() for image in images]
    path.parent.mkdir(exist_ok=True)
    sample_grid(images, truths, predictions, dataset.classes, dataset.mask_values,
                grey_void=getattr(dataset, "rois", None) is not None).save(path)


def main(argv=None, started=STARTED):
    """`started`: when a --time budget began (time.monotonic()); by default when the process imported train.py."""
    config, data, augment, model_config, flags = parse_args(argv)
    try:
        device, rank, world_size = init_distributed(pick_device(config.device))
        if config.workers is None:
            config = dataclasses.replace(config, workers=default_workers(device.type))
        try:
            return train(config, data, augment, model_config, flags, device, rank, world_size, started)
        finally:
            if is_distributed():
                torch.distributed.destroy_process_group()
    except UserError as e:  # bad data met while loading too: last.pth, saved atomically, is intact
        sys.exit(f"error: {error_line(e)}")
    except RunInterrupted:
        sys.exit(130)


def train(config, data, augment, model_config, flags, device, rank, world_size, started):
    """The whole run; `flags` (every flag's value) is saved with it, so that --resume and eval.py can read it.
    A --time budget counts from `started`."""
    main_process = rank == 0
    if main_process:  # before any data is read: the run must be able to save
        check_folder(Path(config.resume).parent if config.resume else config.checkpoint_dir,
                     "--resume" if config.resume else "--checkpoint-dir")
    checkpoint = load_checkpoint(config.resume or config.load) if config.resume or config.load else None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")  # TF32 matmuls in fp32 runs
    torch.manual_seed(config.seed)
    data, train_set, val_set, fp, batch_size, augment = prepare_data(config, data, augment, device, main_process)
    if main_process and batch_size == 1 and not (config.sync_bn and world_size > 1):
        print("note: with --batch-size 1 BatchNorm normalises each training image by its own statistics, which its "
              "running averages, used for scoring, do not match (ISBI, 400 steps: one 512x512 crop a step scored "
              "membrane Dice 0.21, four 256x256 crops 0.80); use 2 or more, with a smaller --crop-size to fit memory",
              file=sys.stderr)
    scale = load_scale(data.dataset, data.scale)
    # The run saves the dataset it found, its mask values and the recipe it chose.
    flags = {**flags, **dataclasses.asdict(data), "batch_size": batch_size, "crop_size": augment.crop_size,
             "elastic": augment.elastic}
    classes = list(train_set.classes)
    model_args = model_config.model_args(len(classes))
    # Pretrained encoder weights are fetched here, for training only; a failed download is one line.
    model = build_model(model_args, pretrained=not (config.resume or config.load))
    num_logits = model_args["num_classes"]
    if config.resume:
        load_all_weights(model, config.resume, checkpoint)
    elif config.load:
        load_weights(model, config.load, checkpoint, num_logits)
    precision = choose_precision(device, config.amp, config.channels_last)
    model = prepare_model(model, config.sync_bn, precision, device, world_size)
    normalize, ignore_index = input_normalization(model_args), train_set.ignore_index
    meta = {"model_args": model_args, "classes": classes, "mask_values": list(train_set.mask_values),
            "ignore_index": ignore_index, "normalize": normalize}

    # Each process scores its own share of the validation set; the confusion matrices are summed.
    val_loader = make_loader(val_set, range(rank, len(val_set), world_size), 1, config, device)
    epoch_sampler = EpochSampler(len(train_set), batch_size, config.seed, rank, world_size)
    train_loader = make_loader(SeededItems(train_set), epoch_sampler, batch_size, config, device)
    optimizer = build_optimizer(model, config, model_config.encoder_lr_factor)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.needs_grad_scaler)
    criterion = build_criterion(config.loss, config.class_weights, num_logits, ignore_index, device)
    runner = StepRunner(model, optimizer, None, scaler, criterion, normalize, precision.dtype,
                        precision.channels_last, config.clip_grad)
    if main_process:
        print(f"precision: {precision.describe()}")
    plan = plan_run(config, checkpoint, fp, batch_size, augment, world_size, started,
                    lambda: time_training_step(runner, model, batch_size, augment.crop_size, fp, num_logits,
                                               config.accumulate, device))
    plan = all_gather_objects(plan)[0]  # each process timed its own step: rank 0's plan is the run's
    runner.scheduler = scheduler = build_scheduler(optimizer, config.scheduler, plan)
    # What a checkpoint records of the run's progress; "epoch" counts finished epochs.
    run = {"epoch": 0, "best_score": -1.0, "metrics": None, "epoch_progress": None}
    resume_rng = None
    if config.resume:
        run, resume_rng = restore_training(checkpoint, optimizer, scheduler, scaler, rank, world_size)
    deadline = Deadline(plan.budget, plan.spent, started) if plan.budget else None
    if config.resume:
        check_unfinished(config.resume, plan, deadline, scheduler.last_epoch, run)
    if deadline:
        progress = run["epoch_progress"]
        left_in_epoch = (progress["batches"] - progress["batch"]) // config.accumulate if progress else 0
        replan(plan, scheduler.last_epoch, deadline, left_in_epoch)

    run_dir = new_folder = log = None
    if main_process:
        if config.resume:
            run_dir = Path(config.resume).parent
        else:
            run_dir = new_folder = new_run_dir(config.checkpoint_dir, config.name or data.dataset)
        (run_dir / "args.json").write_text(json.dumps({**flags, "plan": plan.as_dict()}, indent=2))
        log = RunLog(run_dir, config.metric, run["epoch"])
        print(f"{count_parameters(model) / 1e6:.2f} M parameters, {len(train_set)} train / "
              f"{len(val_set)} val images, device {device} x {world_size}, run folder {run_dir}"
              + (f", resuming after step {scheduler.last_epoch}" if config.resume else ""))
        print(plan.describe())
    last_good = Path(config.resume) if config.resume else None

    def save(name):
        """Every process calls it (the RNG states are gathered); rank 0 writes."""
        rng = all_gather_objects(rng_states())
        if main_process:
            plan.spent = deadline.used() if deadline else 0.0
            save_checkpoint({**meta, **run, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                             "step": scheduler.last_epoch, "args": flags, "plan": plan.as_dict(), "rng": rng},
                            run_dir / name)
            return run_dir / name

    def out_of_time():
        """No room left in the budget for another step and the epoch's validation and saves."""
        return deadline is not None and deadline.plannable() < plan.step_seconds + plan.epoch_end_seconds

    encoder_frozen = None
    epoch_ends = []  # seconds each validation and its saves took in this session
    with StopRequest() as stop, removed_if_unsaved(new_folder), resume_hint_on_bad_data(lambda: last_good):
        while run["epoch_progress"] or scheduler.last_epoch < plan.total_steps:
            epoch = run["epoch"] + 1
            frozen = epoch <= model_config.freeze_encoder_epochs
            frozen = set_encoder_frozen(model, frozen) and frozen  # False for models without an encoder
            if frozen != encoder_frozen:
                runner.model, runner.ddp = wrap_for_steps(model, config.compile, device, world_size, frozen)
                encoder_frozen = frozen
            start = time.perf_counter()
            steps = min(plan.steps_per_epoch, plan.total_steps - scheduler.last_epoch)
            progress = run["epoch_progress"] or {"batch": 0, "batches": steps * config.accumulate, "loss_sum": 0.0,
                                                 "images": 0}
            run["epoch_progress"] = progress
            first_batch = progress["batch"]
            seed_everything(derived_seed(config.seed, epoch, rank))
            if progress["batch"] and resume_rng:
                set_rng_states(resume_rng)  # resumed mid-epoch
            epoch_sampler.set_epoch(epoch, progress["batches"], progress["batch"])
            epochs = run["epoch"] + math.ceil((plan.total_steps - scheduler.last_epoch) / plan.steps_per_epoch)
            try:
                ended = train_one_epoch(runner, train_loader, epoch, epochs, config.accumulate, device, stop,
                                        progress, main_process, out_of_time)
            except NonFiniteLoss as e:
                where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was saved yet"
                raise TrainingError(f"{e}; stopped, {where}. Try a lower --lr, --clip-grad or --amp off") from None
            if ended == "stop":
                path = save("last.pth")
                if main_process:
                    print(f"interrupted during epoch {epoch}: saved {path}; continue with --resume {path}")
                raise RunInterrupted
            if ended == "time":  # the budget ends with this epoch
                plan.total_steps = scheduler.last_epoch
            trained = time.perf_counter() - start
            plan.step_seconds = trained / max(1, progress["batch"] - first_batch) * config.accumulate
            loss = progress["loss_sum"] / progress["images"]
            # BatchNorm statistics differ between processes: average them, so that every process scores,
            # and the checkpoint holds, the same model.
            average_across_processes(model.buffers())
            metrics = evaluate(model, val_loader, num_logits, normalize, ignore_index, device,
                               distributed=world_size > 1, scale=scale, amp_dtype=precision.dtype)
            score = score_of(metrics, config.metric, num_logits)
            improved = score > run["best_score"]
            run.update(epoch=epoch, metrics=metrics, epoch_progress=None,
                       best_score=max(run["best_score"], score))
            last_good = save("last.pth")
            if improved:
                save("best.pth")
            if main_process:
                seconds = time.perf_counter() - start
                log.append({"epoch": epoch, "step": scheduler.last_epoch, "lr": optimizer.param_groups[0]["lr"],
                            "train_loss": loss, **{k: v for k, v in metrics.items() if not isinstance(v, list)},
                            "score": score, "seconds": seconds})
                last_epoch = scheduler.last_epoch >= plan.total_steps
                if config.sample_every and (epoch % config.sample_every == 0 or last_epoch):
                    save_samples(model, val_set, normalize, scale, precision.dtype, device,
                                 run_dir / "samples" / f"epoch_{epoch:03d}.png")
                dice = f"  dice {score:.4f}" if config.metric == "dice" else ""
                print(f"epoch {epoch}/{epochs}  loss {loss:.4f}  mIoU {metrics['miou']:.4f}  "
                      f"pixel acc {metrics['pixel_acc']:.4f}{dice}{'  (best)' if improved else ''}  {seconds:.1f}s")
            epoch_ends.append(time.perf_counter() - start - trained)
            plan.epoch_end_seconds = max(epoch_ends)
            if deadline and ended != "time":
                replan(plan, scheduler.last_epoch, deadline)
            if any_process(stop.requested, device):
                if main_process:
                    print(f"stopped after epoch {epoch}: continue with --resume {last_good}")
                raise RunInterrupted
    if main_process:
        used = f" in {duration_text(deadline.used())} of the {duration_text(plan.budget)} budget" if deadline else ""
        print(f"best {config.metric} {run['best_score']:.4f}: {run_dir / 'best.pth'}{used}")
    return run_dir


def prepare_data(config, data, augment, device, main_process):
    """(resolved DataConfig, training set, validation set, Fingerprint, batch size, AugmentConfig): the data
    found, and the batch and augmentation the recipe fits to it. Validation scores whole images at the files'
    resolution, as eval.py does, so that best.pth follows eval.py's number."""
    data = resolve_data(data)
    if data.dataset == "shapes" and augment.crop_size and main_process:
        print(f"note: --crop-size {augment.crop_size} does not apply to the synthetic shapes, made at --image-size "
              f"{data.image_size}", file=sys.stderr)
    val_set = build_dataset(data, "val", full_resolution=True)
    fp = fingerprint(build_dataset(data, "train"), val_set, load_scale(data.dataset, data.scale))
    batch_size, augment = fit_recipe(config, augment, fp, device.type)
    return data, build_dataset(data, "train", augment), val_set, fp, batch_size, augment


def fit_recipe(config, augment, fp, device_type):
    """(batch size, AugmentConfig) for this data and device: the flags given, else the recipe's choices."""
    batch_size, crop_size = default_batch_and_crop(fp, device_type)
    elastic = augment.elastic if augment.elastic is not None else default_elastic(fp)
    crop_size = augment.crop_size if augment.crop_size is not None else crop_size
    return config.batch_size or batch_size, dataclasses.replace(augment, crop_size=crop_size, elastic=elastic)


def plan_run(config, checkpoint, fp, batch_size, augment, world_size, started, time_step):
    """The run's Plan: a resumed run's own (with the --time or --epochs given now), else a new one for
    --epochs, or for --time (counted from `started`) from the seconds a training step takes (`time_step()`,
    which measures it)."""
    def validation_seconds(step):
        """Scoring a pixel takes about a third of the time training on it takes (no backward pass)."""
        pixels_per_step = config.accumulate * batch_size * (augment.crop_size or fp.median_size[0]) ** 2
        return step / pixels_per_step / 3 * fp.val_pixels / world_size

    if config.resume and checkpoint.get("plan"):
        plan = Plan(**checkpoint["plan"])
        if config.time and plan.epoch_end_seconds is None:  # a run of epochs stopped in its first, given a budget
            plan.step_seconds = time_step()
            plan.epoch_end_seconds = validation_seconds(plan.step_seconds) + 1.0
        if config.time:
            plan.budget = config.time
        elif plan.budget is None:
            plan.total_steps = (config.epochs or DEFAULT_EPOCHS) * plan.steps_per_epoch
        return plan
    recipe = (fp.train_images, batch_size, augment.crop_size, augment.elastic)
    settings = {"warmup_epochs": config.warmup_epochs, "steps_per_epoch": config.steps_per_epoch}
    if config.time is None:
        return plan_epochs(config.epochs or DEFAULT_EPOCHS, *recipe, world_size * config.accumulate, **settings)
    step = time_step()
    seconds_left = Deadline(config.time, 0.0, started).plannable()
    return plan_budget(config.time, seconds_left, step, validation_seconds(step), *recipe, **settings)


def replan(plan, done_steps, deadline, left_in_epoch=0):
    """Plan.replan on rank 0's clock: every process must run the same steps, so all take rank 0's plan."""
    plan.replan(done_steps, deadline.plannable(), left_in_epoch)
    plan.total_steps, plan.steps_per_epoch = all_gather_objects((plan.total_steps, plan.steps_per_epoch))[0]


def time_training_step(runner, model, batch_size, crop_size, fp, num_logits, accumulate, device, repeats=2):
    """Seconds of one optimisation step on random data (the first pass, which sets up the kernels, untimed).
    Nothing is updated, and the weights and BatchNorm statistics are restored afterwards."""
    saved = copy.deepcopy(model.state_dict())
    height, width = (crop_size, crop_size) if crop_size else fp.median_size
    images = torch.randint(0, 256, (batch_size, 3, height, width), dtype=torch.uint8, device=device)
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
    return min(seconds[1:]) * accumulate


def check_unfinished(path, plan, deadline, done_steps, run):
    """--resume of a run that has nothing left to do: ConfigError saying how to train it longer."""
    if deadline and deadline.left() <= 0:
        raise ConfigError(f"--resume {path}: the run has used its {duration_text(deadline.budget)} budget; to train "
                          f"it longer pass --time with more than {duration_text(deadline.spent)}")
    if not deadline and done_steps >= plan.total_steps and not run["epoch_progress"]:
        raise ConfigError(f"--resume {path}: the run has finished its {run['epoch']} epochs; to train it longer "
                          f"pass --epochs N with N > {run['epoch']}")


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


if __name__ == "__main__":
    main()
