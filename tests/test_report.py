"""eval.py --report: the HTML page checked on its HTML (scores equal the returned metrics, every picture exists,
the galleries ordered by per-image IoU recomputed with numpy from the label images eval writes), the gallery's
bookkeeping, the flags' errors, the eval/ mode default, and the page rendered by a real headless browser."""
import json
import shutil
import subprocess
from argparse import Namespace
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

import eval as evaluate_script
import report
from checkpoints import save_checkpoint
from drawing import class_colours
from model import IMAGENET_NORMALIZE, build_model

MASK_VALUES = [0, 10, 20]
CLASSES = ["background", "road & <lane>", "car"]  # a name that must be escaped
VOID = 255


def write_checkpoint(path):
    """A tiny random U-Net whose last layer is scaled up, so that its predictions vary from pixel to pixel."""
    model_args = {"arch": "unet", "in_channels": 3, "num_classes": 3, "base_channels": 4, "depth": 2,
                  "bilinear": False}
    torch.manual_seed(0)
    model = build_model(model_args)
    with torch.no_grad():
        model.outc.weight.mul_(100.0)
        model.outc.bias.zero_()
    save_checkpoint({"model": model.state_dict(), "model_args": model_args, "classes": CLASSES,
                     "mask_values": MASK_VALUES, "ignore_index": VOID, "normalize": IMAGENET_NORMALIZE,
                     "optimizer": {}, "epoch": 1, "metrics": {}, "args": {}, "best_score": 0.0}, path)
    return path


def write_data(root, count=12, size=(24, 32)):
    """Random images and blocky masks of MASK_VALUES with a void (255) border on some of them. One stem holds
    characters that HTML must escape."""
    rng = np.random.default_rng(0)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True), masks.mkdir(parents=True)
    stems = [f"img{i:02d}" for i in range(count - 1)] + ["a<b>&'c\""]
    for i, stem in enumerate(stems):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(images / f"{stem}.png")
        shares = [0.2 + 0.05 * (i % 4), 0.4, 0.4 - 0.05 * (i % 4)]
        blocks = rng.choice(MASK_VALUES, (size[0] // 8, size[1] // 8), p=shares)
        mask = np.kron(blocks, np.ones((8, 8), dtype=np.int64)).astype(np.uint8)
        if i % 3 == 0:
            mask[0] = VOID
        Image.fromarray(mask).save(masks / f"{stem}.png")
    return stems


def numpy_image_iou(label, truth):
    """Mean IoU over the mask values in the truth or the prediction, void truth pixels skipped."""
    keep = truth != VOID
    label, truth = label[keep], truth[keep]
    ious = [np.sum((label == v) & (truth == v)) / np.sum((label == v) | (truth == v))
            for v in MASK_VALUES if np.any((label == v) | (truth == v))]
    return float(np.mean(ious))


class Page(HTMLParser):
    """What the tests read from the page: pictures, headline scores, per-class cells, gallery rows, text."""

    def __init__(self, text):
        super().__init__()
        self.images, self.scores, self.cells, self.rows, self.text = [], {}, {}, {}, []
        self.table, self.cell = None, None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        if tag == "table" and attrs.get("id"):
            self.table = attrs["id"]
        if tag == "tr" and "data-iou" in attrs:
            self.rows.setdefault(self.table, []).append((attrs["data-name"], float(attrs["data-iou"])))
        if tag == "td" and "data-key" in attrs:
            self.cell = (attrs["data-key"], attrs.get("data-class"), attrs.get("data-value"))

    def handle_endtag(self, tag):
        if tag == "td":
            self.cell = None
        if tag == "table":
            self.table = None

    def handle_data(self, data):
        self.text.append(data)
        if self.cell:
            key, index, value = self.cell
            if index is None:
                self.scores[key] = (value, data)
            else:
                self.cells[key, int(index)] = data


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """eval.py --report on 12 images with galleries of 3: the report folder, the metrics, the label images."""
    root = tmp_path_factory.mktemp("report")
    checkpoint = write_checkpoint(root / "model.pth")
    stems = write_data(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report, "GALLERY_SIZE", 3)
        metrics = evaluate_script.main(["-m", str(checkpoint), "--images", str(root / "images"), "--masks",
                                        str(root / "masks"), "--ignore-index", str(VOID), "--save-labels",
                                        str(root / "labels"), "--report", str(root / "report"), "--json",
                                        str(root / "scores.json"), "--workers", "0"])
    ious = {}
    for stem in stems:
        label = np.asarray(Image.open(root / "labels" / f"{stem}.png")).astype(np.int64)  # mask values
        truth = np.asarray(Image.open(root / "masks" / f"{stem}.png")).astype(np.int64)
        ious[stem] = numpy_image_iou(label, truth)
    html_text = (root / "report" / "index.html").read_text(encoding="utf-8")
    return Namespace(root=root, folder=root / "report", metrics=metrics, ious=ious, stems=stems, html=html_text,
                     page=Page(html_text))


def test_report_html_scores_pictures_and_galleries(evaluated):
    page, metrics = evaluated.page, evaluated.metrics
    saved = json.loads((evaluated.root / "scores.json").read_text())  # --json and --report in one run
    # Every picture is a file beside the page, loaded by a relative name (no server, no network).
    assert page.images and all("://" not in img["src"] and (evaluated.folder / img["src"]).is_file()
                               for img in page.images)
    assert {"confusion.png"} <= {img["src"] for img in page.images}
    assert "http:" not in evaluated.html and "https:" not in evaluated.html and "<link" not in evaluated.html
    # The headline scores are the returned metrics, exactly (data-value) and as printed (4 decimals).
    for key in ("pixel_acc", "mean_acc", "miou", "fwiou", "mean_dice"):
        value, shown = page.scores[key]
        assert float(value) == metrics[key] == saved[key] and shown == f"{metrics[key]:.4f}"
    for i in range(3):
        for key in ("iou", "dice", "class_acc"):
            assert page.cells[key, i] == f"{metrics[key][i]:.4f}"
    text = "".join(page.text)
    for name in CLASSES:
        assert name in text  # parsed back: escaped in the HTML
    assert "road &amp; &lt;lane&gt;" in evaluated.html and "<lane>" not in evaluated.html
    assert "void (truth only: not scored)" in text and "<th>images</th><td>12</td>" in evaluated.html
    # Galleries of 3: the worst by increasing and the best by decreasing per-image IoU, as numpy computes it from
    # the label images that --save-labels wrote and the masks.
    in_set_order = sorted(evaluated.stems)  # the folder's order: ties of IoU keep it
    worst, best = page.rows["worst"], page.rows["best"]
    assert [name for name, _ in worst] == sorted(in_set_order, key=lambda stem: evaluated.ious[stem])[:3]
    assert [name for name, _ in best] == sorted(in_set_order, key=lambda stem: -evaluated.ious[stem])[:3]
    for name, iou in worst + best:
        assert iou == pytest.approx(evaluated.ious[name])
    # Each row: image | truth | prediction, the label maps in the class colours and void in the void colour.
    colours = class_colours(MASK_VALUES)
    for rank, (name, _) in enumerate(worst, 1):
        truth = np.asarray(Image.open(evaluated.folder / f"worst_{rank:02d}_truth.png"))
        mask = np.asarray(Image.open(evaluated.root / "masks" / f"{name}.png"))
        assert truth.shape == (24, 32, 3)
        expected = np.where((mask == VOID)[..., None], report.VOID_COLOUR,
                            colours[np.searchsorted(MASK_VALUES, np.where(mask == VOID, 0, mask))])
        assert np.array_equal(truth, expected)
        label = np.asarray(Image.open(evaluated.root / "labels" / f"{name}.png"))
        prediction = np.asarray(Image.open(evaluated.folder / f"worst_{rank:02d}_prediction.png"))
        assert np.array_equal(prediction, colours[np.searchsorted(MASK_VALUES, label)])
        image = np.asarray(Image.open(evaluated.folder / f"worst_{rank:02d}_image.png"))
        assert np.array_equal(image, np.asarray(Image.open(evaluated.root / "images" / f"{name}.png")))


def test_gallery_keeps_the_worst_and_best_as_thumbnails():
    """Many images through the callback: the kept ones are the size lowest and highest IoUs (ties in the set's
    order), thumbnails have a long side of at most THUMBNAIL, images whose truth is all void have no IoU."""
    rng = np.random.default_rng(1)
    gallery = report.Gallery(num_classes=3, ignore_index=VOID, size=4)
    expected = []
    for i in range(30):
        height, width = (600, 1000) if i == 5 else (20, 30)
        truth = torch.from_numpy(rng.integers(0, 3, (height, width)))
        prediction = truth.clone()
        wrong = torch.from_numpy(rng.random((height, width)) < (i % 7) / 10)
        prediction[wrong] = (prediction[wrong] + 1) % 3
        image = torch.from_numpy(rng.integers(0, 256, (3, height, width), dtype=np.uint8))
        gallery.add(image, truth, prediction, f"n{i}")
        expected.append((report.image_iou(prediction, truth, 3, VOID), i))
    gallery.add(torch.zeros(3, 8, 8, dtype=torch.uint8), torch.full((8, 8), VOID), torch.zeros(8, 8), "void")
    worst, best = gallery.galleries()
    ranked = sorted(expected)
    assert [e.name for e in worst] == [f"n{i}" for _, i in ranked[:4]]
    assert [e.name for e in best] == [f"n{i}" for _, i in sorted(expected, key=lambda x: (-x[0], x[1]))[:4]]
    assert gallery.scored == 30 and gallery.all_void == ["void"]
    assert len(gallery._worst) == len(gallery._best) == 4
    for entry in worst + best:
        assert max(entry.truth.shape) <= report.THUMBNAIL and entry.image.shape[:2] == entry.truth.shape
    big = report.Gallery(3, VOID, size=1)
    truth = torch.zeros(600, 1000, dtype=torch.long)
    big.add(torch.zeros(3, 600, 1000, dtype=torch.uint8), truth, truth, "big")
    assert big.galleries()[0][0].truth.shape == (154, 256)
    # At most 2 x size images: split between the galleries, none shown twice.
    few = report.Gallery(3, VOID, size=4)
    for i in range(5):
        truth = torch.zeros(4, 4, dtype=torch.long)
        prediction = truth.clone()
        prediction[:i] = 1
        few.add(torch.zeros(3, 4, 4, dtype=torch.uint8), truth, prediction, f"f{i}")
    worst, best = few.galleries()
    assert [e.name for e in worst] == ["f4", "f3", "f2"] and [e.name for e in best] == ["f0", "f1"]


def test_report_flag_errors_and_eval_mode_default(evaluated, tmp_path, monkeypatch, capsys):
    model, images, masks = evaluated.root / "model.pth", evaluated.root / "images", evaluated.root / "masks"
    base = ["-m", str(model), "--images", str(images), "--ignore-index", str(VOID), "--workers", "0"]
    with pytest.raises(SystemExit, match="--report needs the true masks"):
        evaluate_script.main([*base, "--report", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match="holds input images"):
        evaluate_script.main([*base, "--masks", str(masks), "--report", str(masks)])
    with pytest.raises(SystemExit, match="--save-labels and --report name one folder"):
        evaluate_script.main([*base, "--masks", str(masks), "--report", str(tmp_path / "r"), "--save-labels",
                              str(tmp_path / "r")])
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        evaluate_script.main([*base, "--masks", str(masks), "--report", str(tmp_path / "file")])
    # eval/ mode: eval/report/index.html beside eval/labels and eval/confusion.png.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints" / "run").mkdir(parents=True)
    shutil.copy(model, tmp_path / "checkpoints" / "run" / "best.pth")
    (tmp_path / "eval").mkdir()
    shutil.copytree(images, tmp_path / "eval" / "images")
    shutil.copytree(masks, tmp_path / "eval" / "masks")
    evaluate_script.main(["--workers", "0", "--ignore-index", str(VOID)])
    assert "wrote eval/report/index.html" in capsys.readouterr().out
    text = (tmp_path / "eval" / "report" / "index.html").read_text(encoding="utf-8")
    page = Page(text)
    assert len(page.rows["worst"]) == 6 and len(page.rows["best"]) == 6  # 12 images split, none twice
    assert sorted(name for name, _ in page.rows["worst"] + page.rows["best"]) == sorted(evaluated.stems)
    assert "a&lt;b&gt;&amp;&#x27;c&quot;" in text and "a<b>" not in text  # the odd stem, escaped
    shutil.rmtree(tmp_path / "eval" / "masks")
    shutil.rmtree(tmp_path / "eval" / "report")
    evaluate_script.main(["--workers", "0"])  # no masks: label images only, no report
    assert not (tmp_path / "eval" / "report").exists()


def chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def run_browser(browser, *flags, timeout=60):
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", "--hide-scrollbars", "--force-device-scale-factor=1", *flags],
                          capture_output=True, text=True, timeout=timeout)


def test_report_in_a_headless_browser(evaluated, tmp_path):
    """Debian's chromium renders the page: in its DOM after the load event every picture has loaded
    (naturalWidth > 0), and its screenshot is not blank (the gallery's class colours cover many pixels). The page
    copied without its pictures says that they did not load."""
    browser = chromium()
    if browser is None:
        pytest.skip("no chromium, chromium-browser or google-chrome on PATH (Debian: apt-get install chromium)")
    total, shot = len(evaluated.page.images), tmp_path / "shot.png"
    dom = run_browser(browser, "--virtual-time-budget=5000", "--window-size=1200,2000", f"--screenshot={shot}",
                      "--dump-dom", (evaluated.folder / "index.html").as_uri())
    assert f'data-images-loaded="{total}/{total}"' in dom.stdout, dom.stderr[-2000:]
    assert '<p id="broken"></p>' in dom.stdout  # the warning stays empty and hidden
    assert shot.is_file(), dom.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 50  # text, swatches, the confusion matrix and the pictures
    for colour in class_colours(MASK_VALUES)[1:]:  # the two non-black classes: swatches are 1em; maps far more
        close = np.abs(pixels.astype(int) - colour.astype(int)).max(1) <= 2
        assert close.sum() > 3000, f"class colour {colour.tolist()} covers only {close.sum()} pixels"
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(evaluated.folder / "index.html", alone / "index.html")
    dom = run_browser(browser, "--virtual-time-budget=5000", "--dump-dom", (alone / "index.html").as_uri())
    assert f'data-images-loaded="0/{total}"' in dom.stdout, dom.stderr[-2000:]
    assert f'style="display: block;">{total} of {total} pictures did not load' in dom.stdout
