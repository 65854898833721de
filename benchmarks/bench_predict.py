"""Benchmark predict.py: images/s and peak memory, whole images versus overlap-tile inference.

    python benchmarks/bench_predict.py --threads 1          # under a minute on 2 CPU cores shared with other jobs
    python benchmarks/bench_predict.py --threads 1 --huge 10000   # a 10,000 x 10,000 image: about 2 more minutes
    python benchmarks/bench_predict.py --base-channels 64 --count 64 --device cuda   # the classic 31 M U-Net
    python benchmarks/bench_predict.py --threads 1 --huge 0 --tiff 20000   # a 20,000 x 20,000 striped TIFF

Writes randomly initialised checkpoints and synthetic images to a temporary folder, then runs predict.py on
a folder of 512x512 images, on one 1918x1280 image (Carvana's size), on one --huge x --huge image (tiled
only, with a smaller model) and on one --tiff x --tiff striped TIFF (no tile flag: the memory plan tiles it and
it is read by windows, blended band by band). Each run is a fresh process, so its peak resident memory
(ru_maxrss) is its own; 'over start' is the peak minus the process's size once torch and predict were imported.
Each run follows a warm-up run on one image (written nowhere) in the same process: the times are those of a warm
process.
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's modules (predict, model, ...)

import numpy as np
import tifffile
from PIL import Image

from benchmarks.common import add_threads_arg, add_unet_args, use_threads
from precision import choose_precision

SCRIPT = Path(__file__).resolve()  # each case runs this file again with --child, from any working directory


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def child(plan):
    """Run predict.main on plan["warmup"] (writing nothing), then on plan["run"]: print the second run's
    seconds and this process's memory as one JSON line. The warm-up keeps one-off costs (oneDNN kernels,
    the allocator's first page faults) out of the figures."""
    import torch

    import predict

    torch.set_grad_enabled(False)
    use_threads(plan["threads"])
    start_mb = peak_rss_mb()
    predict.main(plan["warmup"])
    start = time.perf_counter()
    predict.main(plan["run"])
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_mb": peak_rss_mb(), "start_mb": start_mb}))


def write_checkpoint(path, base_channels, depth):
    from checkpoints import save_checkpoint
    from model import IMAGENET_NORMALIZE, build_model, count_parameters

    model_args = {"arch": "unet", "in_channels": 3, "num_classes": 2, "base_channels": base_channels,
                  "depth": depth, "bilinear": False}
    model = build_model(model_args)
    save_checkpoint({"model": model.state_dict(), "model_args": model_args, "classes": ["background", "object"],
                     "mask_values": [0, 255], "ignore_index": 255, "normalize": IMAGENET_NORMALIZE}, path)
    return f"U-Net base {base_channels} depth {depth}, {count_parameters(model) / 1e6:.2f} M parameters"


def synthetic_photo(path, height, width, seed):
    """A smooth random colour field (an enlarged coarse grid), saved as JPEG: cheap to make at any size."""
    grid = np.random.default_rng(seed).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    Image.fromarray(grid).resize((width, height), Image.BILINEAR).save(path, quality=90)


def striped_tiff(path, side, rows=256):
    """A side x side RGB TIFF of `rows`-row strips (BigTIFF past 4 GB), written strip by strip: the smooth colour
    field of synthetic_photo, tiled, so that making it takes no more memory than one strip."""
    grid = np.random.default_rng(2).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(grid).resize((side, rows), Image.BILINEAR))

    def strips():
        for top in range(0, side, rows):
            yield field[:min(rows, side - top)]

    tifffile.imwrite(path, strips(), shape=(side, side, 3), dtype=np.uint8, photometric="rgb", rowsperstrip=rows,
                     bigtiff=3 * side * side > 2 ** 32 - 2 ** 25)


def run(name, count, inputs, warmup, flags, threads):
    """predict.py -i inputs `flags` in a fresh process, after a warm-up on the image `warmup`; prints a row."""
    plan = {"warmup": ["-i", str(warmup), "-n", *flags], "run": ["-i", str(inputs), *flags], "threads": threads}
    result = subprocess.run([sys.executable, str(SCRIPT), "--child", json.dumps(plan)], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: {name} failed:\n{result.stderr[-2000:]}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"{name:<36} {count:>6} {figures['seconds']:>8.1f} {count / figures['seconds']:>9.2f} "
          f"{figures['peak_mb']:>9.0f} {figures['peak_mb'] - figures['start_mb']:>11.0f}", flush=True)
    return figures


def main():
    if sys.argv[1:2] == ["--child"]:
        return child(json.loads(sys.argv[2]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_unet_args(p, base_channels=8, depth=4)
    p.add_argument("--count", type=int, default=8, help="512x512 images in the folder")
    p.add_argument("--tile", type=int, default=256, help="tile side of the tiled runs")
    p.add_argument("--overlap", type=float, default=0.25, help="tile overlap of the tiled runs")
    p.add_argument("--huge", type=int, default=4000, help="side of the huge image, tiled only (0: skip)")
    p.add_argument("--huge-tile", type=int, default=1024, help="tile side for the huge image")
    p.add_argument("--tiff", type=int, default=0, help="side of a striped TIFF segmented with no tile flag (0: skip)")
    p.add_argument("--batch-size", type=int, default=4, help="images or tiles per forward pass")
    p.add_argument("--device", default="cpu", help="'cpu', 'cuda', ...")
    add_threads_arg(p)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = write_checkpoint(tmp / "model.pth", args.base_channels, args.depth)
        tiny = write_checkpoint(tmp / "tiny.pth", 4, 2)
        (tmp / "folder").mkdir()
        for i in range(args.count):
            synthetic_photo(tmp / "folder" / f"{i:04d}.jpg", 512, 512, i)
        synthetic_photo(tmp / "carvana.jpg", 1280, 1918, 0)
        common = ["--batch-size", str(args.batch_size), "--device", args.device, "-o", str(tmp / "out")]
        model_flags = ["-m", str(tmp / "model.pth"), *common]
        tiled = ["--tile", str(args.tile), "--overlap", str(args.overlap)]

        print(f"model: {model}; device {args.device}, threads {args.threads or 'default'}, predict.py's default "
              f"precision {choose_precision(args.device).summary}; tiles {args.tile} px, overlap {args.overlap}")
        print(f"{'case':<36} {'images':>6} {'seconds':>8} {'images/s':>9} {'peak MB':>9} {'over start':>11}")
        figures = {}
        for case, inputs, warmup, count in [("512x512 folder", tmp / "folder", tmp / "folder" / "0000.jpg", args.count),
                                            ("1918x1280", tmp / "carvana.jpg", tmp / "carvana.jpg", 1)]:
            for mode, flags in [("whole", model_flags), ("tiled", model_flags + tiled)]:
                figures[case, mode] = run(f"{case}, {mode}", count, inputs, warmup, flags, args.threads)
        for case in ("512x512 folder", "1918x1280"):
            whole, tile = figures[case, "whole"], figures[case, "tiled"]
            print(f"{case}: tiled / whole: time x{tile['seconds'] / whole['seconds']:.2f}, memory over start "
                  f"x{(tile['peak_mb'] - tile['start_mb']) / max(whole['peak_mb'] - whole['start_mb'], 1):.2f}")
        if args.huge:
            synthetic_photo(tmp / "huge.jpg", args.huge, args.huge, 1)
            print(f"huge image, model: {tiny}")
            run(f"{args.huge}x{args.huge}, tiled {args.huge_tile}", 1, tmp / "huge.jpg", tmp / "carvana.jpg",
                ["-m", str(tmp / "tiny.pth"), *common, "--tile", str(args.huge_tile), "--overlap", str(args.overlap)],
                args.threads)
            print(f"  (its 2 x H x W float32 probabilities alone take {2 * 4 * args.huge ** 2 / 2 ** 20:.0f} MB)")
        if args.tiff:
            striped_tiff(tmp / "scan.tif", args.tiff)
            print(f"striped TIFF, model: {tiny}; the image takes {3 * args.tiff ** 2 / 2 ** 20:.0f} MB, its labels "
                  f"{args.tiff ** 2 / 2 ** 20:.0f} MB")
            run(f"{args.tiff}x{args.tiff} TIFF, planned", 1, tmp / "scan.tif", tmp / "carvana.jpg",
                ["-m", str(tmp / "tiny.pth"), "--device", args.device, "-o", str(tmp / "out")], args.threads)


if __name__ == "__main__":
    main()
