"""From uint8 images to class scores and labels: the one inference path that train, eval and predict share.

Whole images go through the model in one pass. With `tile`, the image is cut into overlapping tiles (the
overlap-tile strategy of the U-Net paper) whose probabilities are blended with Gaussian weights, as nnU-Net
does, so that tile borders, where the network sees least context, count least. Tiles stream through the model
`batch_size` at a time and are blended band by band (sliding_window_bands): the float32 accumulator spans one row
of tiles, so besides the image and what the caller keeps, memory grows with the tile size, not the image size.
Planner chooses whole images or tiles, and the batch, for the memory available (memory.py).
"""
import contextlib
import functools
import math
import weakref
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from errors import ConfigError
from images import scaled_size
from memory import CPU_MAX_WHOLE, CPU_PASS_PIXELS, measure_footprint, memory_budget, parse_memory, plan_memory
from metrics import ConfusionMatrix
from precision import AMP_DTYPES, choose_precision
from utils import progress_bars, warn

FALLBACK_TILES = (1024, 512, 256, 128)  # tried in turn after running out of memory
LABEL_ROWS = 1024  # rows turned into labels (or normalised) at a time, to bound temporary memory


@dataclass
class InferenceConfig:
    """How predict_probs runs (the inference flags of eval.py and predict.py): scale, overlap tiles, flip
    averaging, precision and memory layout."""
    scale: float | None = None  # None: the scale the model was trained at (datasets.trained_scale)
    tile: int | None = None
    overlap: float = 0.125  # within 0.001 of 0.5's scores for half the cost (benchmarks/bench_tiling.py)
    tta: bool = False
    tta_vflip: bool = False
    no_tta: bool = False  # neither: the flips the model was trained with decide (trained_flips)
    amp: str = "auto"  # "auto", "off", "bf16" or "fp16": see precision.choose_precision; use_precision resolves it
    channels_last: str = "auto"  # "auto", "on" or "off"
    max_memory: str | None = None  # "4G": the memory plan's budget (default: what the system has available)

    def check(self):
        if self.no_tta and (self.tta or self.tta_vflip):
            raise ConfigError("--no-tta asks for one pass and --tta or --tta-vflip for flipped ones: give one")
        if self.max_memory is not None:
            parse_memory(self.max_memory)
        if self.scale is not None and not self.scale > 0:
            raise ConfigError(f"--scale must be positive, got {self.scale}")
        if self.tile is not None and self.tile < 16:
            raise ConfigError(f"--tile must be at least 16 pixels, got {self.tile}")
        if not 0 <= self.overlap < 1:
            raise ConfigError(f"--overlap must lie in [0, 1), got {self.overlap}")
        return self

    def options(self):
        """The keyword arguments of predict_probs."""
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"amp {self.amp!r} depends on the device: resolve it first with use_precision")
        return {"scale": self.scale or 1.0, "tile": self.tile, "overlap": self.overlap,
                "flips": flip_dims(self.tta, self.tta_vflip), "amp_dtype": AMP_DTYPES[self.amp]}


def for_model(config, model, checkpoint, trained_scale, log=print):
    """config resolved for a checkpoint's model, as eval.py and predict.py run it: at the scale it was trained at
    (`trained_scale`) unless --scale gives one, in the precision and layout of its device (use_precision, which
    also lays out the model), and averaging the flips it learnt (trained_flips)."""
    config = replace(config, scale=config.scale or trained_scale)
    return trained_flips(use_precision(model, config, log), checkpoint.get("args", {}).get("vflip"), log)


def use_precision(model, config, log=print):
    """Choose the precision and layout that config's --amp and --channels-last select on the model's device
    (precision.choose_precision), say which through `log`, and put the model in channels_last when chosen.
    Returns the config with the choice spelled out (amp "off", "bf16" or "fp16"; channels_last "on" or "off"),
    as scores and reports record it."""
    precision = choose_precision(model_device(model), config.amp, config.channels_last)
    log(f"precision: {precision.describe()}")
    precision.prepare(model)
    return replace(config, amp=precision.name if precision.dtype else "off",
                   channels_last="on" if precision.channels_last else "off")


def trained_flips(config, trained_vflip, log=print):
    """config with its flips decided: those a flag asks for; else, for a model trained with vertical flips too
    (its data have no up and down: micrographs), the average of all four flips, which scored +0.008 mIoU on the
    VNC stack and +0.003 membrane Dice on ISBI 2012 (docs/datasets.md#vertical-flips); else one pass."""
    if config.tta or config.tta_vflip or config.no_tta or not trained_vflip:
        return config
    log("test-time augmentation: the model learnt with vertical flips too (data with no up and down), so its "
        "predictions of the four flips are averaged (4 passes; --no-tta: 1)")
    return replace(config, tta_vflip=True)


def flip_dims(tta=False, vertical=False):
    """The flips whose predictions are averaged: none; with tta the horizontal one, which training shows the
    model; with vertical (which implies tta), all four combinations, for data with no up and down (micrographs)."""
    if vertical:
        return ((), (-1,), (-2,), (-2, -1))
    return ((), (-1,)) if tta else ((),)


@functools.lru_cache(maxsize=16)
def normalization_tensors(stats, device):
    """Each tuple of `stats` (mean, std, ...) as a 1 x C x 1 x 1 tensor on `device`, made once per device (no copy
    at every batch)."""
    return tuple(torch.tensor(values, device=device).view(1, -1, 1, 1) for values in stats)


def preprocess(images, normalize):
    """Images B x C x H x W as read (any device) -> normalised float, with the statistics saved in the checkpoint:
    8-bit RGB uint8 by a mean and std of 0..1 pixels; images of any other form (normalize has 'low' and 'high',
    image_stats.channel_statistics) clipped to the training set's percentiles, then by the mean and std of the
    raw values."""
    raw = "low" in normalize
    names = ("mean", "std", "low", "high") if raw else ("mean", "std")
    stats = tuple(tuple(normalize[name]) for name in names), images.device
    # A trace (torch.export, torch.compile, jit.trace) makes placeholders, which must not outlive it in the cache.
    tracing = torch.compiler.is_compiling() or torch.jit.is_tracing()
    tensors = normalization_tensors.__wrapped__(*stats) if tracing else normalization_tensors(*stats)
    if raw:
        mean, std, low, high = tensors
        return (torch.minimum(torch.maximum(images.float(), low), high) - mean) / std
    mean, std = tensors
    return (images.float() / 255 - mean) / std


def probabilities(logits):
    """Sigmoid for one logit (foreground probability), softmax over classes otherwise."""
    return torch.sigmoid(logits) if logits.shape[1] == 1 else logits.softmax(1)


def stack_batch(tensors):
    """torch.stack, without copying a lone (possibly huge) tensor."""
    return tensors[0][None] if len(tensors) == 1 else torch.stack(tensors)


def same_size_runs(items, size, image_of):
    """Runs of up to `size` consecutive items whose images (`image_of(item)`) share one shape: what one forward
    pass can stack (VOC's varied sizes mostly go one by one, Carvana's in full batches)."""
    run = []
    for item in items:
        if run and (len(run) == size or image_of(item).shape != image_of(run[0]).shape):
            yield run
            run = []
        run.append(item)
    if run:
        yield run


def model_device(model):
    return next(model.parameters()).device


def in_channels_last(model):
    """Whether the model's convolution weights are channels_last: the first 4-D weight whose layout tells
    (a 1x1 kernel's fits both)."""
    for weight in model.parameters():
        if weight.dim() == 4 and weight.is_contiguous() != weight.is_contiguous(memory_format=torch.channels_last):
            return not weight.is_contiguous()
    return False


def forward_probs(model, x, flips=((),), amp_dtype=None):
    """Probabilities of normalised images x: the mean over `flips` (dims to flip, see flip_dims). Images smaller
    than the model's downsampling are padded (with 0, the mean colour) to that size, and the scores cropped back.
    The model runs under autocast to `amp_dtype`; None opens none, so that a caller's own autocast (training's
    validation) applies, and fp32 otherwise."""
    height, width = x.shape[-2:]
    stride = getattr(model, "output_stride", 1)
    if height < stride or width < stride:
        x = F.pad(x, [0, max(0, stride - width), 0, max(0, stride - height)])
    if in_channels_last(model):  # flips keep the layout
        x = x.contiguous(memory_format=torch.channels_last)
    total = 0
    # autocast(enabled=False) would switch a caller's autocast off: None opens no context at all.
    with torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
        for dims in flips:
            total = total + probabilities(model(x.flip(dims)).float()).flip(dims)
    return (total / len(flips))[..., :height, :width]


def resize(x, size):
    """Bilinear resize of a B x C x H x W tensor (antialiased when shrinking); uint8 stays uint8."""
    if x.dtype == torch.uint8 and x.device.type != "cpu":  # only the CPU kernels resize uint8 directly
        return resize(x.float(), size).round().clamp(0, 255).byte()
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


@torch.inference_mode()
def predict_probs(model, images, normalize, scale=1.0, tile=None, overlap=0.5, flips=((),), amp_dtype=None,
                  batch_size=4):
    """uint8 images B x C x H x W -> class probabilities B x K x H x W at the input size (float32).

    `scale` resizes the input before the forward pass (e.g. 0.5 for a model trained on half-size images);
    the scores are resized back, so labels always have the input's size. `tile` switches to overlap-tile
    inference (see sliding_window_probs); `flips` (flip_dims) averages flipped predictions; `amp_dtype` runs the
    model under autocast (see forward_probs).
    Whole images are moved to the model's device, and so are the probabilities; tiles are accumulated on the
    images' device, so that CPU images of any size only send one batch of tiles at a time to the GPU.
    """
    height, width = images.shape[-2:]
    if tile is not None:
        if scale != 1.0:
            images = resize(images, scaled_size((height, width), scale))
        probs = stack_batch([sliding_window_probs(model, image, normalize, tile, overlap, flips, amp_dtype, batch_size)
                             for image in images])
    else:
        x = preprocess(images.to(model_device(model)), normalize)
        if scale != 1.0:
            x = resize(x, scaled_size((height, width), scale))
        probs = forward_probs(model, x, flips, amp_dtype)
    if probs.shape[-2:] != (height, width):
        probs = resize(probs, (height, width))
    return probs


def gaussian_weights(size, device):
    """1-D Gaussian over a tile side, sigma = size / 8 as in nnU-Net, peak 1; its outer product weights a tile."""
    centre, sigma = (size - 1) / 2, size / 8
    x = torch.arange(size, dtype=torch.float32, device=device)
    return torch.exp(-((x - centre) ** 2) / (2 * sigma ** 2))


def tile_starts(size, tile, overlap, align=1):
    """Offsets of tiles of `tile` pixels covering `size`: a stride of tile * (1 - overlap) rounded down to a
    multiple of `align`, and a last tile flush with the border (as mmsegmentation's slide inference)."""
    if size <= tile:
        return [0]
    stride = max(align, int(tile * (1 - overlap)) // align * align)
    return [min(i * stride, size - tile) for i in range(math.ceil((size - tile) / stride) + 1)]


def balanced_tile(side, tile, overlap, align=1):
    """The smallest tile side (a multiple of `align`, at most `tile`) that covers `side` pixels with no more tiles
    than `tile` does at this overlap: the tiles spread evenly instead of a last one lying mostly over its
    neighbour (2048 pixels in 1536-pixel tiles at overlap 0.25: two tiles of 1184, 1.16x the pixels, not 1.5x)."""
    count = len(tile_starts(side, tile, overlap, align))
    smallest = math.ceil(side / (count - (count - 1) * overlap) / align) * align
    for candidate in range(max(align, smallest), tile, align):
        if len(tile_starts(side, candidate, overlap, align)) <= count:
            return candidate
    return tile


def aligned_tile(tile, align):
    """The tile side actually used: a multiple of the model's output stride `align`, rounded down, and at least one
    stride. A tile smaller than the stride would step by a whole stride and leave stripes that no tile covers."""
    return max(align, tile // align * align)


def tile_grid(model, size, tile, overlap):
    """(tile height, tile width, row offsets, column offsets) of the tiles over an image of `size` (H, W).
    Offsets that are multiples of the model's downsampling make every tile pool over the same grid as the whole
    image, so tiles agree with whole-image inference."""
    height, width = size
    align = getattr(model, "output_stride", 1)
    tile = aligned_tile(tile, align)
    tile_h, tile_w = min(tile, height), min(tile, width)
    return tile_h, tile_w, tile_starts(height, tile_h, overlap, align), tile_starts(width, tile_w, overlap, align)


@torch.inference_mode()
def sliding_window_bands(model, image, normalize, tile, overlap=0.5, flips=((),), amp_dtype=None, batch_size=4,
                         device=None, on_tiles=None):
    """Overlap-tile probabilities of one uint8 image C x H x W, blended band by band: yields (first row, K x rows x W
    float32 probabilities), top to bottom. Rows are final once the last row of tiles over them is done, so the
    accumulator spans one row of tiles (tile + stride rows), not the image. `image` is a tensor, or anything with
    .shape and [:, y0:y1] slicing that gives uint8 C x rows x W (a TIFF read by windows: images.TiffWindows);
    the accumulator lives on `device` (default: the image's, else the CPU); `on_tiles(count)` is told of each batch
    of tiles done (a progress bar).

    Each tile's probabilities, weighted by a Gaussian centred on the tile, are summed into the accumulator, which
    is then divided by the summed weights. Tiles lie on a grid and the Gaussian is separable, so the summed
    weights are the outer product of two vectors: no H x W weight map is needed.
    """
    height, width = image.shape[-2:]
    tile_h, tile_w, ys, xs = tile_grid(model, (height, width), tile, overlap)
    device = device or getattr(image, "device", torch.device("cpu"))
    weight_y, weight_x = gaussian_weights(tile_h, device), gaussian_weights(tile_w, device)
    tile_weight = weight_y[:, None] * weight_x[None, :]
    sum_y, sum_x = torch.zeros(height, device=device), torch.zeros(width, device=device)
    for y in ys:
        sum_y[y:y + tile_h] += weight_y
    for x in xs:
        sum_x[x:x + tile_w] += weight_x
    top, total = 0, None  # total holds rows top .. top + its height
    for row, y in enumerate(ys):
        band = torch.as_tensor(image[:, y:y + tile_h])
        for first in range(0, len(xs), batch_size):
            starts = xs[first:first + batch_size]
            tiles = torch.stack([band[:, :, x:x + tile_w] for x in starts]).to(model_device(model))
            probs = forward_probs(model, preprocess(tiles, normalize), flips, amp_dtype).to(device)
            if total is None:
                total = torch.zeros(probs.shape[1], 0, width, device=device)
            if total.shape[1] < y + tile_h - top:  # grow the band down to this row of tiles' bottom
                grow = torch.zeros(total.shape[0], y + tile_h - top - total.shape[1], width, device=device)
                total = torch.cat([total, grow], 1)
            for x, p in zip(starts, probs):
                total[:, y - top:y - top + tile_h, x:x + tile_w] += p * tile_weight
            if on_tiles:
                on_tiles(len(starts))
        done = ys[row + 1] if row + 1 < len(ys) else height  # rows no later tile covers
        final = total[:, :done - top] / (sum_y[top:done, None] * sum_x[None, :])
        total = total[:, done - top:].clone()  # a clone, so that the finished rows' memory is freed
        yield top, final
        top = done


@torch.inference_mode()
def sliding_window_probs(model, image, normalize, tile, overlap=0.5, flips=((),), amp_dtype=None, batch_size=4):
    """Overlap-tile probabilities K x H x W of one uint8 image C x H x W, on the image's device: the bands of
    sliding_window_bands put together."""
    probs = None
    for top, band in sliding_window_bands(model, image, normalize, tile, overlap, flips, amp_dtype, batch_size):
        if probs is None:
            probs = torch.empty(band.shape[0], *image.shape[-2:], device=band.device)
        probs[:, top:top + band.shape[1]] = band
    return probs


def out_of_memory(error):
    """CUDA's out-of-memory error, or the CPU allocator refusing a buffer larger than the machine's memory."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def predict_probs_or_tile(model, images, normalize, log=print, predict=None, **options):
    """predict_probs (or `predict`, a function of the same arguments) that survives running out of memory (on
    CUDA, or a CPU allocation that the system refuses): it retries with ever smaller tiles (FALLBACK_TILES), the
    accumulator on the CPU, and says so through `log`. Returns (what `predict` returns, options that worked), so
    that a caller can keep those for the next images."""
    predict = predict or predict_probs
    while True:
        try:
            return predict(model, images, normalize, **options), options
        except RuntimeError as e:  # torch.OutOfMemoryError is one
            if not out_of_memory(e):
                raise
            device = "CUDA" if isinstance(e, torch.OutOfMemoryError) else "CPU"
        # Out of the except block: its traceback held on to the failed pass's tensors.
        height, width = images.shape[-2:]
        side = max(scaled_size((height, width), options.get("scale", 1.0)))  # tiles this big or more change nothing
        current = min(side, options.get("tile") or side)
        smaller = [t for t in FALLBACK_TILES if t < current]
        where = f"a {width}x{height} input with " + (f"--tile {options['tile']}" if options.get("tile") else "no tiles")
        if not smaller:
            raise torch.OutOfMemoryError(f"{device} out of memory on {where}, even at the smallest tile")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log(f"{device} out of memory on {where}; falling back to --tile {smaller[0]} (accumulated on the CPU)")
        options = {**options, "tile": smaller[0]}
        images = images.cpu() if isinstance(images, torch.Tensor) else images


def probs_to_labels(probs, threshold=0.5, dtype=torch.long):
    """One channel: foreground where the probability exceeds `threshold`; several: argmax.
    Computed LABEL_ROWS rows at a time into a `dtype` tensor (uint8 keeps huge label maps small)."""
    batch, channels, height, width = probs.shape
    labels = torch.empty(batch, height, width, dtype=dtype, device=probs.device)
    for row in range(0, height, LABEL_ROWS):
        rows = probs[:, :, row:row + LABEL_ROWS]
        labels[:, row:row + LABEL_ROWS] = rows[:, 0] > threshold if channels == 1 else rows.argmax(1)
    return labels


class Planner:
    """The memory plan (memory.plan_memory) for each image size that predict_probs meets with one model and its
    options: the footprint is measured on the first call, each new choice said once through `log`. `tile` and
    `batch_size` given are kept (the user's flags); `max_batch` bounds the batch chosen."""

    def __init__(self, model, normalize, options, num_classes, max_memory=None, tile=None, batch_size=None,
                 max_batch=4, log=print):
        self.model, self.normalize, self.options, self.num_classes = model, normalize, options, num_classes
        self.tile, self.batch_size, self.max_batch, self.log = tile, batch_size, max_batch, log
        self.max_memory = max_memory and parse_memory(max_memory)
        self.footprint, self.said = None, set()
        self.refresh()

    def _probe(self, side):
        """A pass over a side x side image of the model's form (8-bit RGB, or normalize's channels and dtype)."""
        form = self.normalize.get("form")
        dtype = getattr(torch, form[1]) if form else torch.uint8
        probe = torch.zeros(1, len(self.normalize["mean"]), side, side, dtype=dtype)
        predict_probs(self.model, probe, self.normalize, **{**self.options, "tile": None})

    def plan(self, size):
        """The MemoryPlan for images of `size` (H, W)."""
        size = tuple(size)
        if size not in self.plans:
            if self.footprint is None:
                self.footprint = measure_footprint(self._probe, getattr(self.model, "output_stride", 1))
            stride = getattr(self.model, "output_stride", 1)
            on_cpu = model_device(self.model).type == "cpu"  # a CPU stops at its ceilings; a GPU fills its memory
            plan = plan_memory(self.footprint, size, self.budget, self.num_classes, self.tile, self.batch_size,
                               self.max_batch, stride, *((CPU_PASS_PIXELS, CPU_MAX_WHOLE) if on_cpu else (None, None)))
            if plan.tile and not self.tile:  # a planned tile, not the user's: spread evenly over the image
                plan.tile = balanced_tile(max(size), plan.tile, self.options.get("overlap", 0.5), stride)
            plan.source = self.source
            self.plans[size] = plan
            if (size, plan.tile, plan.batch_size) not in self.said:
                self.said.add((size, plan.tile, plan.batch_size))
                self.log(plan.describe(size))
        return self.plans[size]

    def refresh(self):
        """Plan again with the memory available now (the footprint stays; a choice already said is not said again)."""
        self.budget, self.source = memory_budget(model_device(self.model), self.max_memory)
        self.plans = {}

    def options_for(self, size):
        """predict_probs's keyword arguments under the plan for `size`."""
        plan = self.plan(size)
        return {**self.options, "tile": plan.tile, "batch_size": plan.batch_size}

    def remember(self, size, options):
        """After the out-of-memory fallback (options' tile is not the plan's for `size`): the plan was wrong, so
        the tile that worked is kept for every later image, as if given with --tile."""
        if options.get("tile") != self.plans[tuple(size)].tile:
            self.tile, self.plans = options["tile"], {}

    def batches(self, items, image_of):
        """(items, options): runs of same-size items (by `image_of(item)`'s shape) as many as the plan puts in one
        pass (one image at a time when tiled), each with its options."""
        for run in same_size_runs(items, self.batch_size or self.max_batch, image_of):
            size = image_of(run[0]).shape[-2:]
            plan = self.plan(size)
            step = 1 if plan.tile else plan.batch_size
            for first in range(0, len(run), step):
                yield run[first:first + step], self.options_for(size)


_validation_planners = weakref.WeakKeyDictionary()  # model -> Planner: one footprint and one line per run


def validation_planner(model, normalize, options, num_classes, max_batch, log):
    """The Planner of training's validation passes: its footprint measured once per model (again if the options
    change), its budget read again at each validation."""
    planner = _validation_planners.get(model)
    if planner is None or planner.options != options or planner.max_batch != max_batch:
        planner = Planner(model, normalize, options, num_classes, max_batch=max_batch, log=log)
        _validation_planners[model] = planner
    else:
        planner.refresh()
    return planner


def evaluate(model, loader, num_classes, normalize, ignore_index, device, distributed=False, **options):
    """Scores over the whole loader from one confusion matrix; `options` go to predict_probs, each batch split
    (or tiled) as the memory plan says. distributed=True: each process holds a shard of the set; the matrices are
    summed over the processes and only rank 0 draws a progress bar and says the plan."""
    model.eval()
    confusion = ConfusionMatrix(max(num_classes, 2), ignore_index, device)
    quiet = distributed and torch.distributed.get_rank() > 0
    planner = validation_planner(model, normalize, options, num_classes, loader.batch_size or 1,
                                 log=(lambda line: None) if quiet else tqdm.write)
    for images, masks, *_ in tqdm(loader, desc="val", leave=False, disable=quiet or not progress_bars()):
        plan = planner.plan(images.shape[-2:])
        step = 1 if plan.tile else plan.batch_size
        for first in range(0, len(images), step):
            # Out of memory all the same, the images fall back to tiles, as in eval.py; later images keep them.
            probs, used = predict_probs_or_tile(model, images[first:first + step].to(device), normalize, log=warn,
                                                **planner.options_for(images.shape[-2:]))
            planner.remember(images.shape[-2:], used)
            confusion.update(probs_to_labels(probs), masks[first:first + step].to(device))
    if distributed:
        confusion.reduce_from_all_processes()
    return confusion.compute()
