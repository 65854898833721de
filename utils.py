"""Checkpoints (atomic save, safe load), palettes and label images."""
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CHECKPOINT_KEYS = ("model", "model_args", "classes", "mask_values", "normalize")


class CheckpointError(Exception):
    """A checkpoint file is missing, unreadable, or not one of ours."""


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
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"'{path}' is not a readable PyTorch checkpoint ({reason})") from None
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
