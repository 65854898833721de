"""eval.py: every score against scikit-learn, label images, and full-resolution evaluation of a tiny VOC model
recomputed with numpy from the written label images and the VOC masks."""
import json
import math
import shutil
from argparse import Namespace

import numpy as np
import pytest
import torch
from PIL import Image

import eval as evaluate_script
import train
from metrics import ConfusionMatrix
from drawing import voc_palette, write_pictures


def accumulate(num_classes, batches):
    confusion = ConfusionMatrix(num_classes, ignore_index=255)
    for pred, truth in batches:
        confusion.update(torch.from_numpy(pred), torch.from_numpy(truth))
    return confusion.compute()


def random_batches(rng, num_classes, truth_classes, pred_classes, count=4):
    """Several batches of random class maps with 10% ignored pixels."""
    batches = []
    for _ in range(count):
        truth = rng.choice(truth_classes, (2, 13, 19))
        truth[rng.random(truth.shape) < 0.1] = 255
        batches.append((rng.choice(pred_classes, truth.shape), truth))
    return batches


def flat_valid(batches):
    pred = np.concatenate([p.ravel() for p, _ in batches])
    truth = np.concatenate([t.ravel() for _, t in batches])
    keep = truth != 255
    return pred[keep], truth[keep]


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_every_score_against_sklearn():
    sk = pytest.importorskip("sklearn.metrics")  # an optional test dependency: skips this test alone
    rng = np.random.default_rng(0)
    # 7 classes: 5 is only predicted, 4 only in the truth, 6 nowhere (n/a).
    batches = random_batches(rng, 7, [0, 1, 2, 3, 4], [0, 1, 2, 3, 5])
    s = accumulate(7, batches)
    pred, truth = flat_valid(batches)
    scored = [0, 1, 2, 3, 4, 5]
    assert s["pixel_acc"] == pytest.approx(sk.accuracy_score(truth, pred))
    assert s["mean_acc"] == pytest.approx(sk.balanced_accuracy_score(truth, pred))  # mean recall over true classes
    assert s["iou"][:6] == pytest.approx(sk.jaccard_score(truth, pred, labels=scored, average=None).tolist())
    assert s["miou"] == pytest.approx(sk.jaccard_score(truth, pred, labels=scored, average="macro"))
    assert s["fwiou"] == pytest.approx(sk.jaccard_score(truth, pred, labels=scored, average="weighted"))
    assert s["dice"][:6] == pytest.approx(sk.f1_score(truth, pred, labels=scored, average=None).tolist())
    assert s["mean_dice"] == pytest.approx(sk.f1_score(truth, pred, labels=scored, average="macro"))
    assert math.isnan(s["iou"][6]) and math.isnan(s["dice"][6]) and math.isnan(s["class_acc"][6])
    assert s["iou"][4] == 0 and s["iou"][5] == 0 and math.isnan(s["class_acc"][5])
    names = [f"c{i}" for i in range(7)]
    table = evaluate_script.format_table(s, names)
    assert "n/a: c6 appear(s) in neither" in table and "6 of 7 classes scored" in table
    assert "acc n/a: c5 predicted" in table


def test_binary_scores_against_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    batches = random_batches(np.random.default_rng(1), 2, [0, 1], [0, 1])
    s = accumulate(2, batches)
    pred, truth = flat_valid(batches)
    assert s["fg_dice"] == pytest.approx(sk.f1_score(truth, pred))
    assert s["fg_iou"] == pytest.approx(sk.jaccard_score(truth, pred))
    assert s["miou"] == pytest.approx(sk.jaccard_score(truth, pred, average="macro"))


def test_label_images_read_back(tmp_path):
    labels = np.random.default_rng(2).integers(0, 21, (2, 23, 31)).astype(np.uint8)
    labels[0, 0, 0], labels[1, 0, 0] = 20, 0
    images = torch.zeros(2, 3, 23, 31, dtype=torch.uint8)
    folders = tmp_path / "labels", tmp_path / "overlays"
    folders[0].mkdir(), folders[1].mkdir()
    classes = [f"class {i}" for i in range(21)]

    def write(images, labels, names, classes, mask_values):
        for image, label, name in zip(images, labels, names):
            write_pictures(image, label, classes, mask_values, *(folder / f"{name}.png" for folder in folders))

    write(images, labels, ["a", "b"], classes, list(range(21)))
    for name, label in zip("ab", labels):
        written = Image.open(tmp_path / "labels" / f"{name}.png")
        assert written.mode == "P"
        assert np.array_equal(np.asarray(written), label)
        palette = np.array(written.getpalette()[:3 * 256]).reshape(-1, 3)
        assert np.array_equal(palette, voc_palette())
        overlay = np.asarray(Image.open(tmp_path / "overlays" / f"{name}.png"))
        picture, key = overlay[:23], overlay[23:]  # the overlay, then the key of its classes below it
        assert picture.shape == (23, 31, 3) and (picture[label == 0] == 0).all() and picture[label > 0].any()
        assert key.shape[0] > 0 and (key == voc_palette()[label.max()]).all(-1).any()
    write(images[:1], labels[:1] % 2, ["bin"], classes[:2], [0, 1])
    binary = Image.open(tmp_path / "labels" / "bin.png")
    assert binary.mode == "L" and np.array_equal(np.asarray(binary), (labels[0] % 2) * 255)


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    """A VOC layout of 4 train and 3 val images, linked to the shared sample, and a tiny model trained on it
    for one step at half scale (the scale that eval must apply on the model's side)."""
    from conftest import SHARED_DATA
    source = SHARED_DATA / "voc_subset" / "VOC2012"
    if not source.is_dir():
        pytest.skip(f"real sample data not found at {source}")
    root = tmp_path_factory.mktemp("voc")
    voc = root / "VOC2012"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    for folder in ("JPEGImages", "SegmentationClass"):
        (voc / folder).symlink_to(source / folder)
    lists = source / "ImageSets" / "Segmentation"
    val = (lists / "val.txt").read_text().split()[:3]
    train_ids = (lists / "train.txt").read_text().split()[:4]
    for split, ids in [("train", train_ids), ("val", val)]:
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids))
    run_dir = train.main(["--dataset", "voc", "--data", str(root), "--scale", "0.5", "--crop-size", "48",
                          "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "4", "--base-channels", "4",
                          "--depth", "2", "--workers", "0", "--sample-every", "0",
                          "--checkpoint-dir", str(root / "checkpoints")])
    return Namespace(root=root, voc=voc, val=val, checkpoint=run_dir / "best.pth")


def numpy_scores(labels_dir, masks_dir, ids, num_classes=21):
    """The VOC devkit's scores from the label images and masks as PIL reads them (255 ignored)."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    for i in ids:
        pred = np.asarray(Image.open(labels_dir / f"{i}.png")).astype(np.int64)
        truth = np.asarray(Image.open(masks_dir / f"{i}.png")).astype(np.int64)
        assert pred.shape == truth.shape  # full resolution: the label image has the mask's size
        keep = truth != 255
        matrix += np.bincount(truth[keep] * num_classes + pred[keep], minlength=num_classes ** 2).reshape(
            num_classes, num_classes)
    tp, truth_count, pred_count = np.diag(matrix), matrix.sum(1), matrix.sum(0)
    union = truth_count + pred_count - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    return matrix, tp.sum() / matrix.sum(), iou


def test_eval_voc_full_resolution(voc, tmp_path, capsys):
    labels, report = tmp_path / "labels", tmp_path / "scores.json"
    metrics = evaluate_script.main(["-m", str(voc.checkpoint), "--data", str(voc.root), "--split", "val",
                                    "--save-labels", str(labels), "--json", str(report), "--workers", "1",
                                    "--confusion", str(tmp_path / "confusion.png")])
    saved = json.loads(report.read_text())
    assert saved["dataset"] == "voc" and saved["images"] == 3 and saved["options"]["scale"] == 0.5
    matrix, pixel_acc, iou = numpy_scores(labels, voc.voc / "SegmentationClass", voc.val)
    assert saved["confusion_matrix"] == matrix.tolist()
    assert saved["pixel_acc"] == pytest.approx(pixel_acc)
    assert saved["iou"] == pytest.approx([None if math.isnan(x) else x for x in iou])
    assert saved["miou"] == pytest.approx(np.nanmean(iou)) and metrics["miou"] == pytest.approx(saved["miou"])
    absent = [name for name, x in zip(saved["classes"], iou) if math.isnan(x)]
    assert saved["absent_classes"] == absent and absent  # 3 images hold only a few of the 21 classes
    assert Image.open(tmp_path / "confusion.png").size[0] > 0
    out = capsys.readouterr().out
    assert "aeroplane" in out and f"n/a: {absent[0]}" in out


def test_eval_folder_mode_and_images_without_masks(voc, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="no best.pth under checkpoints/"):
        evaluate_script.main([])
    (tmp_path / "checkpoints" / "run").mkdir(parents=True)
    shutil.copy(voc.checkpoint, tmp_path / "checkpoints" / "run" / "best.pth")
    own_val = evaluate_script.main(["--workers", "0"])  # no eval/ folder: the run's validation set
    assert "scoring the checkpoint's validation set" in capsys.readouterr().out
    assert own_val["miou"] == pytest.approx(evaluate_script.main(["--split", "val", "--workers", "0"])["miou"])
    for folder, source, suffix in [("images", "JPEGImages", "jpg"), ("masks", "SegmentationClass", "png")]:
        (tmp_path / "eval" / folder).mkdir(parents=True)
        for ident in voc.val[:2]:
            shutil.copy(voc.voc / source / f"{ident}.{suffix}", tmp_path / "eval" / folder)
    metrics = evaluate_script.main(["--workers", "0"])
    out = capsys.readouterr().out
    assert "using the newest checkpoint, checkpoints/run/best.pth" in out and "mIoU" in out
    matrix, pixel_acc, iou = numpy_scores(tmp_path / "eval" / "labels", tmp_path / "eval" / "masks", voc.val[:2])
    assert metrics["pixel_acc"] == pytest.approx(pixel_acc) and metrics["miou"] == pytest.approx(np.nanmean(iou))
    assert (tmp_path / "eval" / "confusion.png").is_file()
    # The same folders named by flags give the same scores.
    same = evaluate_script.main(["--images", "eval/images", "--masks", "eval/masks", "--workers", "0"])
    assert same["miou"] == pytest.approx(metrics["miou"])
    shutil.rmtree(tmp_path / "eval" / "masks")
    shutil.rmtree(tmp_path / "eval" / "labels")
    assert evaluate_script.main(["--workers", "0"]) is None
    assert "no scores were computed" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "eval" / "labels").iterdir()) == [f"{i}.png" for i in voc.val[:2]]
    with pytest.raises(SystemExit, match="holds input images"):
        evaluate_script.main(["--images", "eval/images", "--save-labels", "eval/images"])
