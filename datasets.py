"""Dataset readers. Every dataset yields (image CxHxW, mask int64 HxW holding class indices, 255 = ignore)
and carries `classes`, `mask_values` (class index -> value in the mask files) and `ignore_index`. Images are uint8
(8-bit RGB or grey), or float32 holding the files' raw values for any other form (images.open_image).
Normalisation happens on the device, in inference.preprocess, so loaders move compact uint8 tensors.

Readers: synthetic `shapes`; Pascal VOC 2012 (`voc`); SBD (`sbd`); the two VOC+SBD training protocols
(`sbd-voc`, `trainaug`); Kaggle Carvana (`carvana`); any image/mask folders (`folder`)."""
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageMode
from torchvision import tv_tensors

from class_tables import check_class_names, read_class_names, read_colour_table
from errors import ColourMaskError, ConfigError, DatasetError, check_at_least, check_seeds
from images import GREY, Bands, describe_form, header_size, open_image, open_mask, packed_colour, scaled_size, \
    to_tensor, unpacked_colour
from memory import available_memory
from metrics import IGNORE_INDEX
from pairs import check_values, data_form, existing, found_mask_values, held_out, list_files, pair_by_stem, \
    read_ids, read_pairs_file, scan_pairs, size_mismatch, unknown_colours, unknown_values
from synthetic import Shapes
from transforms import class_centre, fit_canvas, random_zoom_crop, resample_mask, train_transform
from utils import spread_indices

DATASETS = ["auto", "shapes", "voc", "sbd", "sbd-voc", "trainaug", "carvana", "folder"]


@dataclass
class DataConfig:
    """Which data to read and how; the fields are the data flags of the scripts (see flags.py)."""
    # where the data lies
    dataset: str = "auto"
    data: str = "data"
    download: bool = False
    images: str | None = None
    masks: str | None = None
    pairs: str | None = None  # a CSV list of image,mask pairs (folder data whose names share no pattern)
    # how mask values become classes
    mask_suffix: str | None = None
    mask_values: list | None = None  # ints, or [R, G, B] colours for colour-coded masks
    ignore_index: int | None = None
    mask_colors: str | None = None  # the colour table file (--mask-colors), read into mask_values and void_color
    void_color: list | None = None  # [R, G, B] of void pixels in colour-coded masks
    class_names: str | None = None  # the class names file (--class-names), read into names
    names: list | None = None  # class names in class order (None: the dataset's own)
    roi: str | None = None  # folder of region-of-interest masks: pixels outside are void
    # splits, checks and size
    val_percent: float = 10.0
    verify: bool = False
    skip_bad: bool = False
    scale: float | None = None
    # the synthetic shapes
    image_size: int = 64
    num_train: int = 2000
    num_val: int = 200
    data_seed: int = 0
    # found in the data (resolve_data), not a flag: [channels, dtype] of the images, None for 8-bit RGB
    image_form: list | None = None

    def check(self):
        """ConfigError for an impossible value, before any file is read."""
        if self.dataset not in DATASETS:
            raise ConfigError(f"--dataset must be one of {', '.join(DATASETS)}, got '{self.dataset}'")
        check_at_least(1, image_size=self.image_size, num_train=self.num_train, num_val=self.num_val)
        if not 0 <= self.val_percent < 100:
            raise ConfigError(f"--val-percent must lie in [0, 100), got {self.val_percent:g}")
        if self.scale is not None and not 0 < self.scale <= 4:
            raise ConfigError(f"--scale must lie in (0, 4], got {self.scale:g}")
        if self.ignore_index is not None and not 0 <= self.ignore_index < 65536:
            raise ConfigError(f"--ignore-index must be a mask value in [0, 65535], got {self.ignore_index}")
        self.check_mask_values()
        check_seeds(data_seed=self.data_seed)
        if bool(self.images) != bool(self.masks) and self.dataset in ("auto", "folder"):
            raise ConfigError("--images and --masks go together: name both folders")
        if (self.roi or self.mask_colors) and self.dataset not in ("auto", "folder"):
            raise ConfigError(f"--roi and --mask-colors apply to folder data (--images and --masks), not --dataset "
                              f"{self.dataset}")
        if (self.mask_colors or colour_coded(self.mask_values)) and self.ignore_index is not None:
            raise ConfigError("--ignore-index names a void value, but these masks are colour-coded: name the void "
                              "colour in the --mask-colors table instead (a line 'R G B void', as '0 0 0 Void')")
        if self.pairs and (self.images or self.masks):
            raise ConfigError("--pairs lists the files itself: give it without --images and --masks")
        if self.pairs and self.dataset not in ("auto", "folder"):
            raise ConfigError(f"--pairs lists folder data, not --dataset {self.dataset}")
        if self.pairs and self.roi:
            raise ConfigError("--roi finds region masks by the names of the images in --images; with --pairs it is "
                              "not supported yet: give --images and --masks")
        return self

    def check_mask_values(self):
        """--mask-values: mask pixels are 8- or 16-bit (or colours, saved by a run on colour-coded masks), and each
        value names one class."""
        values = [tuple(value) for value in self.mask_values] if colour_coded(self.mask_values) else \
            self.mask_values or []
        outside = [value for value in values if not isinstance(value, tuple) and not 0 <= value < 65536]
        if outside:
            raise ConfigError(f"--mask-values must be mask values in [0, 65535], got {outside[0]}")
        repeated = sorted({value for value in values if values.count(value) > 1})
        if repeated:
            raise ConfigError(f"--mask-values names {', '.join(map(str, repeated))} more than once; give each "
                              f"class's value once, in class order")


def colour_coded(mask_values):
    """Whether mask values are [R, G, B] colours (colour-coded masks) rather than ints."""
    return bool(mask_values) and isinstance(mask_values[0], (list, tuple))


VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]
VOC_MAX_SIDE = 500  # every VOC and SBD image fits in 500x500: validation pads to that canvas so batches stack



class SegmentationFiles(torch.utils.data.Dataset):
    """(image, mask) file pairs read as they are on disk, resized by `scale` on load, then `transform`ed
    (torchvision v2, with the mask as a tv_tensors.Mask). `canvas` (height, width) pads or crops every item to
    one size so that images of different sizes can share a batch; padded mask pixels are ignored.
    `with_names` adds the image's file stem to each item: (image, mask, stem). Mask values that are [R, G, B]
    colours (and such a `void_value`) read the masks as colour-coded. `rois` ({image path: region-of-interest
    mask path}, or None) makes the pixels outside each image's region void. `form` is the images' form
    (images.open_image; None: 8-bit RGB). `class_crops` is the share of training crops centred on a pixel of a
    random class of the mask (transforms.class_centre). Up to `cache_bytes` of decoded pairs are kept in memory
    (DecodedPairs)."""

    ignore_index = IGNORE_INDEX

    def __init__(self, pairs, classes, mask_values, void_value=None, scale=1.0, transform=None, canvas=None,
                 skip_bad=False, zoom_crop=None, with_names=False, rois=None, form=None, class_crops=0.0,
                 cache_bytes=0):
        if len(mask_values) >= IGNORE_INDEX:
            raise DatasetError(f"the masks hold {len(mask_values)} distinct values; masks must hold class ids "
                               f"(at most {IGNORE_INDEX - 1} classes)")
        self.pairs, self.classes, self.mask_values = pairs, list(classes), list(mask_values)
        self.void_value, self.scale, self.transform, self.canvas = void_value, scale, transform, canvas
        # (crop side, (min zoom, max zoom), largest rotation) for training, cut before anything else
        self.zoom_crop, self.class_crops = zoom_crop, class_crops  # class_crops: see transforms.class_centre
        self.colours, self.rois = colour_coded(self.mask_values), rois
        values, void_value = packed_values(self.mask_values, void_value)
        # mask value -> class index, as sorted values and their classes: a look-up for any value, colours too
        self.keys = np.asarray(values + ([void_value] if void_value is not None else []), dtype=np.int64)
        self.codes = np.asarray(list(range(len(values))) + [IGNORE_INDEX] * (void_value is not None), np.int16)
        order = np.argsort(self.keys, kind="stable")  # void after a class of the same value: it wins
        self.keys, self.codes = self.keys[order], self.codes[order]
        self.table = np.full(65536, -1, dtype=np.int16)  # the same for 8- and 16-bit masks: a direct index
        if not self.colours:
            self.table[self.keys] = self.codes
        self.values_are_classes = self.mask_values == list(range(len(self.mask_values)))
        self.skip_bad, self.skipped, self.with_names = skip_bad, set(), with_names
        self.form = tuple(form) if form is not None else None
        self.decoded = DecodedPairs(cache_bytes) if cache_bytes else None

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
        centred = self.zoom_crop is not None and self.class_crops and float(torch.rand(())) < self.class_crops
        # Class indices before the crop resamples them where it must; kept pairs hold class indices too.
        early = self.colours or self.rois is not None or centred or self.decoded is not None
        if self.decoded is not None:
            image, mask = self.decoded.get(index, lambda: self.decode(image_path, mask_path, early))
        else:
            image, mask = self.decode(image_path, mask_path, early)
        outside = None
        if self.zoom_crop is not None:
            centre = class_centre(np.asarray(mask)) if centred else None
            if centre is not None:  # from the mask's pixels to the image's (they differ under --scale)
                centre = centre[0] * image.size[0] / mask.width, centre[1] * image.size[1] / mask.height
            image, mask, outside = random_zoom_crop(image, mask, *self.zoom_crop, centre=centre)
        elif mask.size != image.size:  # a --scale without a crop
            mask = resample_mask(mask, (0, 0, *mask.size), lambda layer, x, y: layer.resize(image.size, Image.BILINEAR))
        classes = np.array(mask) if early else self.to_classes(np.array(mask), mask_path)
        image, mask = to_tensor(image), torch.from_numpy(classes)
        if outside is not None:
            mask[torch.from_numpy(outside)] = IGNORE_INDEX  # rotated in from beyond the image: no class
        if self.canvas is not None:
            image, mask = fit_canvas(image, mask, *self.canvas)
        if self.transform is not None:
            image, mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        item = image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()
        return (*item, image_path.stem) if self.with_names else item

    def decode(self, image_path, mask_path, as_classes):
        """(PIL image at the load scale, PIL mask of raw values or, `as_classes`, of class indices)."""
        image, size = open_image(image_path, self.scale, self.form)
        mask = open_mask(mask_path, self.colours)
        if mask.size != size:
            raise size_mismatch(image_path, size, mask_path, mask.size)
        if as_classes:
            mask = Image.fromarray(self.classes_in_region(np.array(mask), mask_path, image_path, size))
        return image, mask

    def class_map(self, index):
        """Pair `index`'s mask as read, as class ids (H x W uint8): void and pixels outside the region of interest
        IGNORE_INDEX."""
        image_path, mask_path = self.pairs[index]
        mask = open_mask(mask_path, self.colours)
        return self.classes_in_region(np.array(mask), mask_path, image_path, mask.size)

    def to_classes(self, values, mask_path):
        """Raw mask values (or packed colours) -> uint8 class indices (255 = ignore)."""
        if self.values_are_classes and values.dtype == np.uint8 and values.max() < len(self.mask_values):
            return values  # already class indices (VOC, SBD, Carvana): no table look-up over every pixel
        if self.colours:
            at = np.searchsorted(self.keys, values).clip(max=len(self.keys) - 1)
            classes = np.where(self.keys[at] == values, self.codes[at], -1)
        else:
            classes = self.table[values if values.dtype in (np.uint8, np.uint16) else values.clip(0, 65535)]
        if classes.min() < 0:
            bad, counts = np.unique(values[classes < 0], return_counts=True)
            if self.colours:
                raise unknown_colours(mask_path, dict(zip(bad.tolist(), counts.tolist())))
            raise unknown_values(mask_path, bad.tolist(), self.mask_values, self.void_value)
        return classes.astype(np.uint8)

    def classes_in_region(self, values, mask_path, image_path, size):
        """Class indices of a mask's raw values, void outside the image's region of interest when there is one."""
        classes = np.array(self.to_classes(values, mask_path))
        if self.rois is not None:
            roi_path = self.rois[image_path]
            roi = open_mask(roi_path)
            if roi.size != size:
                raise roi_size_mismatch(image_path, size, roi_path, roi.size)
            classes[np.asarray(roi) == 0] = IGNORE_INDEX
        return classes


class DecodedPairs:
    """Decoded pairs kept in memory, first come first kept, up to `max_bytes` in all: a training set that fits is
    decoded once a run instead of once an epoch. Each data-loader worker keeps its own, within its share of the
    bytes. A training item of the VNC stack (grey 1024x1024 TIFF sections, PNG masks, a 256x256 crop) took 6.5 ms
    of CPU time read from its files, 1.7 ms kept (one thread, AMD EPYC Zen 4): 19 ms of a 0.33 s step of 4."""

    def __init__(self, max_bytes):
        self.max_bytes, self.used, self.pairs = max_bytes, 0, {}

    def get(self, index, decode):
        """The pair `index`, from memory or from decode() (an (image, mask) of PIL images)."""
        pair = self.pairs.get(index)
        if pair is None:
            pair = decode()
            size = sum(map(decoded_bytes, pair))
            worker = torch.utils.data.get_worker_info()
            if self.used + size <= self.max_bytes / (worker.num_workers if worker else 1):
                self.pairs[index] = pair
                self.used += size
        return pair


def decoded_bytes(image):
    """The bytes of pixel values a decoded PIL image (or Bands: a float32 layer a channel) holds, by PIL's own
    table of its modes' bands and value types."""
    layers = image.layers if isinstance(image, Bands) else [image]
    modes = [ImageMode.getmode(layer.mode) for layer in layers]
    return sum(layer.width * layer.height * len(mode.bands) * np.dtype(mode.typestr).itemsize
               for layer, mode in zip(layers, modes))


def decoded_cache_bytes(share=0.25, most=8 << 30):
    """The bytes of decoded training pairs this process keeps: a quarter of the memory free now, at most 8 GiB,
    shared among the training processes torchrun started on this machine."""
    available, _ = available_memory(torch.device("cpu"))
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return int(min(most, share * available) / processes) if available else 0


@dataclass
class MaskLayout:
    """Where the classes of the training masks lie: each class's share of the labelled pixels, and how far the
    classes' distribution over the top halves of the masks lies from that over the bottom halves (`upside_down`),
    and the left halves' from the right ones' (`mirrored`), as total variation distances: 0 the same, 1 apart."""
    shares: np.ndarray
    upside_down: float
    mirrored: float


def half_counts(classes):
    """Pixels of each class id (5 x (IGNORE_INDEX + 1) counts) in the class map `classes` (H x W): in the whole
    map, then in its top, bottom, left and right halves (the middle row or column of an odd side in neither)."""
    height, width = classes.shape
    parts = (classes, classes[:height // 2], classes[height - height // 2:], classes[:, :width // 2],
             classes[:, width - width // 2:])
    return np.stack([np.bincount(part.ravel(), minlength=IGNORE_INDEX + 1) for part in parts])


def mask_layout(dataset, num_classes, limit=64, most_pixels=64_000_000):
    """The MaskLayout of up to `limit` masks spread over `dataset` (synthetic shapes: its items), read in a seeded
    random order until they hold `most_pixels` (huge masks are slow to read); void left out; with --skip-bad an
    unreadable mask is left out."""
    counts = np.zeros((5, IGNORE_INDEX + 1))
    for i in np.random.default_rng(0).permutation(spread_indices(len(dataset), limit)):
        try:
            counts += half_counts(dataset.class_map(i) if hasattr(dataset, "class_map") else dataset[i][1].numpy())
        except DatasetError:
            if not getattr(dataset, "skip_bad", False):
                raise
        if counts[0].sum() >= most_pixels:
            break
    counts = counts[:, :num_classes]
    whole, top, bottom, left, right = counts / np.maximum(1.0, counts.sum(axis=1, keepdims=True))
    return MaskLayout(whole, 0.5 * float(np.abs(top - bottom).sum()), 0.5 * float(np.abs(left - right).sum()))


def packed_values(mask_values, void_value):
    """(mask values, void value) as ints: colours packed as images.pack_colours does, other values as they are."""
    if not colour_coded(mask_values):
        return list(mask_values), void_value
    return [packed_colour(c) for c in mask_values], None if void_value is None else packed_colour(void_value)


def roi_size_mismatch(image_path, image_size, roi_path, roi_size):
    return DatasetError(f"ROI mask '{roi_path}' is {roi_size[0]}x{roi_size[1]} but its image '{image_path}' is "
                        f"{image_size[0]}x{image_size[1]}; region-of-interest masks (--roi) must have their "
                        f"image's size")



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


def void_value(dataset, ignore_index=None):
    """The mask value of void pixels: VOC's and SBD's 255 (their object borders), else --ignore-index (or None)."""
    return IGNORE_INDEX if dataset in ("voc", "sbd", "sbd-voc", "trainaug") else ignore_index


def trained_scale(checkpoint):
    """The scale a checkpoint's model saw its images at: what eval.py and predict.py resize inputs by."""
    trained_with = checkpoint.get("args", {})
    return load_scale(trained_with.get("dataset"), trained_with.get("scale"))


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


def need_root(config, layout, why=""):
    data = Path(config.data)
    root = find_root(data, layout)
    if root is None:
        raise DatasetError(f"--dataset {config.dataset}{why} found nothing under '{data}': looked for "
                           f"{looked_for(layout)}; "
                           f"point --data at the folder that holds it (see data/README.md)")
    return root


def augmented_masks(voc_root, data):
    """The SegmentationClassAug folder (SBD's masks converted to VOC PNGs), when there is one."""
    return next((f for f in (voc_root / "SegmentationClassAug", data / "SegmentationClassAug") if f.is_dir()), None)


def detect(config):
    """The dataset whose layout lies under --data."""
    data = Path(config.data)
    if config.images or config.masks or config.pairs:
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


def read_voc(config, split):
    root = need_root(config, "voc")
    listed = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    return existing(voc_pairs(root, read_ids(listed)), listed)


def read_sbd(config, split):
    root = need_root(config, "sbd")
    return existing(sbd_pairs(root, read_ids(root / f"{split}.txt")), root / f"{split}.txt")


def read_sbd_voc(config, split):
    """Train on SBD train+val (11,355); validate on the VOC 2012 train+val images SBD lacks (676)."""
    sbd = need_root(config, "sbd")
    if split == "train":
        return existing(sbd_pairs(sbd, sbd_ids(sbd)), sbd)
    voc = need_root(config, "voc")
    in_sbd = set(sbd_ids(sbd))
    listed = voc / "ImageSets" / "Segmentation" / "trainval.txt"
    return existing(voc_pairs(voc, [i for i in read_ids(listed) if i not in in_sbd]), listed)


def read_trainaug(config, split):
    """VOC train plus SBD train+val minus VOC val (10,582); validate on VOC val (1,449). Where VOC and SBD both
    annotate an image, VOC's own mask is used; SBD masks come from SegmentationClassAug when present."""
    voc = need_root(config, "voc")
    lists = voc / "ImageSets" / "Segmentation"
    val_ids = read_ids(lists / "val.txt")
    if split != "train":
        return existing(voc_pairs(voc, val_ids), lists / "val.txt")
    train_ids = read_ids(lists / "train.txt")
    annotated_by_voc = set(train_ids) | set(val_ids)
    aug = augmented_masks(voc, Path(config.data))
    if aug is not None:
        masks = list_files(aug, "mask")
        extra = [(voc / "JPEGImages" / f"{i}.jpg", masks[i]) for i in sorted(masks.keys() - annotated_by_voc)]
    else:
        sbd = need_root(config, "sbd", " (without a SegmentationClassAug folder)")
        extra = sbd_pairs(sbd, sorted(set(sbd_ids(sbd)) - annotated_by_voc))
    return existing(voc_pairs(voc, train_ids) + extra, lists)


def read_carvana(config, split):
    """imgs/<car>_<view>.jpg + masks/<car>_<view>_mask.gif; validation holds whole cars (all 16 views)."""
    root = need_root(config, "files")
    suffix = "_mask" if config.mask_suffix is None else config.mask_suffix
    pairs = pair_by_stem(root / "imgs", root / "masks", suffix)
    if split == "all":
        return pairs
    val_cars = held_out({car_id(pair) for pair in pairs}, config.val_percent, config.data_seed)
    return [pair for pair in pairs if (car_id(pair) in val_cars) == (split != "train")]


def car_id(pair):
    return pair[0].stem.rsplit("_", 1)[0]


def folder_pairs(config):
    if config.pairs:
        return read_pairs_file(config.pairs)
    if config.images or config.masks:
        return pair_by_stem(Path(config.images), Path(config.masks), config.mask_suffix)
    root = need_root(config, "files")
    return pair_by_stem(root / "imgs", root / "masks", config.mask_suffix)


READERS = {"voc": read_voc, "sbd": read_sbd, "sbd-voc": read_sbd_voc, "trainaug": read_trainaug,
           "carvana": read_carvana}


def class_names(mask_values):
    if len(mask_values) == 2:
        return ["background", "foreground"]
    if colour_coded(mask_values):
        return ["colour {} {} {}".format(*colour) for colour in mask_values]
    return [f"value {v}" for v in mask_values]


def resolve_data(config):
    """The config with what the data itself decides filled in: --download done, --dataset auto replaced by the
    dataset found under --data, and for folder data the mask values found in the masks (unless given). The run
    saves the result, so eval.py reads the data the same way and predict.py writes the same mask values."""
    config.check()
    if config.download:
        download(Path(config.data), config.dataset)
    resolved = dataclasses.replace(config, download=False)
    if resolved.dataset == "auto":
        resolved.dataset = detect(resolved)
        resolved.check()  # --roi and --mask-colors need folder data
    resolved = with_tables(resolved)
    if resolved.dataset == "folder":
        forms = {}  # {image path: form}, filled by the scan that finds the mask values
        if resolved.mask_values is None:
            resolved.mask_values = found_values(resolved, forms)
        resolved.image_form = found_form(resolved, forms)
    if resolved.class_names:
        if resolved.dataset == "shapes":
            raise ConfigError("--class-names names the classes of your data; the synthetic shapes have their own")
        resolved.names = read_class_names(resolved.class_names)
    return resolved


def with_tables(config):
    """The config with the colour table of --mask-colors read into mask_values, void_color and names."""
    if not config.mask_colors:
        return config
    table = read_colour_table(config.mask_colors)
    if config.mask_values is not None and config.mask_values != table.colours:
        raise ConfigError("--mask-values and --mask-colors both name the classes' mask values; give only one")
    return dataclasses.replace(config, mask_values=table.colours, void_color=table.void, names=table.names)


def found_values(config, forms=None):
    """The mask values found in folder data's masks: values, or [R, G, B] colours when the masks hold colours.
    `forms`, a dict, gets the images' forms (scan_pairs)."""
    pairs = folder_pairs(config)
    try:
        return found_mask_values(scan_pairs(pairs, config.skip_bad, forms=forms), config.ignore_index)
    except ColourMaskError:
        if config.ignore_index is not None:
            raise ConfigError("the masks are colour-coded, so --ignore-index (a mask value) cannot name their "
                              "void colour: give a colour table with --mask-colors (a line 'R G B void')") from None
        found = scan_pairs(pairs, config.skip_bad, colours=True, forms=forms)
        return [unpacked_colour(value) for value in found_mask_values(found, colours=True)]


def found_form(config, forms):
    """The form of folder data's images (pairs.data_form) as a list, or None for 8-bit RGB: one form for all.
    `forms` ({image path: form}) when a scan found them, else empty."""
    if not forms:
        scan_pairs(folder_pairs(config), config.skip_bad, colour_coded(config.mask_values), forms)
    form = data_form(forms)
    return list(form) if form is not None else None


def dataset_splits(name):
    return ("train", "val", "all") if name in ("carvana", "folder") else ("train", "val")


def build_dataset(config, split, augment=None, full_resolution=False):
    """The dataset a resolved config (resolve_data) names: with `augment` (an AugmentConfig) the training preset,
    else the deterministic validation preset. carvana and folder data also have the split 'all' (every pair).

    full_resolution=True, for evaluation: items are (image, mask, name) as the files hold them (upright, never
    resized by --scale nor padded, so sizes vary), named by the image's file stem."""
    if config.dataset == "shapes":  # made at --image-size: no crop
        length = config.num_train if split == "train" else config.num_val
        return Shapes(length, config.image_size, config.data_seed, split, with_names=full_resolution)
    name, scale = config.dataset, load_scale(config.dataset, config.scale)
    found, classes, mask_values, void = found_pairs(config, split)
    rois = region_masks(config, found) if config.roi else None
    pairs, form = [pair for pair, _, _ in found], config.image_form
    if full_resolution:
        return SegmentationFiles(pairs, classes, mask_values, void, skip_bad=config.skip_bad, with_names=True,
                                 rois=rois, form=form)
    if augment is not None and augment.jitter and form not in (None, list(GREY)):
        raise ConfigError(f"--jitter changes the brightness, contrast and colour of 8-bit images, but these are "
                          f"{describe_form(form)}: leave it out")
    zoom_crop = augment.zoom_crop() if augment is not None else None
    largest = max((max(scaled_size(size, scale)) for _, size, _ in found if size), default=None)
    if zoom_crop and largest and zoom_crop[0] > largest:  # a crop beyond every image would be mostly padding
        print(f"note: --crop-size {zoom_crop[0]} is larger than every image (at most {largest} pixels a side at "
              f"--scale {scale:g}); cropping {largest} instead", file=sys.stderr)
        zoom_crop = (largest, *zoom_crop[1:])
    if zoom_crop:
        canvas = (zoom_crop[0], zoom_crop[0])
    elif name == "folder":  # items of varied size share one canvas so that batches stack
        sizes = {scaled_size(size, scale) for _, size, _ in found}
        canvas = (max(h for _, h in sizes), max(w for w, _ in sizes)) if len(sizes) > 1 else None
    else:
        canvas = None if name == "carvana" else (round(VOC_MAX_SIDE * scale),) * 2
    transform = train_transform(augment) if augment is not None else None
    return SegmentationFiles(pairs, classes, mask_values, void, scale, transform, canvas, config.skip_bad, zoom_crop,
                             rois=rois, form=form, class_crops=augment.class_crops if zoom_crop else 0.0,
                             cache_bytes=decoded_cache_bytes() if augment is not None else 0)


def found_pairs(config, split):
    """(the scanned pairs of a split, class names, mask values, void value) of a resolved config that is not
    shapes; every mask of folder data (and of others with --verify) is checked to hold known values only."""
    name = config.dataset
    if name in ("sbd-voc", "trainaug", "carvana", "folder") and split not in dataset_splits(name):
        splits = ", ".join(map(repr, dataset_splits(name)))
        raise DatasetError(f"--dataset {name} has the splits {splits}, not '{split}'")
    if name == "folder":
        colours = colour_coded(config.mask_values)
        classes, mask_values = class_names(config.mask_values), config.mask_values
        void = config.void_color if colours else config.ignore_index
        found = scan_pairs(folder_pairs(config), config.skip_bad, colours)
        check_values(found, *packed_values(mask_values, void), colours)
    else:
        pairs = READERS[name](config, split)
        classes, mask_values = (["background", "car"], [0, 1]) if name == "carvana" else (VOC_CLASSES, range(21))
        void = void_value(name, config.ignore_index)
        found = scan_pairs(pairs, config.skip_bad) if config.verify and pairs else [(p, None, {}) for p in pairs]
        check_values(found, mask_values, void)
    check_class_names(config.names, len(classes), config.class_names)
    if name == "folder" and split != "all":
        val_stems = held_out({pair[0].stem for pair, _, _ in found}, config.val_percent, config.data_seed)
        found = [entry for entry in found if (entry[0][0].stem in val_stems) == (split != "train")]
    if not found:
        where = (f"'{config.images}'" if name == "folder" and config.images else
                 f"listed in '{config.pairs}'" if name == "folder" and config.pairs else f"under '{config.data}'")
        fix = "; give --val-percent above 0 to hold out validation images" if config.val_percent == 0 else ""
        raise DatasetError(f"the {split} split of --dataset {name} {where} is empty "
                           f"(--val-percent {config.val_percent:g}){fix}")
    return found, config.names or classes, mask_values, void


def region_masks(config, found):
    """{image path: its region-of-interest mask in --roi}, named as masks are, each of its image's size."""
    images = Path(config.images) if config.images else need_root(config, "files") / "imgs"
    rois = dict(pair_by_stem(images, Path(config.roi), kind="ROI mask"))
    for (image_path, _), size, _ in found:
        roi_size = header_size(rois[image_path])
        if roi_size != size:
            raise roi_size_mismatch(image_path, size, rois[image_path], roi_size)
    return rois


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
