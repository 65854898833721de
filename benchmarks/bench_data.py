"""Data-loading benchmark: start-up on a Carvana-sized set, per-item load + augment at Carvana's full size
against a plain "PIL open, resize, to tensor" baseline measured in the same run, and the same item as 16-bit grey
and 5-band images against 8-bit RGB.

Example: python benchmarks/bench_data.py --carvana DIR    (DIR: a Carvana folder holding imgs/ and masks/)
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo's modules (datasets, flags, ...)

import numpy as np
import torch
from PIL import Image

import datasets
import flags
from transforms import AugmentConfig

SAMPLE = ROOT.parent / "shared" / "data" / "carvana_sample"  # where the tests' Carvana sample lies, if anywhere


def build(argv, splits, augment=True):
    """The datasets train.py would load for these data and augmentation flags, one per split: the training
    preset, or with augment=False the deterministic validation preset. Resolving the flags recognises the layout
    under --data and, for folder data, checks every pair and finds the mask values (cached, pairs.cache_folder)."""
    parser = argparse.ArgumentParser()
    flags.add_dataset_args(parser)
    flags.add_augment_args(parser)
    values = vars(parser.parse_args(argv))
    data = datasets.resolve_data(flags.config_from(datasets.DataConfig, values))
    augmentation = flags.config_from(AugmentConfig, values).check() if augment else None
    return [datasets.build_dataset(data, split, augment=augmentation) for split in splits]


def timed(function, clock=time.perf_counter):
    start = clock()
    function()
    return clock() - start


def make_set(root, image, mask, cars, mask_suffix):
    """cars x 16 views of symlinks to one image and one mask, named like Carvana."""
    for folder in ("imgs", "masks"):
        (root / folder).mkdir(parents=True)
    for car in range(cars):
        for view in range(1, 17):
            stem = f"{car:012x}_{view:02d}"
            os.symlink(image, root / "imgs" / f"{stem}{image.suffix}")
            os.symlink(mask, root / "masks" / f"{stem}{mask_suffix}{mask.suffix}")


def startup(args, sample):
    """Seconds to recognise the layout and build the train and val sets (best of `args.repeat`)."""
    pairs = args.cars * 16
    with tempfile.TemporaryDirectory() as tmp, \
            mock.patch.dict(os.environ, {"XDG_CACHE_HOME": str(Path(tmp) / "cache")}):  # the check's cache, gone after
        carvana = Path(tmp) / "carvana"
        make_set(carvana, *first_pair(sample), args.cars, "_mask")
        seconds = min(timed(lambda: build(["--data", str(carvana)], ("train", "val"))) for _ in range(args.repeat))
        print(f"start-up, carvana reader, {pairs} pairs: {seconds:.3f} s (target < 1 s)")

        folder = Path(tmp) / "folder"
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(Path(tmp) / "tiny.jpg")
        Image.fromarray(np.eye(8, dtype=np.uint8) * 255).save(Path(tmp) / "tiny.png")
        make_set(folder, Path(tmp) / "tiny.jpg", Path(tmp) / "tiny.png", args.cars, "")
        build_folder = lambda: build(["--data", str(folder), "--dataset", "folder"], ("train", "val"))
        first = timed(build_folder)
        cached = min(timed(build_folder) for _ in range(args.repeat))
        print(f"start-up, folder reader (finds the mask values), {pairs} tiny pairs: first run {first:.3f} s "
              f"(decodes every pair once), then {cached:.3f} s from the cache")


def first_pair(sample):
    """The first image of a Carvana folder and its mask."""
    images = sorted((sample / "imgs").glob("*.jpg"))
    if not images:
        sys.exit(f"error: no Carvana images in '{sample / 'imgs'}'; pass --carvana DIR, a folder holding "
                 f"imgs/<car>_<view>.jpg and masks/<car>_<view>_mask.gif")
    return images[0], sample / "masks" / f"{images[0].stem}_mask.gif"


def baseline_item(image_path, mask_path, scale):
    """PIL open, resize, to tensor: what a plain loader does."""
    image = Image.open(image_path).convert("RGB")
    size = (round(image.width * scale), round(image.height * scale))
    image = np.array(image.resize(size))
    mask = np.array(Image.open(mask_path).resize(size, Image.NEAREST))
    return torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(mask).long()


def per_item(args, sample):
    """CPU milliseconds per item, best of `args.repeat` passes over the sample pairs."""
    every_pair = ["--data", str(sample), "--dataset", "carvana", "--val-percent", "0", "--scale", str(args.scale)]
    train_split = lambda *extra, augment=True: build(every_pair + list(extra), ["train"], augment)[0]
    train, plain, rich = train_split(), train_split("--rotate", "0"), train_split("--jitter", "0.2")
    kept = train_split()
    for dataset in (train, plain, rich):
        dataset.decoded = None  # every pass decodes the files
    val = train_split(augment=False)
    cases = {"baseline: PIL open, resize, to tensor": lambda i: baseline_item(*train.pairs[i], args.scale),
             "ours, train preset (load, zoom+rotate+crop, flip)": train.__getitem__,
             "ours, train preset, pairs kept decoded after a first pass": kept.__getitem__,
             "ours, train preset with --rotate 0": plain.__getitem__,
             "ours, train preset + --jitter 0.2": rich.__getitem__,
             "ours, validation preset (load only)": val.__getitem__}
    passes = {name: [] for name in cases}
    for _ in range(args.repeat):  # interleaved passes, best of each: robust to other load on the machine
        for name, load in cases.items():
            # CPU time of this process: what a data-loader worker spends per item, whatever else the machine runs
            passes[name].append(timed(lambda: [load(i) for i in range(len(train))], time.process_time)
                                / len(train) * 1000)
    milliseconds = {name: min(times) for name, times in passes.items()}
    width, height = Image.open(train.pairs[0][0]).size
    print(f"per item (CPU time, one thread), {width}x{height} JPEG + GIF mask, --scale {args.scale:g}, "
          f"{len(train)} pairs:")
    base = milliseconds["baseline: PIL open, resize, to tensor"]
    for name, ms in milliseconds.items():
        print(f"  {name:<58} {ms:7.2f} ms  {base / ms:5.2f}x the baseline")


def per_form(args, sample):
    """CPU milliseconds per training item (load, zoom + rotate + crop, flip) of one Carvana photo saved in three
    forms of the same size: 8-bit RGB PNG, 16-bit grey PNG and a 5-band 16-bit TIFF (images.open_image)."""
    import tifffile

    image_path, mask_path = first_pair(sample)
    rgb = np.asarray(Image.open(image_path).convert("RGB"), dtype=np.uint16) * 257
    writers = {"8-bit RGB PNG": lambda path: Image.open(image_path).convert("RGB").save(path.with_suffix(".png")),
               "16-bit grey PNG": lambda path: Image.fromarray(rgb[..., 1]).save(path.with_suffix(".png")),
               "5-band 16-bit TIFF": lambda path: tifffile.imwrite(path.with_suffix(".tif"), np.concatenate(
                   [np.moveaxis(rgb, -1, 0), np.moveaxis(rgb[..., :2], -1, 0)]), photometric="minisblack")}
    with tempfile.TemporaryDirectory() as folder:
        loaders = {}
        for i, (name, write) in enumerate(writers.items()):
            root = Path(folder) / str(i)
            (root / "imgs").mkdir(parents=True), (root / "masks").mkdir()
            write(root / "imgs" / "a")
            Image.open(mask_path).save(root / "masks" / "a.png")
            train = build(["--images", str(root / "imgs"), "--masks", str(root / "masks"), "--val-percent", "0",
                           "--scale", str(args.scale)], ["train"])[0]
            train.decoded = None  # each item decodes its file
            loaders[name] = train.__getitem__
        milliseconds = {name: min(timed(lambda: [load(0) for _ in range(4)], time.process_time) / 4 * 1000
                                  for _ in range(args.repeat)) for name, load in loaders.items()}
    print(f"per training item by image form (CPU time, one thread), the same photo, --scale {args.scale:g}:")
    base = milliseconds["8-bit RGB PNG"]
    for name, ms in milliseconds.items():
        print(f"  {name:<58} {ms:7.2f} ms  {ms / base:5.2f}x the 8-bit RGB item")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--carvana", default=str(SAMPLE),
                        help="Carvana folder (imgs/, masks/) whose files the benchmark reads (default: the "
                             "sample the tests read)")
    parser.add_argument("--cars", type=int, default=318,
                        help="cars in the start-up set, at least 2 (x 16 views; 318: 5,088)")
    parser.add_argument("--scale", type=float, default=0.5, help="load scale of the per-item benchmark")
    parser.add_argument("--repeat", type=int, default=5, help="timed passes")
    args = parser.parse_args()
    if args.cars < 2 or args.repeat < 1:
        parser.error("--cars needs at least 2 (one for the val split) and --repeat at least 1")
    torch.set_num_threads(1)  # as in a data-loader worker
    sample = Path(args.carvana).resolve()
    first_pair(sample)  # a clear error, before anything is timed, when the folder holds no Carvana data
    startup(args, sample)
    per_item(args, sample)
    per_form(args, sample)


if __name__ == "__main__":
    main()
