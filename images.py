"""Reading image and mask files: EXIF orientation, any bit depth and colour mode to 8-bit RGB, masks as the raw
values they hold (palette indices, grey ids, SBD .mat files)."""
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from errors import ColourMaskError, DatasetError, ImageReadError

EXIF_ORIENTATION = 0x0112
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm")
# The largest value of PIL's high-bit-depth modes (PIL reads 16-bit PNGs as I;16, or I in older versions).
FORMAT_RANGE = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I": 65535.0, "F": 1.0}


def scaled_size(size, scale):
    """Each side of `size` (width, height or height, width) times `scale`, rounded, at least 1."""
    return tuple(max(1, round(side * scale)) for side in size)


def upright(image):
    """Apply the EXIF orientation only when there is one (exif_transpose would copy every image)."""
    return ImageOps.exif_transpose(image) if image.getexif().get(EXIF_ORIENTATION, 1) != 1 else image


def open_image(path, scale=1.0):
    """Image file -> (decoded RGB PIL image resized by `scale`, (width, height) of the upright file).

    JPEGs are decoded straight at 1/2, 1/4 or 1/8 size when `scale` allows (PIL draft mode), which makes
    large photos several times cheaper to load. EXIF orientation is applied; grey, RGBA and 16-bit converted."""
    with decoding(path), Image.open(path) as image:
        size = image.size
        if scale < 1:
            image.draft("RGB", scaled_size(size, scale))
        turned = image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
        image = upright(image)
        if image.mode in FORMAT_RANGE:
            # Scaled by the range of the format, never by the image's own values: every image of a set
            # then keeps the same brightness (16-bit PNG and TIFF: 0..65535; float TIFF: 0..1).
            pixels = np.asarray(image, dtype=np.float32)
            image = Image.fromarray((pixels * (255.0 / FORMAT_RANGE[image.mode])).clip(0, 255).round()
                                    .astype(np.uint8))
        image = image if image.mode == "RGB" else image.convert("RGB")
        size = size[::-1] if turned else size
        target = scaled_size(size, scale)
        if image.size != target:
            image = image.resize(target, Image.BILINEAR)
        image.load()
    return image, size


@contextmanager
def decoding(path):
    """PIL's many errors for a missing, foreign, corrupt or truncated file, as one ImageReadError naming it."""
    try:
        yield
    except FileNotFoundError:
        raise ImageReadError(f"'{path}' does not exist") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"'{path}' is not an image file that PIL can read") from None
    except Image.DecompressionBombError as e:  # a header that claims more pixels than memory could hold
        raise ImageReadError(f"'{path}' is refused: {str(e).rstrip('.')}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(f"'{path}' could not be decoded, the file may be corrupt or truncated ({e})") from None


def to_tensor(image):
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def read_image(path):
    """Any image file -> uint8 RGB tensor 3xHxW: EXIF orientation applied; grey, RGBA and 16-bit converted."""
    return to_tensor(open_image(path)[0])


def checked_image_size(path):
    """(width, height) of the upright image, after decoding all of it (at 1/8 size for JPEGs, which is cheap but
    still reads every byte): a truncated or corrupt file fails here, not in the middle of training."""
    with decoding(path), Image.open(path) as image:
        turned = image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
        size = image.size[::-1] if turned else image.size
        image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
        image.load()
        return size


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
    """(width, height) of the upright image, from the file's header alone (nothing decoded)."""
    with decoding(path), Image.open(path) as image:
        turned = image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
        return image.size[::-1] if turned else image.size
