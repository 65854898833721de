"""Dataset readers. Every dataset yields (image uint8 CxHxW, mask int64 HxW holding class indices, 255 = ignore)
and carries `classes`, `mask_values` (class index -> value in the mask files) and `ignore_index`.
Normalisation happens on the device, in inference.preprocess, so loaders move compact uint8 tensors.

Readers: synthetic `shapes`; Pascal VOC 2012 (`voc`); SBD (`sbd`); the two VOC+SBD training protocols
(`sbd-voc`, `trainaug`); Kaggle Carvana (`carvana`); any image/mask folders (`folder`)."""
import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import scipy.io
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.transforms import v2

IGNORE_INDEX = 255
EXIF_ORIENTATION = 0x0112
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm")
VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]
VOC_MAX_SIDE = 500  # every VOC and SBD image fits in 500x500: validation pads to that canvas so batches stack


class DatasetError(ValueError):
    """Bad or missing data; the one-line message names the files, the values and how to fix them."""


class ImageReadError(DatasetError):
    """A file that is missing or that PIL cannot decode; the message names it."""


def scaled_size(size, scale):
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def upright(image):
    """Apply the EXIF orientation only when there is one (exif_transpose would copy every image)."""
    return ImageOps.exif_transpose(image) if image.getexif().get(EXIF_ORIENTATION, 1) != 1 else image


def open_image(path, scale=1.0):
    """Image file -> (decoded RGB PIL image resized by `scale`, (width, height) of the upright file).

    JPEGs are decoded straight at 1/2, 1/4 or 1/8 size when `scale` allows (PIL draft mode), which makes
    large photos several times cheaper to load. EXIF orientation is applied; grey, RGBA and 16-bit converted."""
    try:
        with Image.open(path) as image:
            size = image.size
            if scale < 1:
                image.draft("RGB", scaled_size(size, scale))
            turned = image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
            image = upright(image)
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                # 16-bit and float pixels: scale the range to 8 bits instead of clipping it.
                pixels = np.asarray(image, dtype=np.float32)
                top = 65535.0 if pixels.max() > 255 else 255.0
                image = Image.fromarray((pixels * (255.0 / top)).clip(0, 255).astype(np.uint8))
            image = image if image.mode == "RGB" else image.convert("RGB")
            size = size[::-1] if turned else size
            target = scaled_size(size, scale)
            if image.size != target:
                image = image.resize(target, Image.BILINEAR)
            image.load()
    except FileNotFoundError:
        raise ImageReadError(f"'{path}' does not exist") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"'{path}' is not an image file that PIL can read") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(f"'{path}' could not be decoded, the file may be corrupt ({e})") from None
    return image, size


def to_tensor(image):
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def read_image(path):
    """Any image file -> uint8 RGB tensor 3xHxW: EXIF orientation applied; grey, RGBA and 16-bit converted."""
    return to_tensor(open_image(path)[0])


def image_size(path):
    """(width, height) of the upright image, from its header alone."""
    try:
        with Image.open(path) as image:
            turned = image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
            return image.size[::-1] if turned else image.size
    except FileNotFoundError:
        raise ImageReadError(f"'{path}' does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ImageReadError(f"'{path}' is not an image file that PIL can read") from None


def open_mask(path):
    """Mask file -> PIL image of its raw values: palette indices, grey ids, 0/255, 16-bit ids, or SBD's
    GTcls.Segmentation from a MATLAB .mat file."""
    try:
        if path.suffix == ".mat":
            segmentation = scipy.io.loadmat(path, variable_names=["GTcls"])["GTcls"][0, 0]["Segmentation"]
            return Image.fromarray(np.ascontiguousarray(segmentation, dtype=np.uint8))
        with Image.open(path) as mask:
            mask = upright(mask)
            if mask.mode in ("RGB", "RGBA", "LA"):
                channels = np.asarray(mask)[..., :3 if mask.mode != "LA" else 1]
                if (channels != channels[..., :1]).any():
                    raise DatasetError(f"mask '{path}' holds colours; save class ids as a palette or grey PNG")
                return Image.fromarray(np.ascontiguousarray(channels[..., 0]))
            mask.load()
            return mask.convert("L") if mask.mode == "1" else mask
    except FileNotFoundError:
        raise ImageReadError(f"mask '{path}' does not exist") from None
    except DatasetError:
        raise
    except Exception as e:  # PIL and scipy raise many kinds for a corrupt file
        raise ImageReadError(f"mask '{path}' could not be read, the file may be corrupt "
                             f"({type(e).__name__}: {e})") from None


def mask_values_of(path):
    """(width, height) and the sorted distinct values of one mask file."""
    mask = open_mask(path)
    return mask.size, np.unique(np.asarray(mask)).tolist()


def size_mismatch(image_path, image_size, mask_path, mask_size):
    return DatasetError(f"mask '{mask_path}' is {mask_size[0]}x{mask_size[1]} but its image '{image_path}' is "
                        f"{image_size[0]}x{image_size[1]}; masks must have their image's size")


def unknown_values(mask_path, values, mask_values, void_value):
    void = f" and the void value {void_value}" if void_value is not None else ""
    return DatasetError(f"mask '{mask_path}' holds values {values} outside the known mask values "
                        f"{list(mask_values)}{void}; fix the mask, or name a void value with --ignore-index")


class SegmentationFiles(torch.utils.data.Dataset):
    """(image, mask) file pairs read as they are on disk, resized by `scale` on load, then `transform`ed
    (torchvision v2, with the mask as a tv_tensors.Mask). `canvas` (height, width) pads or crops every item to
    one size so that images of different sizes can share a batch; padded mask pixels are ignored.
    `with_names` adds the image's file stem to each item: (image, mask, stem)."""

    ignore_index = IGNORE_INDEX

    def __init__(self, pairs, classes, mask_values, void_value=None, scale=1.0, transform=None, canvas=None,
                 skip_bad=False, zoom_crop=None, with_names=False):
        if len(mask_values) >= IGNORE_INDEX:
            raise DatasetError(f"the masks hold {len(mask_values)} distinct values; masks must hold class ids "
                               f"(at most {IGNORE_INDEX - 1} classes)")
        self.pairs, self.classes, self.mask_values = pairs, list(classes), list(mask_values)
        self.void_value, self.scale, self.transform, self.canvas = void_value, scale, transform, canvas
        # (crop side, (min zoom, max zoom), largest rotation) for training, cut before anything else
        self.zoom_crop = zoom_crop
        self.table = np.full(65536, -1, dtype=np.int16)  # mask value -> class index; -1: no class has it
        self.table[np.asarray(self.mask_values, dtype=np.int64)] = np.arange(len(self.mask_values))
        if void_value is not None:
            self.table[void_value] = IGNORE_INDEX
        self.values_are_classes = self.mask_values == list(range(len(self.mask_values)))
        self.skip_bad, self.skipped, self.with_names = skip_bad, set(), with_names

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(index)
        for offset in range(len(self)):
            i = (index + offset) % len(self)
            try:
                return self.load(i)
            except DatasetError as e:
                if not self.skip_bad:
                    raise
                if i not in self.skipped:
                    self.skipped.add(i)
                    print(f"warning: skipped a pair ({len(self.skipped)} so far): {e}", file=sys.stderr)
        raise DatasetError("no pair of this dataset could be read")

    def load(self, index):
        image_path, mask_path = self.pairs[index]
        image, size = open_image(image_path, self.scale)
        mask = open_mask(mask_path)
        if mask.size != size:
            raise size_mismatch(image_path, size, mask_path, mask.size)
        outside = None
        if self.zoom_crop is not None:
            image, mask, outside = random_zoom_crop(image, mask, *self.zoom_crop)
        elif mask.size != image.size:
            mask = mask.resize(image.size, Image.NEAREST)  # masks are only ever resampled by nearest neighbour
        image, mask = to_tensor(image), torch.from_numpy(self.to_classes(np.array(mask), mask_path))
        if outside is not None:
            mask[torch.from_numpy(outside)] = IGNORE_INDEX  # rotated in from beyond the image: no class
        if self.canvas is not None:
            image, mask = fit_canvas(image, mask, *self.canvas)
        if self.transform is not None:
            image, mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        item = image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()
        return (*item, image_path.stem) if self.with_names else item

    def to_classes(self, values, mask_path):
        """Raw mask values -> uint8 class indices (255 = ignore)."""
        if self.values_are_classes and values.dtype == np.uint8 and values.max() < len(self.mask_values):
            return values  # already class indices (VOC, SBD, Carvana): no table look-up over every pixel
        classes = self.table[values if values.dtype in (np.uint8, np.uint16) else values.clip(0, 65535)]
        if classes.min() < 0:
            bad = np.unique(values[classes < 0]).tolist()
            raise unknown_values(mask_path, bad, self.mask_values, self.void_value)
        return classes.astype(np.uint8)


def fit_canvas(image, mask, height, width):
    """Pad at the bottom and right (mask pixels there are ignored), or crop there, to height x width."""
    pad = [0, width - image.shape[-1], 0, height - image.shape[-2]]
    return F.pad(image, pad), F.pad(mask, pad, value=IGNORE_INDEX)


def random_zoom_crop(image, mask, size, zoom, rotate=0.0):
    """Zoom by a random factor drawn from `zoom`, rotate by a random angle in [-rotate, rotate] degrees, and cut a
    random window of at most size x size (fit_canvas pads the rest). Works on the decoded PIL image and the
    full-size mask before either becomes a tensor, in one resampling of the window's pixels (image: bilinear;
    mask: nearest, straight from the file's resolution), which keeps large photos cheap. Image and mask share one
    geometry, so they stay aligned. Returns (image, mask, boolean map of the pixels that came from beyond the
    image, or None): those are black in the image and void in the mask."""
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
                          Image.NEAREST)
    corners_x = np.array([0, out_w, 0, out_w]), np.array([0, 0, out_h, out_h])
    x, y = a * corners_x[0] + b * corners_x[1] + c, d * corners_x[0] + e * corners_x[1] + f
    if x.min() >= 0 and y.min() >= 0 and x.max() <= width and y.max() <= height:
        return image, mask, None  # the rotated window lies inside the image
    ys, xs = np.mgrid[0:out_h, 0:out_w].astype(np.float32) + 0.5  # pixel centres
    x, y = a * xs + b * ys + c, d * xs + e * ys + f
    return image, mask, (x < 0) | (y < 0) | (x >= width) | (y >= height)


def train_transform(args):
    """The training preset after the random zoom + crop (which also rotates): horizontal flip, colour jitter
    (and rotation when there is no crop), each of which can be off, on the image and its tv_tensors.Mask together."""
    if args.no_augment:
        return None
    steps = []
    if args.hflip:
        steps.append(v2.RandomHorizontalFlip(args.hflip))
    if args.rotate and not args.crop_size:
        steps.append(v2.RandomRotation(args.rotate, interpolation=v2.InterpolationMode.BILINEAR,
                                       fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}))
    if args.jitter:
        steps.append(v2.ColorJitter(args.jitter, args.jitter, args.jitter))
    return v2.Compose(steps) if steps else None


def listing(names, limit=5):
    names = list(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def list_files(folder, kind):
    """{stem: path} of the image files in `folder`."""
    if not folder.is_dir():
        raise DatasetError(f"{kind} folder '{folder}' does not exist")
    files = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            path = Path(entry.path)
            if not entry.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS:
                files[path.stem] = path
    if not files:
        raise DatasetError(f"{kind} folder '{folder}' is empty (no {', '.join(IMAGE_EXTENSIONS)} files)")
    return files


def pair_by_stem(images_dir, masks_dir, suffix=None):
    """Image and mask files matched by name: `<stem>.<ext>` with `<stem><suffix>.<ext>`; the suffix, when not
    given, is '' if any names match as they are, else '_mask'."""
    images, masks = list_files(images_dir, "image"), list_files(masks_dir, "mask")
    if suffix is None:
        suffix = "" if images.keys() & masks.keys() else "_mask"
    masks = {stem[:-len(suffix)] if suffix and stem.endswith(suffix) else stem: path for stem, path in masks.items()}
    no_mask = sorted(images.keys() - masks.keys())
    if no_mask:
        raise DatasetError(f"{len(no_mask)} image(s) in '{images_dir}' have no mask named '<image name>{suffix}.*' "
                           f"in '{masks_dir}': {listing(images[s].name for s in no_mask)}")
    no_image = sorted(masks.keys() - images.keys())
    if no_image:
        raise DatasetError(f"{len(no_image)} mask(s) in '{masks_dir}' have no image in '{images_dir}': "
                           f"{listing(masks[s].name for s in no_image)}")
    return [(images[stem], masks[stem]) for stem in sorted(images)]


def read_ids(path):
    """The ids of a split list (one per line; SBD and VOC write them this way)."""
    if not path.is_file():
        lists = sorted(p.stem for p in path.parent.glob("*.txt"))
        raise DatasetError(f"split list '{path}' does not exist (lists there: {listing(lists) or 'none'})")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"split list '{path}' is empty")
    return ids


def existing(pairs, listed_in):
    """The pairs themselves, after checking that every listed file is there (one stat per file)."""
    missing = [str(p) for pair in pairs for p in pair if not p.is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} file(s) listed in '{listed_in}' are missing: {listing(missing)}")
    return pairs


def held_out(keys, percent, seed):
    """A seeded random `percent` of `keys` (at least one when percent > 0): the validation side of a split."""
    keys = sorted(keys)
    count = min(len(keys) - 1, max(1, round(len(keys) * percent / 100))) if percent > 0 else 0
    order = np.random.default_rng(seed).permutation(len(keys))
    return {keys[i] for i in order[:count]}


SCAN_CACHE = ".unet_scan.json"


def file_stamp(path):
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise ImageReadError(f"'{path}' does not exist") from None
    return [stat.st_mtime_ns, stat.st_size]


def scan_pairs(pairs, skip_bad=False):
    """Check every pair once: the image's size (from its header) equals the decoded mask's, both are readable;
    and collect each mask's values. Results are cached beside the masks (SCAN_CACHE), keyed by file size and
    modification time, so later starts cost two stat calls per pair.
    Returns [(pair, (width, height), values)] for the readable pairs."""
    caches, changed, found, skipped = {}, set(), [], []
    for image_path, mask_path in pairs:
        folder = mask_path.parent
        if folder not in caches:
            try:
                caches[folder] = json.loads((folder / SCAN_CACHE).read_text())
            except (OSError, ValueError):
                caches[folder] = {}
        try:
            stamp = file_stamp(image_path) + file_stamp(mask_path)
            entry = caches[folder].get(mask_path.name)
            if entry is None or entry["stamp"] != stamp or entry["image"] != image_path.name:
                size = image_size(image_path)
                mask_size, values = mask_values_of(mask_path)
                if mask_size != size:
                    raise size_mismatch(image_path, size, mask_path, mask_size)
                entry = {"image": image_path.name, "stamp": stamp, "size": list(size), "values": values}
                caches[folder][mask_path.name] = entry
                changed.add(folder)
        except ImageReadError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
            continue
        found.append(((image_path, mask_path), tuple(entry["size"]), entry["values"]))
    for folder in changed:
        try:
            (folder / f"{SCAN_CACHE}.tmp").write_text(json.dumps(caches[folder]))
            os.replace(folder / f"{SCAN_CACHE}.tmp", folder / SCAN_CACHE)
        except OSError as e:
            print(f"note: could not cache the mask check in '{folder}' ({e}); it will run again", file=sys.stderr)
    if skipped:
        print(f"warning: skipped {len(skipped)} unreadable pair(s): {listing(skipped, 3)}", file=sys.stderr)
    if not found:
        raise DatasetError("none of the image/mask pairs could be read")
    return found


def check_values(found, mask_values, void_value):
    known = set(mask_values) | {void_value}
    for (_, mask_path), _, values in found:
        if not known.issuperset(values):
            raise unknown_values(mask_path, sorted(set(values) - known), mask_values, void_value)


class Shapes(torch.utils.data.Dataset):
    """Synthetic circles, squares and triangles on textured, noisy backgrounds, made on the fly.

    Item i of a split is a pure function of (seed, split, i): no files, identical on every machine.
    Shape colours are random, so the classes differ by geometry alone. `with_names` adds a name to each item:
    (image, mask, '<split>_<i>').
    """

    classes = ["background", "circle", "square", "triangle"]
    mask_values = [0, 1, 2, 3]
    ignore_index = IGNORE_INDEX

    def __init__(self, length=1000, image_size=64, seed=0, split="train", with_names=False):
        self.length, self.image_size, self.seed, self.split = length, image_size, seed, split
        self.with_names = with_names
        self.split_id = {"train": 0, "val": 1, "test": 2}[split]

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(index)
        image, mask = self.render(np.random.default_rng([self.seed, self.split_id, index]))
        item = torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(mask).long()
        return (*item, f"{self.split}_{index:05d}") if self.with_names else item

    def render(self, rng):
        s = self.image_size
        # Low-frequency colour texture: a coarse random grid, bilinearly enlarged, plus stripes.
        grid = rng.integers(0, 256, (rng.integers(2, 6), rng.integers(2, 6), 3), dtype=np.uint8)
        background = np.asarray(Image.fromarray(grid).resize((s, s), Image.BILINEAR), dtype=np.float32)
        yy, xx = np.mgrid[0:s, 0:s]
        angle, period = rng.uniform(0, math.pi), rng.uniform(4, 16)
        stripes = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
        background += 25 * stripes[..., None]
        image = Image.fromarray(background.clip(0, 255).astype(np.uint8))
        mask = Image.new("L", (s, s), 0)
        draw_image, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
        for _ in range(rng.integers(1, 5)):
            label = int(rng.integers(1, len(self.classes)))
            r = rng.uniform(0.08, 0.2) * s
            cx, cy = rng.uniform(r, s - r, size=2)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            if label == 1:
                points = [cx - r, cy - r, cx + r, cy + r]
                draw_image.ellipse(points, fill=colour)
                draw_mask.ellipse(points, fill=label)
            else:
                corners = 4 if label == 2 else 3
                start = rng.uniform(0, 2 * math.pi)
                points = [(cx + r * math.cos(start + 2 * math.pi * k / corners),
                           cy + r * math.sin(start + 2 * math.pi * k / corners)) for k in range(corners)]
                draw_image.polygon(points, fill=colour)
                draw_mask.polygon(points, fill=label)
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 12, (s, s, 3))
        return noisy.clip(0, 255).astype(np.uint8), np.array(mask, dtype=np.uint8)


DATASETS = ["auto", "shapes", "voc", "sbd", "sbd-voc", "trainaug", "carvana", "folder"]
# Where each layout's root may lie under --data, and the folders it must hold.
LAYOUTS = {
    "voc": (("VOCdevkit/VOC2012", "VOC2012", "."), ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation")),
    "sbd": (("benchmark_RELEASE/dataset", "dataset", "."), ("img", "cls")),
    "files": ((".",), ("imgs", "masks")),
}
DEFAULT_SCALE = {"carvana": 0.5}


def load_scale(dataset, scale=None):
    """The resize factor of a dataset's images: --scale when given, else its default (carvana 0.5, others 1)."""
    return scale or DEFAULT_SCALE.get(dataset, 1.0)


def find_root(data, layout):
    places, needs = LAYOUTS[layout]
    for place in places:
        if all((data / place / need).is_dir() for need in needs):
            return data / place
    return None


def looked_for(layout):
    places, needs = LAYOUTS[layout]
    inside = "{" + ",".join(needs) + "}"
    return " or ".join(inside if place == "." else f"{place}/{inside}" for place in places)


def need_root(data, layout, dataset):
    root = find_root(data, layout)
    if root is None:
        raise DatasetError(f"--dataset {dataset} found nothing under '{data}': looked for {looked_for(layout)}; "
                           f"point --data at the folder that holds it (see data/README.md)")
    return root


def augmented_masks(voc_root, data):
    """The SegmentationClassAug folder (SBD's masks converted to VOC PNGs), when there is one."""
    return next((f for f in (voc_root / "SegmentationClassAug", data / "SegmentationClassAug") if f.is_dir()), None)


def detect(args):
    """The dataset whose layout lies under --data."""
    data = Path(args.data)
    if args.images or args.masks:
        return "folder"
    voc, sbd = find_root(data, "voc"), find_root(data, "sbd")
    if voc and (sbd or augmented_masks(voc, data)):
        return "trainaug"
    if voc or sbd:
        return "voc" if voc else "sbd"
    files = find_root(data, "files")
    if files:
        return "carvana" if next((files / "masks").glob("*_mask.gif"), None) else "folder"
    raise DatasetError(
        f"no dataset found under '{data}': looked for Pascal VOC 2012 ({looked_for('voc')}), "
        f"SBD ({looked_for('sbd')}) and Carvana or image/mask folders ({looked_for('files')}). Fetch VOC and SBD "
        f"with --download, lay out your own data as data/README.md shows, or try --dataset shapes (synthetic)")


def voc_pairs(root, ids):
    return [(root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png") for i in ids]


def sbd_pairs(root, ids):
    return [(root / "img" / f"{i}.jpg", root / "cls" / f"{i}.mat") for i in ids]


def sbd_ids(root):
    """SBD train + val: 11,355 ids in the full release."""
    return sorted(set(read_ids(root / "train.txt")) | set(read_ids(root / "val.txt")))


def read_voc(args, data, split):
    root = need_root(data, "voc", args.dataset)
    listed = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    return existing(voc_pairs(root, read_ids(listed)), listed)


def read_sbd(args, data, split):
    root = need_root(data, "sbd", args.dataset)
    return existing(sbd_pairs(root, read_ids(root / f"{split}.txt")), root / f"{split}.txt")


def read_sbd_voc(args, data, split):
    """Train on SBD train+val (11,355); validate on the VOC 2012 train+val images SBD lacks (676)."""
    sbd = need_root(data, "sbd", args.dataset)
    if split == "train":
        return existing(sbd_pairs(sbd, sbd_ids(sbd)), sbd)
    voc = need_root(data, "voc", args.dataset)
    in_sbd = set(sbd_ids(sbd))
    listed = voc / "ImageSets" / "Segmentation" / "trainval.txt"
    return existing(voc_pairs(voc, [i for i in read_ids(listed) if i not in in_sbd]), listed)


def read_trainaug(args, data, split):
    """VOC train plus SBD train+val minus VOC val (10,582); validate on VOC val (1,449). Where VOC and SBD both
    annotate an image, VOC's own mask is used; SBD masks come from SegmentationClassAug when present."""
    voc = need_root(data, "voc", args.dataset)
    lists = voc / "ImageSets" / "Segmentation"
    val_ids = read_ids(lists / "val.txt")
    if split != "train":
        return existing(voc_pairs(voc, val_ids), lists / "val.txt")
    train_ids = read_ids(lists / "train.txt")
    annotated_by_voc = set(train_ids) | set(val_ids)
    aug = augmented_masks(voc, data)
    if aug is not None:
        masks = list_files(aug, "mask")
        extra = [(voc / "JPEGImages" / f"{i}.jpg", masks[i]) for i in sorted(masks.keys() - annotated_by_voc)]
    else:
        sbd = need_root(data, "sbd", f"{args.dataset} (without a SegmentationClassAug folder)")
        extra = sbd_pairs(sbd, sorted(set(sbd_ids(sbd)) - annotated_by_voc))
    return existing(voc_pairs(voc, train_ids) + extra, lists)


def read_carvana(args, data, split):
    """imgs/<car>_<view>.jpg + masks/<car>_<view>_mask.gif; validation holds whole cars (all 16 views)."""
    root = need_root(data, "files", args.dataset)
    suffix = "_mask" if args.mask_suffix is None else args.mask_suffix
    pairs = pair_by_stem(root / "imgs", root / "masks", suffix)
    if split == "all":
        return pairs
    val_cars = held_out({car_id(pair) for pair in pairs}, args.val_percent, args.data_seed)
    return [pair for pair in pairs if (car_id(pair) in val_cars) == (split != "train")]


def car_id(pair):
    return pair[0].stem.rsplit("_", 1)[0]


def folder_pairs(args, data):
    if args.images or args.masks:
        if not (args.images and args.masks):
            raise DatasetError("--images and --masks go together: name both folders")
        return pair_by_stem(Path(args.images), Path(args.masks), args.mask_suffix)
    root = need_root(data, "files", args.dataset)
    return pair_by_stem(root / "imgs", root / "masks", args.mask_suffix)


READERS = {"voc": read_voc, "sbd": read_sbd, "sbd-voc": read_sbd_voc, "trainaug": read_trainaug,
           "carvana": read_carvana}


def read_folder(args, data, split):
    """Any image/mask folders. Mask values are found once (scan_pairs, cached) and stored in args.mask_values,
    which the run saves: eval then maps values the same way, and predict writes them back."""
    found = scan_pairs(folder_pairs(args, data), args.skip_bad)
    values = sorted(set().union(*(v for _, _, v in found)) - {args.ignore_index})
    if args.mask_values is None:
        args.mask_values = values
    check_values(found, args.mask_values, args.ignore_index)
    if split == "all":
        return found
    val_stems = held_out({pair[0].stem for pair, _, _ in found}, args.val_percent, args.data_seed)
    return [entry for entry in found if (entry[0][0].stem in val_stems) == (split != "train")]


def class_names(mask_values):
    if len(mask_values) == 2:
        return ["background", "foreground"]
    return [f"value {v}" for v in mask_values]


def resolve_dataset(args):
    """Fetch VOC/SBD for --download, then turn --dataset auto into the dataset found under --data. The name is
    written back into args, so the run's saved arguments (and eval.py) name the dataset itself."""
    if args.download:
        download(Path(args.data), args.dataset)
    if args.dataset == "auto":
        args.dataset = detect(args)
    return args.dataset


def build_dataset(args, split, full_resolution=False):
    """The dataset that `args` (from add_dataset_args) names: the train preset for 'train', the deterministic
    validation preset (no random augmentation) for any other split. carvana and folder data also have the
    split 'all' (every pair).

    full_resolution=True, for evaluation: items are (image, mask, name) as the files hold them (upright, never
    resized by --scale nor padded, so sizes vary), named by the image's file stem."""
    if args.dataset == "shapes":
        length = args.num_train if split == "train" else args.num_val
        return Shapes(length, args.image_size, args.data_seed, split, with_names=full_resolution)
    name = resolve_dataset(args)
    data, scale = Path(args.data), load_scale(name, args.scale)
    splits = ("train", "val", "all") if name in ("carvana", "folder") else ("train", "val")
    if name in ("sbd-voc", "trainaug", "carvana", "folder") and split not in splits:
        raise DatasetError(f"--dataset {name} has the splits {', '.join(map(repr, splits))}, not '{split}'")
    if name == "folder":
        found = read_folder(args, data, split)
        classes, mask_values, void = class_names(args.mask_values), args.mask_values, args.ignore_index
    else:
        pairs = READERS[name](args, data, split)
        voc_like = name != "carvana"
        classes, mask_values = (VOC_CLASSES, range(21)) if voc_like else (["background", "car"], [0, 1])
        void = IGNORE_INDEX if voc_like else args.ignore_index
        found = scan_pairs(pairs, args.skip_bad) if args.verify and pairs else [(p, None, []) for p in pairs]
        check_values(found, mask_values, void)
    if not found:
        raise DatasetError(f"the {split} split of --dataset {name} under '{data}' is empty "
                           f"(--val-percent {args.val_percent:g})")
    pairs = [pair for pair, _, _ in found]
    if full_resolution:
        return SegmentationFiles(pairs, classes, mask_values, void, skip_bad=args.skip_bad, with_names=True)
    train = split == "train"
    zoom_crop = ((args.crop_size, tuple(args.zoom), args.rotate) if train and args.crop_size and not args.no_augment
                 else None)
    if zoom_crop:
        canvas = (args.crop_size, args.crop_size)
    elif name == "folder":  # items of varied size share one canvas so that batches stack
        sizes = {scaled_size(size, scale) for _, size, _ in found}
        canvas = (max(h for _, h in sizes), max(w for w, _ in sizes)) if len(sizes) > 1 else None
    else:
        canvas = None if name == "carvana" else (round(VOC_MAX_SIDE * scale),) * 2
    return SegmentationFiles(pairs, classes, mask_values, void, scale,
                             train_transform(args) if train else None, canvas, args.skip_bad, zoom_crop)


def download(data, dataset):
    """Fetch and unpack Pascal VOC 2012 and/or SBD into `data` with torchvision's downloader (skipped for a
    dataset already there). Full sizes: VOC 2 GB, SBD 1.4 GB."""
    import torchvision.datasets
    from torchvision.datasets.utils import download_and_extract_archive

    wanted = {"voc": ["voc"], "sbd": ["sbd"]}.get(dataset, ["voc", "sbd"])
    if dataset in ("shapes", "carvana", "folder"):
        raise DatasetError(f"--download fetches Pascal VOC 2012 and SBD; get --dataset {dataset} data by hand "
                           f"(see data/README.md)")
    sbd = torchvision.datasets.SBDataset
    sources = {"voc": torchvision.datasets.voc.DATASET_YEAR_DICT["2012"],
               "sbd": {"url": sbd.url, "filename": sbd.filename, "md5": sbd.md5}}
    for name in wanted:
        if find_root(data, name) is not None:
            continue
        source = sources[name]
        print(f"downloading {source['url']} into {data}")
        try:
            download_and_extract_archive(source["url"], data, filename=source["filename"], md5=source["md5"],
                                         remove_finished=True)
        except Exception as e:  # no network, a refused connection, a bad checksum, a broken archive
            raise DatasetError(f"could not download {source['url']} ({type(e).__name__}: {e}); fetch it by hand "
                               f"and unpack it under '{data}' (see data/README.md)") from None


def default_workers():
    """Data-loader processes: the CPU cores this process may use (containers and taskset count) minus the main
    process, at most 4, and 0 on a single core. Works with the spawn start method of Windows and macOS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(4, max(0, cores - 1))


def add_dataset_args(parser):
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="auto", choices=DATASETS,
                       help="dataset to read; 'auto' recognises the layout under --data; 'shapes' is synthetic")
    group.add_argument("--data", default="data", help="folder that holds the dataset (or the dataset's root)")
    group.add_argument("--download", action="store_true", help="first fetch Pascal VOC 2012 and/or SBD into --data")
    group.add_argument("--images", default=None, help="folder of images (--dataset folder)")
    group.add_argument("--masks", default=None, help="folder of masks named like the images (--dataset folder)")
    group.add_argument("--mask-suffix", default=None,
                       help="mask name = image name + suffix (default: '' or '_mask', whichever matches)")
    group.add_argument("--mask-values", type=int, nargs="+", default=None,
                       help="mask value of each class, in class order (folder; default: the values found)")
    group.add_argument("--ignore-index", type=int, default=None,
                       help="mask value of void pixels, skipped by loss and metrics (VOC and SBD: 255)")
    group.add_argument("--val-percent", type=float, default=10.0,
                       help="validation share of carvana (whole cars) and folder data")
    group.add_argument("--verify", action="store_true",
                       help="check every pair before training (readable, same size, known values); cached; "
                            "always on for folder")
    group.add_argument("--skip-bad", action="store_true",
                       help="leave out unreadable files, naming them with a count, instead of stopping")
    group.add_argument("--scale", type=float, default=None,
                       help="resize factor applied when loading (default: 0.5 for carvana, 1 otherwise)")
    group.add_argument("--crop-size", type=int, default=256, help="side of the random training crop (0: none)")
    group.add_argument("--zoom", type=float, nargs=2, default=[0.5, 2.0], metavar=("MIN", "MAX"),
                       help="random zoom range applied before the crop")
    group.add_argument("--hflip", type=float, default=0.5, help="probability of a horizontal flip (0: off)")
    group.add_argument("--rotate", type=float, default=10.0, help="largest random rotation in degrees (0: off)")
    group.add_argument("--jitter", type=float, default=0.0,
                       help="brightness, contrast and saturation jitter (0: off)")
    group.add_argument("--no-augment", action="store_true", help="no random augmentation at all")
    group.add_argument("--image-size", type=int, default=64, help="side of the synthetic shapes images")
    group.add_argument("--num-train", type=int, default=2000, help="synthetic training images")
    group.add_argument("--num-val", type=int, default=200, help="synthetic validation images")
    group.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data and of random splits")
    return group


def check_dataset_args(args):
    """Reject impossible values with a one-line ValueError."""
    for name in ("image_size", "num_train", "num_val"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.val_percent < 100:
        raise ValueError(f"--val-percent must lie in [0, 100), got {args.val_percent:g}")
    if args.scale is not None and not 0 < args.scale <= 4:
        raise ValueError(f"--scale must lie in (0, 4], got {args.scale:g}")
    if args.crop_size < 0 or args.rotate < 0 or args.jitter < 0 or not 0 <= args.hflip <= 1:
        raise ValueError(f"--crop-size, --rotate and --jitter cannot be negative and --hflip must lie in [0, 1], "
                         f"got {args.crop_size}, {args.rotate:g}, {args.jitter:g}, {args.hflip:g}")
    if not 0 < args.zoom[0] <= args.zoom[1]:
        raise ValueError(f"--zoom needs 0 < MIN <= MAX, got {args.zoom[0]:g} {args.zoom[1]:g}")
    if args.ignore_index is not None and not 0 <= args.ignore_index < 65536:
        raise ValueError(f"--ignore-index must be a mask value in [0, 65535], got {args.ignore_index}")


def main():
    parser = argparse.ArgumentParser(description="Write synthetic shapes images (and their masks) to a folder.")
    parser.add_argument("--out", default="samples", help="output folder")
    parser.add_argument("--count", type=int, default=2, help="number of images")
    parser.add_argument("--image-size", type=int, default=256, help="side of each image")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Shapes(args.count, args.image_size, args.seed, "test")
    for i in range(args.count):
        image, mask = data[i]
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(out / f"shapes_{i}.png")
        Image.fromarray(mask.numpy().astype(np.uint8) * 80).save(out / f"shapes_{i}_truth.png")
        print(f"wrote {out / f'shapes_{i}.png'}")


if __name__ == "__main__":
    main()
