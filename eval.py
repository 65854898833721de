"""Score a checkpoint on a dataset. Example: python eval.py -m checkpoints/RUN/best.pth --dataset shapes --json scores.json"""
import argparse
import json
import math
import sys

import torch

from datasets import add_dataset_args, build_dataset, check_dataset_args
from inference import evaluate, load_model
from utils import CheckpointError, newest_checkpoint, pick_device


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("-m", "--model", default=None, help="checkpoint file (default: the newest best.pth under checkpoints/)")
    data = add_dataset_args(p)
    data_defaults = {action.dest: action.default for action in data._group_actions}
    # Data flags left out are taken from the checkpoint's training arguments, then from these defaults.
    p.set_defaults(**{key: None for key in data_defaults})
    p.add_argument("--split", default="val", help="split to score")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    p.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    p.add_argument("--json", default=None, metavar="FILE", help="also write every score to this JSON file")
    return p.parse_args(argv), data_defaults


def format_table(metrics, classes):
    def cell(x):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"

    width = max(len(c) for c in classes + ["class"])
    lines = [f"{'class':<{width}}  {'IoU':>7}  {'Dice':>7}  {'acc':>7}"]
    for name, iou, dice, acc in zip(classes, metrics["iou"], metrics["dice"], metrics["class_acc"]):
        lines.append(f"{name:<{width}}  {cell(iou):>7}  {cell(dice):>7}  {cell(acc):>7}")
    lines.append("")
    for key, label in [("pixel_acc", "pixel accuracy"), ("mean_acc", "mean accuracy"), ("miou", "mIoU"),
                       ("fwiou", "frequency-weighted IoU"), ("mean_dice", "mean Dice"),
                       ("fg_iou", "foreground IoU"), ("fg_dice", "foreground Dice")]:
        if key in metrics:
            lines.append(f"{label:<24}{cell(metrics[key])}")
    return "\n".join(lines)


def main(argv=None):
    args, data_defaults = parse_args(argv)
    checkpoint_path = args.model or newest_checkpoint()
    if checkpoint_path is None:
        sys.exit("error: no -m/--model given and no best.pth under checkpoints/; train a model first")
    device = pick_device(args.device)
    try:
        model, checkpoint = load_model(checkpoint_path, device)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    trained_with = checkpoint.get("args", {})
    for key, default in data_defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, trained_with.get(key, default))
    try:
        check_dataset_args(args)
        dataset = build_dataset(args, args.split)
    except ValueError as e:
        sys.exit(f"error: {e}")
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    num_logits = checkpoint["model_args"]["num_classes"]
    metrics = evaluate(model, loader, num_logits, checkpoint["normalize"], checkpoint.get("ignore_index", 255),
                       device)
    print(f"{checkpoint_path} on {args.dataset} {args.split} ({len(dataset)} images)")
    print(format_table(metrics, list(checkpoint["classes"])))
    if args.json:
        report = {"checkpoint": str(checkpoint_path), "dataset": args.dataset, "split": args.split,
                  "images": len(dataset), "classes": list(checkpoint["classes"]), **metrics}
        with open(args.json, "w") as f:
            json.dump(_nan_to_none(report), f, indent=2)
        print(f"wrote {args.json}")
    return metrics


def _nan_to_none(value):
    """JSON has no NaN: classes with no score are written as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


if __name__ == "__main__":
    main()
