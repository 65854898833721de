"""Reading image and mask files: EXIF orientation, any bit depth and colour mode to 8-bit RGB, masks as the raw
values they hold (palette indices, grey ids, SBD .mat files)."""
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from errors import DatasetError, ImageReadError

EXIF_ORIENTATION = 0x0112
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm")


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
    try:
        with Image.open(path) as image:
            size = image.size
            if scale < 1:
                image.draft("RGB", scaled_size(size, scale))
            turned = image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
            image = upright(image)
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                # 16-bit and float pixels: scale the range to 8 bits instead of clipping it.
                pixels = np.asarray(image, dtype=np.float32)
                top = 65535.0 if pixels.max() > 255 else 255.0
                image = Image.fromarray((pixels * (255.0 / top)).clip(0, 255).astype(np.uint8))
            image = image if image.mode == "RGB" else image.convert("RGB")
            size = size[::-1] if turned else size
            target = scaled_size(size, scale)
            if image.size != target:
                image = image.resize(target, Image.BILINEAR)
            image.load()
    except FileNotFoundError:
        raise ImageReadError(f"'{path}' does not exist") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"'{path}' is not an image file that PIL can read") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(f"'{path}' could not be decoded, the file may be corrupt ({e})") from None
    return image, size


def to_tensor(image):
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def read_image(path):
    """Any image file -> uint8 RGB tensor 3xHxW: EXIF orientation applied; grey, RGBA and 16-bit converted."""
    return to_tensor(open_image(path)[0])


def image_size(path):
    """(width, height) of the upright image, from its header alone."""
    try:
        with Image.open(path) as image:
            turned = image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
            return image.size[::-1] if turned else image.size
    except FileNotFoundError:
        raise ImageReadError(f"'{path}' does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ImageReadError(f"'{path}' is not an image file that PIL can read") from None


def open_mask(path):
    """Mask file -> PIL image of its raw values: palette indices, grey ids, 0/255, 16-bit ids, or SBD's
    GTcls.Segmentation from a MATLAB .mat file."""
    try:
        if path.suffix == ".mat":
            import scipy.io  # only SBD needs it

            segmentation = scipy.io.loadmat(path, variable_names=["GTcls"])["GTcls"][0, 0]["Segmentation"]
            return Image.fromarray(np.ascontiguousarray(segmentation, dtype=np.uint8))
        with Image.open(path) as mask:
            mask = upright(mask)
            if mask.mode in ("RGB", "RGBA", "LA"):
                channels = np.asarray(mask)[..., :3 if mask.mode != "LA" else 1]
                if (channels != channels[..., :1]).any():
                    raise DatasetError(f"mask '{path}' holds colours; save class ids as a palette or grey PNG")
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


def mask_values_of(path):
    """(width, height) and the sorted distinct values of one mask file."""
    mask = open_mask(path)
    return mask.size, np.unique(np.asarray(mask)).tolist()

