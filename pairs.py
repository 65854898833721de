"""Image/mask pairs on disk: matching files by name, split lists, and the check of every pair (readable, same
size, known mask values), done once and cached."""
import csv
import filecmp
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from errors import DatasetError, ImageReadError
from images import COLOUR, GREY, IMAGE_EXTENSIONS, checked_image_size, describe_form, mask_values_of, \
    open_image, unpacked_colour
from utils import replaced_atomically

PHOTO_VALUES = 16  # a mask with more distinct values than this looks like a photograph


def size_mismatch(image_path, image_size, mask_path, mask_size):
    return DatasetError(f"mask '{mask_path}' is {mask_size[0]}x{mask_size[1]} but its image '{image_path}' is "
                        f"{image_size[0]}x{image_size[1]}; masks must have their image's size")


def unknown_values(mask_path, values, mask_values, void_value):
    void = f" and the void value {void_value}" if void_value is not None else ""
    if len(values) > PHOTO_VALUES:
        fix = "these look like photographs, not masks: are --images and --masks swapped?"
    else:
        fix = ("fix the mask, map the values to the classes with --mask-values (one per class, in class order), "
               "or name a void value with --ignore-index")
    return DatasetError(f"mask '{mask_path}' holds {len(values)} value(s) ({listing(map(str, values), 8)}) outside "
                        f"the known mask values {list(mask_values)}{void}; {fix}")


def unknown_colours(mask_path, counts):
    """The error for colours of a colour-coded mask that no class has: the file, each colour and its pixels."""
    colours = [f"({', '.join(map(str, unpacked_colour(value)))}) on {count} pixel(s)"
               for value, count in sorted(counts.items(), key=lambda item: -item[1])]
    example = " ".join(map(str, unpacked_colour(max(counts, key=counts.get))))
    return DatasetError(f"mask '{mask_path}' holds {len(counts)} colour(s) outside the class colours: "
                        f"{listing(colours, 4)}; fix the mask, or add each colour to the colour table given with "
                        f"--mask-colors (a line '{example} <class name>', or '{example} void' to ignore it)")


def listing(names, limit=5, separator=", "):
    names = list(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return separator.join(names[:limit]) + more


def list_files(folder, kind):
    """{stem: path} of the image files in `folder`."""
    if not folder.is_dir():
        raise DatasetError(f"{kind} folder '{folder}' does not exist")
    files = {}
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            path = Path(entry.path)
            if not entry.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS:
                if path.stem in files:
                    raise DatasetError(f"'{files[path.stem].name}' and '{path.name}' in {kind} folder '{folder}' "
                                       f"share the name '{path.stem}', so either could be paired; keep one")
                files[path.stem] = path
    if not files:
        raise DatasetError(f"{kind} folder '{folder}' is empty (no {', '.join(IMAGE_EXTENSIONS)} files)")
    return files


PAIRS_HINT = ("if image and mask names share no pattern, list the pairs in a CSV file, one 'image,mask' line each "
              "(paths relative to the file), and pass --pairs FILE")


def pair_by_stem(images_dir, masks_dir, suffix=None, kind="mask"):
    """Image and mask files matched by name: `<stem>.<ext>` with `<stem><suffix>.<ext>`; the suffix, when not
    given, is '' if any names match as they are, else '_mask'. `kind` names the masks in errors. One folder may
    hold both, given a suffix."""
    same_folder = images_dir.resolve() == masks_dir.resolve()
    if same_folder and not suffix:
        raise DatasetError(f"--images and --masks both name '{images_dir}': the masks would be the images "
                           f"themselves; point --masks at the folder of masks (or, for masks named "
                           f"'<image name>_mask.png' beside their images, pass --mask-suffix _mask)")
    images, masks = list_files(images_dir, "image"), list_files(masks_dir, kind)
    if suffix is None:
        suffix = "" if images.keys() & masks.keys() else "_mask"
    if same_folder:
        images = {stem: path for stem, path in images.items() if not stem.endswith(suffix)}
        masks = {stem: path for stem, path in masks.items() if stem.endswith(suffix)}
    masks = {stem[:-len(suffix)] if suffix and stem.endswith(suffix) else stem: path for stem, path in masks.items()}
    no_mask = sorted(images.keys() - masks.keys())
    if no_mask:
        raise DatasetError(f"{len(no_mask)} image(s) in '{images_dir}' have no {kind} named '<image name>{suffix}.*' "
                           f"in '{masks_dir}': {listing(images[s].name for s in no_mask)}; {PAIRS_HINT}")
    no_image = sorted(masks.keys() - images.keys())
    if no_image:
        raise DatasetError(f"{len(no_image)} {kind}(s) in '{masks_dir}' have no image in '{images_dir}': "
                           f"{listing(masks[s].name for s in no_image)}; {PAIRS_HINT}")
    return [(images[stem], masks[stem]) for stem in sorted(images)]


def read_pairs_file(path):
    """The (image, mask) pairs a CSV list names, one `image,mask` row each, paths relative to the list's folder
    (MONAI's datalists and mmsegmentation's split files do the same); a first row that names no image file
    (such as `image,mask`) is a header. Every file must exist, and image names be unique (outputs and the
    validation split are keyed by them)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"--pairs '{path}' does not exist; write a CSV file of 'image,mask' lines")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [(number, [cell.strip() for cell in row]) for number, row in enumerate(csv.reader(f), 1)
                if any(cell.strip() for cell in row)]
    if rows and Path(rows[0][1][0]).suffix.lower() not in IMAGE_EXTENSIONS:
        rows = rows[1:]  # a header
    if not rows:
        raise DatasetError(f"--pairs '{path}' lists no pairs; write one 'image,mask' line per pair")
    pairs, stems = [], {}
    for number, row in rows:
        if len(row) != 2 or not all(row):
            raise DatasetError(f"--pairs '{path}', line {number}: expected 'image,mask' (two paths), got "
                               f"{','.join(row)!r}")
        image, mask = (path.parent / cell for cell in row)  # an absolute path stays as it is
        if image.stem in stems:
            raise DatasetError(f"--pairs '{path}', line {number}: '{image}' has the name of '{stems[image.stem]}' "
                               f"(eval.py's outputs and the validation split go by image name); rename one")
        stems[image.stem] = image
        pairs.append((image, mask))
    return existing(pairs, path)


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


def cache_folder():
    """Where the checks of data folders are cached: never beside the data, which may be read-only or shared."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "unet-segmentation" / "scans"


def cache_file(mask_folder, colours=False):
    name = str(mask_folder.resolve()) + (" (colours)" if colours else "")  # masks read as colours: another scan
    key = hashlib.sha1(name.encode()).hexdigest()[:16]
    return cache_folder() / f"{key}.json"


def file_stamp(path):
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise ImageReadError(f"'{path}' does not exist") from None
    except OSError as e:  # a symbolic link that loops, a file without read permission
        raise ImageReadError(f"'{path}' cannot be read ({e.strerror})") from None
    return [stat.st_mtime_ns, stat.st_size]


def checked_mask_values(image_path, mask_path, colours=False, compare=True):
    """images.mask_values_of, but a 'mask' that is its image again (--masks naming a copy of the images, or
    the images' own folder) is named as such rather than as a mask of colours or of too many values. A mask of
    many values is compared with its image only when `compare` (the comparison decodes both files)."""
    try:
        mask_size, counts = mask_values_of(mask_path, colours)
    except ImageReadError:
        raise
    except DatasetError:  # a mask in colours, read as class values
        if same_picture(image_path, mask_path):
            raise same_images(image_path, mask_path) from None
        raise
    if compare and len(counts) > PHOTO_VALUES and same_picture(image_path, mask_path):
        raise same_images(image_path, mask_path)
    return mask_size, counts


def same_picture(image_path, mask_path, tolerance=8.0):
    """The same file, or the same pixels within `tolerance` grey levels on average: a re-encoded copy (JPEG at
    quality 90 moves a photograph's pixels by 1 to 7 levels; a mask of another picture differs by tens)."""
    if filecmp.cmp(image_path, mask_path, shallow=False):
        return True
    image, mask = open_image(image_path)[0], open_image(mask_path)[0]
    if image.size != mask.size:
        return False
    difference = np.abs(np.asarray(image, np.int16) - np.asarray(mask, np.int16))
    return float(difference.mean()) <= tolerance


def same_images(image_path, mask_path):
    return DatasetError(f"mask '{mask_path}' is the same picture as its image '{image_path}': the masks' folder "
                        f"'{mask_path.parent}' looks like the same images as the images' folder; point --masks "
                        f"(or the mask column of --pairs) at the masks, which hold one value (or colour) per class")


def scan_pairs(pairs, skip_bad=False, colours=False, forms=None):
    """Check every pair once: both files decode, the image's size equals the mask's; and count each mask's values
    (with `colours`, its colours packed as images.pack_colours does).
    Results are cached per mask folder (cache_folder), keyed by file size and modification time, so later starts
    cost two stat calls per pair. Returns [(pair, (width, height), {value: pixel count})] for the readable pairs;
    `forms`, a dict, is filled with {image path: its form (images.checked_image_size)}."""
    caches, changed, found, skipped = {}, set(), [], []
    compared = False  # a copy of the images shows in its first mask of many values: one comparison per scan
    for image_path, mask_path in pairs:
        folder = mask_path.parent
        if folder not in caches:
            try:
                caches[folder] = json.loads(cache_file(folder, colours).read_text())
            except (OSError, ValueError):
                caches[folder] = {}
        try:
            stamp = file_stamp(image_path) + file_stamp(mask_path)
            entry = caches[folder].get(mask_path.name)
            if (entry is None or entry.get("stamp") != stamp or entry.get("image") != image_path.name
                    or "form" not in entry):
                size, form = checked_image_size(image_path)
                mask_size, counts = checked_mask_values(image_path, mask_path, colours, compare=not compared)
                compared = compared or len(counts) > PHOTO_VALUES
                if mask_size != size:
                    raise size_mismatch(image_path, size, mask_path, mask_size)
                entry = {"image": image_path.name, "stamp": stamp, "size": list(size), "form": list(form),
                         "counts": [[value, count] for value, count in counts.items()]}
                caches[folder][mask_path.name] = entry
                changed.add(folder)
        except ImageReadError as e:
            if not skip_bad:
                raise DatasetError(f"{e}; fix or remove the file, or pass --skip-bad to leave out unreadable "
                                   f"pairs") from None
            skipped.append(str(e))
            continue
        found.append(((image_path, mask_path), tuple(entry["size"]), dict(entry["counts"])))
        if forms is not None:
            forms[image_path] = tuple(entry["form"])
    for folder in changed:
        path = cache_file(folder, colours)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with replaced_atomically(path) as f:  # every torchrun process may write it: each its own temporary
                f.write(json.dumps(caches[folder]).encode())
        except OSError as e:
            print(f"note: could not cache the check of '{folder}' in '{path}' ({e}); it will run again",
                  file=sys.stderr)
    if skipped:
        print(f"warning: skipped {len(skipped)} unreadable pair(s): {listing(skipped, 3)}", file=sys.stderr)
    if not found:
        raise DatasetError("none of the image/mask pairs could be read")
    return found


MAX_CLASSES = 254  # class indices 0..253 fit in a uint8 mask tensor beside the void index 255
STRAY_SHARE = 1e-3  # a mask value on fewer than this share of all mask pixels, in few masks, looks like noise


def found_mask_values(found, void_value=None, colours=False):
    """The sorted mask values (with `colours`, packed colours) of scanned pairs, void left out. A value on a tiny
    share of the pixels of a few masks (stray pixels of an edited or JPEG-saved mask) is refused rather than made a
    class of its own."""
    totals, masks_with = {}, {}
    for (_, mask_path), _, counts in found:
        for value, count in counts.items():
            totals[value] = totals.get(value, 0) + count
            masks_with.setdefault(value, []).append(mask_path)
    pixels = sum(totals.values())
    values = sorted(set(totals) - {void_value})
    if len(values) > MAX_CLASSES:
        folder = found[0][0][1].parent
        kind = "colours" if colours else "values"
        raise DatasetError(f"the masks in '{folder}' hold {len(values)} distinct {kind}, as photographs do: masks "
                           f"must hold one {kind[:-1]} per class (are --images and --masks swapped?)")
    few_masks = max(1, len(found) // 100)
    stray = [v for v in values if totals[v] < STRAY_SHARE * pixels and len(masks_with[v]) <= few_masks]
    if stray and colours:
        colour = " ".join(map(str, unpacked_colour(stray[0])))
        raise DatasetError(
            f"colour ({colour}) covers only {totals[stray[0]]} pixel(s), in "
            f"{listing(map(str, masks_with[stray[0]]), 3)}: stray pixels (an antialiased or JPEG-saved mask?) "
            f"rather than a class? Fix those masks, or list the class colours with --mask-colors FILE (one line "
            f"'R G B name' per class; a line '{colour} void' ignores this one)")
    if stray:
        value = stray[0]
        usual = [v for v in values if v not in stray]
        raise DatasetError(
            f"mask value {value} covers only {totals[value]} pixel(s), in {listing(map(str, masks_with[value]), 3)}: "
            f"stray pixels rather than a class? Fix those masks, or say what the values mean: --mask-values "
            f"{' '.join(map(str, usual))} with --ignore-index {value} to skip them as void, or --mask-values "
            f"{' '.join(map(str, values))} to keep {value} as a class")
    return values


def check_values(found, mask_values, void_value, colours=False):
    """DatasetError naming the first mask that holds a value (with `colours`, a packed colour) of no class."""
    known = set(mask_values) | {void_value}
    for (_, mask_path), _, counts in found:
        if colours and not known.issuperset(counts):
            raise unknown_colours(mask_path, {value: n for value, n in counts.items() if value not in known})
        if not known.issuperset(counts):
            raise unknown_values(mask_path, sorted(set(counts) - known), mask_values, void_value)


def data_form(forms):
    """The form (images.describe_form) of a dataset's images, from {image path: form}: 8-bit RGB (None) when any is
    colour and all are 8-bit grey or colour, as photo sets mix them; else the one form all share. Images of two
    forms are refused, naming one file of each."""
    distinct = {}
    for path, form in forms.items():
        distinct.setdefault(form, path)
    beyond_8_bit = [form for form in distinct if form not in (GREY, COLOUR)]
    if not beyond_8_bit:
        return None if COLOUR in distinct else GREY
    if len(distinct) == 1:
        return beyond_8_bit[0]
    form = beyond_8_bit[0]
    other = next(f for f in distinct if f != form)
    raise DatasetError(f"the images are not all of one form: '{distinct[form]}' is {describe_form(form)} but "
                       f"'{distinct[other]}' is {describe_form(other)}; convert them to one channel count and bit "
                       f"depth")
