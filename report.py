"""eval.py --report DIR: one self-contained HTML page of an evaluation, DIR/index.html, with its pictures as PNG
files beside it (no server, no network, no external CSS, script or font): the scores, the per-class table, the
confusion matrix, a class colour key, and galleries of the worst and best images by per-image IoU (image | truth
| prediction).

Per-image IoU is the mean IoU over the classes present in that image's truth or prediction (void pixels
skipped), from a confusion matrix of the image alone. Only the gallery's images are kept, as thumbnails, in
`Gallery`: memory does not grow with the size of the set."""
import datetime
import heapq
import html
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from drawing import VOID_COLOUR, colour_table, plot_confusion_matrix
from metrics import SCORE_NAMES, ConfusionMatrix, absent_classes, score_text
from outputs import HTML_MARK, is_own_output, save_png
from utils import replaced_atomically

GALLERY_SIZE = 8  # worst and best images shown, each
THUMBNAIL = 256  # long side of the gallery's pictures, in pixels (smaller images are kept as they are)
PICTURE_NAMES = ("worst_", "best_")  # the gallery's PNG files start so: removed before a report is rewritten


def gallery_pictures(folder):
    """The gallery pictures of an earlier report in `folder`."""
    return sorted(path for path in Path(folder).glob("*.png") if path.name.startswith(PICTURE_NAMES))


def report_files(folder):
    """The files of `folder` that a report writes over or removes: eval.py checks that they are all its own."""
    return [Path(folder) / "index.html", Path(folder) / "confusion.png", *gallery_pictures(folder)]


def image_iou(label, truth, num_classes, ignore_index):
    """Mean IoU of one image over the classes in its truth or prediction (void truth pixels skipped); NaN when
    every true pixel is void. `label` and `truth` are HxW class maps on one device."""
    confusion = ConfusionMatrix(num_classes, ignore_index, label.device)
    confusion.update(label, truth)
    return confusion.compute()["miou"]


def nearest_resize(labels, size):
    """Nearest-neighbour resize of an HxW tensor to size (height, width), on its own device: a thumbnail of a huge
    label map never copies the whole map to the CPU."""
    height, width = labels.shape
    rows = ((torch.arange(size[0], device=labels.device) + 0.5) * height / size[0]).long().clamp_(max=height - 1)
    cols = ((torch.arange(size[1], device=labels.device) + 0.5) * width / size[1]).long().clamp_(max=width - 1)
    return labels[rows][:, cols]


def thumbnail_size(height, width, longest=THUMBNAIL):
    scale = min(1.0, longest / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


@dataclass
class Entry:
    """One image of the gallery: its name, IoU, and thumbnails (image HxWx3 uint8, truth and prediction HxW
    uint8 class maps, 255 void)."""
    name: str
    iou: float
    order: int  # the position of the image in the set: ties of IoU keep the set's order
    image: np.ndarray
    truth: np.ndarray
    prediction: np.ndarray


class Gallery:
    """The `size` worst and `size` best images of a set by per-image IoU, as thumbnails. `add` is eval.segment's
    per-image callback: (image uint8 3xHxW, truth HxW, prediction HxW, name)."""

    def __init__(self, num_classes, ignore_index, size=None, thumbnail=THUMBNAIL):
        self.num_classes, self.ignore_index, self.thumbnail = num_classes, ignore_index, thumbnail
        self.size = GALLERY_SIZE if size is None else size
        self._worst = []  # heap of (-iou, -order, entry): its top is the best of the worst kept
        self._best = []  # heap of (iou, -order, entry): its top is the worst of the best kept
        self._order = itertools.count()
        self.scored = 0  # images with a per-image IoU
        self.all_void = []  # names of images whose true pixels are all void (no IoU)

    def add(self, image, truth, prediction, name):
        iou = image_iou(prediction, truth, self.num_classes, self.ignore_index)
        if math.isnan(iou):
            self.all_void.append(name)
            return
        order = next(self._order)
        self.scored += 1
        enters_worst = len(self._worst) < self.size or iou < -self._worst[0][0]
        enters_best = len(self._best) < self.size or iou > self._best[0][0]
        if not (enters_worst or enters_best):
            return
        entry = self.entry(image, truth, prediction, name, iou, order)
        if enters_worst:
            push_bounded(self._worst, (-iou, -order, entry), self.size)
        if enters_best:
            push_bounded(self._best, (iou, -order, entry), self.size)

    def entry(self, image, truth, prediction, name, iou, order):
        size = thumbnail_size(*truth.shape, self.thumbnail)
        photo = Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy()))
        if photo.size != size[::-1]:
            photo = photo.resize(size[::-1], Image.BILINEAR, reducing_gap=2.0)
        maps = [nearest_resize(m, size).to(torch.uint8).cpu().numpy() for m in (truth, prediction)]
        return Entry(str(name), iou, order, np.asarray(photo), *maps)

    def galleries(self):
        """(worst, best): the worst images by increasing IoU, the best by decreasing IoU. With at most 2 x size
        images scored, the set is split between the two, so that no image is shown twice."""
        worst = sorted((item[2] for item in self._worst), key=lambda e: (e.iou, e.order))
        best = sorted((item[2] for item in self._best), key=lambda e: (-e.iou, e.order))
        if self.scored <= 2 * self.size:
            every = sorted({e.order: e for e in worst + best}.values(), key=lambda e: (e.iou, e.order))
            half = (len(every) + 1) // 2
            worst, best = every[:half], sorted(every[half:], key=lambda e: (-e.iou, e.order))
        return worst, best


def push_bounded(heap, item, size):
    if len(heap) < size:
        heapq.heappush(heap, item)
    else:
        heapq.heapreplace(heap, item)


def rgb(colour):
    return "rgb({}, {}, {})".format(*(int(c) for c in colour))


STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #111; background: #fff; }
h1 { margin-bottom: 0.2em; }
h2 { margin-top: 1.4em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; }
th, td { padding: 0.2em 0.7em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #f4f4f4; }
.swatch { display: inline-block; width: 1em; height: 1em; border: 1px solid #666; vertical-align: middle; }
.row { display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }
.key span.item { margin-right: 1.2em; white-space: nowrap; }
.gallery td { background: none; }
.gallery img { border: 1px solid #999; }
img.labels { image-rendering: pixelated; image-rendering: crisp-edges; }
.muted { color: #555; }
#broken { display: none; color: #a00; font-weight: bold; }
"""

# Shows a warning when a picture did not load (index.html copied without its PNG files), and records the count
# in <body data-images-loaded="loaded/total"> for tests. Runs in the page: no network.
SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-loaded", loaded + "/" + images.length);
  if (loaded < images.length) {
    var note = document.getElementById("broken");
    note.textContent = (images.length - loaded) + " of " + images.length + " pictures did not load: keep the "
      + "PNG files beside index.html.";
    note.style.display = "block";
  }
});
"""


def write_report(folder, *, checkpoint, data, count, metrics, matrix, classes, mask_values, gallery, options=None,
                 left_out=(), void_share=0.0):
    """Write folder/index.html and its pictures (confusion.png and the gallery's PNGs). `metrics` as
    ConfusionMatrix.compute returns them, `matrix` the confusion matrix (rows truth), `gallery` a Gallery.
    Returns the path of index.html."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in gallery_pictures(folder):  # the pictures of an earlier, possibly larger, report
        if is_own_output(stale):
            stale.unlink()
    plot_confusion_matrix(np.asarray(matrix), classes, folder / "confusion.png")
    colours = colour_table(mask_values)
    worst, best = gallery.galleries()
    e = html.escape
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n{HTML_MARK}\n"
             f"<title>Evaluation of {e(str(checkpoint))}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
             f"<h1>Evaluation report</h1>\n<p id=\"broken\"></p>\n<table class=\"meta\">\n"]
    meta = [("checkpoint", str(checkpoint)), ("data", str(data)), ("images", str(count)),
            ("date", datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"))]
    if options:
        meta.append(("options", ", ".join(f"{k} {v}" for k, v in options.items() if v not in (None, False))))
    if void_share:
        meta.append(("void pixels", f"{void_share:.1%} of the true pixels (not scored)"))
    parts += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>\n" for k, v in meta]
    parts.append("</table>\n")
    if left_out:
        parts.append(f"<p><b>{len(left_out)} image(s) could not be read and were left out</b> (the scores cover "
                     f"the others):</p>\n<ul>\n" + "".join(f"<li>{e(str(why))}</li>\n" for why in left_out)
                     + "</ul>\n")

    parts.append("<div class=\"row\">\n<div>\n<h2>Scores</h2>\n<table class=\"scores\">\n")
    for key, label in SCORE_NAMES:
        if key in metrics:
            parts.append(f"<tr><th>{e(label)}</th><td class=\"num\" data-key=\"{key}\" "
                         f"data-value=\"{e(repr(metrics[key]))}\">{score_text(metrics[key])}</td></tr>\n")
    parts.append("</table>\n</div>\n<div>\n<h2>Per class</h2>\n<table class=\"classes\">\n"
                 "<tr><th>class</th><th>colour</th><th>mask value</th><th>IoU</th><th>Dice</th><th>acc</th></tr>\n")
    values = list(mask_values) if len(mask_values) == len(classes) else [""] * len(classes)
    for i, name in enumerate(classes):
        cells = "".join(f"<td class=\"num\" data-key=\"{key}\" data-class=\"{i}\">{score_text(metrics[key][i])}</td>"
                        for key in ("iou", "dice", "class_acc"))
        parts.append(f"<tr><td>{e(str(name))}</td><td><span class=\"swatch\" style=\"background: "
                     f"{rgb(colours[i])}\"></span></td><td class=\"num\">{e(str(values[i]))}</td>{cells}</tr>\n")
    parts.append("</table>\n")
    absent = [str(name) for name in absent_classes(metrics, classes)]
    if absent:
        parts.append(f"<p class=\"muted\">n/a: {e(', '.join(absent))} appear(s) in neither the truth nor the "
                     f"predictions; left out of the means.</p>\n")
    parts.append("</div>\n<div>\n<h2>Confusion matrix</h2>\n<p class=\"muted\">rows: true class, normalised to 1; "
                 "columns: predicted class</p>\n<img src=\"confusion.png\" alt=\"confusion matrix\" "
                 "style=\"max-width: 100%\">\n</div>\n</div>\n")

    parts.append("<h2>Colour key</h2>\n<p class=\"key\">")
    for i, name in enumerate(classes):
        parts.append(f"<span class=\"item\"><span class=\"swatch\" style=\"background: {rgb(colours[i])}\"></span> "
                     f"{e(str(name))}</span>")
    parts.append(f"<span class=\"item\"><span class=\"swatch\" style=\"background: {rgb(VOID_COLOUR)}\"></span> "
                 f"void (truth only: not scored)</span></p>\n"
                 f"<p class=\"muted\">Per-image IoU: the mean IoU over the classes in that image's truth or "
                 f"prediction, void pixels skipped. {gallery.scored} image(s) scored"
                 + (f"; {len(gallery.all_void)} with only void truth left out of the galleries"
                    if gallery.all_void else "") + ".</p>\n")
    for title, kind, entries in [("Worst images", "worst", worst), ("Best images", "best", best)]:
        parts.append(gallery_html(folder, title, kind, entries, colours))
    parts.append(f"<script>{SCRIPT}</script>\n</body>\n</html>\n")
    path = folder / "index.html"
    with replaced_atomically(path) as f:
        f.write("".join(parts).encode("utf-8"))
    return path


def gallery_html(folder, title, kind, entries, colours):
    """One gallery: its pictures are written as folder/<kind>_NN_{image,truth,prediction}.png."""
    e = html.escape
    if not entries:
        return f"<h2>{e(title)}</h2>\n<p class=\"muted\">none</p>\n"
    rows = [f"<h2>{e(title)} by per-image IoU</h2>\n<table class=\"gallery\" id=\"{kind}\">\n"
            "<tr><th>#</th><th>image</th><th>truth</th><th>prediction</th></tr>\n"]
    for rank, entry in enumerate(entries, 1):
        height, width = entry.truth.shape
        scale = THUMBNAIL / max(height, width)  # shown with the long side at THUMBNAIL pixels
        size = f"width=\"{round(width * scale)}\" height=\"{round(height * scale)}\""
        cells = []
        for part, picture, label in [("image", entry.image, False), ("truth", colours[entry.truth], True),
                                     ("prediction", colours[entry.prediction], True)]:
            name = f"{kind}_{rank:02d}_{part}.png"
            save_png(Image.fromarray(np.ascontiguousarray(picture)), folder / name)
            css = " class=\"labels\"" if label else ""
            cells.append(f"<td><img src=\"{name}\"{css} {size} alt=\"{e(part)} of {e(entry.name)}\"></td>")
        rows.append(f"<tr data-name=\"{e(entry.name)}\" data-iou=\"{e(repr(entry.iou))}\"><td>{rank}<br>"
                    f"<b>{e(entry.name)}</b><br>IoU {entry.iou:.4f}</td>{''.join(cells)}</tr>\n")
    rows.append("</table>\n")
    return "".join(rows)
