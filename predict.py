"""Segment images with a trained checkpoint. Example: python predict.py -i img.jpg -o mask.png

Inputs are image files, folders (the images directly inside) or glob patterns; outputs are written beside each
input as <stem>_mask.png (<stem>_mask.tif, a BigTIFF written by rows, for images of 64 M pixels or more) unless -o
names files or a folder, and never replace an input, a checkpoint, a true mask or any file this tool did not write
(outputs.py). Unreadable files are reported and skipped; the run ends with a summary and a non-zero exit status
if anything failed."""
import argparse
import contextlib
import dataclasses
import functools
import glob
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bigtiff import TiffWindows, open_windows
from checkpoints import find_checkpoint, load_model
from datasets import trained_scale
from distributed import all_gather_objects, init_distributed, is_distributed
from drawing import TIFF_MASK_PIXELS, is_huge, mask_suffix, viewable, viz_picture, write_label_tiff, write_pictures
from errors import ConfigError, DatasetError, UserError, check_at_least, one_line
from flags import add_inference_args, config_from, finite_float
from images import IMAGE_EXTENSIONS, TIFF_SUFFIXES, header_size, is_tiff, read_image
from inference import (InferenceConfig, Planner, for_model, predict_probs_or_tile, probs_to_labels,
                       sliding_window_bands, stack_batch, tile_grid)
from outputs import Planned, check_outputs, is_own_output
from progress import Progress
from utils import count, pick_device, warn

OUTPUT_KINDS = ("mask", "overlay", "viz", "probs")  # <stem>_<kind>: what this script writes
TILE_PROGRESS = 16  # an image of this many tiles or more gets a progress bar of its own
MAX_IMAGE_PIXELS = 1_000_000_000  # PIL's decompression-bomb limit (89 M pixels) is too low for large scans


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=None,
                   help="checkpoint file (default: the newest best.pth under checkpoints/)")
    p.add_argument("-i", "--input", nargs="+", required=True, help="image files, folders or glob patterns")
    p.add_argument("-o", "--output", nargs="+", default=None,
                   help="one .png (or .tif: BigTIFF) mask file per input image, or one folder (default: "
                        "<stem>_mask.png beside each input; <stem>_mask.tif for images of 64 M pixels or more)")
    p.add_argument("-t", "--mask-threshold", type=finite_float, default=None,
                   help="foreground probability threshold of single-logit models (default: 0.5)")
    p.add_argument("-v", "--viz", action="store_true",
                   help="also write <stem>_viz.png, the image and its mask side by side (with -n: show them); "
                        "not for images of 64 M pixels or more")
    p.add_argument("-n", "--no-save", action="store_true", help="write no files")
    p.add_argument("--overlay", action="store_true",
                   help="also write <stem>_overlay.png, the classes tinted on the image; not for images of 64 M "
                        "pixels or more")
    p.add_argument("--probs", action="store_true",
                   help="also write <stem>_probs.npy, the class probabilities as float16 K x H x W "
                        "(K = 1 for single-logit models: the foreground probability)")
    add_inference_args(p)
    p.add_argument("--batch-size", type=int, default=None,
                   help="images of one size, or tiles, per forward pass (default: the memory plan's choice, at most "
                        "4)")
    p.add_argument("--workers", type=int, default=2,
                   help="threads that decode the next images meanwhile (default: 2)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', ...")
    args = p.parse_args(argv)
    try:
        inference = config_from(InferenceConfig, vars(args)).check()
        if args.mask_threshold is not None and not 0 <= args.mask_threshold <= 1:
            raise ConfigError(f"--mask-threshold must lie in [0, 1], got {args.mask_threshold}")
        check_at_least(1, batch_size=1 if args.batch_size is None else args.batch_size)
        check_at_least(0, workers=args.workers)
        pick_device(args.device)
    except ConfigError as e:
        p.error(str(e))
    return args, inference, Outputs(args.no_save, args.overlay, args.viz, args.probs)


@dataclass
class Outputs:
    """Which files to write beside each mask (or, with no_save, nothing; viz then shows them in a window)."""
    no_save: bool = False
    overlay: bool = False
    viz: bool = False
    probs: bool = False


def is_image_file(path):
    """An image by its name that is not named as one of our outputs (<stem>_mask.png and friends)."""
    return (path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
            and not path.stem.endswith(tuple(f"_{kind}" for kind in OUTPUT_KINDS)))


def true_masks(paths):
    """The files among `paths` named <stem>_mask beside an image <stem> that this tool did not write: the true
    masks of a folder of pairs (as pairs.pair_by_stem matches them), not images to segment."""
    stems = {(path.parent, path.stem) for path in paths if is_image_file(path)}
    return [path for path in paths if path.suffix.lower() in IMAGE_EXTENSIONS and path.stem.endswith("_mask")
            and (path.parent, path.stem.removesuffix("_mask")) in stems and not is_own_output(path)]


def expand_inputs(names):
    """-i arguments -> (image paths, problems). Folders give the images directly inside them and patterns the
    images they match, both sorted, less our outputs and the true masks beside their images (said in a note);
    other names are taken as files, to be read (or reported) later."""
    paths, problems, masks = [], [], []
    for name in names:
        path = Path(name)
        if broken_link(path):
            problems.append(f"'{name}' is a symbolic link that loops or leads nowhere")
            continue
        if path.is_dir():
            candidates = sorted(path.iterdir())
            problems += [f"'{p}' is a symbolic link that loops or leads nowhere" for p in candidates
                         if p.suffix.lower() in IMAGE_EXTENSIONS and broken_link(p)]
        elif any(c in name for c in "*?[") and not path.exists():
            candidates = sorted(map(Path, glob.glob(name)))
        else:
            paths.append(path)
            continue
        found = [p for p in candidates if is_image_file(p)]
        masks += true_masks(candidates)
        if not found:
            problems.append(f"'{name}' holds or matches no image file ({' '.join(IMAGE_EXTENSIONS)})")
        paths += found
    if masks:
        print(f"note: skipped {count(len(masks), 'true mask')} ('{masks[0]}' and others named <image>_mask beside "
              f"their image): they are masks, not images to segment")
    return list(dict.fromkeys(paths)), problems


def broken_link(path):
    return path.is_symlink() and not path.exists()  # exists() follows the link: False for a loop


def is_folder_name(name):
    return Path(name).is_dir() or name.endswith(("/", os.sep)) or not Path(name).suffix


def header_pixels(path):
    """The pixel count of an image from its file's header (0 where that cannot be read: reported when read)."""
    try:
        width, height = header_size(path)
    except (UserError, OSError):
        return 0
    return width * height


def mask_paths(inputs, output, pixels):
    """Where each input's mask goes: <stem>_mask.png (.tif for an image of `pixels` that is huge: a BigTIFF, see
    drawing.mask_suffix) beside it or in the -o folder, or the -o files in order (.png, or .tif for a BigTIFF)."""
    names = [f"{path.stem}_mask{mask_suffix(size)}" for path, size in zip(inputs, pixels)]
    if output is None:
        return [path.with_name(name) for path, name in zip(inputs, names)]
    if len(output) == 1 and is_folder_name(output[0]):
        return [Path(output[0]) / name for name in names]
    if len(output) != len(inputs):
        raise ConfigError(f"{len(inputs)} input images but {len(output)} output names; give one .png or .tif per "
                          f"image, or a single folder")
    for name, image, size in zip(output, inputs, pixels):
        suffix = Path(name).suffix.lower()
        if suffix not in (".png", *TIFF_SUFFIXES):
            raise ConfigError(f"-o '{name}': masks are written as PNG or BigTIFF (lossless); give a .png or .tif "
                              f"name, or a folder")
        if suffix == ".png" and is_huge(size):
            raise ConfigError(f"-o '{name}': '{image}' has {size / 2 ** 20:.0f} M pixels, too many for a PNG mask "
                              f"({TIFF_MASK_PIXELS / 2 ** 20:.0f} M or more are written as BigTIFF); give a .tif "
                              f"name, or a folder")
    return [Path(name) for name in output]


def extra_path(mask_path, kind, suffix=".png"):
    """<stem>_overlay.png and friends, beside the mask and named after it."""
    return mask_path.with_name(f"{mask_path.stem.removesuffix('_mask')}_{kind}{suffix}")


def drawn(outputs, pixels):
    """`outputs` less the pictures (overlay, viz) that an image of `pixels` does not get when huge (is_huge)."""
    return dataclasses.replace(outputs, overlay=False, viz=False) if is_huge(pixels) else outputs


def outputs_of(mask_path, outputs):
    if outputs.no_save:
        return []
    wanted = [(outputs.overlay, "overlay", ".png"), (outputs.viz, "viz", ".png"), (outputs.probs, "probs", ".npy")]
    return [mask_path] + [extra_path(mask_path, kind, suffix) for on, kind, suffix in wanted if on]


def planned_outputs(inputs, masks, pixels, outputs, output_flag):
    """Every file to be written (outputs.Planned), in input order."""
    return [Planned(out, output_flag, image) for image, mask, size in zip(inputs, masks, pixels)
            for out in outputs_of(mask, drawn(outputs, size))]


def huge_note(inputs, pixels, outputs):
    """The line that says how huge inputs (is_huge) are written, or None when there is none."""
    huge = [path for path, size in zip(inputs, pixels) if is_huge(size)]
    pictures = outputs.overlay or outputs.viz
    if not huge or (outputs.no_save and not outputs.viz):
        return None
    images = f"{count(len(huge), 'image')} of {TIFF_MASK_PIXELS / 2 ** 20:.0f} M pixels or more ('{huge[0]}'" + \
        (" and others)" if len(huge) > 1 else ")")
    if outputs.no_save:
        return f"note: {images} cannot be shown (-v -n): a picture that large cannot be viewed"
    return (f"note: {images}: their masks are BigTIFFs written by rows (.tif), as PNG readers refuse masks that "
            f"large" + ("; they get no --overlay or --viz picture, which could not be viewed" if pictures else ""))


def try_read(path, form=None):
    """(path, image C x H x W of `form` (images.open_image), None), or (path, None, why it cannot be read). A large
    8-bit RGB TIFF (form None) that can be read by windows comes as a TiffWindows, read as it is segmented."""
    try:
        return path, (open_windows(path) if form is None else None) or read_image(path, form), None
    except DatasetError as e:  # unreadable, or of another form than the model's
        return path, None, str(e)
    except Image.DecompressionBombError as e:
        return path, None, f"'{path}' is refused by PIL ({e})"
    except MemoryError:
        return path, None, f"'{path}' is too large to decode in the memory available"


def read_images(paths, workers, form=None):
    """try_read over `paths` in order, with `workers` threads decoding the next images while the model runs."""
    if workers == 0:
        yield from (try_read(path, form) for path in paths)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending = deque()
        for path in paths:
            pending.append(pool.submit(try_read, path, form))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def skip(reason, failures):
    print(f"error: {reason}; skipped", file=sys.stderr)
    failures.append(reason)


def readable(read, failures):
    """(index, path, image) of the readable images; the reasons of the others are appended to `failures`."""
    for index, (path, image, error) in enumerate(read):
        if error:
            skip(error, failures)
        else:
            yield index, path, image


def save_outputs(image, labels, probs, mask_path, checkpoint, outputs):
    """Write (or show) what `outputs` asks for, less the pictures of a huge image (drawn); returns the paths written.
    labels or probs None: written already (by bands); `image` may be a TiffWindows, read whole only for an overlay
    or a side-by-side view."""
    classes, mask_values = checkpoint["classes"], checkpoint["mask_values"]
    outputs = drawn(outputs, image.shape[-2] * image.shape[-1])
    if isinstance(image, TiffWindows):  # read whole only for the pictures that show it
        image = image.read() if outputs.overlay or outputs.viz else None
    image = None if image is None else viewable(image, checkpoint["normalize"])  # the picture: uint8 RGB
    if outputs.no_save:
        if outputs.viz:
            show(viz_picture(image.permute(1, 2, 0).numpy(), labels, classes, mask_values), mask_path.stem)
        return []
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    write_pictures(image, labels, classes, mask_values, label_path=labels is not None and mask_path,
                   overlay_path=outputs.overlay and extra_path(mask_path, "overlay"),
                   viz_path=outputs.viz and extra_path(mask_path, "viz"))
    if outputs.probs and probs is not None:
        save_probabilities(probs, extra_path(mask_path, "probs", ".npy"))
    return outputs_of(mask_path, outputs)


def labels_by_bands(model, image, normalize, threshold, probs_path=None, name="image", write_labels=None, **options):
    """Labels (uint8 1 x H x W array) of one image (a uint8 C x H x W tensor or a TiffWindows) in overlap tiles,
    blended band by band (label_bands). With `write_labels`, a function of an iterator of label bands (uint8 rows x
    W, top to bottom), each band goes to it as soon as it is final and None is returned: the labels are never held
    whole."""
    bands = label_bands(model, image, normalize, threshold, probs_path, name, **options)
    if write_labels:
        write_labels(band for _, band in bands)
        return None
    labels = np.empty((1, *image.shape[-2:]), np.uint8)
    for top, band in bands:
        labels[0, top:top + len(band)] = band
    return labels


def label_bands(model, image, normalize, threshold, probs_path=None, name="image", **options):
    """(first row, uint8 rows x W labels) of one image in overlap tiles, top to bottom, each band as soon as it is
    final (inference.sliding_window_bands): memory holds one band of probabilities, which go to `probs_path`
    (float16 .npy, as save_probabilities writes) when given. An image of TILE_PROGRESS tiles or more gets its own
    progress (bar or plain lines, named `name`)."""
    height, width = image.shape[-2:]
    out = None
    _, _, ys, xs = tile_grid(model, (height, width), options["tile"], options["overlap"])
    tiles = len(ys) * len(xs)
    with Progress(tiles, name, "tiles", leave=False) if tiles >= TILE_PROGRESS else contextlib.nullcontext() as bar:
        bands = sliding_window_bands(model, image, normalize, options["tile"], options["overlap"], options["flips"],
                                     options["amp_dtype"], options["batch_size"], on_tiles=bar and bar.update)
        for top, band in bands:
            if probs_path:
                if out is None:
                    out = np.lib.format.open_memmap(probs_path, mode="w+", dtype=np.float16,
                                                    shape=(len(band), height, width))
                out[:, top:top + band.shape[1]] = band.cpu().numpy()
            yield top, probs_to_labels(band[None], threshold, torch.uint8)[0].cpu().numpy()
    if out is not None:
        out.flush()


def segment(model, images, normalize, options, threshold, probs_path=None, name="image", write_labels=None):
    """(labels B x H x W uint8 array, probabilities B x K x H x W, options that worked), labels or probabilities
    None where written already: one tiled image at the input's scale by bands (labels_by_bands, which hands the
    labels to `write_labels` when given), others whole through predict_probs; both fall back to smaller tiles on
    running out of memory."""
    if options["tile"] and options["scale"] == 1.0 and len(images) == 1:
        labels, used = predict_probs_or_tile(model, images[0], normalize, log=warn, predict=labels_by_bands,
                                             threshold=threshold, probs_path=probs_path, name=name,
                                             write_labels=write_labels, **options)
        return labels, None, used
    images = [image.read() if isinstance(image, TiffWindows) else image for image in images]
    probs, used = predict_probs_or_tile(model, stack_batch(images), normalize, log=warn, **options)
    return probs_to_labels(probs, threshold, dtype=torch.uint8).cpu().numpy(), probs, used


def save_probabilities(probs, path, rows=1024):
    """Class probabilities K x H x W (tensor) -> float16 .npy file (np.load it, mmap_mode='r' for huge ones),
    written `rows` rows at a time so that no full-size copy is made."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=tuple(probs.shape))
    for row in range(0, probs.shape[1], rows):
        out[:, row:row + rows] = probs[:, row:row + rows].cpu().numpy()
    out.flush()
    del out


def show(image, title):
    import matplotlib.pyplot as plt

    plt.figure(title)
    plt.imshow(image)
    plt.axis("off")
    plt.show()


def check_display(outputs):
    if outputs.viz and outputs.no_save:
        import matplotlib

        if matplotlib.get_backend().lower() == "agg":
            raise ConfigError("-v with -n shows the images in a window, but matplotlib found no display; "
                              "drop -n to write <stem>_viz.png files instead")


def band_writers(mask_path, image, checkpoint, outputs):
    """The files that segment may write by bands for a tiled image: its --probs file (probs_path) and its BigTIFF
    mask (write_labels: write_label_tiff)."""
    if outputs.no_save:
        return {}
    write_labels = is_tiff(mask_path) and functools.partial(write_label_tiff, mask_path, image.shape[-2:],
                                                            classes=checkpoint["classes"],
                                                            mask_values=checkpoint["mask_values"])
    return {"probs_path": outputs.probs and extra_path(mask_path, "probs", ".npy") or None,
            "write_labels": write_labels or None}


def segment_all(model, checkpoint, planner, inputs, masks, outputs, threshold, workers, failures, written):
    """Segment `inputs` into `masks` (and the other `outputs`) with progress; the reasons of failed inputs are
    appended to `failures`, the inputs done to `written` (as they are done: what a Ctrl-C keeps)."""
    images_read = readable(read_images(inputs, workers, checkpoint["normalize"].get("form")), failures)
    with Progress(len(inputs), "predict", "images") as progress:
        for batch, options in planner.batches(images_read, lambda item: item[2]):
            indices, paths, images = zip(*batch)
            try:
                labels, probs, used = segment(model, images, checkpoint["normalize"], options, threshold,
                                              name=paths[0].name, **band_writers(masks[indices[0]], images[0],
                                                                                 checkpoint, outputs))
                planner.remember(images[0].shape[-2:], used)
            except RuntimeError as e:  # out of memory even at the smallest tile, or an input the model cannot take
                for path in paths:
                    skip(f"'{path}': {one_line(e)}", failures)
                continue
            for i, index in enumerate(indices):
                try:
                    saved = save_outputs(images[i], None if labels is None else labels[i],
                                         None if probs is None else probs[i], masks[index], checkpoint, outputs)
                except OSError as e:  # a full disk, a folder that became read-only
                    skip(f"'{paths[i]}': could not write its outputs ({e})", failures)
                    continue
                progress.write(f"{paths[i]} -> {', '.join(map(str, saved)) or '(not saved)'}")
                written.append(paths[i])
            progress.update(len(batch))
            for image in images:
                if isinstance(image, TiffWindows):
                    image.close()
            del probs, labels  # free this batch's buffers before the next one is computed


def main(argv=None):
    args, inference, outputs = parse_args(argv)
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    inputs, failures = expand_inputs(args.input)
    pixels = [header_pixels(path) for path in inputs]
    try:
        masks = mask_paths(inputs, args.output, pixels)
        check_outputs(planned_outputs(inputs, masks, pixels, outputs, "-o" if args.output else None), inputs,
                      fix="choose another -o (a .png or .tif file per image, or a folder)")
        check_display(outputs)
        device, rank, world_size = init_distributed(pick_device(args.device))
        model, checkpoint = load_model(find_checkpoint(args.model), device)
    except UserError as e:
        sys.exit(f"error: {e}")
    say = print if rank == 0 else (lambda *_: None)  # under torchrun, rank 0 speaks for all
    note = huge_note(inputs, pixels, outputs)
    if note:
        say(note)
    failures = failures if rank == 0 else []  # and counts the inputs that were not found
    classes = checkpoint["model_args"]["num_classes"]
    if args.mask_threshold is not None and classes > 1:
        say(f"note: -t applies to single-logit models; this one has {classes} classes, labels are the argmax")
    # The model sees images at the scale it was trained at (Carvana: half size) unless -s says otherwise.
    inference = for_model(inference, model, checkpoint, trained_scale(checkpoint), log=say)
    planner = Planner(model, checkpoint["normalize"], inference.options(), classes, inference.max_memory,
                      inference.tile, args.batch_size, log=say)
    threshold = 0.5 if args.mask_threshold is None else args.mask_threshold
    # Under torchrun each process takes every world_size-th input: each output is written by one process.
    mine = range(rank, len(inputs), world_size)
    start, written = time.perf_counter(), []
    try:
        segment_all(model, checkpoint, planner, [inputs[i] for i in mine], [masks[i] for i in mine], outputs,
                    threshold, args.workers, failures, written)
    except KeyboardInterrupt:
        sys.exit(f"interrupted: {count(len(written), 'image')} segmented and kept, "
                 f"{len(mine) - len(written)} not done")
    seconds = time.perf_counter() - start
    gathered = all_gather_objects((len(written), failures))
    done, failures = sum(done for done, _ in gathered), [reason for _, reasons in gathered for reason in reasons]
    say(f"{count(done, 'image')} in {seconds:.1f} s ({done / max(seconds, 1e-9):.2f} images/s"
        f"{f', {world_size} processes' if world_size > 1 else ''})")
    if is_distributed():
        torch.distributed.destroy_process_group()
    if failures:
        lines = "\n".join(f"  {reason}" for reason in failures)
        sys.exit(f"error: {len(failures)} of {done + len(failures)} inputs failed:\n{lines}" if rank == 0 else 1)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
