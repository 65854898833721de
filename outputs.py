"""What the scripts write, and what they may write over: the one rule of eval.py, predict.py and export.py.

Every file they write carries a mark of this tool (a PNG text chunk, a TIFF Software tag, a JSON key, an HTML meta
tag, an ONNX metadata key, a TorchScript extra file). An existing file is replaced only when it carries the mark and
is not one of the run's inputs (compared by device and inode, so that a hard link or a symlink to an input counts
as the input). Checkpoints, images, masks and every other file are never replaced: the run stops before any work,
with one line naming the file and what to do."""
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, PngImagePlugin

from errors import ConfigError
from images import IMAGE_EXTENSIONS
from utils import check_folder

MARK = "unet-segmentation"
PNG_KEY = "Software"  # PNG's keyword for the program that wrote the file (TIFF's Software tag holds MARK too)
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # little- and big-endian TIFF, then BigTIFF
MARK_KEY = "written_by"  # the JSON key, ONNX metadata key and TorchScript extra file that hold MARK
HTML_MARK = f'<meta name="generator" content="{MARK}">'
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt")
# eval.py --json files written before the mark are recognised by these keys (as older ONNX exports by theirs)
EVAL_JSON_KEYS = {"checkpoint", "classes", "mask_values", "confusion_matrix", "miou"}


def png_info():
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, MARK)
    return info


def save_png(image, path):
    """Save a PIL image as a PNG that carries the mark."""
    image.save(path, format="PNG", pnginfo=png_info())


def is_own_output(path):
    """Whether the existing file `path` carries this tool's mark (a file that cannot be read does not)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
        start = head.lstrip()
        if head.startswith(b"\x89PNG"):
            with Image.open(path) as image:
                return image.info.get(PNG_KEY) == MARK
        if head.startswith(TIFF_MAGIC):
            with tifffile.TiffFile(path) as tiff:
                return tiff.pages.first.software == MARK
        if head.startswith(b"PK\x03\x04"):  # a zip: TorchScript, or a torch.save checkpoint (never marked)
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith(f"/extra/{MARK_KEY}") and archive.read(name) == MARK.encode()
                           for name in archive.namelist())
        if head.startswith(b"\x93NUMPY"):
            return is_probability_map(path)
        if start.startswith(b"{"):
            with open(path, encoding="utf-8") as f:
                value = json.load(f)
            return isinstance(value, dict) and (value.get(MARK_KEY) == MARK or EVAL_JSON_KEYS <= value.keys())
        if start.lower().startswith(b"<!doctype html"):
            with open(path, encoding="utf-8", errors="replace") as f:
                return HTML_MARK in f.read(4096)
        if Path(path).suffix.lower() == ".onnx":
            return is_own_onnx(path)
    except (OSError, ValueError, zipfile.BadZipFile, Image.DecompressionBombError, tifffile.TiffFileError):
        return False
    return False


def is_probability_map(path):
    """A .npy file has no room for a mark: a float16 K x H x W array, the form predict.py --probs writes, is
    taken as one of ours."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
    return dtype == np.float16 and len(shape) == 3


def is_own_onnx(path):
    """An ONNX file with the mark (export.py writes its metadata as JSON), or with the metadata export.py wrote
    before it marked its files."""
    try:
        import onnx
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not installed, or not an ONNX file: protobuf raises several kinds
        return False
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    return metadata.get(MARK_KEY) == json.dumps(MARK) or {"classes", "mask_values", "normalize"} <= metadata.keys()


@dataclass(frozen=True)
class Planned:
    """An output file to be written: its path, the flag that chose it, and the input it is made from (if any)."""
    path: Path
    flag: str | None = None
    source: Path | None = None

    def __str__(self):
        named = f"{self.flag} '{self.path}'" if self.flag else f"'{self.path}'"
        return f"{named} (the output of '{self.source}')" if self.source else named


def file_id(path):
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def kind_of(path):
    """What a foreign file is, for the message that refuses to replace it."""
    suffix = path.suffix.lower()
    if suffix in CHECKPOINT_SUFFIXES:
        return "a checkpoint"
    return "an image or mask" if suffix in IMAGE_EXTENSIONS else "a file"


def check_outputs(planned, inputs=(), fix="choose another output"):
    """Before any work: every planned output (Planned) can be written, no two share a file, none is an input, and
    none replaces a file this tool did not write. `fix` says how to name other outputs. ConfigError otherwise."""
    sources = {}
    for source in inputs:
        if os.path.exists(source):
            sources.setdefault(file_id(source), source)
    owners = {}
    for output in planned:
        path = Path(output.path)
        if path.is_dir():
            raise ConfigError(f"{output} is a folder; name a file")
        key = file_id(path) if path.exists() else path.resolve()
        if key in owners:
            raise ConfigError(f"{owners[key]} and {output} would both be written to one file; {fix}")
        owners[key] = output
        if key in sources:
            raise ConfigError(f"{output} would overwrite the input '{sources[key]}'; {fix}")
        if path.exists() and not is_own_output(path):
            raise ConfigError(f"{output} is {kind_of(path)} that this tool did not write, and it is never replaced; "
                              f"{fix}, or delete the file yourself")
    folders = {Path(output.path).parent: output.flag for output in planned}
    for folder, flag in folders.items():  # made only once every output passed
        check_folder(folder, flag or "-o")  # no flag: predict.py's outputs beside their inputs, moved by -o


def check_folder_outputs(folder, flag, paths=None):
    """Before any work: the files of `folder` that `flag` may write over (`paths`, or every .png and .tif file
    there: eval.py's label images, drawing.mask_suffix) were all written by this tool. ConfigError naming the first
    foreign one otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    candidates = paths if paths is not None else sorted([*folder.glob("*.png"), *folder.glob("*.tif")])
    foreign = [path for path in candidates if path.is_file() and not is_own_output(path)]
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise ConfigError(f"{flag} '{folder}' holds '{foreign[0].name}'{more}, which this tool did not write and "
                          f"never replaces; give {flag} a folder of its own (a new one, or one it wrote before)")
