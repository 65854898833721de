"""Score a checkpoint at full resolution, or segment a folder of images.

  python eval.py                                   # eval/images (+ eval/masks) with the newest best.pth
  python eval.py -m checkpoints/RUN/best.pth --json scores.json   # no eval/ folder: the run's validation set
  python eval.py --dataset voc --data data --split val --save-labels labels/
  python eval.py --images photos/ --masks truth/ --confusion confusion.png
  python eval.py --images photos/ --masks truth/ --report report/   # open report/index.html in a browser

Every score comes from one confusion matrix over the whole set (the VOC devkit's protocol): predictions are
resized back to each mask's size, masks are never resized, and void pixels are skipped."""
import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoints import find_checkpoint, load_model
from class_tables import check_class_names, read_class_names
from datasets import DataConfig, build_dataset, trained_scale, void_value, with_tables
from drawing import greyed, is_huge, mask_suffix, plot_confusion_matrix, viewable, write_pictures
from errors import ConfigError, DatasetError, UserError, check_at_least, error_line
from flags import add_dataset_args, add_inference_args, config_from
from images import IMAGE_EXTENSIONS, read_image
from inference import InferenceConfig, Planner, for_model, predict_probs_or_tile, probs_to_labels, stack_batch
from metrics import IGNORE_INDEX, SCORE_NAMES, ConfusionMatrix, absent_classes, score_text
from outputs import MARK, MARK_KEY, Planned, check_folder_outputs, check_outputs
from pairs import list_files, listing
from report import Gallery, report_files, write_report
from utils import check_folder, count, default_workers, pick_device, warn

EVAL_DIR = Path("eval")  # no-argument mode: eval/images, eval/masks -> eval/labels, eval/confusion.png, eval/report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=None,
                   help="checkpoint file (default: the newest best.pth under checkpoints/)")
    data = add_dataset_args(p)
    # Data flags left out are taken from the checkpoint's training arguments, then from DataConfig's defaults.
    p.set_defaults(**{action.dest: None for action in data._group_actions})
    p.add_argument("--split", default=None,
                   help="split to score (default: val; 'all' for --images/--masks folders, carvana and folder data)")
    add_inference_args(p, scale=False)  # --scale is a data flag: the model's input scale, as in training
    p.add_argument("--batch-size", type=int, default=None,
                   help="images of one size per forward pass (default: the memory plan's choice, at most 16)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="data-loader worker processes (default: usable CPU cores - 1, at most 4)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    p.add_argument("--json", default=None, metavar="FILE", help="write every score and the confusion matrix")
    p.add_argument("--confusion", default=None, metavar="FILE",
                   help="draw the confusion matrix, rows normalised (default: eval/confusion.png in eval/ mode)")
    p.add_argument("--save-labels", default=None, metavar="DIR",
                   help="write predicted label images DIR/<stem>.png (<stem>.tif, a BigTIFF, for images of 64 M "
                        "pixels or more; default: eval/labels in eval/ mode)")
    p.add_argument("--overlays", default=None, metavar="DIR",
                   help="write DIR/<stem>.png, the classes tinted on the image")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="write DIR/index.html, a page of the scores, the confusion matrix and the worst and best "
                        "images, with its pictures beside it (default: eval/report in eval/ mode)")
    args = p.parse_args(argv)
    try:
        check_at_least(1, batch_size=1 if args.batch_size is None else args.batch_size)
        check_at_least(0, workers=args.workers)
        inference = config_from(InferenceConfig, vars(args)).check()
        pick_device(args.device)
    except ConfigError as e:
        p.error(str(e))
    given = {field.name: getattr(args, field.name, None) for field in dataclasses.fields(DataConfig)}
    return config_from(EvalConfig, vars(args)), given, inference


@dataclass
class EvalConfig:
    """What eval.py scores with, and where its outputs go (the flags other than the data and inference ones)."""
    model: str | None = None
    split: str | None = None
    batch_size: int | None = None  # None: the memory plan's
    workers: int = 0
    device: str = "auto"
    json: str | None = None
    confusion: str | None = None
    save_labels: str | None = None
    overlays: str | None = None
    report: str | None = None


class ImageFiles(torch.utils.data.Dataset):
    """The images of a folder, without masks: items (image, None, stem), read as images of `form`
    (images.open_image)."""

    ignore_index = IGNORE_INDEX

    def __init__(self, folder, form=None):
        self.paths = sorted(list_files(Path(folder), "image").values())
        self.form = form

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        path = self.paths[index]
        return read_image(path, self.form), None, path.stem


def holds_images(folder):
    return folder.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir())


def eval_folder_mode(given, split):
    """No flag names the data: eval/images (and eval/masks) when there is such a folder, else the checkpoint's
    own validation set."""
    if split is not None or any(given[key] is not None for key in ("dataset", "data", "images", "masks", "pairs")):
        return False
    if not (EVAL_DIR / "images").is_dir():
        print(f"no {EVAL_DIR}/images/ here: scoring the checkpoint's validation set (as --split val)")
        return False
    return True


def choose_data(given, split, checkpoint):
    """The DataConfig and split that the given data flags (None where left out) select: a plain folder of images
    and masks read with the checkpoint's classes, or a dataset whose flags left out are the training run's."""
    trained_with = checkpoint.get("args", {})
    if given["images"] or given["masks"] or given["pairs"]:
        # The masks hold the checkpoint's mask values; a value is void only when --ignore-index says so, or when
        # the training data defined one (VOC's 255 borders, or the run's --ignore-index).
        void = void_value(trained_with.get("dataset"), trained_with.get("ignore_index"))
        defaults = DataConfig(dataset="folder", mask_values=list(checkpoint["mask_values"]), ignore_index=void,
                              void_color=trained_with.get("void_color"))
        split = split or "all"
    else:
        defaults = config_from(DataConfig, trained_with)
        split = split or "val"
    data = DataConfig(**{key: getattr(defaults, key) if value is None else value for key, value in given.items()})
    data.image_form = checkpoint["normalize"].get("form")  # images read as the model's training images were
    if given["mask_colors"]:  # this data's own colour table, in place of the checkpoint's colours
        data = with_tables(dataclasses.replace(data, mask_values=None, void_color=None))
    return data.check(), split


def check_output_paths(dataset, checkpoint_path, files, folders):
    """Before any work: every output can be written and replaces no input nor any file this tool did not write
    (outputs.check_outputs). `files` and `folders` map flags to output files and folders (None: not asked for).
    Label images, overlays and the report go to folders that hold no input (they would replace masks), each its
    own."""
    inputs = [path for pair in getattr(dataset, "pairs", []) for path in pair] + getattr(dataset, "paths", [])
    check_outputs([Planned(Path(path), flag) for flag, path in files.items() if path], [checkpoint_path, *inputs],
                  fix="choose another file")
    input_folders = {folder.resolve() for folder in {path.parent for path in inputs}}
    chosen = {flag: Path(folder).resolve() for flag, folder in folders.items() if folder}
    for flag, folder in chosen.items():
        if folder in input_folders:
            raise ConfigError(f"{flag} '{folder}' holds input images or masks; write label images, overlays and "
                              f"reports elsewhere")
        check_folder_outputs(folder, flag, report_files(folder) if flag == "--report" else None)
        check_folder(folder, flag)
    for flag, folder in chosen.items():
        same = [other for other, elsewhere in chosen.items() if elsewhere == folder]
        if len(same) > 1:
            raise ConfigError(f"{' and '.join(same)} name one folder; give each its own")


def check_classes(dataset, checkpoint):
    have, want = len(dataset.mask_values), max(checkpoint["model_args"]["num_classes"], 2)
    if have != want:
        raise ConfigError(f"the checkpoint predicts {want} classes but the data has {have}; evaluate it on data "
                         f"with its classes (--mask-values)")


class ReportingBadFiles(torch.utils.data.Dataset):
    """Items (image, mask, name, None), or (None, None, None, why) for a pair that cannot be read, so that one bad
    file is reported and left out instead of ending the evaluation."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return (*self.dataset[index], None)
        except UserError as e:
            return None, None, None, error_line(e)


def readable(loader, failures, bar):
    """The items that could be read; the reasons of the others go to `failures`."""
    for *item, error in loader:
        if error is None:
            yield item
        else:
            warn(f"{error}; left out")
            failures.append(error)
            bar.update(1)


def segment(model, checkpoint, dataset, inference, batch_size, workers, confusion, save_labels, overlays,
            on_image=None):
    """Predict every item (the inference path of predict.py), add it to `confusion` when it has a mask, and
    write the label images and overlays asked for (folders or None). `on_image(image, mask, labels, name)`, when
    given, sees each image that has a mask with its predicted class map (on the model's device). Returns (number
    of images segmented, reasons of the ones left out)."""
    loader = torch.utils.data.DataLoader(ReportingBadFiles(dataset), batch_size=None, num_workers=workers)
    planner = Planner(model, checkpoint["normalize"], inference.options(), len(checkpoint["classes"]),
                      inference.max_memory, inference.tile, batch_size, max_batch=16, log=tqdm.write)
    done, failures = 0, []
    with tqdm(total=len(dataset), desc="eval", leave=False) as bar:
        items = readable(loader, failures, bar)
        for batch, options in planner.batches(items, lambda item: item[0]):
            images, masks, names = zip(*batch)
            probs, used = predict_probs_or_tile(model, stack_batch(images), checkpoint["normalize"], log=warn,
                                                **options)
            planner.remember(images[0].shape[-2:], used)
            labels = probs_to_labels(probs)
            images = [viewable(image, checkpoint["normalize"]) for image in images]  # from here on, pictures
            if masks[0] is not None and getattr(dataset, "rois", None):  # shown greyed outside their regions
                images = [greyed(image, mask == IGNORE_INDEX) for image, mask in zip(images, masks)]
            if masks[0] is not None:
                confusion.update(labels, stack_batch(masks))
                if on_image:
                    for image, mask, label, name in zip(images, masks, labels, names):
                        on_image(image, mask, label, name)
            if save_labels or overlays:
                for image, label, name in zip(images, labels.to(torch.uint8).cpu().numpy(), names):
                    write_image_files(image, label, name, checkpoint, save_labels, overlays)
            done += len(batch)
            bar.update(len(batch))
    return done, failures


def write_image_files(image, labels, name, checkpoint, save_labels, overlays):
    """The label image (<name>.png, or .tif for a huge image: drawing.mask_suffix) and overlay of one image into
    the folders asked for (None: not asked); a huge image gets no overlay, said in a warning."""
    huge = is_huge(labels.size)
    if overlays and huge:
        warn(f"{name}: no overlay for an image of {labels.size / 2 ** 20:.0f} M pixels: it could not be viewed")
    write_pictures(image, labels, checkpoint["classes"], checkpoint["mask_values"],
                   label_path=save_labels and Path(save_labels) / f"{name}{mask_suffix(labels.size)}",
                   overlay_path=overlays and not huge and Path(overlays) / f"{name}.png")


def format_table(metrics, classes):
    width = max(len(c) for c in classes + ["class"])
    lines = [f"{'class':<{width}}  {'IoU':>7}  {'Dice':>7}  {'acc':>7}"]
    for name, iou, dice, acc in zip(classes, metrics["iou"], metrics["dice"], metrics["class_acc"]):
        lines.append(f"{name:<{width}}  {score_text(iou):>7}  {score_text(dice):>7}  {score_text(acc):>7}")
    lines.append("")
    for key, label in SCORE_NAMES:
        if key in metrics:
            lines.append(f"{label:<24}{score_text(metrics[key])}")
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
    config, given, inference = parse_args(argv)
    try:
        return evaluate_checkpoint(config, given, inference)
    except UserError as e:  # also raised in a data-loader worker: one line, not the worker's traceback
        sys.exit(f"error: {error_line(e)}")


def evaluate_checkpoint(config, given, inference):
    """Score (or only segment) the data that `given` (the data flags, None where left out) selects; returns the
    scores, or None without true masks. UserError for bad input."""
    config, given = with_eval_folder(config, given)
    checkpoint_path = find_checkpoint(config.model)
    model, checkpoint = load_model(checkpoint_path, pick_device(config.device))
    if given["class_names"]:  # other names for the checkpoint's classes
        classes = read_class_names(given["class_names"])
        check_class_names(classes, len(checkpoint["classes"]), given["class_names"])
        checkpoint = {**checkpoint, "classes": classes}  # in the overlays' keys too
    classes = list(checkpoint["classes"])
    dataset, data, split, what = open_data(config, given, checkpoint)
    check_output_paths(dataset, checkpoint_path, {"--json": config.json, "--confusion": config.confusion},
                       {"--save-labels": config.save_labels, "--overlays": config.overlays, "--report": config.report})
    inference = for_model(inference, model, checkpoint, trained_scale(checkpoint))
    device = next(model.parameters()).device
    num_classes = max(checkpoint["model_args"]["num_classes"], 2)
    confusion = ConfusionMatrix(num_classes, dataset.ignore_index, device)
    gallery = Gallery(num_classes, dataset.ignore_index) if config.report else None
    start = time.perf_counter()
    done, failures = segment(model, checkpoint, dataset, inference, config.batch_size, config.workers, confusion,
                             config.save_labels, config.overlays, on_image=gallery.add if gallery else None)
    seconds = time.perf_counter() - start
    print(f"{checkpoint_path} on {what}: {count(done, 'image')} in {seconds:.1f} s "
          f"({done / max(seconds, 1e-9):.2f} images/s, scale {inference.scale:g})")
    for kind, folder in [("label image", config.save_labels), ("overlay", config.overlays)]:
        if folder:
            print(f"wrote {count(done, kind)} to {Path(folder)}")
    if data is None:
        print(f"no true masks for {given['images']}: no scores were computed")
        check_complete(failures, done)
        return None
    metrics = confusion.compute()
    print(format_table(metrics, classes))
    run = {"checkpoint": str(checkpoint_path), "data": what, "dataset": data.dataset, "split": split, "images": done,
           "classes": classes, "mask_values": list(checkpoint["mask_values"]), "options": dataclasses.asdict(inference)}
    save_scores(config, run, metrics, confusion, void_share(confusion, data), gallery, failures)
    check_complete(failures, done)
    return metrics


def with_eval_folder(config, given):
    """(config, given) with eval/'s images and masks, and its outputs where no flag names them, when eval.py runs
    with no data flag and an eval/ folder is there (eval_folder_mode); else as they are."""
    if not eval_folder_mode(given, config.split):
        return config, given
    given = {**given, "images": str(EVAL_DIR / "images"),
             "masks": str(EVAL_DIR / "masks") if holds_images(EVAL_DIR / "masks") else None}
    scored = given["masks"] is not None
    config = dataclasses.replace(
        config, save_labels=config.save_labels or str(EVAL_DIR / "labels"),
        confusion=config.confusion or (str(EVAL_DIR / "confusion.png") if scored else None),
        report=config.report or (str(EVAL_DIR / "report") if scored else None))
    return config, given


def open_data(config, given, checkpoint):
    """(dataset, DataConfig or None, split, the words that name it): the images and masks `given` selects read as
    the checkpoint's, or images alone (no DataConfig), which only --save-labels and --overlays can use."""
    if given["images"] and not given["masks"]:
        for flag, path in (("--report", config.report), ("--json", config.json), ("--confusion", config.confusion)):
            if path:
                raise ConfigError(f"{flag} needs the true masks: add --masks DIR (label images alone: "
                                  f"--save-labels DIR)")
        if not (config.save_labels or config.overlays):
            raise ConfigError("--images without --masks only writes label images: add --save-labels DIR "
                              "(or --masks DIR to score them)")
        dataset = ImageFiles(given["images"], checkpoint["normalize"].get("form"))
        return dataset, None, None, f"{given['images']} (no masks)"
    data, split = choose_data(given, config.split, checkpoint)
    dataset = build_dataset(data, split, full_resolution=True)
    where = (f"{data.images} + {data.masks}" if data.dataset == "folder" and data.images else
             data.pairs if data.dataset == "folder" and data.pairs else data.dataset)
    check_classes(dataset, checkpoint)
    return dataset, data, split, f"{where} {split}"


def void_share(confusion, data):
    """The share of the true pixels that are void, with a warning where it is most of them and no region of
    interest explains it: masks of another task, whose classes this checkpoint reads as void."""
    void = int(confusion.ignored)
    share = void / max(1, void + int(confusion.mat.sum()))
    if share > 0.5 and not data.roi:  # outside a region of interest, void is expected
        value = f"colour {data.void_color}" if data.void_color else f"mask value {data.ignore_index}"
        warn(f"{share:.0%} of the true pixels are void ({value}) and were not scored; "
             f"if that value is a class of these masks, they are not masks of this checkpoint's task")
    return share


def save_scores(config, run, metrics, confusion, void, gallery, failures):
    """The --confusion picture, the --json scores and the --report page; `run` says what was scored and how."""
    matrix, classes = confusion.mat.cpu(), run["classes"]
    if config.confusion:
        plot_confusion_matrix(matrix.numpy(), classes, config.confusion)
        print(f"wrote {config.confusion}")
    if config.json:
        scores = {MARK_KEY: MARK, **run, **metrics, "absent_classes": absent_classes(metrics, classes),
                  "left_out": failures, "confusion_matrix": matrix.tolist()}
        with open(config.json, "w") as f:
            json.dump(_nan_to_none(scores), f, indent=2)
        print(f"wrote {config.json}")
    if config.report:
        page = write_report(config.report, checkpoint=run["checkpoint"], data=run["data"], count=run["images"],
                            metrics=metrics, matrix=matrix.numpy(), classes=classes, mask_values=run["mask_values"],
                            gallery=gallery, options=run["options"], left_out=failures, void_share=void)
        print(f"wrote {page} (open it in a browser; the pictures beside it belong to it)")


def check_complete(failures, done):
    """Everything asked for is written; a set with unreadable files still ends in an error (exit status 1)."""
    if failures:
        raise DatasetError(f"{len(failures)} of {done + len(failures)} images could not be read and were left out "
                           f"(the scores cover the others): {listing(failures, 3, '; ')}")


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
