"""The memory plan of inference: before the first forward pass, whole images or tiles, and how many per pass.

The peak memory of a forward pass is measured once per model, precision and options (InferenceFootprint) by
running predict_probs on two small probe images while a dispatch mode (PeakTracker) adds up the bytes of every
tensor made and frees them as they die. Why not the alternatives: the process's RSS growth on CPU is blurred by the
allocator's caches, the reader threads and oneDNN's one-off buffers, so a small probe says little; torch's profiler
is slow and CPU-only in its memory events; and deriving the peak from activation shapes would need each
architecture's liveness (skips held across the decoder). The tracker sees exactly the tensors of the pass, on any
device, in its precision and layout (autocast's weight copies, the channels_last copy, the flips' sums), and the
peak is affine in the pixel count (fixed + per_pixel x pixels), which two probe sizes fix. What it misses
(allocator fragmentation, oneDNN and cuDNN scratch) is covered by OVERHEAD, measured on CPU: the classic U-Net's
tracked 936 MB for a 768x768 fp32 pass was 1,079 MB of RSS growth (x1.15).

The available memory is Linux's MemAvailable and the cgroup (v1 or v2) limit less its usage on the CPU,
torch.cuda.mem_get_info (plus what torch's cache holds free) on a GPU; --max-memory overrides it.
"""
import re
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from errors import ConfigError

OVERHEAD = 1.25  # tracked tensor bytes -> process memory: allocator slack and kernel scratch (x1.15 measured)
# On a CPU a larger pass buys no throughput, only memory. CPU seconds per megapixel of one forward pass of the
# classic U-Net (base 64, depth 4; bf16 autocast + channels_last; one thread; CPU time, so other jobs matter little:
# `nice -n 19 python benchmarks/bench_cpu_pass.py` on a 2-core AMD EPYC Zen 4 VM with AVX512-BF16), tile x batch:
#   256 x 1: 8.26, x 2: 7.42 | 512: 7.62, 8.05 | 768: 7.95, 8.50 | 1024: 8.45, 8.45 | 1536: 9.14, 8.64
# and again for the small ones (--sides 256 384 512 --batches 1 2 4 --repeats 4):
#   256 x 1: 8.28, x 2: 7.70, x 4: 7.60 | 384: 7.33, 7.87, 8.29 | 512: 7.73, 8.10, 8.22
# Over both runs the best is 7.33 (384 x 1) and the smallest pass within 5% of it 256 x 256 x 2 (7.56 on average;
# the second run alone: 7.70, just over): on a CPU tiles and batches stop there, whatever the memory. GPUs fill
# their memory instead: there larger batches pay.
CPU_PASS_PIXELS = 2 * 256 * 256
# Whole images up to this side on a CPU, larger ones tiled: tiles at the default overlap (0.125) take 1.25 to 1.4
# times the image's pixels, more than a whole image's larger pass costs a pixel (1536 x 1536: +23%).
CPU_MAX_WHOLE = 2048
SAFETY = 0.8  # share of the available memory that a plan may fill: the system, readers and other jobs keep the rest
IMAGE_BYTES = 4  # per pixel held outside the pass: the uint8 RGB image and its uint8 label image
TILE_SIDES = (4096, 3072, 2048, 1536, 1024, 768, 512, 384, 256, 192, 128, 96, 64, 32)  # tried largest first
UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def parse_memory(text):
    """'4G', '512M', '1.5g', '2GB', '1000000' (bytes) -> bytes; ConfigError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"--max-memory '{text}' is not an amount of memory; write e.g. 4G, 512M or 1.5G")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def memory_text(size):
    """Bytes as '3.1 GB', '640 MB' or '2.5 MB'."""
    if size >= 2 ** 30:
        return f"{size / 2 ** 30:.1f} GB"
    return f"{size / 2 ** 20:.0f} MB" if size >= 10 * 2 ** 20 else f"{size / 2 ** 20:.1f} MB"


def meminfo_available(path="/proc/meminfo"):
    """MemAvailable in bytes (what can be allocated without swapping), or None off Linux."""
    try:
        match = re.search(r"^MemAvailable:\s+(\d+) kB", Path(path).read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def cgroup_free(root="/sys/fs/cgroup"):
    """The cgroup's memory limit less its usage (v2: memory.max and memory.current; v1: memory/
    memory.limit_in_bytes and memory.usage_in_bytes), or None where there is no limit."""
    root = Path(root)
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            limit, usage = (root / limit_file).read_text().strip(), (root / usage_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and int(limit) < 2 ** 60:  # v2 writes 'max', v1 a huge number, for no limit
            return max(0, int(limit) - int(usage))
    return None


def process_rss(path="/proc/self/status"):
    """This process's resident memory in bytes (0 where /proc is missing)."""
    try:
        match = re.search(r"^VmRSS:\s+(\d+) kB", Path(path).read_text(), re.MULTILINE)
    except OSError:
        return 0
    return int(match.group(1)) * 1024 if match else 0


def available_memory(device):
    """(bytes that inference may still use on `device`, where that figure comes from)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached, "free CUDA memory"
    found = {"MemAvailable": meminfo_available(), "cgroup limit": cgroup_free()}
    found = {name: size for name, size in found.items() if size is not None}
    if not found:
        return None, "unknown"
    name = min(found, key=found.get)
    return found[name], name


def memory_budget(device, max_memory=None):
    """(bytes a plan may fill, how that was found): --max-memory less what the process holds already, or a
    SAFETY share of the available memory."""
    if max_memory is not None:
        return max(0, max_memory - process_rss()), f"--max-memory {memory_text(max_memory)}"
    available, source = available_memory(device)
    if available is None:
        return None, source
    return int(available * SAFETY), f"{SAFETY:.0%} of {memory_text(available)} available ({source})"


class PeakTracker(TorchDispatchMode):
    """Within the `with` block: `peak`, the most bytes held at once by the tensors made there (storages counted
    once, however many views share them; tensors made before the block, such as weights, are not counted)."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak, self.timeline = {}, 0, 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                self._track(tensor)
        self.timeline.append(self.now)  # bytes held once each operation has made its outputs
        return out

    def _track(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.live:
            self.live[key] = [storage.nbytes(), 0]
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
        self.live[key][1] += 1  # tensors alive on this storage
        weakref.finalize(tensor, self._release, key)

    def _release(self, key):
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]


@dataclass
class Footprint:
    """Peak bytes of a forward pass over `pixels` input pixels: OVERHEAD x the most, over the pass's operations,
    of fixed + per_pixel x pixels, one (fixed, per_pixel) pair per operation. Where the peak lies moves with the
    size (the deepest layer's weights on a small image, the full-size activations on a large one), so one slope
    measured on small probes would underestimate large images."""
    points: list

    def bytes(self, pixels):
        return OVERHEAD * max(fixed + per_pixel * pixels for fixed, per_pixel in self.points)


def measure_footprint(run, stride=1):
    """The Footprint of `run(side)`, a forward pass on a side x side probe, from two probe sizes of whole
    multiples of the model's output stride: the bytes held after each operation are affine in the pixel count,
    which the two probes fix operation by operation (the same operations run at both sizes)."""
    sides = (max(64, 2 * stride), max(128, 4 * stride))
    run(sides[0])  # a first pass makes one-off operations (weight layouts, caches) that later passes skip
    timelines = []
    for side in sides:
        with PeakTracker() as tracker:
            run(side)
        timelines.append(tracker.timeline or [0])
    small, large = timelines
    if len(small) != len(large):  # another sequence of operations at another size: the peaks alone
        small, large = [max(small)], [max(large)]
    pixels = (sides[0] ** 2, sides[1] ** 2)
    slopes = [max(0.0, (b - a) / (pixels[1] - pixels[0])) for a, b in zip(small, large)]
    return Footprint([(max(0.0, a - slope * pixels[0]), slope) for a, slope in zip(small, slopes)])


@dataclass
class MemoryPlan:
    """Whole images `batch_size` per pass (tile None), or tiles of `tile` pixels `batch_size` per pass;
    `estimate` is the planned peak, `budget` what it had to fit (None: unknown, the defaults stand)."""
    tile: int | None
    batch_size: int
    estimate: int
    budget: int | None
    source: str = ""

    def describe(self, size):
        height, width = size
        how = (f"whole {width}x{height} images, {self.batch_size} per pass" if self.tile is None
               else f"{width}x{height} images in {self.tile}-pixel tiles, {self.batch_size} per pass")
        fits = "" if self.budget is None else f" of {memory_text(self.budget)} ({self.source})"
        return f"memory plan: {how}: about {memory_text(self.estimate)}{fits}"


def whole_bytes(footprint, size, batch):
    pixels = batch * size[0] * size[1]
    return footprint.bytes(pixels) + IMAGE_BYTES * pixels


def tiled_bytes(footprint, size, tile, batch, num_classes):
    """A pass over `batch` tiles, the band of blended float32 probabilities (a row of tiles and the next: two
    tiles high) and the image with its labels."""
    band = 2 * tile * size[1] * max(num_classes, 1) * 4
    return footprint.bytes(batch * tile * tile) + band + IMAGE_BYTES * size[0] * size[1]


def plan_memory(footprint, size, budget, num_classes, tile=None, batch_size=None, max_batch=4, stride=1,
                max_pixels=None, max_whole=None):
    """The plan for images of `size` (H, W): whole images when one fits `budget` (and has no more pixels than a
    `max_whole` x `max_whole` image), else the largest tile (a multiple of `stride`, of at most `max_pixels` pixels)
    that fits; then as many per pass as fit, up to `max_batch` and to `max_pixels` pixels a pass (at least one). A
    `tile` or `batch_size` given is kept as is (the user's override); budget None (unknown) keeps the defaults:
    whole images, max_batch."""
    def batches(pixels):
        most = max_batch if max_pixels is None else max(1, min(max_batch, max_pixels // pixels))
        return [batch_size] if batch_size else range(most, 0, -1)

    whole_fits_pass = max_whole is None or size[0] * size[1] <= max_whole ** 2
    if tile is None and whole_fits_pass:
        for batch in batches(size[0] * size[1]):
            estimate = whole_bytes(footprint, size, batch)
            if budget is None or estimate <= budget:
                return MemoryPlan(None, batch, int(estimate), budget)
    side = max(size)
    tiles = [tile] if tile else [t for t in TILE_SIDES if t % stride == 0 and t < side
                                 and (max_pixels is None or t * t <= max_pixels)]
    tiles = tiles or [max(stride, 32)]
    for candidate in tiles:
        for batch in batches(candidate * candidate):
            estimate = tiled_bytes(footprint, size, candidate, batch, num_classes)
            if budget is None or estimate <= budget:
                return MemoryPlan(candidate, batch, int(estimate), budget)
    smallest = tiles[-1]  # nothing fits: the smallest, and the out-of-memory fallback as a second line of defence
    batch = batches(smallest * smallest)[-1]
    return MemoryPlan(smallest, batch, int(tiled_bytes(footprint, size, smallest, batch, num_classes)), budget)
