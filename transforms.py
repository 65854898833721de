"""Training augmentation: a random zoom, rotation and crop cut straight from the decoded image, then flips, elastic
deformation and colour jitter on the image and its mask together."""
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

BEYOND_FILL = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}  # v2 fill of pixels from beyond: black and void


@dataclass
class AugmentConfig:
    """The random augmentation of training items; the fields are train.py's augmentation flags."""
    crop_size: int | None = None  # None: the training recipe chooses (recipe.default_batch_and_crop)
    zoom: tuple = (0.7, 1.4)
    hflip: float = 0.5
    vflip: float | None = None  # None: the training recipe decides (recipe.default_vflip; 0 here)
    rotate: float = 10.0
    jitter: float = 0.0
    elastic: float | None = None  # probability of an elastic deformation; None: the training recipe decides (0 here)
    class_crops: float = 1 / 3  # probability that a crop is centred on a pixel of a random class (class_centre)
    no_augment: bool = False
    planned: tuple = ()  # of zoom, rotate, elastic: those no flag set, which a --time plan may turn off

    def check(self):
        if (self.crop_size or 0) < 0 or self.rotate < 0 or self.jitter < 0:
            raise ConfigError(f"--crop-size, --rotate and --jitter cannot be negative, got {self.crop_size}, "
                              f"{self.rotate:g}, {self.jitter:g}")
        if not 0 < self.zoom[0] <= self.zoom[1]:
            raise ConfigError(f"--zoom needs 0 < MIN <= MAX, got {self.zoom[0]:g} {self.zoom[1]:g}")
        for flag, probability in (("--hflip", self.hflip), ("--vflip", self.vflip), ("--elastic", self.elastic),
                                  ("--class-crops", self.class_crops)):
            if probability is not None and not 0 <= probability <= 1:
                raise ConfigError(f"{flag} is a probability in [0, 1], got {probability:g}")
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


def class_centre(classes):
    """A random point (x, y) of the mask `classes` (H x W uint8 class ids): the centre of a random pixel of a class
    drawn uniformly from those present, void aside; None when every pixel is void. nnU-Net centres a third of its
    crops so, as a class of a few hundredths of the pixels (synapses, a thin vessel) is otherwise seen too rarely
    to be learnt in a short run."""
    counts = np.bincount(classes.ravel(), minlength=IGNORE_INDEX + 1)
    counts[IGNORE_INDEX] = 0
    present = np.flatnonzero(counts)
    if not len(present):
        return None
    chosen = present[int(torch.randint(len(present), ()))]
    pixel = np.flatnonzero(classes.ravel() == chosen)[int(torch.randint(int(counts[chosen]), ()))]
    y, x = divmod(int(pixel), classes.shape[1])
    return x + 0.5, y + 0.5


def random_zoom_crop(image, mask, size, zoom, rotate=0.0, centre=None):
    """Zoom by a random factor drawn from `zoom`, rotate by a random angle in [-rotate, rotate] degrees, and cut a
    random window of at most size x size (fit_canvas pads the rest), or the window centred on `centre` (x, y in
    the image's pixels) as far as the image allows. Works on the decoded PIL image and the
    full-size mask before either becomes a tensor and resamples only the window's pixels (bilinear, and
    antialiased when zoomed out; the mask through resample_mask, straight from the file's resolution), which keeps
    large photos cheap. Image and mask share one geometry, so they stay aligned. Returns (image, mask, boolean map
    of the pixels that came from beyond the image, or None): those are black in the image, and the caller makes
    them void in the mask."""
    width, height = image.size
    factor = float(torch.empty(()).uniform_(*zoom))
    out_w, out_h = (max(1, min(size, round(side * factor))) for side in (width, height))
    crop_w, crop_h = min(width, max(1, round(out_w / factor))), min(height, max(1, round(out_h / factor)))
    if centre is None:
        left = int(torch.randint(0, width - crop_w + 1, ()))
        top = int(torch.randint(0, height - crop_h + 1, ()))
    else:
        left = min(max(0, round(centre[0] - crop_w / 2)), width - crop_w)
        top = min(max(0, round(centre[1] - crop_h / 2)), height - crop_h)
    angle = math.radians(float(torch.empty(()).uniform_(-rotate, rotate))) if rotate else 0.0
    fx, fy = mask.width / width, mask.height / height
    margin = max(fx, fy) / factor + 1  # mask pixels per output pixel, plus one: the filter's reach
    if not angle:
        box = (left, top, left + crop_w, top + crop_h)
        mask_box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
        return (image.resize((out_w, out_h), Image.BILINEAR, box=box),
                resample_mask(mask, pixel_region(mask_box, (margin, margin), mask.size),
                              lambda layer, x, y: layer.resize((out_w, out_h), Image.BILINEAR, box=(
                                  mask_box[0] - x, mask_box[1] - y, mask_box[2] - x, mask_box[3] - y))),
                None)
    # Output point -> image point: about the window's centre, rotate by `angle`, then stretch to the window.
    sx, sy, cos, sin = crop_w / out_w, crop_h / out_h, math.cos(angle), math.sin(angle)
    a, b, d, e = sx * cos, -sx * sin, sy * sin, sy * cos
    c = left + crop_w / 2 - a * out_w / 2 - b * out_h / 2
    f = top + crop_h / 2 - d * out_w / 2 - e * out_h / 2
    image = rotated_window(image, (a, b, c, d, e, f), (out_w, out_h))
    mask_affine = (a * fx, b * fx, c * fx, d * fy, e * fy, f * fy)
    mask = resample_mask(mask, pixel_region(window_bounds(mask_affine, (out_w, out_h)), (margin, margin), mask.size),
                         lambda layer, x, y: rotated_window(layer, moved(mask_affine, x, y), (out_w, out_h)))
    x0, y0, x1, y1 = window_bounds((a, b, c, d, e, f), (out_w, out_h))
    if x0 >= 0 and y0 >= 0 and x1 <= width and y1 <= height:
        return image, mask, None  # the rotated window lies inside the image
    ys, xs = np.mgrid[0:out_h, 0:out_w].astype(np.float32) + 0.5  # pixel centres
    x, y = a * xs + b * ys + c, d * xs + e * ys + f
    return image, mask, (x < 0) | (y < 0) | (x >= width) | (y >= height)


def resample_mask(mask, region, resample):
    """A PIL mask of class values resampled as the image is: `resample(layer, left, top)` resamples a PIL image
    cut from the mask at `region` (left, top, right, bottom: the pixels the window reads) whose corner lies at
    (left, top) of the mask. Each value's indicator (0 or 255) is resampled, bilinearly and antialiased when
    shrinking, and each output pixel takes the value whose indicator came out largest. Class edges so land where
    the image's edges land, to a fraction of a pixel, and a thin structure thins as it does in the image. Nearest
    neighbour would move edges by up to half a pixel at random and, when shrinking, drop or double whole rows of a
    thin line: label noise on exactly the pixels that decide a boundary (ISBI's true membranes grown by one
    pixel score a Dice of only 0.88 against themselves)."""
    values = np.asarray(mask.crop(region))
    present = np.unique(values)  # pixels beyond the image come out as present[0]; the caller makes them void
    layers = [np.asarray(resample(Image.fromarray((values == value).astype(np.uint8) * 255), *region[:2]))
              for value in present]
    return Image.fromarray(present[np.argmax(layers, axis=0)])


def moved(affine, x, y):
    """`affine` (output point -> image point) for the part of the image whose corner lies at (x, y)."""
    a, b, c, d, e, f = affine
    return a, b, c - x, d, e, f - y


def pixel_region(bounds, margin, size):
    """Whole-pixel (left, top, right, bottom) around float `bounds`, `margin` (x, y) pixels wider on every side and
    clipped to an image of `size` (width, height)."""
    x0, y0, x1, y1 = bounds
    return (max(0, math.floor(x0 - margin[0])), max(0, math.floor(y0 - margin[1])),
            min(size[0], math.ceil(x1 + margin[0])), min(size[1], math.ceil(y1 + margin[1])))


def window_bounds(affine, size):
    """(left, top, right, bottom) in the image of the window that `affine` (output point -> image point) maps
    onto an output of `size` (width, height)."""
    a, b, c, d, e, f = affine
    xs, ys = np.array([0, size[0], 0, size[0]]), np.array([0, 0, size[1], size[1]])
    x, y = a * xs + b * ys + c, d * xs + e * ys + f
    return x.min(), y.min(), x.max(), y.max()


def rotated_window(image, affine, size):
    """The bilinear resampling of `image` through `affine` (output point -> image point) into `size`. PIL's
    transform does not low-pass filter, so a zoomed-out window would alias (a fine pattern turns into moire,
    unlike test images, which are resized with antialiasing): the window's bounding box is first shrunk by the
    zoom with Image.resize (antialiased, and reading only that box), then rotated at about unit scale."""
    a, b, c, d, e, f = affine
    shrink_x, shrink_y = math.hypot(a, b), math.hypot(d, e)  # image pixels per output pixel along x and y
    if shrink_x <= 1 and shrink_y <= 1:
        return image.transform(size, Image.AFFINE, affine, Image.BILINEAR)
    # One output pixel of margin for the bilinear taps at the rim; beyond the image the transform fills black.
    x0, y0, x1, y1 = pixel_region(window_bounds(affine, size), (shrink_x, shrink_y), image.size)
    small_w, small_h = max(1, round((x1 - x0) / max(1, shrink_x))), max(1, round((y1 - y0) / max(1, shrink_y)))
    small = image.resize((small_w, small_h), Image.BILINEAR, box=(x0, y0, x1, y1))
    kx, ky = (x1 - x0) / small_w, (y1 - y0) / small_h  # the exact shrink of each axis
    affine = (a / kx, b / kx, (c - x0) / kx, d / ky, e / ky, (f - y0) / ky)
    return small.transform(size, Image.AFFINE, affine, Image.BILINEAR)


class WarpsMaskLikeImage:
    """Mixin for a v2 geometric transform: a tv_tensors.Mask (H x W class ids) is warped as the image is, one float
    layer per class id, bilinearly, each pixel then taking the id of the largest layer (see resample_mask), rather
    than by nearest neighbour. A last layer of ones tells the pixels pulled from beyond the item: they are void."""

    def transform(self, inpt, params):
        if not isinstance(inpt, tv_tensors.Mask):
            return super().transform(inpt, params)
        ids = inpt.unique()
        layers = torch.cat([inpt[None] == ids[:, None, None], torch.ones_like(inpt[None], dtype=torch.bool)])
        warped = super().transform(tv_tensors.Image(layers.float()), params)  # an Image's fill beyond is 0
        labels = ids[warped[:-1].argmax(0)]
        labels[warped[-1] < 0.5] = IGNORE_INDEX
        return tv_tensors.wrap(labels, like=inpt)


class SoftRotation(WarpsMaskLikeImage, v2.RandomRotation):
    """v2.RandomRotation with the mask resampled as the image (WarpsMaskLikeImage)."""


class SmoothElastic(WarpsMaskLikeImage, v2.ElasticTransform):
    """The U-Net paper's elastic deformation: random displacements (`std` pixels of standard deviation) at the nodes
    of a coarse grid at most `spacing` pixels apart, interpolated bicubically to every pixel: a smooth wobble.
    v2.ElasticTransform resamples the image bilinearly (pixels pulled from beyond the item are black), and
    WarpsMaskLikeImage the mask; only the field is new, as v2's own (per-pixel noise blurred by a Gaussian) costs
    ~160 ms per 256x256 item at a comparable smoothness (sigma 10), this one ~3 ms."""

    def __init__(self, std=4.0, spacing=64):
        super().__init__(fill=BEYOND_FILL)
        self.std, self.spacing = std, spacing

    def make_params(self, flat_inputs):
        height, width = v2.query_size(flat_inputs)
        nodes = torch.randn(1, 2, math.ceil(height / self.spacing) + 1, math.ceil(width / self.spacing) + 1)
        field = F.interpolate(nodes * self.std, size=(height, width), mode="bicubic", align_corners=True)
        field *= torch.tensor([2 / width, 2 / height]).view(1, 2, 1, 1)  # pixels -> grid_sample's [-1, 1] units
        return dict(displacement=field.permute(0, 2, 3, 1))  # 1 x H x W x (x, y)


def train_transform(augment):
    """The training preset after the random zoom + crop (which also rotates): flips, elastic deformation,
    colour jitter (and rotation when there is no crop), each of which can be off, on the image and its
    tv_tensors.Mask together."""
    if augment.no_augment:
        return None
    steps = []
    if augment.hflip:
        steps.append(v2.RandomHorizontalFlip(augment.hflip))
    if augment.vflip:
        steps.append(v2.RandomVerticalFlip(augment.vflip))
    if augment.rotate and not augment.crop_size:
        steps.append(SoftRotation(augment.rotate, interpolation=v2.InterpolationMode.BILINEAR, fill=BEYOND_FILL))
    if augment.elastic:
        steps.append(v2.RandomApply([SmoothElastic()], p=augment.elastic))
    if augment.jitter:
        steps.append(v2.ColorJitter(augment.jitter, augment.jitter, augment.jitter))
    return v2.Compose(steps) if steps else None
