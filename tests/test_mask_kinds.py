"""Masks of other kinds, train -> eval -> predict on data made here: colour-coded masks (with a colour table and a
void colour, or their colours found), region-of-interest masks, class names; and their bad-data errors."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval as evaluate_script
import predict
import train
from checkpoints import load_checkpoint
from datasets import DataConfig, build_dataset, resolve_data
from drawing import sample_grid
from transforms import AugmentConfig

# CamVid's own lines for three of its classes, and its void colour.
TABLE = "64 128 64 Animal\n192 0 128 Archway\n0 128 192 Bicyclist\n0 0 0 Void\n"
COLOURS = np.array([[64, 128, 64], [192, 0, 128], [0, 128, 192]], dtype=np.uint8)
VOID = np.array([0, 0, 0], dtype=np.uint8)
SIDE = 32
TINY = ["--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "4", "--base-channels", "4", "--depth", "2",
        "--workers", "0", "--crop-size", "0", "--val-percent", "25", "--sample-every", "0", "--amp", "off"]


def class_map(seed):
    """A SIDE x SIDE map of classes 0..2 in random rectangles, with a void (-1) band along the top."""
    rng = np.random.default_rng(seed)
    classes = np.zeros((SIDE, SIDE), dtype=np.int64)
    for label in (1, 2):
        top, left = rng.integers(0, SIDE // 2, 2)
        classes[top:top + SIDE // 2, left:left + SIDE // 2] = label
    classes[:3] = -1
    return classes


def picture(classes, seed):
    """An image in which each class shows as its own colour, with noise; void pixels noise only."""
    rng = np.random.default_rng(seed + 100)
    image = np.where(classes[..., None] >= 0, COLOURS[classes.clip(0)], 128).astype(np.int64)
    return (image + rng.integers(-30, 30, image.shape)).clip(0, 255).astype(np.uint8)


def colour_set(folder, count=8):
    """images/, masks/ (RGB colour-coded, CamVid's colours) and colors.txt; returns the class maps by stem."""
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    maps = {}
    for i in range(count):
        classes = class_map(i)
        Image.fromarray(picture(classes, i)).save(folder / "images" / f"f{i}.png")
        colours = np.where(classes[..., None] >= 0, COLOURS[classes.clip(0)], VOID)
        Image.fromarray(colours.astype(np.uint8)).save(folder / "masks" / f"f{i}.png")
        maps[f"f{i}"] = classes
    (folder / "colors.txt").write_text(TABLE)
    return maps


def colours_to_classes(rgb):
    """An independent reading of a colour-coded mask: class index per pixel by comparing with each table colour;
    -1 for void, -2 for a colour of no class."""
    classes = np.full(rgb.shape[:2], -2, dtype=np.int64)
    classes[(rgb == VOID).all(-1)] = -1
    for i, colour in enumerate(COLOURS):
        classes[(rgb == colour).all(-1)] = i
    return classes


def numpy_confusion(truths, predictions, num_classes):
    """Rows truth, columns prediction, counted over the pixels whose truth is a class (>= 0)."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    for truth, predicted in zip(truths, predictions):
        keep = truth >= 0
        np.add.at(matrix, (truth[keep], predicted[keep]), 1)
    return matrix


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("colours")
    maps = colour_set(folder)
    run_dir = train.main(["--images", str(folder / "images"), "--masks", str(folder / "masks"),
                          "--mask-colors", str(folder / "colors.txt"), *TINY,
                          "--checkpoint-dir", str(folder / "runs")])
    return folder, maps, run_dir / "best.pth"


def test_colour_table_classes_and_void_in_the_checkpoint(colour_run):
    _, _, checkpoint = colour_run
    state = load_checkpoint(checkpoint)
    assert state["classes"] == ["Animal", "Archway", "Bicyclist"]
    assert state["mask_values"] == COLOURS.tolist()
    assert state["args"]["void_color"] == [0, 0, 0]


def test_colour_masks_eval_scores_and_labels_written_in_the_colours(colour_run, tmp_path, capsys):
    folder, maps, checkpoint = colour_run
    scores, labels = tmp_path / "scores.json", tmp_path / "labels"
    evaluate_script.main(["-m", str(checkpoint), "--images", str(folder / "images"), "--masks",
                          str(folder / "masks"), "--json", str(scores), "--save-labels", str(labels), "--workers", "0"])
    saved = json.loads(scores.read_text())
    assert saved["classes"] == ["Animal", "Archway", "Bicyclist"] and saved["mask_values"] == COLOURS.tolist()
    assert "Bicyclist" in capsys.readouterr().out  # the per-class table names the classes
    truths, predictions, right = [], [], 0
    for stem, classes in sorted(maps.items()):
        written = np.asarray(Image.open(labels / f"{stem}.png"))
        assert written.shape == (SIDE, SIDE, 3)
        predicted = colours_to_classes(written)
        assert (predicted >= 0).all()  # every pixel written in a class's colour
        truth_rgb = np.asarray(Image.open(folder / "masks" / f"{stem}.png"))
        hit = predicted == classes
        assert (written[hit] == truth_rgb[hit]).all()  # predicted right: the input's own colour
        right += hit.sum()
        truths.append(colours_to_classes(truth_rgb))
        predictions.append(predicted)
    assert right > 0
    # The void colour is left out: the confusion matrix counts only the pixels of a table class.
    assert saved["confusion_matrix"] == numpy_confusion(truths, predictions, 3).tolist()
    assert np.sum(saved["confusion_matrix"]) == 8 * SIDE * (SIDE - 3)


def test_colour_masks_predict_writes_the_same_colours(colour_run, tmp_path):
    folder, maps, checkpoint = colour_run
    labels = tmp_path / "labels"
    evaluate_script.main(["-m", str(checkpoint), "--images", str(folder / "images"), "--save-labels", str(labels),
                          "--workers", "0"])
    predict.main(["-m", str(checkpoint), "-i", str(folder / "images"), "-o", str(tmp_path / "predicted")])
    for stem in maps:
        written = np.asarray(Image.open(tmp_path / "predicted" / f"{stem}_mask.png"))
        assert written.shape == (SIDE, SIDE, 3) and (colours_to_classes(written) >= 0).all()
        assert np.array_equal(written, np.asarray(Image.open(labels / f"{stem}.png")))


def test_colours_found_without_a_table(tmp_path):
    colour_set(tmp_path, count=3)
    data = resolve_data(DataConfig(images=str(tmp_path / "images"), masks=str(tmp_path / "masks")))
    # Sorted as 0xRRGGBB: void (black) is a class here, as no table names it.
    assert data.mask_values == [[0, 0, 0], [0, 128, 192], [64, 128, 64], [192, 0, 128]]
    dataset = build_dataset(data, "all", full_resolution=True)
    assert dataset.classes == ["colour 0 0 0", "colour 0 128 192", "colour 64 128 64", "colour 192 0 128"]
    _, mask, _ = dataset[0]
    expected = np.array([2, 3, 1])[class_map(0).clip(0)]  # Animal, Archway, Bicyclist at their sorted places
    expected[class_map(0) < 0] = 0
    assert np.array_equal(mask.numpy(), expected)


def test_eval_renames_classes(colour_run, tmp_path):
    folder, _, checkpoint = colour_run
    (tmp_path / "names.txt").write_text("cat\ngate\nrider\n")
    evaluate_script.main(["-m", str(checkpoint), "--images", str(folder / "images"), "--masks", str(folder / "masks"),
                          "--class-names", str(tmp_path / "names.txt"), "--json", str(tmp_path / "s.json"),
                          "--workers", "0"])
    assert json.loads((tmp_path / "s.json").read_text())["classes"] == ["cat", "gate", "rider"]


def test_stray_colours_refused_without_a_table(tmp_path):
    colour_set(tmp_path, count=3)
    mask = np.array(Image.open(tmp_path / "masks" / "f1.png"))
    mask[20, 3] = (9, 9, 200)  # one antialiased pixel
    Image.fromarray(mask).save(tmp_path / "masks" / "f1.png")
    with pytest.raises(Exception, match=r"colour \(9 9 200\) covers only 1 pixel.*f1.png.*--mask-colors"):
        resolve_data(DataConfig(images=str(tmp_path / "images"), masks=str(tmp_path / "masks")))


def test_class_names_file(tmp_path):
    colour_set(tmp_path, count=2)
    (tmp_path / "names.txt").write_text("animal\narch way\ncyclist\n")
    flags = dict(images=str(tmp_path / "images"), masks=str(tmp_path / "masks"),
                 mask_colors=str(tmp_path / "colors.txt"))
    data = resolve_data(DataConfig(**flags, class_names=str(tmp_path / "names.txt")))
    assert build_dataset(data, "all").classes == ["animal", "arch way", "cyclist"]
    (tmp_path / "names.txt").write_text("animal\ncyclist\n")
    data = resolve_data(DataConfig(**flags, class_names=str(tmp_path / "names.txt")))
    with pytest.raises(Exception, match="names 2 classes but the data has 3"):
        build_dataset(data, "all")


def one_line_error(argv, capsys=None):
    with pytest.raises(SystemExit) as stop:
        train.main(argv)
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_colour_not_in_the_table_named_with_its_pixels(tmp_path):
    colour_set(tmp_path, count=4)
    mask = np.array(Image.open(tmp_path / "masks" / "f2.png"))
    mask[5:7, 0:5] = (10, 20, 30)  # 10 pixels of a colour no line names
    Image.fromarray(mask).save(tmp_path / "masks" / "f2.png")
    message = one_line_error(["--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"),
                              "--mask-colors", str(tmp_path / "colors.txt"), *TINY,
                              "--checkpoint-dir", str(tmp_path / "runs")])
    assert str(tmp_path / "masks" / "f2.png") in message
    assert "(10, 20, 30) on 10 pixel(s)" in message and "--mask-colors" in message and "10 20 30" in message


@pytest.mark.parametrize("table, problem", [("64 128 Animal\n1 2 3 b\n", "line 1"),
                                            ("64 128 64 a\n64 128 64 b\n", "listed twice"),
                                            ("1 2 3 a\n0 0 0 void\n", "1 class colour")])
def test_bad_colour_tables(tmp_path, table, problem):
    colour_set(tmp_path, count=1)
    (tmp_path / "colors.txt").write_text(table)
    with pytest.raises(Exception, match=problem):
        resolve_data(DataConfig(images=str(tmp_path / "images"), masks=str(tmp_path / "masks"),
                                mask_colors=str(tmp_path / "colors.txt")))


# --- region-of-interest masks -------------------------------------------------------------------------------

def roi_set(folder, count=8, seed=0):
    """images/, masks/ and roi/: classes 0/1 inside a disc (the ROI); outside, random labels (wrong ones)."""
    for name in ("images", "masks", "roi"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    ys, xs = np.mgrid[:SIDE, :SIDE]
    inside = (ys - SIDE / 2) ** 2 + (xs - SIDE / 2) ** 2 < (SIDE / 3) ** 2  # 35% of the image
    for i in range(count):
        rng = np.random.default_rng(i)
        truth = (xs > rng.integers(8, 24)).astype(np.uint8)
        image = np.where(truth[..., None] == 1, 200, 40) + rng.integers(-20, 20, (SIDE, SIDE, 3))
        image[~inside] = rng.integers(0, 255, (int((~inside).sum()), 3))  # coloured noise outside
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / "images" / f"r{i}.png")
        outside_labels = np.random.default_rng(seed * 1000 + i).integers(0, 2, (SIDE, SIDE))
        mask = np.where(inside, truth, outside_labels).astype(np.uint8) * 255
        Image.fromarray(mask).save(folder / "masks" / f"r{i}.png")
        Image.fromarray(inside.astype(np.uint8) * 255).save(folder / "roi" / f"r{i}_mask.png")
    return inside


def test_roi_masks_leave_the_outside_out_of_the_scores(tmp_path, capsys):
    inside = roi_set(tmp_path)
    flags = ["--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"), "--roi", str(tmp_path / "roi")]
    run_dir = train.main([*flags, *TINY, "--sample-every", "2", "--checkpoint-dir", str(tmp_path / "runs")])
    assert (run_dir / "samples" / "epoch_002.png").is_file()
    scores = []
    for seed in (0, 1):  # the same truth inside, other wrong labels outside
        roi_set(tmp_path, seed=seed)
        out = tmp_path / f"eval{seed}"
        evaluate_script.main(["-m", str(run_dir / "best.pth"), *flags, "--json", str(out / "scores.json"),
                              "--save-labels", str(out / "labels"), "--overlays", str(out / "overlays"),
                              "--report", str(out / "report"), "--workers", "0"])
        scores.append(json.loads((out / "scores.json").read_text()))
        assert "were not scored" not in capsys.readouterr().err  # 65% void: expected outside the regions
    truths, predictions = [], []
    for i in range(8):
        truth = np.asarray(Image.open(tmp_path / "masks" / f"r{i}.png")).astype(np.int64) // 255
        predicted = np.asarray(Image.open(tmp_path / "eval1" / "labels" / f"r{i}.png")).astype(np.int64) // 255
        truths.append(np.where(inside, truth, -1))
        predictions.append(predicted)
        overlay = np.asarray(Image.open(tmp_path / "eval1" / "overlays" / f"r{i}.png"))[:SIDE]
        grey = overlay[~inside & (predicted == 0)]
        assert (grey[:, 0] == grey[:, 1]).all() and (grey[:, 1] == grey[:, 2]).all()  # greyed outside
    assert scores[1]["confusion_matrix"] == numpy_confusion(truths, predictions, 2).tolist()
    assert np.sum(scores[1]["confusion_matrix"]) == 8 * inside.sum()
    assert scores[0]["confusion_matrix"] == scores[1]["confusion_matrix"]
    assert scores[0]["miou"] == scores[1]["miou"]
    for picture in (tmp_path / "eval1" / "report").glob("*_image.png"):  # the report's gallery: greyed outside
        outside = np.asarray(Image.open(picture))[~inside]
        assert (outside[:, 0] == outside[:, 1]).all() and (outside[:, 1] == outside[:, 2]).all()
    assert list((tmp_path / "eval1" / "report").glob("*_image.png"))


def test_checkpoint_without_the_new_data_fields_still_scores(tmp_path):
    """A checkpoint of before colour tables, names and ROIs (their fields absent) loads and scores as before."""
    roi_set(tmp_path, count=4)
    run_dir = train.main(["--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"), *TINY,
                          "--checkpoint-dir", str(tmp_path / "runs")])
    state = load_checkpoint(run_dir / "best.pth")
    for key in ("mask_colors", "void_color", "class_names", "names", "roi"):
        del state["args"][key]
    torch.save(state, tmp_path / "old.pth")
    scores = []
    for path in (run_dir / "best.pth", tmp_path / "old.pth"):
        json_path = tmp_path / f"{path.stem}.json"
        evaluate_script.main(["-m", str(path), "--split", "all", "--json", str(json_path), "--workers", "0"])
        scores.append(json.loads(json_path.read_text()))
    assert scores[1]["classes"] == ["background", "foreground"] and scores[1]["mask_values"] == [0, 255]
    assert scores[0]["confusion_matrix"] == scores[1]["confusion_matrix"]


def test_training_samples_greyed_outside_the_roi():
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 256, (3, 16, 16), dtype=np.uint8))
    truth = torch.zeros(16, 16, dtype=torch.long)
    truth[:, :5] = 255  # outside the region
    args = ([image], [truth], [torch.zeros(16, 16, dtype=torch.long)], ["a", "b"], [0, 255])
    plain, greyed = (np.asarray(sample_grid(*args, grey_void=grey)) for grey in (False, True))
    changed = (plain != greyed).any(-1)
    factor = 10  # 16-pixel panels are enlarged to 160 pixels
    assert changed.sum() == 16 * 5 * factor ** 2
    assert (greyed[changed][:, 0] == greyed[changed][:, 2]).all()
    expected = (image.double().mean(0) * 0.5 + 64).to(torch.uint8)[:, :5].numpy()  # what greyed() makes
    assert sorted(np.unique(greyed[changed][:, 0])) == sorted(np.unique(expected))


def test_roi_masks_void_in_training_items(tmp_path):
    inside = roi_set(tmp_path, count=2)
    data = resolve_data(DataConfig(images=str(tmp_path / "images"), masks=str(tmp_path / "masks"),
                                   roi=str(tmp_path / "roi")))
    dataset = build_dataset(data, "all", full_resolution=True)
    _, mask, _ = dataset[0]
    truth = np.asarray(Image.open(tmp_path / "masks" / "r0.png")) // 255
    assert np.array_equal(mask.numpy(), np.where(inside, truth, 255))


def crop_place(original, crop):
    """(top, left) of the one place of `original` (HxWx3) that `crop` (a plain cut of it) comes from."""
    size = crop.shape[0]
    at = [(top, left) for top in range(original.shape[0] - size + 1) for left in range(original.shape[1] - size + 1)
          if np.array_equal(original[top:top + size, left:left + size], crop)]
    assert len(at) == 1
    return at[0]


def cropped_items_match(data, stem, expected):
    """Training items of a 20-pixel crop (no zoom, rotation or flip) hold `expected` (HxW classes) at their place."""
    augment = AugmentConfig(crop_size=20, zoom=(1.0, 1.0), rotate=0, hflip=0)
    dataset = build_dataset(data, "train", augment)
    original = np.asarray(Image.open(Path(data.images) / f"{stem}.png"))
    for _ in range(4):
        image, mask = dataset[0]
        top, left = crop_place(original, image.permute(1, 2, 0).numpy())
        assert np.array_equal(mask.numpy(), expected[top:top + 20, left:left + 20])


def test_roi_void_in_cropped_training_items(tmp_path):
    """The training preset crops the mask with the ROI already applied: the loss never sees the outside."""
    inside = roi_set(tmp_path, count=2)
    data = resolve_data(DataConfig(images=str(tmp_path / "images"), masks=str(tmp_path / "masks"),
                                   roi=str(tmp_path / "roi"), val_percent=0))
    expected = np.where(inside, np.asarray(Image.open(tmp_path / "masks" / "r0.png")) // 255, 255)
    cropped_items_match(data, "r0", expected)


def test_colour_classes_in_cropped_training_items(tmp_path):
    maps = colour_set(tmp_path, count=2)
    data = resolve_data(DataConfig(images=str(tmp_path / "images"), masks=str(tmp_path / "masks"),
                                   mask_colors=str(tmp_path / "colors.txt"), val_percent=0))
    cropped_items_match(data, "f0", np.where(maps["f0"] >= 0, maps["f0"], 255))


def test_roi_mask_of_another_size(tmp_path):
    roi_set(tmp_path, count=4)
    Image.new("L", (SIDE, SIDE - 4), 255).save(tmp_path / "roi" / "r2_mask.png")
    message = one_line_error(["--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"),
                              "--roi", str(tmp_path / "roi"), *TINY, "--checkpoint-dir", str(tmp_path / "runs")])
    assert str(tmp_path / "roi" / "r2_mask.png") in message and f"{SIDE}x{SIDE - 4}" in message
    assert "must have their image's size" in message
