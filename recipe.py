"""The training recipe, fitted to the data, the machine and the time budget as nnU-Net plans from a dataset
fingerprint: batch and crop size, the length of an epoch (the steps between two validations), the number of
steps, the warm-up, and elastic deformation for small datasets. Every choice is printed, and each flag overrides
its own. With a time budget (--time) the run measures its throughput, plans its steps so that training,
validation and checkpoints end within the budget, and re-plans after every validation from what it measured.
plan_run makes train.py's plan from its flags (or takes a resumed run's own).
"""
import argparse
import dataclasses
import math
import re
import statistics
import time
from dataclasses import asdict, dataclass

from images import header_size

from distributed import all_gather_objects
from errors import ConfigError
from utils import spread_indices

MIN_STEPS_PER_EPOCH = 50  # a tiny dataset is seen several times an epoch rather than validated every few steps
MAX_VALIDATIONS = 20  # validations a budgeted run aims for: enough to pick a good best.pth
VALIDATION_SHARE = 0.1  # at most this share of a budget goes to validation and checkpoints
WARMUP_SHARE = 0.03  # linear learning-rate warm-up, as a share of the planned steps
SMALL_DATASET = 100  # fewer training images than this get elastic deformation (the U-Net paper had 30)
ELASTIC_PROBABILITY = 0.5
# Vertical flips for data with no up and down: the top/bottom asymmetry of the masks' classes (no_up_and_down)
# under the floor, or at most this many times the left/right one and under the cap.
UPRIGHT_FLOOR, UPRIGHT_RATIO, UPRIGHT_CAP = 0.01, 1.5, 0.05
VFLIP_PROBABILITY = 0.5
AUGMENT_PASSES = 100  # a --time plan showing the training pixels fewer times trains without zoom and rotation
LIGHT_AUGMENT = {"zoom": (1.0, 1.0), "rotate": 0.0, "elastic": 0.0}
LIGHT_NAMES = {"zoom": "zoom", "rotate": "rotation", "elastic": "elastic deformation"}
SIZE_SAMPLE = 64  # images whose headers are read to fingerprint a dataset
CPU_BATCH, CPU_CROP = 4, 256  # CPUs: throughput per image hardly grows with the batch; small batches, more steps
GPU_BATCH, GPU_CROP = 16, 512
MAX_BATCH = 16
# Before the first validation is timed: a validation takes its forward passes (one timed) times this, for loading
# and scoring, and its checkpoints are written (and fsync'd) at this rate, a slow cloud or network disk's.
VALIDATION_OVERHEAD = 1.25
SAVE_BYTES_PER_SECOND = 200e6
DEFAULT_EPOCHS = 10  # train.py without --time or --epochs
UNITS = {"s": 1, "m": 60, "h": 3600}
# The least --time: start-up (importing PyTorch, reading the data: 2-3 s on a small CPU), one timed step, one
# validation and one checkpoint save, and the 1 s exit margin (Deadline) must fit in it.
MIN_BUDGET = 5.0


def parse_duration(text):
    """'90s', '10m', '2h', '1h30m', '1.5h' -> seconds (argparse type of --time)."""
    parts = re.findall(r"(\d+(?:\.\d*)?)([smh])", text.strip().lower())
    if not parts or "".join(n + u for n, u in parts) != text.strip().lower().replace(" ", ""):
        raise argparse.ArgumentTypeError(f"'{text}' is not a duration: write it as 90s, 10m, 2h or 1h30m")
    seconds = sum(float(number) * UNITS[unit] for number, unit in parts)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"the time budget must be positive, got '{text}'")
    if not math.isfinite(seconds):
        raise argparse.ArgumentTypeError(f"the time budget must be a finite duration, got '{text}'")
    if seconds < MIN_BUDGET:
        raise argparse.ArgumentTypeError(
            f"the least time budget is {MIN_BUDGET:g}s, got '{text}': start-up, one timed training step, one "
            f"validation, one checkpoint save and a 1 s exit margin must fit in it")
    return seconds


def duration_text(seconds):
    """120 -> '2m', 5400 -> '1h30m', 95 -> '1m35s'."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "") + (f"{seconds}s" if seconds else "")
    return text or "0s"


@dataclass
class Fingerprint:
    """What the recipe needs to know of a dataset: its size, its typical image, the pixels one validation scores."""
    train_images: int
    median_size: tuple  # (height, width) of the training images at the training scale
    val_pixels: int
    fixed_size: bool = False  # images made at their training size (synthetic shapes): nothing to crop
    masks: object = None  # datasets.MaskLayout of the training masks: where their classes lie


def image_sizes(dataset, limit=SIZE_SAMPLE):
    """(height, width) at the dataset's scale of up to `limit` images spread over it, from their headers alone."""
    if hasattr(dataset, "image_size"):  # synthetic shapes
        return [(dataset.image_size, dataset.image_size)]
    sizes = []
    for i in spread_indices(len(dataset), limit):
        width, height = header_size(dataset.pairs[i][0])
        sizes.append((max(1, round(height * dataset.scale)), max(1, round(width * dataset.scale))))
    return sizes


def fingerprint(train_set, val_set, val_scale=1.0, masks=None):
    """`val_set` holds images at the files' size, which validation resizes by `val_scale`; `masks` is the
    training masks' MaskLayout."""
    train_sizes, val_sizes = image_sizes(train_set), image_sizes(val_set)
    median = (int(statistics.median(h for h, _ in train_sizes)), int(statistics.median(w for _, w in train_sizes)))
    val_pixels = statistics.fmean(h * w for h, w in val_sizes) * len(val_set) * val_scale ** 2
    return Fingerprint(len(train_set), median, round(val_pixels), hasattr(train_set, "image_size"), masks)


def default_batch_and_crop(fp, device_type, stride=32):
    """A crop no larger than the typical image (a multiple of the network's downsampling), 256 on CPUs and 512
    on GPUs at most, or none for images made at their training size (synthetic shapes); a batch of about as
    many pixels as CPU_BATCH (or GPU_BATCH) crops of 256, 2 to MAX_BATCH images."""
    cap = CPU_CROP if device_type == "cpu" else GPU_CROP
    crop = 0 if fp.fixed_size else max(stride, min(cap, min(fp.median_size)) // stride * stride)
    side = crop or min(fp.median_size)
    batch = (CPU_BATCH if device_type == "cpu" else GPU_BATCH) * (256 / side) ** 2
    return max(2, min(MAX_BATCH, round(batch))), crop


def default_elastic(fp):
    return ELASTIC_PROBABILITY if fp.train_images < SMALL_DATASET else 0.0


def no_up_and_down(masks):
    """Whether the masks' classes lie in the top halves of the images as in the bottom halves, about as closely as
    in the left halves as in the right (which horizontal flips take as the same): micrographs, cells, aerial views,
    not street scenes or photos, where the sky is up and the road down. The thresholds lie between the shared
    data's values (total variation of the classes' shares, top/bottom and left/right): the VNC stack 0.041 and
    0.047, ISBI 2012 0.006 and 0.025; the VOC subset 0.124 and 0.039, the Carvana sample 0.093 and 0.029. 64 small
    masks of randomly placed shapes differ by chance by up to 0.07 and 0.04: where in doubt, no vertical flips, as
    before."""
    if masks is None:
        return False
    return masks.upside_down <= UPRIGHT_FLOOR or masks.upside_down <= min(UPRIGHT_RATIO * masks.mirrored,
                                                                          UPRIGHT_CAP)


def default_vflip(fp):
    return VFLIP_PROBABILITY if no_up_and_down(fp.masks) else 0.0


def passes_over_pixels(plan, fp, batches_per_step):
    """How many times the planned steps show the training set's pixels (a crop shows crop^2 of them)."""
    image_pixels = fp.median_size[0] * fp.median_size[1]
    crop_pixels = min(image_pixels, plan.crop_size ** 2) if plan.crop_size else image_pixels
    return plan.total_steps * plan.batch_size * batches_per_step * crop_pixels / (fp.train_images * image_pixels)


def budget_augment(augment, plan, fp, batches_per_step):
    """(AugmentConfig, note or None): a --time plan that shows the training pixels fewer than AUGMENT_PASSES times
    turns off the zoom, rotation and elastic deformation no flag set (augment.planned), and says so (the plan's
    elastic follows); flips stay.
    A short run is still learning the training images, and the geometric augmentation only makes them harder:
    10-minute runs scored better without it on two datasets (ISBI 2012, 56 passes: membrane Dice 0.817 against
    0.78-0.80; the VNC stack, 23 passes: glia IoU 0.70 against 0.59-0.66, docs/training.md)."""
    passes = passes_over_pixels(plan, fp, batches_per_step)
    if not augment.planned or augment.no_augment or fp.fixed_size or passes >= AUGMENT_PASSES:
        return augment, None
    on = {name: value for name, value in LIGHT_AUGMENT.items()
          if name in augment.planned and as_tuple(getattr(augment, name)) != as_tuple(value)}
    if not on:
        return augment, None
    augment = dataclasses.replace(augment, **on)
    plan.elastic = augment.elastic
    names = [LIGHT_NAMES[name] for name in on]
    listed = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
    return augment, (f"augmentation: {listed} off, as the budget shows "
                     f"the training pixels {passes:.0f} times, fewer than the {AUGMENT_PASSES} that call for them "
                     f"(any of --zoom, --rotate, --elastic given keeps it)")


def as_tuple(value):
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def steps_per_pass(train_images, images_per_step):
    return max(1, math.ceil(train_images / images_per_step))


@dataclass
class Plan:
    """The run's steps. An epoch is `steps_per_epoch` steps followed by a validation; the last one may be
    shorter. With a budget, `total_steps` is re-planned from the measured step, validation and save times."""
    batch_size: int
    crop_size: int
    elastic: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    budget: float | None = None  # seconds of wall-clock time for the whole run, start-up included
    spent: float = 0.0  # seconds of the budget that sessions before this one used (--resume)
    step_seconds: float | None = None
    epoch_end_seconds: float | None = None  # one validation and its checkpoint saves
    epoch_seconds: float | None = None  # training time between validations; None: steps_per_epoch stays as set

    @property
    def epochs(self):
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def epochs_from(self, done_epochs, done_steps):
        """The run's epochs in all, `done_epochs` of them finished after `done_steps` steps."""
        return done_epochs + math.ceil((self.total_steps - done_steps) / self.steps_per_epoch)

    def replan(self, done_steps, seconds_left, left_in_epoch=0):
        """total_steps from now on: as many steps as fit in `seconds_left`, each epoch of them followed by a
        validation and its saves. The epoch under way (with `left_in_epoch` steps to go) is finished, or cut
        short when it does not fit; the next ones last about epoch_seconds."""
        step, end = self.step_seconds, self.epoch_end_seconds
        if self.epoch_seconds and not left_in_epoch:  # validations keep their pace in seconds, not steps
            self.steps_per_epoch = max(1, round(self.epoch_seconds / step))
        if left_in_epoch:  # the epoch under way: its remaining steps, then its validation
            fitting = int((seconds_left - end) // step)
            if fitting < left_in_epoch:  # cut short: at least one more step, then the validation
                self.total_steps = done_steps + max(1, fitting)
                return self.total_steps
            seconds_left -= left_in_epoch * step + end
        epoch_cost = self.steps_per_epoch * step + end
        whole = max(0, int(seconds_left // epoch_cost))
        rest = seconds_left - whole * epoch_cost
        partial = max(0, int((rest - end) // step))
        if partial < self.steps_per_epoch // 4:  # not worth a validation of its own
            partial = 0
        self.total_steps = done_steps + left_in_epoch + whole * self.steps_per_epoch + partial
        return self.total_steps

    def describe(self):
        lines = [f"plan: {self.total_steps} steps of batch {self.batch_size}, crop {self.crop_size or 'none'}, "
                 f"{self.epochs} epoch(s) of {self.steps_per_epoch} steps, each followed by a validation, "
                 f"warm-up {self.warmup_steps} steps, elastic deformation p={self.elastic:g}"]
        if self.budget is not None:
            lines.append(f"  budget {duration_text(self.budget)}"
                         + (f" ({duration_text(self.spent)} spent before)" if self.spent else "")
                         + f": a step takes {self.step_seconds:.3g}s, a validation with its saves about "
                         f"{self.epoch_end_seconds:.3g}s")
            if self.epoch_end_seconds > VALIDATION_SHARE * 3 * self.budget:
                lines.append(f"  note: one validation takes about {self.epoch_end_seconds:.0f}s of the "
                             f"{duration_text(self.budget)}: give more --time, or hold out fewer images "
                             f"(--val-percent, for folder and Carvana data)")
        return "\n".join(lines)

    def as_dict(self):
        return asdict(self)


def plan_epochs(epochs, train_images, batch_size, crop_size, elastic, batches_per_step=1, warmup_epochs=None,
                steps_per_epoch=None):
    """--epochs: each epoch a pass over the data, but at least MIN_STEPS_PER_EPOCH steps. A step takes
    `batches_per_step` batches: one per process, times the batches accumulated."""
    steps = steps_per_epoch or max(MIN_STEPS_PER_EPOCH, steps_per_pass(train_images, batch_size * batches_per_step))
    total = epochs * steps
    warmup = round(warmup_epochs * steps) if warmup_epochs is not None else round(WARMUP_SHARE * total)
    return Plan(batch_size, crop_size, elastic, steps, total, warmup)


def plan_budget(budget, seconds_left, step_seconds, validation_seconds, train_images, batch_size, crop_size,
                elastic, warmup_epochs=None, steps_per_epoch=None):
    """--time: the steps that fit in `seconds_left`, with as many validations as VALIDATION_SHARE of the time
    pays for (1 to MAX_VALIDATIONS), epochs of at least MIN_STEPS_PER_EPOCH steps unless the budget allows fewer
    steps in all. A validation's saves are first guessed at a second: the run measures them."""
    end = validation_seconds + 1.0
    validations = max(1, min(MAX_VALIDATIONS, int(VALIDATION_SHARE * seconds_left // end)))
    steps = max(1, int((seconds_left - validations * end) // step_seconds))
    per_epoch = steps_per_epoch or max(min(MIN_STEPS_PER_EPOCH, steps), math.ceil(steps / validations))
    plan = Plan(batch_size, crop_size, elastic, per_epoch, steps, 0, budget, 0.0, step_seconds, end,
                None if steps_per_epoch else per_epoch * step_seconds)
    plan.total_steps = max(1, plan.replan(0, seconds_left))  # a step and a validation, however short the budget
    plan.warmup_steps = (round(warmup_epochs * per_epoch) if warmup_epochs is not None
                         else round(WARMUP_SHARE * plan.total_steps))
    return plan


def epoch_end_estimate(forward_seconds, images, checkpoint_bytes):
    """Seconds of a validation and its saves before one was timed: `images` whole-image forward passes of
    `forward_seconds` each (one was timed) and `checkpoint_bytes` written (last.pth and best.pth). The first
    epoch's end must be foreseen, since a run of one epoch cannot re-plan; a `--time 60s` run of the classic
    U-Net, planned with a guess from the training step's speed alone, ended at 63.9 s."""
    return forward_seconds * images * VALIDATION_OVERHEAD + checkpoint_bytes / SAVE_BYTES_PER_SECOND


def replan_note(epochs_before, epochs_after, planned, measured):
    """The line a re-planned run prints when its number of epochs changed ('epoch 4/4' right after 'epoch 3/3'
    would read as a bug), else None. `planned` and `measured`: (step seconds, validation and saves seconds)."""
    if epochs_after == epochs_before:
        return None
    pace = "faster" if measured[0] < planned[0] else "slower"
    return (f"re-planned: {epochs_after} epochs instead of {epochs_before} (steps ran {pace} than planned: "
            f"{measured[0]:.3g}s against {planned[0]:.3g}s; a validation with its saves took {measured[1]:.3g}s "
            f"against {planned[1]:.3g}s)")


class EpochPace:
    """Watches the deadline between the steps of an epoch: `out_of_time()`, asked once at the end of each step,
    says when the budget has no room left for one more step and the epoch's end (a validation and its saves).
    A step is timed as this epoch's steps ran so far, data loading included, and never as faster than the plan
    says: a probe misjudges the loop (on one machine its 0.807 s were 0.876 s in the loop)."""

    def __init__(self, plan, deadline, skip_first=False):
        self.plan, self.deadline, self.skip_first = plan, deadline, skip_first
        self.start, self.steps = time.monotonic(), 0

    def measured(self):
        """Seconds a step of this epoch took, None before the first; with `skip_first` (a session's first epoch)
        the first step is left out once others ran: it set up the kernels (cuDNN's autotuning on GPUs) and
        compiled the model with --compile, a one-off that would make every later plan pessimistic."""
        if self.skip_first and self.steps > 1:
            return (time.monotonic() - self.first_end) / (self.steps - 1)
        return (time.monotonic() - self.start) / self.steps if self.steps else None

    def step_seconds(self):
        return max(self.plan.step_seconds or 0.0, self.measured() or 0.0)

    def out_of_time(self):
        self.steps += 1
        if self.steps == 1:
            self.first_end = time.monotonic()
        if self.deadline is None:
            return False
        return self.deadline.plannable() < self.step_seconds() + self.plan.epoch_end_seconds

    def cut_note(self, epoch, steps):
        """The line printed when the budget ends an epoch early; `steps`: (done, planned) in the epoch."""
        return (f"the budget ends epoch {epoch} after {steps[0]} of its {steps[1]} steps (a step took "
                f"{self.step_seconds():.3g}s, {self.plan.step_seconds:.3g}s planned), keeping "
                f"{self.plan.epoch_end_seconds:.3g}s for its validation and saves")


class Deadline:
    """The end of a budget, on this process's monotonic clock: `started` is when the process started, `spent`
    what earlier sessions of the run used. Plans leave out the exit margin: 1% of the budget + 1 s for closing
    files and workers, and for misjudged times."""

    def __init__(self, budget, spent, started):
        self.budget, self.spent, self.started = budget, spent, started
        self.margin = 0.01 * budget + 1.0

    def left(self):
        return self.budget - self.spent - (time.monotonic() - self.started)

    def plannable(self):
        """Seconds left for training, validating and saving: what is left, less the exit margin."""
        return self.left() - self.margin

    def used(self):
        """Seconds of the budget used so far, this session's included: what a checkpoint records."""
        return self.spent + time.monotonic() - self.started


def fit_recipe(config, augment, fp, device_type):
    """(batch size, AugmentConfig) for this data and device: the flags given, else the recipe's choices."""
    batch_size, crop_size = default_batch_and_crop(fp, device_type)
    elastic = augment.elastic if augment.elastic is not None else default_elastic(fp)
    vflip = augment.vflip if augment.vflip is not None else 0.0 if augment.no_augment else default_vflip(fp)
    crop_size = augment.crop_size if augment.crop_size is not None else crop_size
    return config.batch_size or batch_size, dataclasses.replace(augment, crop_size=crop_size, elastic=elastic,
                                                                vflip=vflip)


def plan_run(config, checkpoint, fp, batch_size, augment, world_size, started, time_step, time_end):
    """The run's Plan: a resumed run's own (with the --time or --epochs given now), else a new one for
    --epochs, or for --time (counted from `started`) from the seconds a training step takes and those its first
    costs beyond them (`time_step()`: (step, one-off), compiling with --compile) and those of a validation with
    its saves (`time_end()`), all measured by a probe."""
    if config.resume and checkpoint.get("plan"):
        plan = Plan(**checkpoint["plan"])
        if config.time and plan.epoch_end_seconds is None:  # a run of epochs stopped in its first, given a budget
            plan.step_seconds = time_step()[0]
            plan.epoch_end_seconds = time_end() + 1.0
        if config.time:
            plan.budget = config.time
        elif plan.budget is None:
            plan.total_steps = (config.epochs or DEFAULT_EPOCHS) * plan.steps_per_epoch
        return plan
    recipe = (fp.train_images, batch_size, augment.crop_size, augment.elastic)
    settings = {"warmup_epochs": config.warmup_epochs, "steps_per_epoch": config.steps_per_epoch}
    if config.time is None:
        return plan_epochs(config.epochs or DEFAULT_EPOCHS, *recipe, world_size * config.accumulate, **settings)
    (step, one_off), end = time_step(), time_end()
    seconds_left = Deadline(config.time, 0.0, started).plannable() - one_off
    return plan_budget(config.time, seconds_left, step, end, *recipe, **settings)


def replan(plan, done_steps, deadline, left_in_epoch=0):
    """Plan.replan on rank 0's clock: every process must run the same steps, so all take rank 0's plan."""
    plan.replan(done_steps, deadline.plannable(), left_in_epoch)
    plan.total_steps, plan.steps_per_epoch = all_gather_objects((plan.total_steps, plan.steps_per_epoch))[0]


def check_unfinished(path, plan, deadline, done_steps, run):
    """--resume of a run that has nothing left to do: ConfigError saying how to train it longer."""
    if deadline and deadline.left() <= 0:
        raise ConfigError(f"--resume {path}: the run has used its {duration_text(deadline.budget)} budget; to train "
                          f"it longer pass --time with more than {duration_text(deadline.spent)}")
    if not deadline and done_steps >= plan.total_steps and not run["epoch_progress"]:
        raise ConfigError(f"--resume {path}: the run has finished its {run['epoch']} epochs; to train it longer "
                          f"pass --epochs N with N > {run['epoch']}")
