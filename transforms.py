"""Training augmentation: a random zoom, rotation and crop cut straight from the decoded image, then flips and
colour jitter on the image and its mask together."""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from errors import ConfigError
from metrics import IGNORE_INDEX


@dataclass
class AugmentConfig:
    """The random augmentation of training items; the fields are train.py's augmentation flags."""
    crop_size: int = 256
    zoom: tuple = (0.5, 2.0)
    hflip: float = 0.5
    rotate: float = 10.0
    jitter: float = 0.0
    no_augment: bool = False

    def check(self):
        if self.crop_size < 0 or self.rotate < 0 or self.jitter < 0 or not 0 <= self.hflip <= 1:
            raise ConfigError(f"--crop-size, --rotate and --jitter cannot be negative and --hflip must lie in "
                              f"[0, 1], got {self.crop_size}, {self.rotate:g}, {self.jitter:g}, {self.hflip:g}")
        if not 0 < self.zoom[0] <= self.zoom[1]:
            raise ConfigError(f"--zoom needs 0 < MIN <= MAX, got {self.zoom[0]:g} {self.zoom[1]:g}")
        return self

    def zoom_crop(self):
        """(crop side, (min zoom, max zoom), largest rotation) of random_zoom_crop, or None without a crop."""
        if self.no_augment or not self.crop_size:
            return None
        return self.crop_size, tuple(self.zoom), self.rotate


def fit_canvas(image, mask, height, width):
    """Pad at the bottom and right (mask pixels there are ignored), or crop there, to height x width."""
    pad = [0, width - image.shape[-1], 0, height - image.shape[-2]]
    return F.pad(image, pad), F.pad(mask, pad, value=IGNORE_INDEX)


def random_zoom_crop(image, mask, size, zoom, rotate=0.0, mask_fill=0):
    """Zoom by a random factor drawn from `zoom`, rotate by a random angle in [-rotate, rotate] degrees, and cut a
    random window of at most size x size (fit_canvas pads the rest). Works on the decoded PIL image and the
    full-size mask before either becomes a tensor, in one resampling of the window's pixels (image: bilinear;
    mask: nearest, straight from the file's resolution), which keeps large photos cheap. Image and mask share one
    geometry, so they stay aligned. Returns (image, mask, boolean map of the pixels that came from beyond the
    image, or None): those are black in the image and void in the mask (filled first with `mask_fill`, a value
    the masks hold, so that the mask holds only known values until they are made void)."""
    width, height = image.size
    factor = float(torch.empty(()).uniform_(*zoom))
    out_w, out_h = (max(1, min(size, round(side * factor))) for side in (width, height))
    crop_w, crop_h = min(width, max(1, round(out_w / factor))), min(height, max(1, round(out_h / factor)))
    left = int(torch.randint(0, width - crop_w + 1, ()))
    top = int(torch.randint(0, height - crop_h + 1, ()))
    angle = math.radians(float(torch.empty(()).uniform_(-rotate, rotate))) if rotate else 0.0
    fx, fy = mask.width / width, mask.height / height
    if not angle:
        box = (left, top, left + crop_w, top + crop_h)
        return (image.resize((out_w, out_h), Image.BILINEAR, box=box),
                mask.resize((out_w, out_h), Image.NEAREST, box=(box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)),
                None)
    # Output point -> image point: about the window's centre, rotate by `angle`, then stretch to the window.
    sx, sy, cos, sin = crop_w / out_w, crop_h / out_h, math.cos(angle), math.sin(angle)
    a, b, d, e = sx * cos, -sx * sin, sy * sin, sy * cos
    c = left + crop_w / 2 - a * out_w / 2 - b * out_h / 2
    f = top + crop_h / 2 - d * out_w / 2 - e * out_h / 2
    image = image.transform((out_w, out_h), Image.AFFINE, (a, b, c, d, e, f), Image.BILINEAR)
    mask = mask.transform((out_w, out_h), Image.AFFINE, (a * fx, b * fx, c * fx, d * fy, e * fy, f * fy),
                          Image.NEAREST, fillcolor=mask_fill)
    corners_x = np.array([0, out_w, 0, out_w]), np.array([0, 0, out_h, out_h])
    x, y = a * corners_x[0] + b * corners_x[1] + c, d * corners_x[0] + e * corners_x[1] + f
    if x.min() >= 0 and y.min() >= 0 and x.max() <= width and y.max() <= height:
        return image, mask, None  # the rotated window lies inside the image
    ys, xs = np.mgrid[0:out_h, 0:out_w].astype(np.float32) + 0.5  # pixel centres
    x, y = a * xs + b * ys + c, d * xs + e * ys + f
    return image, mask, (x < 0) | (y < 0) | (x >= width) | (y >= height)


def train_transform(augment):
    """The training preset after the random zoom + crop (which also rotates): horizontal flip, colour jitter
    (and rotation when there is no crop), each of which can be off, on the image and its tv_tensors.Mask together."""
    if augment.no_augment:
        return None
    steps = []
    if augment.hflip:
        steps.append(v2.RandomHorizontalFlip(augment.hflip))
    if augment.rotate and not augment.crop_size:
        steps.append(v2.RandomRotation(augment.rotate, interpolation=v2.InterpolationMode.BILINEAR,
                                       fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}))
    if augment.jitter:
        steps.append(v2.ColorJitter(augment.jitter, augment.jitter, augment.jitter))
    return v2.Compose(steps) if steps else None
