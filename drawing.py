"""Pictures: the class palette, label images, overlays, sample grids, training curves and the confusion matrix."""
import json

import numpy as np
import torch
from PIL import Image, ImageDraw

from bigtiff import WINDOW_PIXELS, WRITE_TILE, write_by_rows
from images import is_tiff
from metrics import IGNORE_INDEX
from outputs import MARK, PNG_KEY, save_png
from utils import replaced_atomically


# Label images of this many pixels or more are written as BigTIFF: the size above which TIFFs are read by windows
# (64 M), below PIL's own limits (a warning at 89 M pixels, DecompressionBombError at 179 M), and a PNG is encoded
# from the whole image at once.
TIFF_MASK_PIXELS = WINDOW_PIXELS


def voc_palette(num_colors=256):
    """The Pascal VOC colour map: class i gets the colour made from the bits of i (three bits a round, the first
    round in the high bits), so that any number of classes (up to 2^24) get distinct colours."""
    index = np.arange(num_colors)
    palette = np.zeros((num_colors, 3), dtype=np.uint8)
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= (((index >> (3 * bit + channel)) & 1) << (7 - bit)).astype(np.uint8)
    return palette


def plot_confusion_matrix(matrix, classes, path):
    """Save the confusion matrix with rows normalised to 1 (each row: where that true class went)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix, dtype=np.float64)
    rows = matrix.sum(1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    n = len(classes)
    size = max(4.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xticks(range(n), classes, rotation=90)
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if normalised[i, j] >= 0.005:
                    ax.text(j, i, f"{normalised[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if normalised[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={PNG_KEY: MARK})
    plt.close(fig)


def mask_pixels(labels, mask_values):
    """Class map (ints, any shape) -> the pixels of the data's mask format, which images.open_mask reads back as
    the mask values: each class's colour (an extra axis of 3) for colour-coded masks (mask values [R, G, B]), 0/255
    for two classes, else the mask values (uint8, or uint16 when a value is larger than 255: 16-bit id masks). The
    one place where labels become mask pixels."""
    labels = np.asarray(labels)
    if np.ndim(mask_values) == 2:
        return np.asarray(mask_values, dtype=np.uint8)[labels]
    if len(mask_values) <= 2:
        return (labels > 0).astype(np.uint8) * 255
    values = np.asarray(mask_values)
    return values.astype(np.uint16 if values.max() > 255 else np.uint8)[labels]  # no int64 copy of a huge map


def label_image(labels, mask_values):
    """Class map (HxW ints) -> PIL image of its mask pixels (mask_pixels): RGB, 0/255 grey, a 16-bit grey PNG, or
    the mask values up to 255 in a VOC-palette PNG."""
    pixels = mask_pixels(labels, mask_values)
    image = Image.fromarray(pixels)  # mode I;16 for uint16: a 16-bit grey PNG
    if np.ndim(mask_values) == 1 and len(mask_values) > 2 and pixels.dtype == np.uint8:
        image.putpalette(voc_palette().flatten().tolist())  # turns the greyscale image into mode P
    return image


def is_huge(pixels):
    """Whether an image of `pixels` pixels gets a BigTIFF label image (mask_suffix) and no overlay or side-by-side
    picture: one of that size could not be viewed, and drawing it would take several copies of the image."""
    return pixels >= TIFF_MASK_PIXELS


def mask_suffix(pixels):
    """The label image file of an image of `pixels` pixels: .tif (a BigTIFF written by rows) when huge, else .png."""
    return ".tif" if is_huge(pixels) else ".png"


def write_label_tiff(path, size, label_bands, classes, mask_values):
    """The label image of an image of `size` (H, W) as a BigTIFF of its mask pixels (mask_pixels) at `path`, from
    `label_bands`, its class maps (rows x W) top to bottom, each written as it comes (bigtiff.write_by_rows). Its
    ImageDescription says which pixel value each class has, as JSON."""
    key = mask_pixels(np.arange(len(classes))[None], mask_values)  # each class's pixel: the file's dtype and samples
    description = json.dumps({"classes": list(classes), "pixel_values": key[0].tolist()})
    write_by_rows(path, (*size, *key.shape[2:]), key.dtype,
                  (mask_pixels(band, mask_values) for band in label_bands), description)


def write_label_file(labels, path, classes, mask_values):
    """The label image of `labels` (H x W class indices) at `path`, with the mark: a BigTIFF written a few rows at a
    time for a .tif path (write_label_tiff), else a PNG (label_image)."""
    if is_tiff(path):
        bands = (labels[top:top + WRITE_TILE] for top in range(0, len(labels), WRITE_TILE))
        write_label_tiff(path, labels.shape, bands, classes, mask_values)
    else:
        save_png(label_image(labels, mask_values), path)


def write_pictures(image, labels, classes, mask_values, label_path=None, overlay_path=None, viz_path=None):
    """eval.py's and predict.py's pictures of one prediction, each written (with the mark, outputs.save_png) when
    its path is given: the label image (write_label_file: a PNG, or a BigTIFF for a .tif path), the overlay with its
    key, and image | labels with its key. `image` uint8 3xHxW tensor, `labels` HxW class indices (numpy)."""
    if label_path:
        write_label_file(labels, label_path, classes, mask_values)
    photo = image.permute(1, 2, 0).numpy() if overlay_path or viz_path else None  # image None: labels only
    if overlay_path:
        save_png(with_key(overlay_image(photo, labels, mask_values), labels, classes, mask_values), overlay_path)
    if viz_path:
        save_png(viz_picture(photo, labels, classes, mask_values), viz_path)


def viz_picture(photo, labels, classes, mask_values):
    """Image (HxWx3 uint8) | its labels in their class colours, with the key of the classes below."""
    return with_key(side_by_side(photo, labels, mask_values), labels, classes, mask_values)


def plot_curves(history, path, metric="miou"):
    """Training loss, the validation score and pixel accuracy against the epoch, one panel each, as a PNG."""
    import matplotlib  # imported here: eval.py and predict.py need no plotting
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    # "score" is the --metric's value (miou, or the Dice that picks best.pth: foreground or mean)
    panels = [("train_loss", "training loss"), ("score", f"validation {'mIoU' if metric == 'miou' else 'Dice'}"),
              ("pixel_acc", "validation pixel accuracy")]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), layout="constrained")
    for ax, (key, title) in zip(axes, panels):
        ax.plot(epochs, [row[key] for row in history], marker="o", markersize=3)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    with replaced_atomically(path) as f:  # curves.png is rewritten each epoch: never half-written
        figure.savefig(f, format="png", dpi=100, metadata={PNG_KEY: MARK})
    plt.close(figure)


VOID_COLOUR = (255, 255, 255)  # void truth pixels: white, which no class colour is (voc_palette's channels <= 252
# for mask values below 65536)
MIN_PANEL = 160  # sample-grid panels are enlarged (whole factors, nearest) to at least this width


def sample_grid(images, truths, predictions, classes, mask_values, grey_void=False):
    """One row per image under the headings image | truth | prediction, then a key of the classes shown.
    Classes in their colours (class_colours), void truth pixels in VOID_COLOUR (and, with `grey_void`, for
    data with regions of interest, greyed in the image); small images enlarged so that the grid can be read.
    Images uint8 3xHxW, label maps HxW (class indices); returns a PIL image."""
    colours = colour_table(mask_values)
    factor = max(1, -(-MIN_PANEL // max(image.shape[-1] for image in images)))
    rows, shown = [], set()
    for image, truth, prediction in zip(images, truths, predictions):
        image = greyed(image, truth == IGNORE_INDEX) if grey_void else image
        panels = [image.permute(1, 2, 0).numpy(), colours[truth.numpy()], colours[prediction.numpy()]]
        rows.append(np.concatenate(panels, axis=1).repeat(factor, 0).repeat(factor, 1))
        shown |= set(truth.unique().tolist()) | set(prediction.unique().tolist())
    width = max(row.shape[1] for row in rows)
    rows = [np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0)), constant_values=255) for row in rows]
    panel = images[0].shape[-1] * factor
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    headed = stack_vertically(text_strip(["image", "truth", "prediction"], panel, width), grid)
    return stack_vertically(headed, colour_key(classes, colours, sorted(shown), width))


def font(size):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: its fixed bitmap font
        return ImageFont.load_default()


def text_strip(titles, column_width, width):
    """A white strip with one centred title per column."""
    size = max(12, min(28, column_width // 8))
    strip = Image.new("RGB", (width, size * 2), "white")
    draw = ImageDraw.Draw(strip)
    for i, title in enumerate(titles):
        draw.text((column_width * (i + 0.5), size), title, fill="black", font=font(size), anchor="mm")
    return strip


def colour_key(classes, colours, shown, width):
    """A white strip with a swatch and the name of each class index in `shown` (void too), wrapped to `width`."""
    size = max(12, min(28, width // 50))
    entries = [("void" if i == IGNORE_INDEX else classes[i], tuple(int(c) for c in colours[i])) for i in shown]
    letters = font(size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines, x = [[]], size // 2
    for name, colour in entries:
        advance = size * 2 + int(measure.textlength(name, font=letters)) + size
        if lines[-1] and x + advance > width:
            lines.append([])
            x = size // 2
        lines[-1].append((x, name, colour))
        x += advance
    strip = Image.new("RGB", (width, len(lines) * size * 2), "white")
    draw = ImageDraw.Draw(strip)
    for row, line in enumerate(lines):
        top = row * size * 2 + size // 2
        for x, name, colour in line:
            draw.rectangle([x, top, x + size, top + size], fill=colour, outline="black")
            draw.text((x + size * 3 // 2, top + size // 2), name, fill="black", font=letters, anchor="lm")
    return strip


def stack_vertically(top, bottom):
    both = Image.new("RGB", (max(top.width, bottom.width), top.height + bottom.height), "white")
    both.paste(top, (0, 0))
    both.paste(bottom, (0, top.height))
    return both


def with_key(picture, labels, classes, mask_values):
    """`picture` (an overlay or image | mask) with, below it, the key of the classes found in `labels`."""
    shown = np.unique(labels).tolist()
    return stack_vertically(picture.convert("RGB"), colour_key(classes, class_colours(mask_values), shown,
                                                               picture.width))


def colour_table(mask_values):
    """Class index (0..255) -> RGB: each class's colour (class_colours), void pixels in VOID_COLOUR."""
    table = np.zeros((256, 3), dtype=np.uint8)
    colours = class_colours(mask_values)
    table[:len(colours)] = colours
    table[IGNORE_INDEX] = VOID_COLOUR
    return table


def class_colours(mask_values):
    """RGB colour of each class: its own colour in colour-coded masks, else its mask value's VOC colour (any
    value), or VOC class 1 (dark red) for the binary foreground."""
    if np.ndim(mask_values) == 2:
        return np.asarray(mask_values, dtype=np.uint8)
    values = np.asarray(mask_values) if len(mask_values) > 2 else np.arange(2)
    return voc_palette(int(values.max()) + 1)[values]


def greyed(image, outside):
    """The image (uint8 3xHxW tensor) with the pixels `outside` (HxW bool) turned to a faded grey: the pixels
    outside a region of interest, which are not scored."""
    grey = (image.float().mean(0) * 0.5 + 64).to(torch.uint8)
    return torch.where(outside, grey, image)


def overlay_image(image, labels, mask_values, alpha=0.5):
    """The image (HxWx3 uint8) with every non-background pixel tinted by its class colour."""
    photo = Image.fromarray(image)
    colours = Image.fromarray(class_colours(mask_values)[labels])
    return Image.composite(Image.blend(photo, colours, alpha), photo, Image.fromarray(labels != 0))


def side_by_side(image, labels, mask_values):
    """Image (HxWx3 uint8) | its labels (HxW class indices) in their class colours, in one RGB image."""
    height, width = image.shape[:2]
    both = Image.new("RGB", (2 * width, height))
    both.paste(Image.fromarray(image), (0, 0))
    both.paste(Image.fromarray(class_colours(mask_values)[labels]), (width, 0))
    return both


def viewable(image, normalize):
    """An image as the model reads it (C x H x W) -> uint8 3 x H x W to draw: 8-bit RGB as it is; any other form
    (image_stats) its first channel in grey, the training set's range of it (normalize's low to high) stretched
    over 0..255."""
    if image.shape[0] == 3 and image.dtype == torch.uint8:
        return image
    low, high = (normalize["low"][0], normalize["high"][0]) if "low" in normalize else (0.0, 255.0)
    grey = ((image[0].float() - low) * (255 / max(high - low, 1e-12))).clamp(0, 255).round().to(torch.uint8)
    return grey.expand(3, -1, -1)
