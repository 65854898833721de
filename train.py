"""Train a U-Net. Example: python train.py --dataset shapes --epochs 10 --base-channels 16
Several GPUs: torchrun --nproc_per_node=4 train.py ... (--batch-size is per process)."""
import time

STARTED = time.monotonic()  # a --time budget counts from here: the start-up is part of it

import argparse
import dataclasses
import json
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoints import check_resumable, load_checkpoint, save_checkpoint, without_resume_state
from datasets import DataConfig, build_dataset, load_scale, mask_layout, resolve_data
from distributed import all_gather_objects, all_reduce_sum, average_across_processes, init_distributed, \
    is_distributed
from engine import StepRunner, build_runner, build_scheduler, load_all_weights, load_weights, \
    prepare_model, restore_training, time_epoch_end, time_training_step, wrap_for_steps
from errors import CheckpointError, ConfigError, DatasetError, EncoderWeightsError, UserError, check_at_least, \
    check_seeds, error_line, one_line
from flags import add_augment_args, add_dataset_args, add_model_args, add_precision_args, config_from, finite_float
from inference import evaluate
from interrupts import RunInterrupted, StopRequest
from losses import balanced_class_weights
from precision import Precision, choose_precision
from progress import Progress
from recipe import CPU_BATCH, DEFAULT_EPOCHS, GPU_BATCH, LIGHT_AUGMENT, MAX_VALIDATIONS, MIN_BUDGET, \
    MIN_STEPS_PER_EPOCH, WARMUP_SHARE, Deadline, EpochPace, Fingerprint, Plan, budget_augment, check_unfinished, \
    duration_text, fingerprint, fit_recipe, parse_duration, plan_budget, plan_run, replan, replan_note
from image_stats import input_normalization_for
from model import TRAINING_FLAGS, ModelConfig, build_model, count_parameters, set_encoder_frozen
from model_choice import CANDIDATE_STRIDE, ENCODERS, NETWORK_FLAGS, as_record, candidate_config, choose, describe, \
    missing_weights_note, probe as probe_candidates, weights_file_encoder
from rundir import RunLog, check_run_name, new_run_dir, removed_if_unsaved, save_samples
from sampling import EpochSampler, SeededItems, make_loader
from transforms import AugmentConfig
from utils import check_folder, default_workers, derived_seed, pick_device, progress_bars, \
    rng_states, seed_everything, set_rng_states


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataset_args(p)
    add_augment_args(p)
    add_model_args(p)
    o = p.add_argument_group("optimisation")
    o.add_argument("--time", type=parse_duration, default=None, metavar="DURATION",
                   help=f"wall-clock budget of the whole run (90s, 10m, 2h; at least {MIN_BUDGET:g}s): the run plans "
                        f"its steps to end within it and, when no network flag names one, chooses the network "
                        f"(the classic U-Net at width 16, or a ResNet-18 or ResNet-34 U-Net; docs/models.md)")
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
    o.add_argument("--lr", type=finite_float, default=1e-3, help="peak learning rate")
    o.add_argument("--weight-decay", type=finite_float, default=1e-4, help="weight decay")
    o.add_argument("--optimizer", default="adamw", choices=["sgd", "adam", "adamw"], help="optimizer")
    o.add_argument("--momentum", type=finite_float, default=0.9, help="SGD momentum")
    o.add_argument("--scheduler", default="poly", choices=["poly", "cosine", "constant"],
                   help="learning-rate decay over the run, per step (poly: (1 - t/T)^0.9)")
    o.add_argument("--warmup-epochs", type=finite_float, default=None,
                   help=f"linear learning-rate warm-up (default: {WARMUP_SHARE * 100:g}%% of the steps)")
    o.add_argument("--clip-grad", type=finite_float, default=0.0, help="clip the gradient norm to this (0: off)")
    o.add_argument("--loss", default="ce+dice", choices=["ce", "dice", "ce+dice"],
                   help="cross-entropy (BCE for a single logit), soft Dice, or their sum (nnU-Net's default)")
    o.add_argument("--class-weights", type=class_weight, nargs="+", default=["balanced"], metavar="W",
                   help="cross-entropy weight of each class, background first (two for a single logit); "
                        "'balanced' (the default): 1/sqrt of each class's share of the training pixels; 'none'")
    o.add_argument("--metric", default="miou", choices=["miou", "dice"],
                   help="validation score that picks best.pth (dice: foreground Dice for two classes)")
    s = p.add_argument_group("speed")
    add_precision_args(s)
    s.add_argument("--compile", action="store_true", help="torch.compile the model")
    s.add_argument("--sync-bn", action="store_true", help="synchronise BatchNorm statistics across GPUs")
    r = p.add_argument_group("run")
    r.add_argument("--name", default=None,
                   help="run name, a folder name (default: the dataset); the run folder adds a timestamp")
    r.add_argument("--checkpoint-dir", default="checkpoints", help="folder that holds the run folders")
    r.add_argument("--resume", default=None, metavar="PATH",
                   help="continue a run from its checkpoint, in its folder (flags not given come from it)")
    r.add_argument("--load", default=None, metavar="PATH", help="start from these weights (fine-tuning)")
    r.add_argument("--sample-every", type=int, default=5, help="save a sample grid every N epochs (0: never)")
    r.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1'...")
    r.add_argument("--workers", type=int, default=None,
                   help="data-loader worker processes (default: usable CPU cores - 1, at most 4; 0 when the model "
                        "runs on 2 CPU cores or fewer)")
    r.add_argument("--seed", type=int, default=0, help="seed of the weights and the data order (0 to 2^63 - 1)")
    return p


def parse_args(argv=None):
    """The run's configs, every flag checked (argparse's usage line and status 2 otherwise), and the flags as a
    dict, which the run saves: (TrainConfig, DataConfig, AugmentConfig, ModelConfig, flags)."""
    p = get_args_parser()
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
        elif args.load:  # the architecture of the loaded model, unless flags name another; how to train it: ours
            model_flags = {field.name for field in dataclasses.fields(ModelConfig)} - set(TRAINING_FLAGS)
            p.set_defaults(**{k: v for k, v in resume_defaults(p, args.load, "--load").items() if k in model_flags})
            flags = vars(p.parse_args(argv))
        config, data, augment = (config_from(kind, flags).check() for kind in (TrainConfig, DataConfig, AugmentConfig))
        given = given_flags(argv)
        planned = args.time is not None and not (args.resume or args.load or given & set(NETWORK_FLAGS))
        model_config = dataclasses.replace(config_from(ModelConfig, flags), planned=planned)
        if args.time is not None and not args.resume:
            augment = dataclasses.replace(augment, planned=tuple(sorted(set(LIGHT_AUGMENT) - given)))
        # --resume and --load take the weights of the checkpoint, never --encoder-weights: it may have moved.
        model_config = model_config.check(reads_weights=not (args.resume or args.load))
        if planned and model_config.encoder_weights not in ("imagenet", "none"):
            weights_file_encoder(model_config.encoder_weights)  # a file of one of the candidates' networks
        if augment.crop_size is not None:
            model_config.check_training_side(augment.crop_size, "--crop-size", zero="0 (no crop) ")
        if data.dataset == "shapes":
            model_config.check_training_side(data.image_size, "--image-size")
    except (ConfigError, CheckpointError, EncoderWeightsError) as e:
        p.error(str(e))
    return config, data, augment, model_config, flags


def given_flags(argv):
    """The flags written on the command line `argv`, by their dests (argparse fills in the others' defaults)."""
    parser = get_args_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


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
        checkpoint = load_checkpoint(path)
        if flag == "--resume":
            check_resumable(checkpoint, path)
        saved = checkpoint.get("args", {})
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
        words = [w for w in self.class_weights or [] if isinstance(w, str)]
        if words and len(self.class_weights) > 1:
            raise ConfigError(f"--class-weights takes 'balanced' or 'none' alone, or one number per class, got "
                              f"{' '.join(map(str, self.class_weights))}")
        if self.class_weights and not words and min(self.class_weights) < 0:
            raise ConfigError(f"--class-weights cannot be negative, got {self.class_weights}")
        check_seeds(seed=self.seed)
        pick_device(self.device)
        check_run_name(self.name)
        return self


OUT_OF_MEMORY_FIX = "give a smaller --batch-size or --crop-size"


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite."""


class TrainingError(UserError):
    """The run cannot go on (a NaN loss); the message says where the last good checkpoint is."""


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
    except torch.OutOfMemoryError as e:  # in the start-up's timed step: nothing was saved
        sys.exit(f"error: out of memory ({one_line(e, 100)}): {OUT_OF_MEMORY_FIX}")
    except KeyboardInterrupt:  # Ctrl-C before the first step: nothing was saved, and nothing changed
        print("interrupted during start-up: nothing was saved"
              + (f"; {config.resume} is unchanged" if config.resume else ""), file=sys.stderr)
        sys.exit(130)
    except RunInterrupted as e:
        if str(e):
            print(e, file=sys.stderr)
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
    if main_process:
        note_batch_of_one(batch_size, config.sync_bn and world_size > 1)
    # The run saves the dataset it found, its mask values and the recipe it chose.
    flags = {**flags, **dataclasses.asdict(data), "batch_size": batch_size, "crop_size": augment.crop_size,
             "elastic": augment.elastic, "vflip": augment.vflip}
    if config.class_weights in (["balanced"], ["none"]):
        weights = balanced_weights(train_set.classes, fp.masks, main_process) \
            if config.class_weights == ["balanced"] else None
        config, flags = dataclasses.replace(config, class_weights=weights), {**flags, "class_weights": weights}
    probe = Probe(config, fp, batch_size, augment.crop_size, len(val_set), world_size)
    chosen = None
    if model_config.planned:
        model_config, chosen = plan_network(probe, model_config, train_set, augment, device, started, main_process)
        flags = {**flags, **model_flags(model_config), "network_choice": chosen and chosen["record"]}
    model, precision, meta = build_run_model(config, model_config, checkpoint, train_set, device, world_size)
    num_logits = meta["model_args"]["num_classes"]
    # Each process scores its own share of the validation set; the confusion matrices are summed.
    runner = build_runner(model, config, model_config.encoder_lr(), precision, meta, device)
    if main_process:
        print(f"precision: {precision.describe()}")
    plan = plan_run(config, checkpoint, fp, batch_size, augment, world_size, started,
                    lambda: chosen["step"] if chosen else probe.step(runner, model, num_logits, device),
                    lambda: chosen["end"] if chosen else probe.epoch_end(model, meta["normalize"], precision))
    plan = all_gather_objects(plan)[0]  # each process timed its own step: rank 0's plan is the run's
    augment, note = budget_augment(augment, plan, fp, world_size * config.accumulate)
    if note:
        flags = {**flags, "zoom": list(augment.zoom), "rotate": augment.rotate, "elastic": augment.elastic}
        if main_process:
            print(note)
    train_set = build_dataset(data, "train", augment)  # augmented as the plan decided
    val_loader = make_loader(val_set, range(rank, len(val_set), world_size), 1, config, device)
    epoch_sampler = EpochSampler(len(train_set), batch_size, config.seed, rank, world_size)
    train_loader = make_loader(SeededItems(train_set), epoch_sampler, batch_size, config, device)
    runner.scheduler = build_scheduler(runner.optimizer, config.scheduler, plan)
    # What a checkpoint records of the run's progress; "epoch" counts finished epochs.
    run = {"epoch": 0, "best_score": -1.0, "metrics": None, "epoch_progress": None}
    resume_rng = None
    if config.resume:
        run, resume_rng = restore_training(checkpoint, runner.optimizer, runner.scheduler, runner.scaler, rank,
                                           world_size)
    session = Session(config, flags, meta, model, runner, plan, run, device, rank, world_size, val_loader, val_set,
                      load_scale(data.dataset, data.scale), precision,
                      Deadline(plan.budget, plan.spent, started) if plan.budget else None)
    start_session(session, len(train_set))
    new_folder = None if config.resume else session.run_dir
    with session.stop, removed_if_unsaved(new_folder), resume_hints(lambda: session.last_good):
        train_epochs(session, model_config.freeze_encoder_epochs, train_loader, epoch_sampler, resume_rng)
        check_made_a_model(session)
    if main_process:
        deadline = session.deadline
        used = f" in {duration_text(deadline.used())} of the {duration_text(plan.budget)} budget" if deadline else ""
        print(f"best {config.metric} {session.run['best_score']:.4f}: {session.run_dir / 'best.pth'}{used}")
    return session.run_dir


@dataclass
class Probe:
    """Times a training step and foresees a validation with its saves, for the plan of a --time run."""
    config: "TrainConfig"
    fp: Fingerprint
    batch_size: int
    crop_size: int
    val_images: int
    world_size: int

    def step(self, runner, model, num_logits, device):
        """(seconds of a training step, seconds the run's first step costs beyond them): with --compile, of the
        compiled model, and its compilation, which the run pays once too."""
        if self.config.compile:
            runner = dataclasses.replace(runner, model=torch.compile(model))
        return time_training_step(runner, model, self.batch_size, self.crop_size, self.fp, num_logits,
                                  self.config.accumulate, device)

    def epoch_end(self, model, normalize, precision):
        return time_epoch_end(model, normalize, precision.dtype, self.fp.val_pixels / self.val_images,
                              math.ceil(self.val_images / self.world_size), self.config.optimizer)


def plan_network(probe, model_config, train_set, augment, device, started, main_process):
    """--time with no network named: (ModelConfig of the candidate the plan expects to score best, {"step":
    (step, one-off seconds), "end": validation seconds, as its probe measured them, "record": what args.json
    keeps}), printing the candidates and the choice
    (model_choice.py). Images smaller than the candidates' output stride keep the classic U-Net: (config, None)."""
    config, fp = probe.config, probe.fp
    side = augment.crop_size or min(fp.median_size)
    if side < CANDIDATE_STRIDE:
        print(f"network: the classic U-Net, as the training images ({side} pixels a side) are smaller than the "
              f"{CANDIDATE_STRIDE} pixels the ResNet U-Nets halve five times")
        return model_config, None

    def time_candidate(network, weights):
        candidate = candidate_config(model_config, network, weights)
        model, precision, meta = build_run_model(config, candidate, None, train_set, device, probe.world_size)
        runner = build_runner(model, config, candidate.encoder_lr(), precision, meta, device)
        step, one_off = probe.step(runner, model, meta["model_args"]["num_classes"], device)
        return step, probe.epoch_end(model, meta["normalize"], precision), one_off

    def plan_steps(step, end, one_off):
        return plan_budget(config.time, Deadline(config.time, 0.0, started).plannable() - one_off, step, end,
                           fp.train_images, probe.batch_size, augment.crop_size, augment.elastic).total_steps

    timed = probe_candidates(time_candidate, plan_steps, model_config.encoder_weights)
    chosen = all_gather_objects(choose(timed))[0]  # each process timed its own: rank 0's choice is the run's
    if main_process:
        print(describe(timed, chosen, config.compile))
        random = [t.network for t in timed if t.weights == "none" and t.network in ENCODERS]
        if random and model_config.encoder_weights == "imagenet":
            print(missing_weights_note(random))
    model_config = candidate_config(model_config, chosen.network, chosen.weights)
    return model_config, {"step": (chosen.step_seconds, chosen.one_off_seconds), "end": chosen.epoch_end_seconds,
                          "record": as_record(timed, chosen)}


def model_flags(model_config):
    """The ModelConfig fields that are flags, as args.json keeps them."""
    return {k: v for k, v in dataclasses.asdict(model_config).items() if k not in ("in_channels", "planned")}


def balanced_weights(classes, masks, main_process):
    """--class-weights balanced: the weights of the classes' shares in the training masks (a MaskLayout),
    printed."""
    weights = [round(w, 3) for w in balanced_class_weights(masks.shares)]
    if main_process:
        print("class weights (balanced, from the training masks' pixels): " + ", ".join(
            f"{name} {w:g} ({share:.2%})" for name, w, share in zip(classes, weights, masks.shares)))
    return weights


def class_weight(text):
    """argparse type of --class-weights: a number, or the word 'balanced' or 'none'."""
    return text if text in ("balanced", "none") else finite_float(text)


def note_batch_of_one(batch_size, synchronised_batch_norm):
    if batch_size == 1 and not synchronised_batch_norm:
        print("note: with --batch-size 1 BatchNorm normalises each training image by its own statistics, which its "
              "running averages, used for scoring, do not match (ISBI, 400 steps: one 512x512 crop a step scored "
              "membrane Dice 0.21, four 256x256 crops 0.80); use 2 or more, with a smaller --crop-size to fit memory",
              file=sys.stderr)


def build_run_model(config, model_config, checkpoint, train_set, device, world_size):
    """(model on its device, Precision, the checkpoint's description of the model and of the data it reads)."""
    classes = list(train_set.classes)
    form = getattr(train_set, "form", None)  # the images' (images.describe_form); the shapes are 8-bit RGB
    model_config = dataclasses.replace(model_config, in_channels=form[0] if form else 3)
    model_args = model_config.model_args(len(classes))
    # Pretrained encoder weights are fetched here, for training only; a failed download is one line.
    model = build_model(model_args, pretrained=not (config.resume or config.load))
    if config.resume:
        load_all_weights(model, config.resume, checkpoint)
    elif config.load:
        load_weights(model, config.load, checkpoint, model_args["num_classes"])
    precision = choose_precision(device, config.amp, config.channels_last)
    model = prepare_model(model, config.sync_bn, precision, device, world_size)
    normalize = input_normalization_for(form, [image for image, _ in getattr(train_set, "pairs", [])], model_args)
    meta = {"model_args": model_args, "classes": classes, "mask_values": list(train_set.mask_values),
            "ignore_index": train_set.ignore_index, "normalize": normalize}
    return model, precision, meta


@dataclass
class Session:
    """A run under way: what its epochs share, and the run folder its main process writes."""
    config: TrainConfig
    flags: dict  # every flag's value, saved in each checkpoint
    meta: dict  # what a checkpoint says of the model and of the data it reads
    model: torch.nn.Module  # the plain model, which checkpoints save
    runner: StepRunner
    plan: Plan
    run: dict  # the run's progress, saved in each checkpoint
    device: torch.device
    rank: int
    world_size: int
    val_loader: torch.utils.data.DataLoader
    val_set: torch.utils.data.Dataset
    scale: float  # the scale validation reads images at
    precision: Precision
    deadline: Deadline | None = None
    run_dir: Path | None = None
    log: RunLog | None = None
    last_good: Path | None = None  # the last checkpoint saved, to resume from
    stop: StopRequest = dataclasses.field(default_factory=StopRequest)

    @property
    def main_process(self):
        return self.rank == 0

    @property
    def step(self):
        return self.runner.scheduler.last_epoch

    def save(self, name):
        """Every process calls it (the RNG states are gathered); rank 0 writes, and returns the path. Only
        last.pth can be resumed: best.pth, the file to share, leaves out the optimizer state (AdamW's: twice the
        weights' bytes), the scheduler's, the scaler's and the random states."""
        rng = all_gather_objects(rng_states())
        if self.main_process:
            runner, plan = self.runner, self.plan
            plan.spent = self.deadline.used() if self.deadline else 0.0
            path = self.run_dir / name
            state = {**self.meta, **self.run, "model": self.model.state_dict(),
                     "optimizer": runner.optimizer.state_dict(), "scheduler": runner.scheduler.state_dict(),
                     "scaler": runner.scaler.state_dict(), "step": self.step, "args": self.flags,
                     "plan": plan.as_dict(), "rng": rng}
            with self.stop.saving_checkpoint():
                save_checkpoint(state if name == "last.pth" else without_resume_state(state), path)
                if name == "last.pth":
                    self.last_good = path
            return path


def start_session(s, train_images):
    """Checks a resumed run has steps left, fits the plan to the time left, opens the run folder and its log
    (main process), and says what the run will do."""
    config, plan, deadline = s.config, s.plan, s.deadline
    if config.resume:
        check_unfinished(config.resume, plan, deadline, s.step, s.run)
        s.last_good = Path(config.resume)
    if deadline:
        progress = s.run["epoch_progress"]
        left_in_epoch = (progress["batches"] - progress["batch"]) // config.accumulate if progress else 0
        replan(plan, s.step, deadline, left_in_epoch)
    if not s.main_process:
        return
    if config.resume:
        s.run_dir = Path(config.resume).parent
    else:
        s.run_dir = new_run_dir(config.checkpoint_dir, config.name or s.flags["dataset"])
    (s.run_dir / "args.json").write_text(json.dumps({**s.flags, "plan": plan.as_dict()}, indent=2))
    s.log = RunLog(s.run_dir, config.metric, s.run["epoch"])
    print(f"{count_parameters(s.model) / 1e6:.2f} M parameters, {train_images} train / "
          f"{len(s.val_set)} val images, device {s.device} x {s.world_size}, run folder {s.run_dir}"
          + (f", resuming after step {s.step}" if config.resume else ""))
    print(plan.describe())


def check_made_a_model(s):
    """TrainingError when the run ends without a best.pth: a --time budget that the start-up used up (nothing
    saved: the new run folder is removed), or no validation score to pick best.pth by (last.pth is kept)."""
    plan = s.plan
    if s.run["epoch"] == 0:
        raise TrainingError(f"--time {duration_text(plan.budget)} left no time to train: the start-up took "
                            f"{s.deadline.used():.1f}s, and a step with the validation and save after it needs "
                            f"about {plan.step_seconds + plan.epoch_end_seconds:.1f}s more; give a longer --time")
    if s.run["best_score"] < 0:
        raise TrainingError(f"no validation score to pick best.pth by ({s.config.metric} was n/a at every epoch): "
                            f"--metric {s.config.metric} needs its class in the validation masks; last.pth is "
                            f"{s.last_good}")


def train_epochs(s, freeze_encoder_epochs, train_loader, epoch_sampler, resume_rng):
    """Trains, validates and saves epoch after epoch to the plan's last step (re-planned after each epoch with
    a --time budget). Raises RunInterrupted once a stop request is honoured (a resumable last.pth saved)."""
    encoder_frozen = None
    epoch_ends = []  # seconds each validation and its saves took in this session
    while s.run["epoch_progress"] or s.step < s.plan.total_steps:
        epoch = s.run["epoch"] + 1
        frozen = epoch <= freeze_encoder_epochs
        frozen = set_encoder_frozen(s.model, frozen) and frozen  # False for models without an encoder
        if frozen != encoder_frozen:  # DDP averages the gradients of the parameters that required them when built
            s.runner.model, s.runner.ddp = wrap_for_steps(s.model, s.config.compile, s.device, s.world_size)
            encoder_frozen = frozen
        epochs = s.plan.epochs_from(s.run["epoch"], s.step)  # as planned
        planned = (s.plan.step_seconds, s.plan.epoch_end_seconds)
        start = time.perf_counter()
        ended, loss = train_epoch(s, epoch, epochs, train_loader, epoch_sampler, resume_rng, not epoch_ends)
        trained = time.perf_counter() - start
        if ended == "time":  # the budget ends with this epoch
            s.plan.total_steps = s.step
        validate_and_save(s, epoch, epochs, loss, start)
        epoch_ends.append(time.perf_counter() - start - trained)
        # The first validation sets up the kernels for each image size (cuDNN autotunes them on GPUs): once later
        # ones are timed, it no longer counts.
        s.plan.epoch_end_seconds = max(epoch_ends[1:] or epoch_ends)
        if s.deadline and ended != "time":
            replan(s.plan, s.step, s.deadline)
            note = replan_note(epochs, s.plan.epochs_from(epoch, s.step), planned,
                               (s.plan.step_seconds, s.plan.epoch_end_seconds))
            if note and s.main_process:
                print(note)
        if any_process(s.stop.requested, s.device):
            if s.main_process:
                print(f"stopped after epoch {epoch}: continue with --resume {s.last_good}")
            raise RunInterrupted


def train_epoch(s, epoch, epochs, train_loader, epoch_sampler, resume_rng, first_of_session=False):
    """(how the epoch ended, its mean training loss): trains epoch `epoch` (of `epochs` planned), or the rest of
    it after a resume, and measures the seconds a step takes (EpochPace). A stop request saves last.pth and
    raises RunInterrupted."""
    config, plan = s.config, s.plan
    steps = min(plan.steps_per_epoch, plan.total_steps - s.step)
    progress = s.run["epoch_progress"] or {"batch": 0, "batches": steps * config.accumulate, "loss_sum": 0.0,
                                           "images": 0}
    s.run["epoch_progress"] = progress
    seed_everything(derived_seed(config.seed, epoch, s.rank))
    if progress["batch"] and resume_rng:
        set_rng_states(resume_rng)  # resumed mid-epoch
    epoch_sampler.set_epoch(epoch, progress["batches"], progress["batch"])
    pace = EpochPace(plan, s.deadline, first_of_session)  # ends the epoch early when the rest would overrun
    try:
        ended = train_one_epoch(s.runner, train_loader, epoch, epochs, config.accumulate, s.device, s.stop,
                                progress, s.main_process, pace.out_of_time)
    except NonFiniteLoss as e:
        where = f"the last good checkpoint is {s.last_good}" if s.last_good else "no checkpoint was saved yet"
        raise TrainingError(f"{e}; stopped, {where}. Try a lower --lr, --clip-grad or --amp off") from None
    if ended == "stop":
        path = s.save("last.pth")
        if s.main_process:
            print(f"interrupted during epoch {epoch}: saved {path}; continue with --resume {path}")
        raise RunInterrupted
    if ended == "time" and s.main_process:
        print(pace.cut_note(epoch, (progress["batch"] // config.accumulate, steps)))
    plan.step_seconds = pace.measured() or plan.step_seconds
    return ended, progress["loss_sum"] / progress["images"]


def validate_and_save(s, epoch, epochs, loss, start):
    """Scores the model on the validation set, saves last.pth (and best.pth when the score improved), and on the
    main process logs the epoch, draws samples and prints its line; `start`: when the epoch began."""
    config, meta = s.config, s.meta
    num_logits = meta["model_args"]["num_classes"]
    # BatchNorm statistics differ between processes: average them, so that every process scores,
    # and the checkpoint holds, the same model.
    average_across_processes(s.model.buffers())
    metrics = evaluate(s.model, s.val_loader, num_logits, meta["normalize"], meta["ignore_index"], s.device,
                       distributed=s.world_size > 1, scale=s.scale, amp_dtype=s.precision.dtype)
    if math.isnan(metrics["miou"]):
        raise TrainingError(f"validation scored no pixel: every pixel of the {len(s.val_set)} validation mask(s) is "
                            f"void, so no best.pth can be chosen; give validation masks that label some pixels")
    score = score_of(metrics, config.metric, num_logits)
    improved = score > s.run["best_score"]
    s.run.update(epoch=epoch, metrics=metrics, epoch_progress=None, best_score=max(s.run["best_score"], score))
    s.save("last.pth")
    if improved:
        s.save("best.pth")
    if not s.main_process:
        return
    seconds = time.perf_counter() - start
    s.log.append({"epoch": epoch, "step": s.step, "lr": s.runner.optimizer.param_groups[0]["lr"],
                  "train_loss": loss, **{k: v for k, v in metrics.items() if not isinstance(v, list)},
                  "score": score, "seconds": seconds})
    last_epoch = s.step >= s.plan.total_steps
    if config.sample_every and (epoch % config.sample_every == 0 or last_epoch):
        save_samples(s.model, s.val_set, meta["normalize"], s.scale, s.precision.dtype, s.device,
                     s.run_dir / "samples" / f"epoch_{epoch:03d}.png")
    dice = f"  dice {score:.4f}" if config.metric == "dice" else ""
    print(f"epoch {epoch}/{epochs}  loss {loss:.4f}  mIoU {metrics['miou']:.4f}  "
          f"pixel acc {metrics['pixel_acc']:.4f}{dice}{'  (best)' if improved else ''}  {seconds:.1f}s")


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
    # For a log file, where the bar is off: a plain line every 30 s.
    lines = Progress(progress["batches"], f"epoch {epoch}/{epochs}", "batches", bar=False, done=progress["batch"])
    lines_wanted = main_process and not progress_bars()
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
        if lines_wanted:
            lines.update()
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
def resume_hints(last_good):
    """A file that went bad or is truncated, met during the run, running out of memory, or a second Ctrl-C: one
    line that says how to go on from the last good checkpoint (`last_good()`, or None before the first save; a
    save under way when the second Ctrl-C came completes first)."""
    try:
        yield
    except DatasetError as e:
        fix = (f"fix or remove the file and continue with --resume {last_good()}" if last_good()
               else "fix or remove the file and start again")
        raise TrainingError(f"{error_line(e)}; {fix} (or add --skip-bad to leave out unreadable pairs)") from None
    except torch.OutOfMemoryError as e:
        kept = f"the last good checkpoint is {last_good()}" if last_good() else "no checkpoint was saved"
        raise TrainingError(f"out of memory ({one_line(e, 100)}): {OUT_OF_MEMORY_FIX}; {kept}") from None
    except KeyboardInterrupt:
        left = f"{last_good()} is whole: continue with --resume {last_good()}" if last_good() else "nothing was saved"
        raise RunInterrupted(f"aborted by a second Ctrl-C: {left}") from None


def prepare_data(config, data, augment, device, main_process):
    """(resolved DataConfig, training set, validation set, Fingerprint, batch size, AugmentConfig): the data
    found, and the batch and augmentation the recipe fits to it. The training set is not augmented yet: the
    plan may still lighten the augmentation (recipe.budget_augment). Validation scores whole images at the
    files' resolution, as eval.py does, so that best.pth follows eval.py's number."""
    data = resolve_data(data)
    if data.dataset == "shapes" and augment.crop_size and main_process:
        print(f"note: --crop-size {augment.crop_size} does not apply to the synthetic shapes, made at --image-size "
              f"{data.image_size}", file=sys.stderr)
    val_set = build_dataset(data, "val", full_resolution=True)
    train_set = build_dataset(data, "train")
    # The masks are read only where a default needs them: the vertical flips' and the balanced class weights'.
    needs_masks = augment.vflip is None or config.class_weights == ["balanced"]
    masks = mask_layout(train_set, len(train_set.classes)) if needs_masks else None
    fp = fingerprint(train_set, val_set, load_scale(data.dataset, data.scale), masks)
    vflip_given = augment.vflip is not None
    batch_size, augment = fit_recipe(config, augment, fp, device.type)
    if main_process and augment.vflip and not vflip_given:
        print(f"augmentation: vertical flips too (--vflip {augment.vflip:g}), as the data show no up and down: "
              f"the masks' classes lie alike in the top and bottom halves (asymmetry {masks.upside_down:.3f}, "
              f"left/right {masks.mirrored:.3f}); --vflip 0 turns them off")
    return data, train_set, val_set, fp, batch_size, augment


if __name__ == "__main__":
    main()
