"""Reading image and mask files: EXIF orientation; images as 8-bit RGB (photos, and every image of a model
trained before image forms existed), 8-bit grey, or as they are (any channel count and bit depth, multi-band and
multi-page TIFF through tifffile); masks as the raw values they hold (palette indices, grey ids, SBD .mat files).

An image's form is (channels, dtype), e.g. (1, "uint16") or (5, "float32"); the form None stands for 8-bit RGB,
into which grey, palette and RGBA files are converted as they always were."""
import functools
import os
from contextlib import contextmanager
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from errors import ColourMaskError, DatasetError, ImageReadError

EXIF_ORIENTATION = 0x0112
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm")
# The largest value of PIL's high-bit-depth modes (PIL reads 16-bit PNGs as I;16, or I in older versions).
FORMAT_RANGE = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I": 65535.0, "F": 1.0}
GREY = (1, "uint8")
COLOUR = (3, "uint8")
# The form of each PIL mode that is not colour (every other mode is converted to RGB, losing nothing of 8-bit data).
PIL_FORMS = {"1": GREY, "L": GREY, "LA": GREY, "La": GREY, "I;16": (1, "uint16"), "I;16L": (1, "uint16"),
             "I;16B": (1, "uint16"), "I;16N": (1, "uint16"), "I": (1, "int32"), "F": (1, "float32")}
TIFF_SUFFIXES = (".tif", ".tiff")


def scaled_size(size, scale):
    """Each side of `size` (width, height or height, width) times `scale`, rounded, at least 1."""
    return tuple(max(1, round(side * scale)) for side in size)


def upright(image):
    """Apply the EXIF orientation only when there is one (exif_transpose would copy every image)."""
    return ImageOps.exif_transpose(image) if image.getexif().get(EXIF_ORIENTATION, 1) != 1 else image


def upright_size(image):
    """(width, height) of a PIL image once turned upright by its EXIF orientation (before any draft)."""
    turned = image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)  # transposed
    return image.size[::-1] if turned else image.size


def describe_form(form):
    """'8-bit RGB' for the form None, else e.g. '5-channel uint16'."""
    return "8-bit RGB" if form is None else f"{form[0]}-channel {form[1]}"


def wrong_form(path, found, wanted):
    return DatasetError(f"'{path}' is a {describe_form(found)} image but the model takes {describe_form(wanted)} "
                        f"images (the form of the data it was trained on); give it images of that form")


def tiff_header(path):
    """(form, (width, height) upright, whether PIL reads the file as it is: one page of 8-bit grey or RGB) of a
    TIFF, from its header. Training reads each file many times, and tifffile's parse of an ImageJ header alone
    takes longer than decoding a 1024x1024 grey image, so the answer is kept while the file is unchanged."""
    with decoding(path):
        stat = os.stat(path)
    return parsed_tiff_header(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=65536)
def parsed_tiff_header(path, modified_ns, size):
    with decoding(path), tifffile.TiffFile(path) as tiff:
        series, pages = tiff.series[0], len(tiff.pages)
        height, width = series.shape[series.axes.index("Y")], series.shape[series.axes.index("X")]
        turned = tiff.pages[0].tags.valueof(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    form = (int(np.prod(series.shape)) // (height * width), series.dtype.name)
    return form, ((height, width) if turned else (width, height)), pages == 1 and form in (GREY, COLOUR)


def is_tiff(path):
    return str(path).lower().endswith(TIFF_SUFFIXES)


def read_tiff(path):
    """Every band and page of a TIFF as a C x H x W array of its own dtype, upright (its Orientation tag)."""
    with decoding(path), tifffile.TiffFile(path) as tiff:
        series = tiff.series[0]
        array, axes = series.asarray(), series.axes
        orientation = tiff.pages[0].tags.valueof(EXIF_ORIENTATION, 1)
    array = np.moveaxis(array, [axes.index("Y"), axes.index("X")], [-2, -1])
    return orient(array.reshape(-1, *array.shape[-2:]), orientation)


def is_deep_colour_png(path):
    """A PNG of 16-bit RGB or RGBA, which PIL reads as 8-bit RGB (its low bits lost): bit depth 16, colour type
    2 or 6 in the header."""
    if not str(path).lower().endswith(".png"):
        return False
    with open(path, "rb") as f:
        header = f.read(26)
    return header[:8] == b"\x89PNG\r\n\x1a\n" and header[24] == 16 and header[25] in (2, 6)


def read_deep_colour_png(path):
    """A 16-bit RGB(A) PNG as the 3 x H x W uint16 array of its colour bands (alpha dropped, as for 8-bit RGBA)."""
    with decoding(path):
        array = imagecodecs.png_decode(Path(path).read_bytes())
    return np.moveaxis(array[..., :3], -1, 0)


def reads_past_pil(path):
    """Files whose values PIL cannot give as they are: multi-band or deep TIFFs, and 16-bit colour PNGs."""
    return (is_tiff(path) and not tiff_header(path)[2]) or is_deep_colour_png(path)


def read_past_pil(path):
    return read_tiff(path) if is_tiff(path) else read_deep_colour_png(path)


def orient(array, orientation):
    """A C x H x W array turned upright as PIL's exif_transpose turns an image with this EXIF orientation."""
    if orientation in (5, 6, 7, 8):  # transposed: the stored rows are the upright image's columns
        array = array.transpose(0, 2, 1)
        orientation = {5: 1, 6: 2, 7: 3, 8: 4}[orientation]
    flips = {2: (-1,), 3: (-2, -1), 4: (-2,)}.get(orientation, ())
    return np.flip(array, flips) if flips else array


def read_pixels(path):
    """Any image file -> (C x H x W array of its values, in its own dtype, upright; its form). Grey files give one
    channel, colour files (palette, RGBA, CMYK...) three 8-bit ones; TIFFs every band and page (tifffile).
    Float images with NaN or infinite values are refused, naming the file."""
    if reads_past_pil(path):
        pixels = read_past_pil(path)
    else:
        with decoding(path), Image.open(path) as image:
            image = upright(image)
            if image.mode in PIL_FORMS:
                pixels = np.asarray(image.getchannel(0) if image.mode in ("LA", "La") else
                                    image.convert("L") if image.mode == "1" else image)[None]
            else:
                pixels = np.moveaxis(np.asarray(image.convert("RGB")), -1, 0)
    pixels = pixels.astype(pixels.dtype.newbyteorder("="), copy=False)  # big-endian 16-bit files
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
        raise ImageReadError(f"'{path}' holds NaN or infinite pixel values; replace them with numbers (e.g. "
                             f"numpy.nan_to_num) and save it again")
    return pixels, (pixels.shape[0], pixels.dtype.name)


class Bands:
    """An image of any channel count and bit depth as one PIL float32 ('F') image per channel, so that the PIL
    resampling that augmentation uses on 8-bit images (antialiased resize of a box, affine transforms) applies to
    it, channel by channel, unchanged."""

    def __init__(self, layers):
        self.layers = layers

    @property
    def size(self):
        return self.layers[0].size

    @property
    def width(self):
        return self.layers[0].width

    @property
    def height(self):
        return self.layers[0].height

    def resize(self, *args, **kwargs):
        return Bands([layer.resize(*args, **kwargs) for layer in self.layers])

    def transform(self, *args, **kwargs):
        return Bands([layer.transform(*args, **kwargs) for layer in self.layers])

    def array(self):
        return np.stack([np.asarray(layer) for layer in self.layers])


def open_bands(path, scale, form):
    """(Bands of the image's raw values resized by `scale`, (width, height) of the upright file) for an image of
    `form` (DatasetError naming the file for another form)."""
    pixels, found = read_pixels(path)
    if found != form:
        raise wrong_form(path, found, form)
    size = pixels.shape[:0:-1]
    bands = Bands([Image.fromarray(band.astype(np.float32, copy=False)) for band in pixels])
    target = scaled_size(size, scale)
    return (bands.resize(target, Image.BILINEAR) if target != size else bands), size


def open_image(path, scale=1.0, form=None):
    """Image file -> (decoded image resized by `scale`, (width, height) of the upright file): a PIL RGB image for the
    form None (8-bit RGB: grey, RGBA and 16-bit files converted), a PIL L image for GREY, else Bands of the raw
    values (open_bands). A file of another form is a DatasetError naming it.

    JPEGs are decoded straight at 1/2, 1/4 or 1/8 size when `scale` allows (PIL draft mode), which makes
    large photos several times cheaper to load. EXIF orientation is applied."""
    if form is not None and tuple(form) != GREY:
        return open_bands(path, scale, tuple(form))
    if is_tiff(path):
        found, _, pil_reads = tiff_header(path)
        if not pil_reads and (form is not None or found[0] not in (1, 3)):  # PIL would cut the bands or pages
            raise wrong_form(path, found, form)
    mode = "RGB" if form is None else "L"
    with decoding(path), Image.open(path) as image:
        if form is not None and PIL_FORMS.get(image.mode, COLOUR) != GREY:
            raise wrong_form(path, PIL_FORMS.get(image.mode, COLOUR), GREY)
        size = upright_size(image)
        if scale < 1:
            image.draft(mode, scaled_size(image.size, scale))
        image = upright(image)
        if image.mode in FORMAT_RANGE:
            # Scaled by the range of the format, never by the image's own values: every image of a set
            # then keeps the same brightness (16-bit PNG and TIFF: 0..65535; float TIFF: 0..1).
            pixels = np.asarray(image, dtype=np.float32)
            image = Image.fromarray((pixels * (255.0 / FORMAT_RANGE[image.mode])).clip(0, 255).round()
                                    .astype(np.uint8))
        image = image if image.mode == mode else image.convert(mode)
        target = scaled_size(size, scale)
        if image.size != target:
            image = image.resize(target, Image.BILINEAR)
        image.load()
    return image, size


@contextmanager
def decoding(path):
    """PIL's and tifffile's many errors for a missing, foreign, corrupt or truncated file, as one ImageReadError
    naming it."""
    try:
        yield
    except FileNotFoundError:
        raise ImageReadError(f"'{path}' does not exist") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"'{path}' is not an image file that PIL can read") from None
    except Image.DecompressionBombError as e:  # a header that claims more pixels than memory could hold
        raise ImageReadError(f"'{path}' is refused: {str(e).rstrip('.')}") from None
    except (OSError, ValueError, SyntaxError, KeyError, IndexError) as e:
        if "imagecodecs" in str(e):
            raise ImageReadError(f"'{path}' is compressed in a way that tifffile decodes only with the imagecodecs "
                                 f"package: pip install imagecodecs, or save it uncompressed or with zlib") from None
        raise ImageReadError(f"'{path}' could not be decoded, the file may be corrupt or truncated ({e})") from None


def to_tensor(image):
    """A decoded image (PIL RGB or L, or Bands) -> C x H x W tensor: uint8 for PIL images, float32 for Bands."""
    if isinstance(image, Bands):
        return torch.from_numpy(image.array())
    array = np.array(image)
    return torch.from_numpy(array).permute(2, 0, 1) if array.ndim == 3 else torch.from_numpy(array)[None]


def read_image(path, form=None):
    """Any image file -> C x H x W tensor of `form` (open_image), upright, at the file's size."""
    return to_tensor(open_image(path, form=form)[0])


def checked_image_size(path):
    """((width, height) of the upright image, its form), after decoding all of it (at 1/8 size for 8-bit JPEGs,
    which is cheap but still reads every byte): a truncated or corrupt file, or a float image with NaN, fails here,
    not in the middle of training."""
    if reads_past_pil(path):
        pixels, form = read_pixels(path)
        return pixels.shape[:0:-1], form
    with decoding(path), Image.open(path) as image:
        size = upright_size(image)
        form = PIL_FORMS.get(image.mode, COLOUR)
        if form[1] != "float32":
            image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
            return size, form
    return size, read_pixels(path)[1]


def open_mask(path, colours=False):
    """Mask file -> PIL image of its raw values: palette indices, grey ids, 0/255, 16-bit ids, or SBD's
    GTcls.Segmentation from a MATLAB .mat file. With `colours` (colour-coded masks) every pixel's RGB colour,
    packed as one int 0xRRGGBB (pack_colours) in a mode "I" image. Without it, a mask whose pixels hold colours
    raises ColourMaskError."""
    try:
        if path.suffix == ".mat":
            import scipy.io  # only SBD needs it

            segmentation = scipy.io.loadmat(path, variable_names=["GTcls"])["GTcls"][0, 0]["Segmentation"]
            return Image.fromarray(np.ascontiguousarray(segmentation, dtype=np.uint8))
        with Image.open(path) as mask:
            mask = upright(mask)
            if colours:
                return Image.fromarray(pack_colours(np.asarray(mask.convert("RGB"))))
            if mask.mode in ("RGB", "RGBA", "LA"):
                channels = np.asarray(mask)[..., :3 if mask.mode != "LA" else 1]
                if (channels != channels[..., :1]).any():
                    raise ColourMaskError(f"mask '{path}' holds colours, but these masks are read as class values; "
                                          f"score colour-coded masks with a model trained on them (or give their "
                                          f"colours with --mask-colors FILE), or save class ids as a palette or "
                                          f"grey PNG")
                return Image.fromarray(np.ascontiguousarray(channels[..., 0]))
            mask.load()
            return mask.convert("L") if mask.mode == "1" else mask
    except FileNotFoundError:
        raise ImageReadError(f"mask '{path}' does not exist") from None
    except DatasetError:
        raise
    except Exception as e:  # PIL and scipy raise many kinds for a corrupt file
        raise ImageReadError(f"mask '{path}' could not be read, the file may be corrupt "
                             f"({type(e).__name__}: {e})") from None


def pack_colours(rgb):
    """HxWx3 uint8 colours -> HxW int32 0xRRGGBB: one value per colour, so colours are counted and looked up as
    mask values are."""
    rgb = rgb.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def packed_colour(colour):
    """[R, G, B] -> 0xRRGGBB."""
    red, green, blue = (int(c) for c in colour)
    return (red << 16) | (green << 8) | blue


def unpacked_colour(value):
    """0xRRGGBB -> [R, G, B]."""
    return [(value >> 16) & 255, (value >> 8) & 255, value & 255]


def mask_values_of(path, colours=False):
    """(width, height) of one mask file, and {value: pixel count} of the values (or packed colours) it holds."""
    mask = open_mask(path, colours)
    values, counts = np.unique(np.asarray(mask), return_counts=True)
    return mask.size, dict(zip(values.tolist(), counts.tolist()))


def header_size(path):
    """(width, height) of the upright image, from the file's header alone (nothing decoded; tifffile's for a TIFF,
    PIL's else)."""
    if is_tiff(path):
        return tiff_header(path)[1]
    with decoding(path), Image.open(path) as image:
        return upright_size(image)
