"""Image/mask pairs on disk: matching files by name, split lists, and the check of every pair (readable, same
size, known mask values), done once and cached."""
import json
import os
import sys
from pathlib import Path

import numpy as np

from errors import DatasetError, ImageReadError
from images import IMAGE_EXTENSIONS, image_size, mask_values_of


def size_mismatch(image_path, image_size, mask_path, mask_size):
    return DatasetError(f"mask '{mask_path}' is {mask_size[0]}x{mask_size[1]} but its image '{image_path}' is "
                        f"{image_size[0]}x{image_size[1]}; masks must have their image's size")


def unknown_values(mask_path, values, mask_values, void_value):
    void = f" and the void value {void_value}" if void_value is not None else ""
    return DatasetError(f"mask '{mask_path}' holds values {values} outside the known mask values "
                        f"{list(mask_values)}{void}; fix the mask, or name a void value with --ignore-index")


def listing(names, limit=5):
    names = list(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def list_files(folder, kind):
    """{stem: path} of the image files in `folder`."""
    if not folder.is_dir():
        raise DatasetError(f"{kind} folder '{folder}' does not exist")
    files = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            path = Path(entry.path)
            if not entry.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS:
                files[path.stem] = path
    if not files:
        raise DatasetError(f"{kind} folder '{folder}' is empty (no {', '.join(IMAGE_EXTENSIONS)} files)")
    return files


def pair_by_stem(images_dir, masks_dir, suffix=None):
    """Image and mask files matched by name: `<stem>.<ext>` with `<stem><suffix>.<ext>`; the suffix, when not
    given, is '' if any names match as they are, else '_mask'."""
    images, masks = list_files(images_dir, "image"), list_files(masks_dir, "mask")
    if suffix is None:
        suffix = "" if images.keys() & masks.keys() else "_mask"
    masks = {stem[:-len(suffix)] if suffix and stem.endswith(suffix) else stem: path for stem, path in masks.items()}
    no_mask = sorted(images.keys() - masks.keys())
    if no_mask:
        raise DatasetError(f"{len(no_mask)} image(s) in '{images_dir}' have no mask named '<image name>{suffix}.*' "
                           f"in '{masks_dir}': {listing(images[s].name for s in no_mask)}")
    no_image = sorted(masks.keys() - images.keys())
    if no_image:
        raise DatasetError(f"{len(no_image)} mask(s) in '{masks_dir}' have no image in '{images_dir}': "
                           f"{listing(masks[s].name for s in no_image)}")
    return [(images[stem], masks[stem]) for stem in sorted(images)]


def read_ids(path):
    """The ids of a split list (one per line; SBD and VOC write them this way)."""
    if not path.is_file():
        lists = sorted(p.stem for p in path.parent.glob("*.txt"))
        raise DatasetError(f"split list '{path}' does not exist (lists there: {listing(lists) or 'none'})")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"split list '{path}' is empty")
    return ids


def existing(pairs, listed_in):
    """The pairs themselves, after checking that every listed file is there (one stat per file)."""
    missing = [str(p) for pair in pairs for p in pair if not p.is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} file(s) listed in '{listed_in}' are missing: {listing(missing)}")
    return pairs


def held_out(keys, percent, seed):
    """A seeded random `percent` of `keys` (at least one when percent > 0): the validation side of a split."""
    keys = sorted(keys)
    count = min(len(keys) - 1, max(1, round(len(keys) * percent / 100))) if percent > 0 else 0
    order = np.random.default_rng(seed).permutation(len(keys))
    return {keys[i] for i in order[:count]}


SCAN_CACHE = ".unet_scan.json"


def file_stamp(path):
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise ImageReadError(f"'{path}' does not exist") from None
    return [stat.st_mtime_ns, stat.st_size]


def scan_pairs(pairs, skip_bad=False):
    """Check every pair once: the image's size (from its header) equals the decoded mask's, both are readable;
    and collect each mask's values. Results are cached beside the masks (SCAN_CACHE), keyed by file size and
    modification time, so later starts cost two stat calls per pair.
    Returns [(pair, (width, height), values)] for the readable pairs."""
    caches, changed, found, skipped = {}, set(), [], []
    for image_path, mask_path in pairs:
        folder = mask_path.parent
        if folder not in caches:
            try:
                caches[folder] = json.loads((folder / SCAN_CACHE).read_text())
            except (OSError, ValueError):
                caches[folder] = {}
        try:
            stamp = file_stamp(image_path) + file_stamp(mask_path)
            entry = caches[folder].get(mask_path.name)
            if entry is None or entry["stamp"] != stamp or entry["image"] != image_path.name:
                size = image_size(image_path)
                mask_size, values = mask_values_of(mask_path)
                if mask_size != size:
                    raise size_mismatch(image_path, size, mask_path, mask_size)
                entry = {"image": image_path.name, "stamp": stamp, "size": list(size), "values": values}
                caches[folder][mask_path.name] = entry
                changed.add(folder)
        except ImageReadError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
            continue
        found.append(((image_path, mask_path), tuple(entry["size"]), entry["values"]))
    for folder in changed:
        try:
            (folder / f"{SCAN_CACHE}.tmp").write_text(json.dumps(caches[folder]))
            os.replace(folder / f"{SCAN_CACHE}.tmp", folder / SCAN_CACHE)
        except OSError as e:
            print(f"note: could not cache the mask check in '{folder}' ({e}); it will run again", file=sys.stderr)
    if skipped:
        print(f"warning: skipped {len(skipped)} unreadable pair(s): {listing(skipped, 3)}", file=sys.stderr)
    if not found:
        raise DatasetError("none of the image/mask pairs could be read")
    return found


def check_values(found, mask_values, void_value):
    known = set(mask_values) | {void_value}
    for (_, mask_path), _, values in found:
        if not known.issuperset(values):
            raise unknown_values(mask_path, sorted(set(values) - known), mask_values, void_value)



