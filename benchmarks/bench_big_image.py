"""predict.py with no flag on a large image, with a model train.py makes by default (random weights: its speed and
memory are those of a trained one): `--time` runs choose the ResNet-18 U-Net (the default here), runs of epochs
the classic U-Net (`--encoder none`). Prints seconds, peak resident memory and the memory plan's line, against
the whole-image throughput of 1024x1024 images measured in the same run.

    python benchmarks/bench_big_image.py                  # a 6000x6000 RGB PNG
    python benchmarks/bench_big_image.py --encoder none   # the classic U-Net: about 10 minutes on 2 CPU cores
    python benchmarks/bench_big_image.py --side 2048 --tile 256     # tiles against a whole image
    python benchmarks/bench_big_image.py --tiff 20000 --eval 20     # a striped TIFF (5 min), eval.py's memory

Targets (issue #23): peak RSS <= 3 GB, and time <= 1.25x what the 1024x1024 throughput predicts for the pixels.
"""
import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_predict import striped_tiff, synthetic_photo  # noqa: E402
from checkpoints import save_checkpoint  # noqa: E402
from precision import choose_precision  # noqa: E402
from model import IMAGENET_NORMALIZE, ModelConfig, build_model, count_parameters  # noqa: E402


def write_checkpoint(path, encoder):
    """A two-class checkpoint of train.py's default model (`encoder` 'none': the classic U-Net), random weights."""
    model_args = ModelConfig(encoder=encoder, encoder_weights="none").model_args(2)
    model = build_model(model_args)
    save_checkpoint({"model": model.state_dict(), "model_args": model_args, "classes": ["background", "object"],
                     "mask_values": [0, 255], "ignore_index": 255, "normalize": IMAGENET_NORMALIZE}, path)
    return f"{model_args}, {count_parameters(model) / 1e6:.2f} M parameters"


def predict(checkpoint, images, out, flags=()):
    """(wall seconds, peak RSS in MB, the memory plan's line) of predict.py -m checkpoint -i images -o out."""
    command = ["/usr/bin/time", "-v", sys.executable, str(ROOT / "predict.py"), "-m", str(checkpoint), "-i",
               *map(str, images), "-o", str(out), *flags]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"error: predict.py failed:\n{result.stderr[-2000:]}")
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1)) / 1024
    plan = next((line for line in (result.stdout + result.stderr).splitlines() if "memory plan" in line), "")
    return seconds, peak, plan


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", type=int, default=6000, help="side of the large RGB PNG")
    p.add_argument("--encoder", default="resnet18", choices=["resnet18", "resnet34", "none"])
    p.add_argument("--tiff", type=int, default=0, help="also a striped RGB TIFF of this side, no flag (0: none)")
    p.add_argument("--eval", type=int, default=0, help="also eval.py on this many 565x584 images (0: none)")
    p.add_argument("--tile", type=int, default=0,
                   help="also segment the large image in tiles of this side (default overlap) against the no-flag run")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = write_checkpoint(tmp / "model.pth", args.encoder)
        for i in range(4):
            synthetic_photo(tmp / f"small{i}.png", 1024, 1024, i)
        synthetic_photo(tmp / "big.png", args.side, args.side, 4)
        print(f"model: {model}; {torch.get_num_threads()} threads, {choose_precision('cpu').describe()}")
        # Start-up (importing torch, loading the model) is left out by difference: one image, then four.
        one, _, small_plan = predict(tmp / "model.pth", [tmp / "small0.png"], tmp / "out")
        four, _, _ = predict(tmp / "model.pth", [tmp / f"small{i}.png" for i in range(4)], tmp / "out")
        per_image = (four - one) / 3
        startup = one - per_image
        print(f"1024x1024, whole: {per_image:.2f} s an image (start-up {startup:.1f} s); {small_plan}")
        big_seconds, big_peak, big_plan = predict(tmp / "model.pth", [tmp / "big.png"], tmp / "out")
        ratio = (big_seconds - startup) / (per_image * args.side ** 2 / 1024 ** 2)
        print(f"{args.side}x{args.side}, no flag: {big_seconds:.1f} s, peak RSS {big_peak:.0f} MB (target 3072); "
              f"{ratio:.2f}x the whole-image throughput (target 1.25x); {big_plan}")
        assert Image.open(tmp / "out" / "big_mask.png").size == (args.side, args.side)
        if args.tile:
            tiled, tiled_peak, _ = predict(tmp / "model.pth", [tmp / "big.png"], tmp / "out", ["--tile", str(args.tile)])
            print(f"{args.side}x{args.side}, --tile {args.tile}: {tiled:.1f} s, peak RSS {tiled_peak:.0f} MB; "
                  f"{(tiled - startup) / (big_seconds - startup):.2f}x the no-flag run (target for 2048x2048 whole "
                  f"images: 1.3x)")
        if args.tiff:
            striped_tiff(tmp / "scan.tif", args.tiff)
            seconds, peak, plan = predict(tmp / "model.pth", [tmp / "scan.tif"], tmp / "out")
            print(f"{args.tiff}x{args.tiff} striped TIFF, no flag: {seconds:.1f} s, peak RSS {peak:.0f} MB (target "
                  f"4096; the image takes {3 * args.tiff ** 2 / 2 ** 20:.0f} MB); {plan}")
        if args.eval:
            eval_memory(tmp, args.eval)


def eval_memory(tmp, count):
    """eval.py with no --batch-size on `count` retina-sized images (565x584) with random masks: peak RSS, and
    the same scores as with --batch-size 1."""
    for kind in ("images", "masks"):
        (tmp / kind).mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        synthetic_photo(tmp / "images" / f"{i:02d}.png", 584, 565, i)
        Image.fromarray((rng.random((584, 565)) > 0.8).astype(np.uint8) * 255).save(tmp / "masks" / f"{i:02d}.png")
    peaks, scores = {}, {}
    for batch in ([], ["--batch-size", "1"]):
        command = ["/usr/bin/time", "-v", sys.executable, str(ROOT / "eval.py"), "-m", str(tmp / "model.pth"),
                   "--images", str(tmp / "images"), "--masks", str(tmp / "masks"), "--json", str(tmp / "scores.json"),
                   *batch]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            sys.exit(f"error: eval.py failed:\n{result.stderr[-2000:]}")
        key = "planned" if not batch else "batch 1"
        peaks[key] = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1)) / 1024
        scores[key] = json.loads((tmp / "scores.json").read_text())["miou"]
    print(f"eval.py, {count} images of 565x584, no --batch-size: peak RSS {peaks['planned']:.0f} MB (target 3072), "
          f"mIoU {scores['planned']:.6f}; with --batch-size 1: {peaks['batch 1']:.0f} MB, mIoU {scores['batch 1']:.6f}")


if __name__ == "__main__":
    main()
