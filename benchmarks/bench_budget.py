"""What a time budget buys: train.py --time on real data, scored by eval.py, and the speed of the default
precision. Prints one line per target; each part runs alone, one at a time (timings need a quiet machine).

  isbi    ISBI 2012 slices 0-24 train, 25-29 scored at full size: membrane Dice after --time (10m; target 0.85);
          --isbi-test N holds out slices N to N+4 instead (another fold of the stack)
  street  a street-scene folder (--street DIR holding train/ and test/, each with images/ and masks/):
          test mIoU after --time (30m; target 0.40)
  choice  the network the plan chooses against the classic U-Net (--encoder none), the same --time (10m) each, on
          the VNC stack (train -> test) and ISBI (slices 0-24 -> 25-29): test scores at full size of both
  demo    the shapes demo with --time 60s: must end by 63 s with a usable best.pth
  speed   training step of the classic U-Net at 256x256, batch 4: the default precision against fp32 (>= 3x on
          CPUs with native bf16, never slower elsewhere)
  bf16    the shapes demo trained twice for the same epochs, fp32 and the default precision: validation mIoU

Example: python benchmarks/bench_budget.py --only isbi demo speed
"""
import argparse
import csv
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ISBI = ROOT.parent / "shared" / "data" / "isbi2012"  # where the tests' copy lies, if anywhere
VNC = ROOT.parent / "shared" / "data" / "vnc"
DEMO = ["--dataset", "shapes", "--image-size", "64", "--num-train", "2000", "--num-val", "200", "--lr", "3e-3",
        "--base-channels", "16", "--depth", "3"]
PARTS = ("isbi", "street", "choice", "demo", "speed", "bf16")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run, in this order")
    p.add_argument("--isbi", default=str(ISBI), help="ISBI 2012 folder holding train/image and train/label")
    p.add_argument("--isbi-time", default="10m")
    p.add_argument("--isbi-test", type=int, default=25, choices=range(26), metavar="N",
                   help="score ISBI slices N to N+4 and train on the other 25 (default: 25, the target's split)")
    p.add_argument("--street", default=None, help="street-scene folder: train/{images,masks}, test/{images,masks}")
    p.add_argument("--street-time", default="30m")
    p.add_argument("--ignore-index", default=None, help="void mask value of the street-scene set")
    p.add_argument("--vnc", default=str(VNC), help="VNC folder holding train/ and test/, each with images/ and masks/")
    p.add_argument("--choice-time", default="10m")
    p.add_argument("--choice-data", nargs="+", choices=("vnc", "isbi"), default=["vnc", "isbi"])
    p.add_argument("--demo-time", default="60s")
    p.add_argument("--bf16-epochs", type=int, default=3)
    p.add_argument("--flags", nargs=argparse.REMAINDER, default=[], help="more train.py flags for isbi and street")
    return p.parse_args()


def run(command):
    """(wall seconds, stdout) of a script of this repo; its output is echoed as it comes."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *command], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    print(result.stdout, end="", flush=True)
    if result.returncode:
        sys.exit(f"error: {' '.join(command)} exited with status {result.returncode}")
    return time.perf_counter() - start, result.stdout


def train_and_score(train_flags, test_images, test_masks, work):
    """(training wall seconds, eval.py's JSON scores of best.pth on the test folder)."""
    seconds, _ = run(["train.py", *train_flags, "--checkpoint-dir", str(work / "runs")])
    (best,) = (work / "runs").glob("*/best.pth")
    scores = work / "scores.json"
    run(["eval.py", "-m", str(best), "--images", str(test_images), "--masks", str(test_masks), "--json", str(scores)])
    return seconds, json.loads(scores.read_text())


def linked_folder(files, folder):
    folder.mkdir(parents=True)
    for file in files:
        (folder / file.name).symlink_to(file)
    return folder


def isbi_split(args, work):
    """{(train or test, image or label): a folder of links to the slices}, slices isbi_test to +4 the test."""
    source = Path(args.isbi) / "train"
    held_out = range(args.isbi_test, args.isbi_test + 5)
    split = {name: [n for n in range(30) if (n in held_out) != (name == "train")] for name in ("train", "test")}
    return {(name, kind): linked_folder([source / kind / f"{n}.png" for n in numbers], work / name / kind)
            for name, numbers in split.items() for kind in ("image", "label")}


def isbi(args, work):
    source = Path(args.isbi) / "train"
    if not (source / "image").is_dir():
        return print(f"isbi: skipped, no ISBI 2012 data in {args.isbi} (pass --isbi DIR)")
    held_out = range(args.isbi_test, args.isbi_test + 5)
    split = {name: [n for n in range(30) if (n in held_out) != (name == "train")] for name in ("train", "test")}
    folders = isbi_split(args, work)
    seconds, scores = train_and_score(["--images", str(folders["train", "image"]), "--masks",
                                       str(folders["train", "label"]), "--time", args.isbi_time, *args.flags],
                                      folders["test", "image"], folders["test", "label"], work)
    membrane = scores["mask_values"].index(0)  # ISBI masks: 0 membrane, 255 cell
    # The annotators drew membranes of varied width along the stack: a fold's share tells how thick its membranes are.
    share = {name: membrane_share([source / "label" / f"{n}.png" for n in numbers]) for name, numbers in split.items()}
    print(f"isbi: --time {args.isbi_time}: trained in {seconds:.0f} s; slices {held_out[0]}-{held_out[-1]}: "
          f"membrane Dice {scores['dice'][membrane]:.3f} (target 0.85), mIoU {scores['miou']:.3f}; membrane share "
          f"of the labels: {share['train']:.3f} in training, {share['test']:.3f} scored")


def membrane_share(masks):
    return float(np.mean([np.mean(np.asarray(Image.open(mask)) == 0) for mask in masks]))


def street(args, work):
    if not args.street:
        return print("street: skipped (pass --street DIR)")
    data = Path(args.street)
    void = ["--ignore-index", args.ignore_index] if args.ignore_index else []
    seconds, scores = train_and_score(["--images", str(data / "train" / "images"), "--masks",
                                       str(data / "train" / "masks"), *void, "--time", args.street_time, *args.flags],
                                      data / "test" / "images", data / "test" / "masks", work)
    print(f"street: --time {args.street_time}: trained in {seconds:.0f} s; test mIoU {scores['miou']:.3f} "
          f"(target 0.40)")


def choice_folders(args, name, work):
    """(train images, train masks, test images, test masks) of a shared dataset, or None where it is absent."""
    if name == "vnc":
        root = Path(args.vnc)
        return None if not (root / "test").is_dir() else tuple(
            root / split / kind for split in ("train", "test") for kind in ("images", "masks"))
    if not (Path(args.isbi) / "train" / "image").is_dir():
        return None
    folders = isbi_split(args, work)
    return tuple(folders[split, kind] for split in ("train", "test") for kind in ("image", "label"))


def choice(args, work):
    """Each dataset twice, the same budget: the plan's choice, then the classic U-Net."""
    for name in args.choice_data:
        folders = choice_folders(args, name, work / name)
        if folders is None:
            print(f"choice: {name} skipped, no data (pass --{name} DIR)")
            continue
        train_images, train_masks, test_images, test_masks = folders
        results = {}
        for network, flags in (("chosen", []), ("classic", ["--encoder", "none"])):
            runs = work / name / network
            seconds, scores = train_and_score(["--images", str(train_images), "--masks", str(train_masks), "--time",
                                               args.choice_time, *flags, *args.flags], test_images, test_masks, runs)
            (run_dir,) = (runs / "runs").glob("*/")
            saved = json.loads((run_dir / "args.json").read_text())
            label = (saved["network_choice"] or {}).get("chosen", "classic U-Net") if network == "chosen" else network
            with open(run_dir / "metrics.csv", newline="") as f:
                steps = list(csv.DictReader(f))[-1]["step"]
            per_class = " ".join(f"{iou:.3f}" for iou in scores["iou"])
            results[network] = (f"{label} ({steps} steps, {seconds:.0f} s): test mIoU "
                                f"{scores['miou']:.3f} (IoU per class {per_class})")
        print(f"choice: {name} --time {args.choice_time}: the plan's {results['chosen']}; the classic U-Net's "
              f"{results['classic'].split(' ', 1)[1]}")


def demo(args, work):
    seconds, _ = run(["train.py", *DEMO, "--time", args.demo_time, "--checkpoint-dir", str(work / "runs")])
    (best,) = (work / "runs").glob("*/best.pth")
    _, out = run(["eval.py", "-m", str(best), "--split", "val", "--json", str(work / "scores.json")])
    miou = json.loads((work / "scores.json").read_text())["miou"]
    print(f"demo: --time {args.demo_time}: the command took {seconds:.1f} s (limit: the budget + 5%); best.pth "
          f"validation mIoU {miou:.3f}")


def speed(args, work):
    """train.py's own step, fp32 against the default precision, timed side by side by bench_train.py."""
    _, out = run(["benchmarks/bench_train.py", "--steps", "3"])
    rates = {name.strip(): float(rate) for name, rate in re.findall(r"^(.+?)\s+([\d.]+) images/s", out, re.M)}
    fp32 = rates["fp32"]
    default = next((rate for name, rate in rates.items() if name.startswith("default:")), fp32)  # fp32 is default
    print(f"speed: classic U-Net training step, 256x256 batch 4: fp32 {fp32:.2f} images/s, default precision "
          f"{default:.2f} images/s: {default / fp32:.2f}x (target: 3x with native bf16, never below 1x)")


def bf16(args, work):
    from checkpoints import load_checkpoint

    scores, seconds = {}, {}
    for amp in ("off", "auto"):
        folder = work / amp
        seconds[amp], _ = run(["train.py", *DEMO, "--epochs", str(args.bf16_epochs), "--amp", amp,
                               "--checkpoint-dir", str(folder)])
        (last,) = folder.glob("*/last.pth")
        scores[amp] = load_checkpoint(last)["metrics"]["miou"]
    print(f"bf16: shapes demo, {args.bf16_epochs} epochs: validation mIoU fp32 {scores['off']:.4f} "
          f"({seconds['off']:.0f} s), default precision {scores['auto']:.4f} ({seconds['auto']:.0f} s): "
          f"{(scores['auto'] / scores['off'] - 1) * 100:+.2f}%")


def main():
    args = parse_args()
    for part in args.only:
        with tempfile.TemporaryDirectory() as work:
            globals()[part](args, Path(work))


if __name__ == "__main__":
    main()
