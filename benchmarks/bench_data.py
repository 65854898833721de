"""Data-loading benchmark: start-up on a Carvana-sized set, and per-item load + augment at Carvana's full size
against a plain "PIL open, resize, to tensor" baseline measured in the same run.

Example: python bench_data.py --carvana ../shared/data/carvana_sample
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import datasets


def data_args(argv):
    parser = argparse.ArgumentParser()
    datasets.add_dataset_args(parser)
    args = parser.parse_args(argv)
    datasets.check_dataset_args(args)
    return args


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
    with tempfile.TemporaryDirectory() as tmp:
        carvana = Path(tmp) / "carvana"
        make_set(carvana, sample / "imgs" / "0cdf5b5d0ce1_01.jpg", sample / "masks" / "0cdf5b5d0ce1_01_mask.gif",
                 args.cars, "_mask")
        build = lambda: [datasets.build_dataset(a, s) for a in [data_args(["--data", str(carvana)])]
                         for s in ("train", "val")]
        seconds = min(timed(build) for _ in range(args.repeat))
        print(f"start-up, carvana reader, {pairs} pairs: {seconds:.3f} s (target < 1 s)")

        folder = Path(tmp) / "folder"
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(Path(tmp) / "tiny.jpg")
        Image.fromarray(np.eye(8, dtype=np.uint8) * 255).save(Path(tmp) / "tiny.png")
        make_set(folder, Path(tmp) / "tiny.jpg", Path(tmp) / "tiny.png", args.cars, "")
        build = lambda: [datasets.build_dataset(data_args(["--data", str(folder), "--dataset", "folder"]), s)
                         for s in ("train", "val")]
        first = timed(build)
        cached = min(timed(build) for _ in range(args.repeat))
        print(f"start-up, folder reader (finds the mask values), {pairs} tiny pairs: first run {first:.3f} s "
              f"(decodes every mask once), then {cached:.3f} s from the cache")


def baseline_item(image_path, mask_path, scale):
    """PIL open, resize, to tensor: what a plain loader does."""
    image = Image.open(image_path).convert("RGB")
    size = (round(image.width * scale), round(image.height * scale))
    image = np.array(image.resize(size))
    mask = np.array(Image.open(mask_path).resize(size, Image.NEAREST))
    return torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(mask).long()


def per_item(args, sample):
    """CPU milliseconds per item, best of `args.repeat` passes over the sample pairs."""
    scale = ["--scale", str(args.scale)]
    train = datasets.build_dataset(data_args(["--data", str(sample), "--val-percent", "0"] + scale), "train")
    val = datasets.build_dataset(data_args(["--data", str(sample), "--val-percent", "0", "--no-augment"] + scale),
                                 "train")
    plain = datasets.build_dataset(data_args(["--data", str(sample), "--val-percent", "0", "--rotate", "0"] + scale),
                                   "train")
    rich = datasets.build_dataset(data_args(["--data", str(sample), "--val-percent", "0", "--jitter", "0.2"] + scale),
                                  "train")
    cases = {"baseline: PIL open, resize, to tensor": lambda i: baseline_item(*train.pairs[i], args.scale),
             "ours, train preset (load, zoom+rotate+crop, flip)": train.__getitem__,
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--carvana", default="../shared/data/carvana_sample",
                        help="Carvana folder (imgs/, masks/) whose files the benchmark reads")
    parser.add_argument("--cars", type=int, default=318, help="cars in the start-up set (x 16 views; 318: 5,088)")
    parser.add_argument("--scale", type=float, default=0.5, help="load scale of the per-item benchmark")
    parser.add_argument("--repeat", type=int, default=5, help="timed passes")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a data-loader worker
    sample = Path(args.carvana).resolve()
    startup(args, sample)
    per_item(args, sample)


if __name__ == "__main__":
    main()
