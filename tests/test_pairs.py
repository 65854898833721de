"""Two newcomer traps on the data side: pairs whose names share no pattern, listed in a --pairs CSV file, and
--masks pointed at the images (or at a copy of them)."""
import shutil

import numpy as np
import pytest
from PIL import Image

import eval as eval_script
import train
from errors import ConfigError, DatasetError
from test_bad_input import exits
from test_datasets import build_dataset, data_args


def retina_like(root, count=4, size=(24, 32)):
    """images/<i>_training.tif with masks/<i>_manual1.gif (the DRIVE retina set's names, which share no pattern),
    random palette masks of indices 0 and 1; returns [(image path, mask path, mask array)]."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    made = []
    for i in range(21, 21 + count):
        image, mask = root / "images" / f"{i}_training.tif", root / "masks" / f"{i}_manual1.gif"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(image)
        truth = (rng.random(size) < 0.3).astype(np.uint8)
        palette_mask = Image.fromarray(truth, mode="P")
        palette_mask.putpalette([0, 0, 0, 255, 255, 255])
        palette_mask.save(mask)
        made.append((image, mask, truth))
    return made


def write_list(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_pairs_file_pairs_names_that_share_no_pattern(tmp_path):
    made = retina_like(tmp_path / "drive")
    with pytest.raises(DatasetError, match="--pairs FILE"):  # matching by name finds no pairs: the fix is named
        data_args("--images", tmp_path / "drive" / "images", "--masks", tmp_path / "drive" / "masks")
    # relative to the list's own folder (not the working directory), with a header; one absolute path
    rows = [f"../drive/images/{image.name},../drive/masks/{mask.name}" for image, mask, _ in made[1:]]
    listed = write_list(tmp_path / "lists" / "train.csv",
                        ["image,mask", f"{made[0][0]}, {made[0][1]}", "", *rows])
    args = data_args("--pairs", listed, "--no-augment", "--val-percent", "0")
    assert args[0].dataset == "folder" and args[0].mask_values == [0, 1]
    dataset = build_dataset(args, "all")
    assert [(a.resolve(), b.resolve()) for a, b in dataset.pairs] == [(a, b) for a, b, _ in made]
    for (_, _, truth), (image, mask) in zip(made, (dataset[i] for i in range(len(made)))):
        assert image.shape == (3, *truth.shape) and np.array_equal(mask.numpy(), truth)
    no_header = write_list(tmp_path / "lists" / "plain.csv", [f"{a},{b}" for a, b, _ in made])
    assert build_dataset(data_args("--pairs", no_header, "--no-augment"), "all").pairs == [(a, b) for a, b, _ in made]


@pytest.mark.parametrize("lines, message", [
    ([], "lists no pairs"),
    (["image,mask"], "lists no pairs"),
    (["21_training.tif"], "line 1: expected 'image,mask' (two paths), got '21_training.tif'"),
    (["image,mask", "a.png,b.png,c.png"], "line 2: expected 'image,mask'"),
    (["images/21_training.tif,masks/nothing.gif"], "1 file(s) listed in"),
    (["images/21_training.tif,masks/21_manual1.gif", "images/21_training.tif,masks/22_manual1.gif"],
     "has the name of"),
])
def test_bad_pairs_files(tmp_path, lines, message):
    retina_like(tmp_path)
    with pytest.raises(DatasetError) as error:
        data_args("--pairs", write_list(tmp_path / "pairs.csv", lines))
    assert message in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(DatasetError, match="does not exist"):
        data_args("--pairs", tmp_path / "missing.csv")


def test_pairs_go_without_images_and_masks(tmp_path):
    with pytest.raises(ConfigError, match="without --images and --masks"):
        data_args("--pairs", "a.csv", "--images", "x", "--masks", "y")
    with pytest.raises(ConfigError, match="not --dataset voc"):
        data_args("--pairs", "a.csv", "--dataset", "voc")


def photo_folders(root, count=3, size=(24, 32)):
    """imgs/<i>.png: smooth colour gradients with a little noise, as photographs are (JPEG keeps them close)."""
    rng = np.random.default_rng(1)
    (root / "imgs").mkdir(parents=True)
    y, x = np.mgrid[0:size[0], 0:size[1]]
    for i in range(count):
        smooth = np.stack([x * 6 + i * 20, y * 8, (x + y) * 3], axis=-1) + rng.integers(0, 8, (*size, 3))
        Image.fromarray(smooth.clip(0, 255).astype(np.uint8)).save(root / "imgs" / f"{i}.png")
    return root / "imgs"


def test_masks_pointed_at_the_images_folder(tmp_path):
    images = photo_folders(tmp_path)
    with pytest.raises(DatasetError, match="both name") as error:
        data_args("--images", images, "--masks", images)
    assert "point --masks at the folder of masks" in str(error.value)
    # a copy of the folder, and a re-encoded copy (JPEG: not the same bytes, nearly the same pixels)
    shutil.copytree(images, tmp_path / "copy")
    (tmp_path / "jpeg").mkdir()
    for png in images.iterdir():
        Image.open(png).save(tmp_path / "jpeg" / f"{png.stem}.jpg", quality=90)
    for masks in ("copy", "jpeg"):
        with pytest.raises(DatasetError) as error:
            data_args("--images", images, "--masks", tmp_path / masks)
        assert "is the same picture as its image" in str(error.value) and "holds colours" not in str(error.value)
    # grey copies hold many values rather than colours: named the same way
    (tmp_path / "grey").mkdir()
    for png in images.iterdir():
        Image.open(png).convert("L").save(tmp_path / "grey" / png.name)
        Image.open(png).convert("L").save(images / png.name)
    with pytest.raises(DatasetError, match="is the same picture as its image"):
        data_args("--images", images, "--masks", tmp_path / "grey")


def test_colour_masks_of_other_pictures_are_not_taken_for_their_images(tmp_path):
    images = photo_folders(tmp_path)
    (tmp_path / "masks").mkdir()
    for png in images.iterdir():
        colours = np.zeros((24, 32, 3), np.uint8)
        colours[:, 16:] = (200, 10, 10)
        Image.fromarray(colours).save(tmp_path / "masks" / png.name)
    args = data_args("--images", images, "--masks", tmp_path / "masks", "--no-augment")
    assert args[0].mask_values == [[0, 0, 0], [200, 10, 10]]  # read as colour-coded masks


def test_masks_beside_their_images_with_a_suffix(tmp_path):
    images = photo_folders(tmp_path)
    for i in range(3):
        Image.fromarray(np.full((24, 32), i % 2, np.uint8)).save(images / f"{i}_mask.png")
    args = data_args("--images", images, "--masks", images, "--mask-suffix", "_mask", "--no-augment")
    assert [(a.name, b.name) for a, b in build_dataset(args, "all").pairs] == [
        (f"{i}.png", f"{i}_mask.png") for i in range(3)]


def test_train_and_eval_read_a_pairs_file(tmp_path, capsys):
    made = retina_like(tmp_path / "drive", count=8, size=(32, 32))
    listed = write_list(tmp_path / "drive" / "pairs.csv",
                        ["image,mask"] + [f"images/{a.name},masks/{b.name}" for a, b, _ in made])
    run = train.main(["--pairs", str(listed), "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2",
                      "--base-channels", "4", "--depth", "2", "--workers", "0", "--sample-every", "0",
                      "--crop-size", "16", "--val-percent", "25", "--checkpoint-dir", str(tmp_path / "runs")])
    model = str(run / "best.pth")
    scores = eval_script.main(["-m", model, "--pairs", str(listed), "--workers", "0"])
    # the same files paired by name instead (links named like the images) score the same
    (tmp_path / "linked").mkdir()
    for image, mask, _ in made:
        (tmp_path / "linked" / f"{image.stem}.gif").symlink_to(mask)
    by_name = eval_script.main(["-m", model, "--images", str(tmp_path / "drive" / "images"),
                                "--masks", str(tmp_path / "linked"), "--workers", "0"])
    assert scores == by_name
    eval_script.main(["-m", model, "--workers", "0"])  # no data flag: the run's validation side of the list
    out = capsys.readouterr().out
    assert "pairs.csv all: 8 images" in out and "pairs.csv val: 2 images" in out
    code, line = exits(eval_script, ["-m", model, "--pairs", str(tmp_path / "none.csv"), "--workers", "0"], capsys)
    assert code == 1 and "none.csv' does not exist" in line
