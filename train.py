"""Train a U-Net. Example: python train.py --dataset shapes --epochs 10 --base-channels 16
Several GPUs: torchrun --nproc_per_node=4 train.py ... (--batch-size is per process)."""
import argparse
import csv
import dataclasses
import json
import math
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from checkpoints import load_checkpoint, save_checkpoint
from datasets import DataConfig, build_dataset, resolve_data
from distributed import all_gather_objects, all_reduce_sum, average_across_processes, init_distributed, \
    is_distributed
from drawing import plot_curves, sample_grid
from errors import CheckpointError, ConfigError, DatasetError, UserError, check_at_least, error_line, one_line
from flags import add_augment_args, add_dataset_args, add_model_args, config_from
from inference import evaluate, predict_probs, preprocess, probs_to_labels
from losses import segmentation_loss
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
    o.add_argument("--epochs", type=int, default=10, help="training epochs")
    o.add_argument("--batch-size", type=int, default=16, help="images per step and process")
    o.add_argument("--accumulate", type=int, default=1, help="batches whose gradients add up to one step")
    o.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    o.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay")
    o.add_argument("--optimizer", default="adamw", choices=["sgd", "adam", "adamw"], help="optimizer")
    o.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    o.add_argument("--scheduler", default="poly", choices=["poly", "cosine", "constant"],
                   help="learning-rate decay over the run, per step (poly: (1 - t/T)^0.9)")
    o.add_argument("--warmup-epochs", type=float, default=0.0, help="linear learning-rate warm-up")
    o.add_argument("--clip-grad", type=float, default=0.0, help="clip the gradient norm to this (0: off)")
    o.add_argument("--loss", default="ce", choices=["ce", "dice", "ce+dice"],
                   help="cross-entropy (BCE for a single logit), soft Dice, or their sum")
    o.add_argument("--class-weights", type=float, nargs="+", default=None, metavar="W",
                   help="cross-entropy weight of each class, background first (two for a single logit)")
    o.add_argument("--metric", default="miou", choices=["miou", "dice"],
                   help="validation score that picks best.pth (dice: foreground Dice for two classes)")
    s = p.add_argument_group("speed")
    s.add_argument("--amp", nargs="?", const="auto", default="off", choices=["off", "auto", "bf16", "fp16"],
                   help="mixed precision; auto: bf16 on GPUs that support it, else fp16 with loss scaling; "
                        "off on CPUs unless a dtype is named")
    s.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster on tensor cores)")
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
    r.add_argument("--workers", type=int, default=default_workers(),
                   help="data-loader worker processes")
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
        if configs[0].warmup_epochs >= configs[0].epochs:
            raise ConfigError(f"--warmup-epochs ({configs[0].warmup_epochs:g}) must be shorter than --epochs "
                              f"({configs[0].epochs})")
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
    # optimisation
    epochs: int = 10
    batch_size: int = 16
    accumulate: int = 1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    momentum: float = 0.9
    scheduler: str = "poly"
    warmup_epochs: float = 0.0
    clip_grad: float = 0.0
    # what is minimised, and what picks best.pth
    loss: str = "ce"
    class_weights: list | None = None
    metric: str = "miou"
    # speed
    amp: str = "off"
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    # the run: where it is saved, where it starts from, what it runs on
    name: str | None = None
    checkpoint_dir: str = "checkpoints"
    resume: str | None = None
    load: str | None = None
    sample_every: int = 5
    device: str = "auto"
    workers: int = 0
    seed: int = 0

    def check(self):
        check_at_least(1, epochs=self.epochs, batch_size=self.batch_size, accumulate=self.accumulate)
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        check_at_least(0, weight_decay=self.weight_decay, momentum=self.momentum, warmup_epochs=self.warmup_epochs,
                       clip_grad=self.clip_grad, workers=self.workers, sample_every=self.sample_every)
        if self.class_weights and min(self.class_weights) < 0:
            raise ConfigError(f"--class-weights cannot be negative, got {self.class_weights}")
        pick_device(self.device)
        return self


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
            loss = self.criterion(logits, masks)
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


def amp_dtype_for(amp, device):
    """--amp: None (fp32), or the autocast dtype."""
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":  # CPUs without native bf16 run bf16 autocast many times slower than fp32
            print("note: --amp stays off on CPU; name a dtype (--amp bf16) to force it")
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def build_optimizer(model, config, encoder_lr_factor):
    groups = parameter_groups(model, config.lr, encoder_lr_factor=encoder_lr_factor)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    optimizer_class = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return optimizer_class(groups, lr=config.lr, weight_decay=config.weight_decay)


def build_scheduler(optimizer, config, steps_per_epoch):
    """Per-step factor on every group's learning rate: linear warm-up, then poly, cosine or constant."""
    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if config.scheduler == "poly":
            return (1 - progress) ** 0.9
        if config.scheduler == "cosine":
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


def prepare_model(model, config, device, world_size):
    """The model on its device, in its memory format, with synchronised BatchNorm across processes if asked."""
    if config.sync_bn and world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if config.channels_last else model


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
    """This process's share of an epoch (a DistributedSampler, reshuffled each epoch) from a given position on,
    as (index, seed) keys. Each item's random augmentation runs from a seed of (run seed, epoch, index), so it
    does not depend on which worker loads it, and a resumed epoch sees exactly the items an uninterrupted one
    would: one loader with persistent workers serves the whole run."""

    def __init__(self, sampler, seed):
        self.sampler, self.seed, self.epoch, self.start = sampler, seed, 0, 0

    def set_epoch(self, epoch, start=0):
        self.sampler.set_epoch(epoch)
        self.epoch, self.start = epoch, start

    def __len__(self):
        return len(self.sampler) - self.start

    def __iter__(self):
        for index in list(self.sampler)[self.start:]:
            yield index, derived_seed(self.seed, self.epoch, index)


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


def make_loader(dataset, sampler, config, device, drop_last=False):
    """Persistent workers (started once, not every epoch: slow on Windows and macOS, which spawn them), pinned
    memory only with CUDA; workers ignore Ctrl-C, which the main process handles."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=config.batch_size, sampler=sampler, num_workers=config.workers,
        pin_memory=device.type == "cuda", drop_last=drop_last, persistent_workers=config.workers > 0,
        generator=torch.Generator().manual_seed(config.seed), worker_init_fn=ignore_sigint)


def ignore_sigint(worker_id):
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def train_one_epoch(runner, loader, epoch, epochs, accumulate, device, stop, progress, main_process):
    """Trains on the loader's batches. `progress` ({"batch", "batches", "loss_sum", "images"}) says where in
    the epoch the loader starts (after a resume) and is kept up to date. Returns False when a stop was
    requested, after a whole step. Raises NonFiniteLoss, before any update, for a NaN or infinite loss."""
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
        flags = torch.tensor([len(images), stop.requested], dtype=torch.float32, device=device)
        totals = torch.cat([(loss.float() * len(images)).view(1), flags])
        batch_loss, batch_images, stop_votes = all_reduce_sum(totals).tolist()
        if not math.isfinite(batch_loss):
            raise NonFiniteLoss(f"the training loss is {batch_loss} at epoch {epoch}, batch {batch + 1}")
        progress.update(batch=batch + 1, loss_sum=progress["loss_sum"] + batch_loss,
                        images=progress["images"] + int(batch_images))
        bar.set_postfix(loss=f"{batch_loss / batch_images:.4f}")
        if ends_step:
            runner.update()
            if stop_votes and batch + 1 < progress["batches"]:  # at the epoch's end, finish it: validate, save
                return False
    return True


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


def save_samples(model, dataset, normalize, amp_dtype, device, path, count=4):
    """image | truth | prediction for the first `count` images of `dataset`."""
    model.eval()
    images, truths = zip(*(dataset[i] for i in range(min(count, len(dataset)))))
    with autocast(device, amp_dtype):
        predictions = [probs_to_labels(predict_probs(model, image[None].to(device), normalize))[0].cpu()
                       for image in images]
    path.parent.mkdir(exist_ok=True)
    sample_grid(images, truths, predictions, dataset.classes, dataset.mask_values).save(path)


def main(argv=None):
    config, data, augment, model_config, flags = parse_args(argv)
    try:
        device, rank, world_size = init_distributed(pick_device(config.device))
        try:
            return train(config, data, augment, model_config, flags, device, rank, world_size)
        finally:
            if is_distributed():
                torch.distributed.destroy_process_group()
    except UserError as e:  # bad data met while loading too: last.pth, saved atomically, is intact
        sys.exit(f"error: {error_line(e)}")
    except RunInterrupted:
        sys.exit(130)


def train(config, data, augment, model_config, flags, device, rank, world_size):
    """The whole run; `flags` (every flag's value) is saved with it, so that --resume and eval.py can read it."""
    main_process = rank == 0
    if main_process:  # before any data is read: the run must be able to save
        check_folder(Path(config.resume).parent if config.resume else config.checkpoint_dir,
                     "--resume" if config.resume else "--checkpoint-dir")
    checkpoint = load_checkpoint(config.resume or config.load) if config.resume or config.load else None
    if config.resume and checkpoint["epoch"] >= config.epochs and not checkpoint["epoch_progress"]:
        raise ConfigError(f"--resume {config.resume}: the run has finished its {checkpoint['epoch']} epochs; to train "
                          f"it longer pass --epochs N with N > {checkpoint['epoch']}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")  # TF32 matmuls in fp32 runs
    torch.manual_seed(config.seed)
    data = resolve_data(data)
    if data.dataset == "shapes" and augment.crop_size not in (0, AugmentConfig.crop_size) and main_process:
        print(f"note: --crop-size {augment.crop_size} does not apply to the synthetic shapes, made at --image-size "
              f"{data.image_size}", file=sys.stderr)
    flags = {**flags, **dataclasses.asdict(data)}  # the run saves the dataset it found and its mask values
    train_set, val_set = build_dataset(data, "train", augment), build_dataset(data, "val")
    classes = list(train_set.classes)
    model_args = model_config.model_args(len(classes))
    # Pretrained encoder weights are fetched here, for training only; a failed download is one line.
    model = build_model(model_args, pretrained=not (config.resume or config.load))
    num_logits = model_args["num_classes"]
    if config.resume:
        load_all_weights(model, config.resume, checkpoint)
    elif config.load:
        load_weights(model, config.load, checkpoint, num_logits)
    model = prepare_model(model, config, device, world_size)
    normalize, ignore_index = input_normalization(model_args), train_set.ignore_index
    meta = {"model_args": model_args, "classes": classes, "mask_values": list(train_set.mask_values),
            "ignore_index": ignore_index, "normalize": normalize}

    train_sampler = torch.utils.data.DistributedSampler(train_set, world_size, rank, shuffle=True, seed=config.seed)
    drop_last = len(train_sampler) > config.batch_size
    batches_per_epoch = len(train_sampler) // config.batch_size if drop_last else 1
    # Each process scores its own share of the validation set; the confusion matrices are summed.
    val_loader = make_loader(val_set, range(rank, len(val_set), world_size), config, device)
    epoch_sampler = EpochSampler(train_sampler, config.seed)
    train_loader = make_loader(SeededItems(train_set), epoch_sampler, config, device, drop_last)

    optimizer = build_optimizer(model, config, model_config.encoder_lr_factor)
    scheduler = build_scheduler(optimizer, config, math.ceil(batches_per_epoch / config.accumulate))
    amp_dtype = amp_dtype_for(config.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    criterion = build_criterion(config.loss, config.class_weights, num_logits, ignore_index, device)
    runner = StepRunner(model, optimizer, scheduler, scaler, criterion, normalize, amp_dtype,
                        config.channels_last, config.clip_grad)
    # What a checkpoint records of the run's progress; "epoch" counts finished epochs.
    run = {"epoch": 0, "best_score": -1.0, "metrics": None, "epoch_progress": None}
    resume_rng = None
    if config.resume:
        run, resume_rng = restore_training(checkpoint, optimizer, scheduler, scaler, batches_per_epoch, rank,
                                           world_size)

    run_dir = new_folder = log = None
    if main_process:
        if config.resume:
            run_dir = Path(config.resume).parent
        else:
            run_dir = new_folder = new_run_dir(config.checkpoint_dir, config.name or data.dataset)
        (run_dir / "args.json").write_text(json.dumps(flags, indent=2))
        log = RunLog(run_dir, config.metric, run["epoch"])
        print(f"{count_parameters(model) / 1e6:.2f} M parameters, {len(train_set)} train / "
              f"{len(val_set)} val images, device {device} x {world_size}, "
              f"{'AMP ' + str(amp_dtype).removeprefix('torch.') if amp_dtype else 'fp32'}, run folder {run_dir}"
              + (f", resuming after step {scheduler.last_epoch}" if config.resume else ""))
    last_good = Path(config.resume) if config.resume else None

    def save(name):
        """Every process calls it (the RNG states are gathered); rank 0 writes."""
        rng = all_gather_objects(rng_states())
        if main_process:
            save_checkpoint({**meta, **run, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                             "step": scheduler.last_epoch, "args": flags, "rng": rng}, run_dir / name)
            return run_dir / name

    encoder_frozen = None
    with StopRequest() as stop, removed_if_unsaved(new_folder), resume_hint_on_bad_data(lambda: last_good):
        for epoch in range(run["epoch"] + 1, config.epochs + 1):
            frozen = epoch <= model_config.freeze_encoder_epochs
            frozen = set_encoder_frozen(model, frozen) and frozen  # False for models without an encoder
            if frozen != encoder_frozen:
                runner.model, runner.ddp = wrap_for_steps(model, config.compile, device, world_size, frozen)
                encoder_frozen = frozen
            start = time.perf_counter()
            progress = run["epoch_progress"] or {"batch": 0, "batches": batches_per_epoch, "loss_sum": 0.0,
                                                 "images": 0}
            run["epoch_progress"] = progress
            seed_everything(derived_seed(config.seed, epoch, rank))
            if progress["batch"] and resume_rng:
                set_rng_states(resume_rng)  # resumed mid-epoch
            epoch_sampler.set_epoch(epoch, progress["batch"] * config.batch_size)
            try:
                finished = train_one_epoch(runner, train_loader, epoch, config.epochs, config.accumulate, device,
                                           stop, progress, main_process)
            except NonFiniteLoss as e:
                where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was saved yet"
                raise TrainingError(f"{e}; stopped, {where}. Try a lower --lr, --clip-grad or --amp off") from None
            if not finished:
                path = save("last.pth")
                if main_process:
                    print(f"interrupted during epoch {epoch}: saved {path}; continue with --resume {path}")
                raise RunInterrupted
            loss = progress["loss_sum"] / progress["images"]
            # BatchNorm statistics differ between processes: average them, so that every process scores,
            # and the checkpoint holds, the same model.
            average_across_processes(model.buffers())
            with autocast(device, amp_dtype):
                metrics = evaluate(model, val_loader, num_logits, normalize, ignore_index, device,
                                   distributed=world_size > 1)
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
                if config.sample_every and (epoch % config.sample_every == 0 or epoch == config.epochs):
                    save_samples(model, val_set, normalize, amp_dtype, device,
                                 run_dir / "samples" / f"epoch_{epoch:03d}.png")
                dice = f"  dice {score:.4f}" if config.metric == "dice" else ""
                print(f"epoch {epoch}/{config.epochs}  loss {loss:.4f}  mIoU {metrics['miou']:.4f}  "
                      f"pixel acc {metrics['pixel_acc']:.4f}{dice}{'  (best)' if improved else ''}  {seconds:.1f}s")
            if any_process(stop.requested, device):
                if main_process:
                    print(f"stopped after epoch {epoch}: continue with --resume {last_good}")
                raise RunInterrupted
    if main_process:
        print(f"best {config.metric} {run['best_score']:.4f}: {run_dir / 'best.pth'}")
    return run_dir


def load_all_weights(model, path, checkpoint):
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        raise CheckpointError(f"--resume {path} holds another architecture ({one_line(e)})") from None


def restore_training(checkpoint, optimizer, scheduler, scaler, batches_per_epoch, rank, world_size):
    """--resume: the optimizer, scheduler and scaler states; returns the run's progress and this process's
    RNG states at the time of the save."""
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    if checkpoint["scaler"]:
        scaler.load_state_dict(checkpoint["scaler"])
    elif scaler.is_enabled():  # saved by a run without fp16: the scaler starts afresh
        print("note: the checkpoint has no fp16 loss-scaler state; the loss scale starts afresh")
    run = {key: checkpoint[key] for key in ("epoch", "best_score", "metrics", "epoch_progress")}
    if run["epoch_progress"] and run["epoch_progress"]["batches"] != batches_per_epoch:
        print("note: the number of batches per epoch changed, so the interrupted epoch starts again")
        run["epoch_progress"] = None
    return run, checkpoint["rng"][rank] if len(checkpoint["rng"]) == world_size else None


if __name__ == "__main__":
    main()
