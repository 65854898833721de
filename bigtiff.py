"""Images larger than memory: striped or tiled TIFF and BigTIFF files read by windows of rows, through tifffile,
decoding only the strips or tiles under the rows asked for, and written by rows (write_by_rows), a row of tiles at a
time. predict.py segments such an image band by band (inference.sliding_window_bands) and writes its labels as
they are final, so that it never holds the whole image nor its labels."""
import math

import numpy as np
import tifffile
import torch

from images import is_tiff
from outputs import MARK
from utils import replaced_atomically

WINDOW_PIXELS = 2 ** 26  # TIFFs of more pixels (64 M: 192 MB as RGB) are read by windows when their format allows
WRITE_TILE = 256  # tiles of the TIFFs written: TIFF wants multiples of 16; 64 KB each in uint8


class TiffWindows:
    """An 8-bit grey, RGB or RGBA TIFF (first page, samples interleaved, upright) read by rows: `image[:, y0:y1]`
    is a uint8 3 x rows x W tensor, decoded from the strips or tiles over those rows only; `shape` is (3, H, W),
    as a tensor's. Raises ValueError for a file whose layout asks to be read whole (images.read_image)."""

    def __init__(self, path):
        self.file = tifffile.TiffFile(path)
        try:
            page = self.file.pages.first
            if (page.dtype != np.uint8 or page.samplesperpixel not in (1, 3, 4) or page.imagedepth != 1
                    or (page.samplesperpixel > 1 and page.planarconfig != tifffile.PLANARCONFIG.CONTIG)
                    or page.photometric not in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.RGB)
                    or page.tags.valueof("Orientation", 1) != 1):  # 1: top left, as stored
                raise ValueError(f"{path}: not an upright 8-bit grey or RGB TIFF")
        except Exception:
            self.file.close()
            raise
        self.page = page
        self.shape = (3, page.imagelength, page.imagewidth)
        self.rows_per_segment = page.tilelength if page.is_tiled else page.rowsperstrip
        self.segments_across = math.ceil(page.imagewidth / page.tilewidth) if page.is_tiled else 1

    def rows(self, top, bottom):
        """Rows top .. bottom as a uint8 rows x W x samples array."""
        page, width = self.page, self.shape[2]
        out = np.zeros((bottom - top, width, page.samplesperpixel), np.uint8)
        handle = self.file.filehandle
        for segment_row in range(top // self.rows_per_segment, math.ceil(bottom / self.rows_per_segment)):
            for column in range(self.segments_across):
                index = segment_row * self.segments_across + column
                handle.seek(page.dataoffsets[index])
                data = handle.read(page.databytecounts[index]) if page.databytecounts[index] else None
                segment, (_, _, y, x, _), _ = page.decode(data, index, jpegtables=page.jpegtables)
                if segment is None:
                    continue  # an empty segment: zeros
                segment = segment[0]  # depth 1: rows x columns x samples
                first, last = max(top, y), min(bottom, y + segment.shape[0])
                span = min(width - x, segment.shape[1])
                out[first - top:last - top, x:x + span] = segment[first - y:last - y, :span]
        return out

    def __getitem__(self, key):
        channels, rows = key
        if channels != slice(None):
            raise IndexError("TiffWindows gives all channels: image[:, top:bottom]")
        top, bottom, _ = rows.indices(self.shape[1])
        pixels = self.rows(top, bottom)
        pixels = np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels[..., :3]
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def read(self):
        """The whole image as a uint8 3 x H x W tensor."""
        return self[:, :]

    def close(self):
        self.file.close()


def open_windows(path, min_pixels=None):
    """TiffWindows for a TIFF of at least `min_pixels` pixels that can be read by windows; None for any other
    file (read whole, as usual). min_pixels None: WINDOW_PIXELS."""
    if is_tiff(path):
        try:
            windows = TiffWindows(path)
        except (ValueError, OSError, tifffile.TiffFileError):
            return None
        if windows.shape[1] * windows.shape[2] >= (WINDOW_PIXELS if min_pixels is None else min_pixels):
            return windows
        windows.close()
    return None


def tile_rows(bands, rows):
    """Arrays of rows (any heights, top to bottom) regrouped into runs of `rows` rows, the last one shorter where
    the height is not a multiple: each run is yielded as soon as its rows have come."""
    pending = None
    for band in bands:
        pending = band if pending is None or not len(pending) else np.concatenate([pending, band])
        whole = len(pending) // rows * rows
        yield from (pending[top:top + rows] for top in range(0, whole, rows))
        pending = pending[whole:].copy()  # a copy, so that the band it came from is freed
    if pending is not None and len(pending):
        yield pending


def write_by_rows(path, shape, dtype, bands, description=""):
    """Write an image of `shape` (H, W) or (H, W, 3 for RGB) from `bands`, arrays of its rows top to bottom (any
    heights), as a tiled, deflate-compressed BigTIFF with this tool's mark (the Software tag, outputs.MARK), each
    row of tiles encoded as soon as its rows have come: memory holds a band and a row of tiles, never the image.
    Written atomically (utils.replaced_atomically): a failure or Ctrl-C midway leaves `path` as it was."""
    height, width = shape[:2]
    runs, done = tile_rows(bands, WRITE_TILE), 0

    def tiles():
        nonlocal done
        for run in runs:
            done += len(run)
            yield from (run[:, left:left + WRITE_TILE] for left in range(0, width, WRITE_TILE))  # padded by tifffile
        raise ValueError(f"{done} rows for an image of {height}")  # tifffile wants more: its own error names no cause

    with replaced_atomically(path) as f, tifffile.TiffWriter(f, bigtiff=True) as tiff:
        # One encoding thread: tifffile's pool would read ahead up to 256 MB of tiles, most of a large label image.
        tiff.write(tiles(), shape=tuple(shape), dtype=dtype, tile=(WRITE_TILE, WRITE_TILE), compression="zlib",
                   photometric="rgb" if len(shape) == 3 else "minisblack", software=MARK, description=description,
                   metadata=None, maxworkers=1)
        done += sum(len(run) for run in runs)  # rows past the last tile, which tifffile did not ask for
        if done != height:  # a short last row of tiles, which tifffile pads, or rows to spare
            raise ValueError(f"{done} rows for an image of {height}")
