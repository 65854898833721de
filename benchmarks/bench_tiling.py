"""Benchmark the tiling defaults: scores and cost of overlap-tile inference against whole images.

    python benchmarks/bench_tiling.py                    # ISBI 2012 and VNC from ../shared/data: about 10 minutes
    python benchmarks/bench_tiling.py --steps 600 --tiles 128 256

Trains a small U-Net for a fixed number of steps on each dataset (train.py, one process), then scores its test
images whole and in tiles at overlaps 0.5, 0.25 and 0.125 (tiles spread evenly: inference.balanced_tile, as the
memory plan chooses them), and prints each score, its difference from overlap 0.5's, and the cost as forward
pixels over the whole image's (what the time follows on a CPU; the seconds are printed too, indicative only).
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks.common import add_threads_arg, use_threads
from checkpoints import load_model
from images import open_mask, read_image
from inference import InferenceConfig, balanced_tile, predict_probs, probs_to_labels, tile_grid, use_precision
from metrics import ConfusionMatrix

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
OVERLAPS = (0.5, 0.25, 0.125)


def datasets(shared):
    """name -> (train images, train masks, test image files, test mask files)."""
    isbi, vnc = shared / "isbi2012" / "train", shared / "vnc"
    test = range(25, 30)  # slices 25-29 held out, as benchmarks/bench_budget.py does
    return {
        "isbi": ([isbi / "image" / f"{n}.png" for n in range(25)], [isbi / "label" / f"{n}.png" for n in range(25)],
                 [isbi / "image" / f"{n}.png" for n in test], [isbi / "label" / f"{n}.png" for n in test]),
        "vnc": (sorted((vnc / "train" / "images").iterdir()), sorted((vnc / "train" / "masks").iterdir()),
                sorted((vnc / "test" / "images").iterdir()), sorted((vnc / "test" / "masks").iterdir())),
    }


def linked(files, folder):
    folder.mkdir(parents=True)
    for file in files:
        (folder / file.name).symlink_to(file)
    return folder


def train(name, images, masks, work, steps, flags):
    runs = work / name / "runs"
    command = [sys.executable, str(ROOT / "train.py"), "--images", str(linked(images, work / name / "images")),
               "--masks", str(linked(masks, work / name / "masks")), "--epochs", "1", "--steps-per-epoch", str(steps),
               "--workers", "0", "--checkpoint-dir", str(runs), *flags]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    (best,) = runs.glob("*/best.pth")
    return best


def score(model, checkpoint, pairs, options, tile=None, overlap=0.5):
    """(mIoU, forward pixels / image pixels, seconds) over `pairs` of (image, class map)."""
    classes = max(checkpoint["model_args"]["num_classes"], 2)
    confusion, forward, pixels, seconds = ConfusionMatrix(classes), 0, 0, 0.0
    stride = getattr(model, "output_stride", 1)
    for image, target in pairs:
        height, width = image.shape[-2:]
        used = balanced_tile(max(height, width), tile, overlap, stride) if tile else None
        start = time.perf_counter()
        probs = predict_probs(model, image[None], checkpoint["normalize"], **{**options, "tile": used,
                                                                             "overlap": overlap})
        seconds += time.perf_counter() - start
        confusion.update(probs_to_labels(probs), target[None])
        if used:
            tile_h, tile_w, ys, xs = tile_grid(model, (height, width), used, overlap)
            forward += len(ys) * len(xs) * tile_h * tile_w
        else:
            forward += height * width
        pixels += height * width
    return confusion.compute()["miou"], forward / pixels, seconds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(SHARED), help="the shared data folder (isbi2012/, vnc/)")
    p.add_argument("--steps", type=int, default=300, help="training steps of each model")
    p.add_argument("--tiles", type=int, nargs="+", default=[128, 256], help="tile sides to score")
    p.add_argument("--only", nargs="+", choices=["isbi", "vnc"], default=["isbi", "vnc"], help="datasets to run")
    p.add_argument("--flags", nargs=argparse.REMAINDER, default=["--base-channels", "16", "--crop-size", "256"],
                   help="train.py flags of the models (default: --base-channels 16 --crop-size 256)")
    add_threads_arg(p)
    args = p.parse_args()
    use_threads(args.threads)
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as work:
        for name, (train_images, train_masks, test_images, test_masks) in datasets(Path(args.data)).items():
            if name not in args.only:
                continue
            model, checkpoint = load_model(train(name, train_images, train_masks, Path(work), args.steps, args.flags))
            config = use_precision(model, InferenceConfig(), log=lambda line: None)
            options = {**config.options(), "scale": 1.0}
            lookup = np.full(65536, 255, np.int64)
            lookup[list(checkpoint["mask_values"])] = range(len(checkpoint["mask_values"]))
            pairs = [(read_image(image), torch.from_numpy(lookup[np.asarray(open_mask(mask), np.int64)]))
                     for image, mask in zip(test_images, test_masks)]
            size = "x".join(map(str, pairs[0][0].shape[:0:-1]))
            whole, _, whole_seconds = score(model, checkpoint, pairs, options)
            print(f"{name} ({len(pairs)} test images of {size}, {config.amp}): whole images mIoU {whole:.4f}, "
                  f"{whole_seconds:.1f} s", flush=True)
            for tile in args.tiles:
                reference = None
                for overlap in OVERLAPS:
                    miou, cost, seconds = score(model, checkpoint, pairs, options, tile, overlap)
                    reference = miou if reference is None else reference
                    print(f"  tile {tile}, overlap {overlap}: mIoU {miou:.4f} ({miou - reference:+.4f} against "
                          f"overlap 0.5, {miou - whole:+.4f} against whole), forward pixels x{cost:.2f}, "
                          f"{seconds:.1f} s", flush=True)


if __name__ == "__main__":
    main()
