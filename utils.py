"""Checkpoints (atomic save, safe load), palettes and label images."""
import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CHECKPOINT_KEYS = ("model", "model_args", "classes", "mask_values", "normalize")


class CheckpointError(Exception):
    """A checkpoint file is missing, unreadable, or not one of ours."""


def one_line(error, limit=200):
    """An exception's message on one line (its lines joined), cut to `limit` characters; its type if empty."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def save_checkpoint(state, path):
    """Write to a temporary file in the same folder, then rename: a crash mid-save leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_checkpoint(path, map_location="cpu"):
    """Load one of our checkpoints with weights_only=True; CheckpointError with a one-line reason otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"'{path}' is not a readable PyTorch checkpoint ({one_line(e)})") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"'{path}' is not a checkpoint written by train.py (missing: {', '.join(missing)})")
    return state


def voc_palette(num_colors=256):
    """The Pascal VOC colour map: class i gets the colour made from the bits of i."""
    palette = np.zeros((num_colors, 3), dtype=np.uint8)
    for i in range(num_colors):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


def plot_confusion_matrix(matrix, classes, path):
    """Save the confusion matrix with rows normalised to 1 (each row: where that true class went)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix, dtype=np.float64)
    rows = matrix.sum(1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    n = len(classes)
    size = max(4.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xticks(range(n), classes, rotation=90)
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if normalised[i, j] >= 0.005:
                    ax.text(j, i, f"{normalised[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if normalised[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def label_image(labels, mask_values):
    """Class map (HxW ints) -> PIL image in the mask format of the data: 0/255 greyscale for two classes,
    a VOC-palette PNG of the mask values otherwise."""
    labels = np.asarray(labels)
    values = np.asarray(mask_values, dtype=np.uint8)  # uint8 lookup: no int64 copy of a huge label map
    if len(values) <= 2:
        return Image.fromarray((labels > 0).astype(np.uint8) * 255)
    image = Image.fromarray(values[labels].astype(np.uint8))
    image.putpalette(voc_palette().flatten().tolist())  # turns the greyscale image into mode P
    return image


def newest_checkpoint(root="checkpoints", name="best.pth"):
    """The most recently written `name` under `root`, or None."""
    found = list(Path(root).glob(f"**/{name}"))
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"error: --device {name} asked for CUDA, but torch sees no CUDA device; use --device cpu")
    return device


# Distributed runs (torchrun sets RANK, WORLD_SIZE and LOCAL_RANK), seeds and RNG states.

def init_distributed(device):
    """Join the process group torchrun describes, if any. Returns (device, rank, world_size): under torchrun
    a CUDA device becomes cuda:LOCAL_RANK (NCCL backend); a CPU device uses the gloo backend."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return device, 0, 1
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, torch.distributed.get_rank(), world_size


def is_distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce_sum(tensor):
    """Sum a tensor over all processes in place (nothing to do in a single process); returns it."""
    if is_distributed():
        torch.distributed.all_reduce(tensor)
    return tensor


def average_across_processes(tensors):
    """Replace each floating-point tensor by its mean over the processes, in place."""
    if is_distributed():
        for tensor in tensors:
            if tensor.is_floating_point():
                torch.distributed.all_reduce(tensor)
                tensor /= torch.distributed.get_world_size()


def all_gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...]; [obj] in a single process."""
    if not is_distributed():
        return [obj]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def derived_seed(*numbers):
    """One 63-bit seed from several integers (seed, epoch, rank), well mixed."""
    return int(np.random.SeedSequence(numbers).generate_state(1, np.uint64)[0] >> np.uint64(1))


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_states():
    """The Python, NumPy, torch and CUDA random states, as plain lists and tensors (weights_only-loadable)."""
    python = random.getstate()
    numpy = np.random.get_state(legacy=False)
    return {"python": list(python[1]), "python_gauss": python[2],
            "numpy_key": numpy["state"]["key"].tolist(), "numpy_pos": int(numpy["state"]["pos"]),
            "numpy_gauss": [int(numpy["has_gauss"]), float(numpy["gauss"])], "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None}


def set_rng_states(states):
    random.setstate((3, tuple(states["python"]), states["python_gauss"]))
    np.random.set_state({"bit_generator": "MT19937", "has_gauss": states["numpy_gauss"][0],
                         "gauss": states["numpy_gauss"][1],
                         "state": {"key": np.array(states["numpy_key"], dtype=np.uint32),
                                   "pos": states["numpy_pos"]}})
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(states["cuda"])


# Watching a run: curves and sample grids.

def plot_curves(history, path, metric="miou"):
    """Training loss, the validation score and pixel accuracy against the epoch, one panel each, as a PNG."""
    import matplotlib  # imported here: eval.py and predict.py need no plotting
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    panels = [("train_loss", "training loss"), (metric, f"validation {'mIoU' if metric == 'miou' else 'Dice'}"),
              ("pixel_acc", "validation pixel accuracy")]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), layout="constrained")
    for ax, (key, title) in zip(axes, panels):
        ax.plot(epochs, [row[key] for row in history], marker="o", markersize=3)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    os.replace(tmp, path)


def sample_grid(images, truths, predictions):
    """One row per image: image | truth | prediction, classes in VOC colours (ignored pixels in VOC's void
    colour). Images uint8 3xHxW, label maps HxW; rows of different widths are padded. Returns a PIL image."""
    palette = voc_palette()
    rows = []
    for image, truth, prediction in zip(images, truths, predictions):
        panels = [image.permute(1, 2, 0).numpy(), palette[truth.numpy()], palette[prediction.numpy()]]
        rows.append(np.concatenate(panels, axis=1))
    width = max(row.shape[1] for row in rows)
    rows = [np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0))) for row in rows]
    return Image.fromarray(np.concatenate(rows, axis=0))


def class_colours(mask_values):
    """RGB colour of each class: its mask value's VOC colour, or VOC class 1 (dark red) for the binary foreground."""
    values = np.asarray(mask_values) if len(mask_values) > 2 else np.arange(2)
    return voc_palette()[values]


def overlay_image(image, labels, mask_values, alpha=0.5):
    """The image (HxWx3 uint8) with every non-background pixel tinted by its class colour."""
    photo = Image.fromarray(image)
    colours = Image.fromarray(class_colours(mask_values)[labels])
    return Image.composite(Image.blend(photo, colours, alpha), photo, Image.fromarray(labels != 0))


def side_by_side(image, mask):
    """Image (HxWx3 uint8) | mask (a PIL image of the same size) in one RGB image, to look at predictions."""
    height, width = image.shape[:2]
    both = Image.new("RGB", (2 * width, height))
    both.paste(Image.fromarray(image), (0, 0))
    both.paste(mask.convert("RGB"), (width, 0))
    return both


def save_probabilities(probs, path, rows=1024):
    """Class probabilities K x H x W (tensor) -> float16 .npy file (np.load it, mmap_mode='r' for huge ones),
    written `rows` rows at a time so that no full-size copy is made."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=tuple(probs.shape))
    for row in range(0, probs.shape[1], rows):
        out[:, row:row + rows] = probs[:, row:row + rows].cpu().numpy()
    out.flush()
    del out
