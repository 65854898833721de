"""Score a checkpoint at full resolution, or segment a folder of images.

  python eval.py                                   # eval/images (+ eval/masks) with the newest best.pth
  python eval.py -m checkpoints/RUN/best.pth --json scores.json   # no eval/ folder: the run's validation set
  python eval.py --dataset voc --data data --split val --save-labels labels/
  python eval.py --images photos/ --masks truth/ --confusion confusion.png

Every score comes from one confusion matrix over the whole set (the VOC devkit's protocol): predictions are
resized back to each mask's size, masks are never resized, and void pixels are skipped."""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from datasets import IGNORE_INDEX, IMAGE_EXTENSIONS, add_dataset_args, build_dataset, check_dataset_args, \
    default_workers, list_files, load_scale, read_image
from inference import add_inference_args, check_inference_args, inference_options, load_model_or_exit, \
    predict_probs_or_tile, probs_to_labels, same_size_runs, stack_batch
from metrics import ConfusionMatrix
from utils import label_image, overlay_image, plot_confusion_matrix

EVAL_DIR = Path("eval")  # the no-argument mode: eval/images, eval/masks -> eval/labels, eval/confusion.png
VOID_VALUE = 255  # the usual void value of mask files (VOC's border)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=None,
                   help="checkpoint file (default: the newest best.pth under checkpoints/)")
    data = add_dataset_args(p)
    data_defaults = {action.dest: action.default for action in data._group_actions}
    # Data flags left out are taken from the checkpoint's training arguments, then from these defaults.
    p.set_defaults(**{key: None for key in data_defaults})
    p.add_argument("--split", default=None,
                   help="split to score (default: val; 'all' for --images/--masks folders, carvana and folder data)")
    add_inference_args(p, scale=False)  # --scale is a data flag: the model's input scale, as in training
    p.add_argument("--batch-size", type=int, default=16, help="images of one size per forward pass (default: 16)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="data-loader worker processes (default: usable CPU cores - 1, at most 4)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    p.add_argument("--json", default=None, metavar="FILE", help="write every score and the confusion matrix")
    p.add_argument("--confusion", default=None, metavar="FILE",
                   help="draw the confusion matrix, rows normalised (default: eval/confusion.png in eval/ mode)")
    p.add_argument("--save-labels", default=None, metavar="DIR",
                   help="write predicted label images DIR/<stem>.png (default: eval/labels in eval/ mode)")
    p.add_argument("--overlays", default=None, metavar="DIR",
                   help="write DIR/<stem>.png, the classes tinted on the image")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.workers < 0:
        p.error(f"--batch-size must be at least 1 and --workers at least 0, got {args.batch_size} and "
                f"{args.workers}")
    return args, data_defaults


class ImageFiles(torch.utils.data.Dataset):
    """The images of a folder, without masks: items (image, None, stem)."""

    ignore_index = IGNORE_INDEX

    def __init__(self, folder):
        self.paths = sorted(list_files(Path(folder), "image").values())

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        path = self.paths[index]
        return read_image(path), None, path.stem


def holds_images(folder):
    return folder.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir())


def eval_folder_mode(args):
    """No flag names the data: eval/images (and eval/masks) when there is such a folder, else the checkpoint's
    own validation set."""
    if any(getattr(args, k) is not None for k in ("dataset", "data", "images", "masks", "split")):
        return False
    if not (EVAL_DIR / "images").is_dir():
        print(f"no {EVAL_DIR}/images/ here: scoring the checkpoint's validation set (as --split val)")
        return False
    return True


def choose_data(args, data_defaults, checkpoint, eval_mode):
    """Fill in the data flags for the mode the flags select, and build the dataset (full resolution).
    Returns (dataset, what it is in words); the dataset's items are (image, mask or None, name)."""
    trained_with = checkpoint.get("args", {})
    args.scale = load_scale(trained_with.get("dataset"), args.scale or trained_with.get("scale"))
    if eval_mode:
        args.images = str(EVAL_DIR / "images")
        args.masks = str(EVAL_DIR / "masks") if holds_images(EVAL_DIR / "masks") else None
        args.save_labels = args.save_labels or str(EVAL_DIR / "labels")
        args.confusion = args.confusion or (str(EVAL_DIR / "confusion.png") if args.masks else None)
    if args.images and not args.masks:
        if not (args.save_labels or args.overlays):
            sys.exit("error: --images without --masks only writes label images: add --save-labels DIR "
                     "(or --masks DIR to score them)")
        return ImageFiles(args.images), f"{args.images} (no masks)"
    if args.images or args.masks:  # a plain folder of images and masks, read with the checkpoint's classes
        args.dataset, args.split = "folder", args.split or "all"
        args.mask_values = args.mask_values or list(checkpoint["mask_values"])
        if args.ignore_index is None:
            void = trained_with.get("ignore_index")
            args.ignore_index = void if void is not None or VOID_VALUE in args.mask_values else VOID_VALUE
        fill = data_defaults
    else:
        args.split = args.split or "val"
        fill = {key: trained_with.get(key, default) for key, default in data_defaults.items()}
    for key, value in fill.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_dataset_args(args)
    dataset = build_dataset(args, args.split, full_resolution=True)
    where = f"{args.images} + {args.masks}" if args.dataset == "folder" and args.images else args.dataset
    return dataset, f"{where} {args.split}"


def check_outputs(dataset, args):
    """Label images and overlays go to two folders that hold no input: they would replace masks."""
    files = [path for pair in getattr(dataset, "pairs", []) for path in pair] + getattr(dataset, "paths", [])
    inputs = {folder.resolve() for folder in {path.parent for path in files}}
    outputs = [Path(folder).resolve() for folder in (args.save_labels, args.overlays) if folder]
    for folder in outputs:
        if folder in inputs:
            raise ValueError(f"'{folder}' holds input images or masks; write label images and overlays elsewhere")
    if len(set(outputs)) < len(outputs):
        raise ValueError("--save-labels and --overlays name one folder; give each its own")


def check_classes(dataset, checkpoint):
    have, want = len(dataset.mask_values), max(checkpoint["model_args"]["num_classes"], 2)
    if have != want:
        raise ValueError(f"the checkpoint predicts {want} classes but the data has {have}; evaluate it on data "
                         f"with its classes (--mask-values)")


def segment(model, checkpoint, dataset, args, confusion):
    """Predict every item (the inference path of predict.py), add it to `confusion` when it has a mask, and
    write the label images and overlays asked for. Returns the number of images."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=args.workers)
    options = {**inference_options(args), "batch_size": args.batch_size}
    outputs = [Path(d) for d in (args.save_labels, args.overlays) if d]
    for folder in outputs:
        folder.mkdir(parents=True, exist_ok=True)
    log = lambda line: print(f"warning: {line}", file=sys.stderr)  # noqa: E731
    done = 0
    with tqdm(total=len(dataset), desc="eval", leave=False) as bar:
        for batch in same_size_runs(loader, 1 if args.tile else args.batch_size, lambda item: item[0]):
            images, masks, names = zip(*batch)
            probs, options = predict_probs_or_tile(model, stack_batch(images), checkpoint["normalize"], log=log,
                                                   **options)
            labels = probs_to_labels(probs)
            if masks[0] is not None:
                confusion.update(labels, stack_batch(masks))
            if outputs:
                labels = labels.to(torch.uint8).cpu().numpy()
                save_outputs(images, labels, names, checkpoint["mask_values"], args)
            done += len(batch)
            bar.update(len(batch))
    return done


def save_outputs(images, labels, names, mask_values, args):
    """Label images (VOC palette PNGs holding the mask values, 0/255 PNGs for two classes) and overlays."""
    for image, label, name in zip(images, labels, names):
        if args.save_labels:
            label_image(label, mask_values).save(Path(args.save_labels) / f"{name}.png")
        if args.overlays:
            photo = image.permute(1, 2, 0).numpy()
            overlay_image(photo, label, mask_values).save(Path(args.overlays) / f"{name}.png")


def cell(x):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def absent_classes(metrics, classes):
    """Classes in neither the truth nor the predictions: no score, left out of the means."""
    return [name for name, iou in zip(classes, metrics["iou"]) if math.isnan(iou)]


def format_table(metrics, classes):
    width = max(len(c) for c in classes + ["class"])
    lines = [f"{'class':<{width}}  {'IoU':>7}  {'Dice':>7}  {'acc':>7}"]
    for name, iou, dice, acc in zip(classes, metrics["iou"], metrics["dice"], metrics["class_acc"]):
        lines.append(f"{name:<{width}}  {cell(iou):>7}  {cell(dice):>7}  {cell(acc):>7}")
    lines.append("")
    for key, label in [("pixel_acc", "pixel accuracy"), ("mean_acc", "mean class accuracy"), ("miou", "mIoU"),
                       ("fwiou", "frequency-weighted IoU"), ("mean_dice", "mean Dice"),
                       ("fg_iou", "foreground IoU"), ("fg_dice", "foreground Dice")]:
        if key in metrics:
            lines.append(f"{label:<24}{cell(metrics[key])}")
    absent = absent_classes(metrics, classes)
    if absent:
        lines.append(f"\nn/a: {', '.join(absent)} appear(s) in neither the truth nor the predictions; "
                     f"left out of the means ({len(classes) - len(absent)} of {len(classes)} classes scored)")
    predicted_only = [name for name, iou, acc in zip(classes, metrics["iou"], metrics["class_acc"])
                      if math.isnan(acc) and not math.isnan(iou)]
    if predicted_only:
        lines.append(f"acc n/a: {', '.join(predicted_only)} predicted but absent from the truth (IoU 0)")
    return "\n".join(lines)


def main(argv=None):
    args, data_defaults = parse_args(argv)
    eval_mode = eval_folder_mode(args)
    model, checkpoint, checkpoint_path = load_model_or_exit(args.model, args.device)
    classes, scored = list(checkpoint["classes"]), True
    try:
        dataset, what = choose_data(args, data_defaults, checkpoint, eval_mode)
        check_inference_args(args)
        check_outputs(dataset, args)
        scored = not isinstance(dataset, ImageFiles)
        if scored:
            check_classes(dataset, checkpoint)
        device = next(model.parameters()).device
        confusion = ConfusionMatrix(max(checkpoint["model_args"]["num_classes"], 2), dataset.ignore_index, device)
        start = time.perf_counter()
        count = segment(model, checkpoint, dataset, args, confusion)
    except ValueError as e:  # DatasetError is one
        sys.exit(f"error: {e}")
    seconds = time.perf_counter() - start
    print(f"{checkpoint_path} on {what}: {count} images in {seconds:.1f} s ({count / max(seconds, 1e-9):.2f} "
          f"images/s, scale {args.scale:g})")
    for kind, folder in [("label images", args.save_labels), ("overlays", args.overlays)]:
        if folder:
            print(f"wrote {count} {kind} to {folder}/")
    if not scored:
        print(f"no true masks for {args.images}: no scores were computed")
        return None
    metrics = confusion.compute()
    print(format_table(metrics, classes))
    if args.confusion:
        plot_confusion_matrix(confusion.mat.cpu().numpy(), classes, args.confusion)
        print(f"wrote {args.confusion}")
    if args.json:
        report = {"checkpoint": str(checkpoint_path), "data": what, "dataset": args.dataset, "split": args.split,
                  "images": count, "classes": classes, "mask_values": list(checkpoint["mask_values"]),
                  "options": inference_options(args), **metrics,
                  "absent_classes": absent_classes(metrics, classes),
                  "confusion_matrix": confusion.mat.cpu().tolist()}
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
