"""Dataset readers on the real sample files, the VOC+SBD protocols, augmentation alignment, bad-data errors,
layout detection and --download."""
import argparse
import hashlib
import http.server
import os
import subprocess
import sys
import tarfile
import threading
from functools import partial

import numpy as np
import pytest
import scipy.io
import torch
import torchvision.datasets.voc
from PIL import Image

import datasets
import images
import pairs
from conftest import ROOT
from datasets import DataConfig, resolve_data
from errors import DatasetError
from flags import add_augment_args, add_dataset_args, config_from
from test_transforms import agreement, thin_lines
from transforms import AugmentConfig, random_zoom_crop


def data_args(*argv):
    """(resolved DataConfig, AugmentConfig) from data and augmentation flags, as train.py builds them."""
    parser = argparse.ArgumentParser()
    add_dataset_args(parser)
    add_augment_args(parser)
    flags = vars(parser.parse_args([str(a) for a in argv]))
    return resolve_data(config_from(DataConfig, flags)), config_from(AugmentConfig, flags).check()


def build_dataset(args, split):
    """The training preset (augmented) for 'train', the validation preset otherwise."""
    data, augment = args
    return datasets.build_dataset(data, split, augment if split == "train" else None)


def link_tree(target, link):
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, link)
    return link


def save_pair(folder, stem, image, mask, mask_name=None):
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / "imgs" / f"{stem}.png")
    Image.fromarray(mask).save(folder / "masks" / (mask_name or f"{stem}.png"))


def striped(height=40, width=60):
    mask = np.zeros((height, width), np.uint8)
    mask[:, width // 3:] = 255
    return np.repeat(mask[..., None], 3, axis=2), mask


# --- real files ---------------------------------------------------------------------------------------------

def test_voc_reads_palette_indices_and_honours_split_lists(shared_data, tmp_path):
    voc = shared_data / "voc_subset" / "VOC2012"
    val = build_dataset(data_args("--dataset", "voc", "--data", voc.parent), "val")
    listed = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert [image.stem for image, _ in val.pairs] == listed and len(val) == 50
    assert val.classes[15] == "person" and val.ignore_index == 255
    seen = set()
    for i in (0, 7, 31):
        image, mask = val[i]
        truth = np.array(Image.open(voc / "SegmentationClass" / f"{listed[i]}.png"))
        height, width = truth.shape
        assert image.shape == (3, 500, 500) and mask.shape == (500, 500) and mask.dtype == torch.int64
        assert np.array_equal(mask[:height, :width].numpy(), truth)  # palette indices are the class indices
        assert (mask[height:] == 255).all() and (mask[:, width:] == 255).all() and (image[:, height:] == 0).all()
        seen |= set(np.unique(truth).tolist())
    assert {0, 255} <= seen
    train = build_dataset(data_args("--dataset", "voc", "--data", voc.parent), "train")
    assert not {p[0].stem for p in train.pairs} & set(listed) and len(train) == 50


def test_voc_verify_finds_every_class_and_caches_outside_the_data(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    voc = link_tree(shared_data / "voc_subset" / "VOC2012", tmp_path / "VOC2012")
    before = sorted(p.name for p in (voc / "SegmentationClass").iterdir())
    found = pairs.scan_pairs(build_dataset(data_args("--data", tmp_path, "--verify"), "train").pairs)
    assert set().union(*(counts for _, _, counts in found)) == set(range(21)) | {255}
    assert sum(sum(counts.values()) for _, _, counts in found) == sum(w * h for _, (w, h), _ in found)
    assert pairs.cache_file(voc / "SegmentationClass").is_file()
    assert sorted(p.name for p in (voc / "SegmentationClass").iterdir()) == before  # nothing written beside the data


def test_sbd_reads_gtcls_segmentation(shared_data, tmp_path):
    root = tmp_path / "benchmark_RELEASE" / "dataset"
    for folder in ("img", "cls"):
        link_tree(shared_data / "sbd_sample" / "dataset" / folder, root / folder)
    for split in ("train", "val"):
        (root / f"{split}.txt").write_text("rider\n")
    args = data_args("--data", tmp_path, "--no-augment")
    assert args[0].dataset == "sbd"
    image, mask = build_dataset(args, "train")[0]
    height, width = 333, 500
    assert image.shape == (3, 500, 500) and (mask[height:] == 255).all()
    values, counts = np.unique(mask[:height, :width].numpy(), return_counts=True)
    assert values.tolist() == [0, 13, 15] and counts.tolist() == [147168, 13488, 5844]  # SOURCE.md's counts


def test_carvana_split_by_car_and_mask_values(shared_data):
    sample = shared_data / "carvana_sample"
    args = data_args("--data", sample, "--val-percent", "50", "--scale", "1")
    assert args[0].dataset == "carvana"
    train, val = build_dataset(args, "train"), build_dataset(args, "val")
    cars = [{image.stem.rsplit("_", 1)[0] for image, _ in part.pairs} for part in (train, val)]
    assert len(cars[0]) == len(cars[1]) == 1 and not cars[0] & cars[1] and len(train) == len(val) == 16
    image, mask = val[3]
    truth = np.array(Image.open(val.pairs[3][1]))
    assert image.shape == (3, 1280, 1918) and np.array_equal(mask.numpy(), truth)
    assert val.classes == ["background", "car"] and val.mask_values == [0, 1]
    half = build_dataset(data_args("--data", sample, "--val-percent", "50"), "val")  # default scale: 0.5
    assert half[3][0].shape == (3, 640, 959) and set(half[3][1].unique().tolist()) == {0, 1}


def test_isbi_folders_named_with_images_and_masks(shared_data, tmp_path):
    for folder in ("image", "label"):
        for png in (shared_data / "isbi2012" / "train" / folder).iterdir():
            link_tree(png, tmp_path / folder / png.name)
    args = data_args("--images", tmp_path / "image", "--masks", tmp_path / "label", "--no-augment")
    train, val = build_dataset(args, "train"), build_dataset(args, "val")
    assert args[0].dataset == "folder" and args[0].mask_values == [0, 255] and len(train) + len(val) == 30
    image, mask = val[0]
    truth = np.array(Image.open(val.pairs[0][1]))
    assert np.array_equal(mask.numpy(), (truth == 255).astype(np.int64))
    # Grey 8-bit images stay one channel, as the file holds them.
    assert image.dtype == torch.uint8 and np.array_equal(image.numpy(), np.array(Image.open(val.pairs[0][0]))[None])


# --- protocols ----------------------------------------------------------------------------------------------

def fake_voc_sbd(root, voc_ids, sbd_ids, voc_lists, sbd_lists):
    voc = root / "VOCdevkit" / "VOC2012"
    sbd = root / "benchmark_RELEASE" / "dataset"
    for folder in (voc / "JPEGImages", voc / "SegmentationClass", voc / "ImageSets" / "Segmentation",
                   sbd / "img", sbd / "cls"):
        folder.mkdir(parents=True)
    image = np.zeros((6, 8, 3), np.uint8)
    for i in voc_ids:
        Image.fromarray(image).save(voc / "JPEGImages" / f"{i}.jpg")
        Image.fromarray(np.full((6, 8), 1, np.uint8)).save(voc / "SegmentationClass" / f"{i}.png")
    for i in sbd_ids:
        Image.fromarray(image).save(sbd / "img" / f"{i}.jpg")
        segmentation = np.full((6, 8), 2, np.uint8)
        scipy.io.savemat(sbd / "cls" / f"{i}.mat", {"GTcls": {"Segmentation": segmentation}})
    for name, ids in voc_lists.items():
        (voc / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    for name, ids in sbd_lists.items():
        (sbd / f"{name}.txt").write_text("\n".join(ids) + "\n")
    return voc, sbd


def stems_and_labels(dataset):
    return {image.stem: int(dataset[i][1][0, 0]) for i, (image, _) in enumerate(dataset.pairs)}


def test_voc_sbd_protocols(tmp_path):
    voc, _ = fake_voc_sbd(tmp_path, "abcd", "bcef", {"train": "ab", "val": "cd", "trainval": "abcd"},
                          {"train": "bce", "val": "f"})
    assert data_args("--data", tmp_path)[0].dataset == "trainaug"
    # trainaug: VOC train + SBD train+val - VOC val; VOC's own mask (1) wins over SBD's (2) for 'b'.
    aug = build_dataset(data_args("--data", tmp_path, "--no-augment"), "train")
    assert stems_and_labels(aug) == {"a": 1, "b": 1, "e": 2, "f": 2}
    assert [p[0].stem for p in build_dataset(data_args("--data", tmp_path), "val").pairs] == ["c", "d"]
    # SBD train+val for training, the VOC train+val images SBD lacks for validation.
    args = data_args("--data", tmp_path, "--dataset", "sbd-voc", "--no-augment")
    assert stems_and_labels(build_dataset(args, "train")) == {"b": 2, "c": 2, "e": 2, "f": 2}
    assert stems_and_labels(build_dataset(args, "val")) == {"a": 1, "d": 1}
    # A SegmentationClassAug folder replaces the .mat files.
    (voc / "SegmentationClassAug").mkdir()
    for i in "abcdef":
        Image.fromarray(np.full((6, 8), 3, np.uint8)).save(voc / "SegmentationClassAug" / f"{i}.png")
    for i in "ef":
        Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(voc / "JPEGImages" / f"{i}.jpg")
    aug = build_dataset(data_args("--data", tmp_path, "--dataset", "trainaug", "--no-augment"), "train")
    assert stems_and_labels(aug) == {"a": 1, "b": 1, "e": 3, "f": 3}


# --- augmentation -------------------------------------------------------------------------------------------

def test_augmentation_moves_mask_with_image(tmp_path):
    rng = np.random.default_rng(0)
    mask = np.zeros((90, 120), np.uint8)
    for _ in range(6):
        top, left = rng.integers(0, 70), rng.integers(0, 100)
        mask[top:top + rng.integers(15, 40), left:left + rng.integers(15, 40)] = 255
    image = np.stack([np.where(mask > 0, 230, 40)] * 3, axis=2).astype(np.uint8)
    save_pair(tmp_path, "pattern", image, mask)
    args = data_args("--data", tmp_path, "--dataset", "folder", "--val-percent", "0", "--crop-size", "64",
                     "--zoom", "0.7", "1.6", "--hflip", "0.5", "--rotate", "30", "--jitter", "0")
    dataset = build_dataset(args, "train")
    torch.manual_seed(0)
    aligned, mirrored = [], []
    for _ in range(20):
        image, mask = dataset[0]
        assert image.shape == (3, 64, 64) and mask.shape == (64, 64)
        assert set(mask.unique().tolist()) <= {0, 1, 255}  # class ids only: no interpolated labels
        red = image[0].float()
        assert (red[mask == 255] < 135).all()  # padding and rotated-in corners are black and ignored
        labelled = (mask != 255) & (mask.flip(1) != 255)
        aligned.append(torch.where(mask == 1, red > 135, red < 135)[labelled])
        mirrored.append(torch.where(mask.flip(1) == 1, red > 135, red < 135)[labelled])
    assert torch.cat(aligned).float().mean() > 0.97  # only resampled edge pixels may disagree
    assert torch.cat(mirrored).float().mean() < 0.85  # while a mask out of step with its image is caught


def test_scaled_masks_follow_their_scaled_images(tmp_path):
    """--scale without a crop: the mask is resampled as the image is, thin lines' edges included."""
    image, mask = thin_lines(160, 200)
    save_pair(tmp_path, "lines", np.stack([image] * 3, axis=2), mask * 255)
    args = data_args("--data", tmp_path, "--dataset", "folder", "--val-percent", "0", "--scale", "0.5",
                     "--crop-size", "0", "--no-augment")
    image, mask = build_dataset(args, "train")[0]
    assert mask.shape == (80, 100) and set(mask.unique().tolist()) == {0, 1}
    assert agreement(image[0].numpy().astype(int), mask.numpy(), ...) >= 0.995



@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_class_crops_show_a_rare_class_as_often_as_a_common_one(tmp_path, scale):
    """One 6x6 square of class 1 in a 200x240 mask (0.075% of the pixels): a random 48-pixel crop holds it in 6%
    of the cases (the windows that overlap it), a crop centred on a pixel of a class drawn uniformly from the two
    in half, so --class-crops 1 shows it in half the crops plus the random share of the others."""
    mask = np.zeros((200, 240), np.uint8)
    mask[150:156, 30:36] = 255
    image = np.stack([np.where(mask > 0, 230, 40)] * 3, axis=2).astype(np.uint8)
    save_pair(tmp_path, "rare", image, mask)
    crop = round(48 * scale)
    shares = {}
    for class_crops in (0, 1):
        args = data_args("--data", tmp_path, "--dataset", "folder", "--val-percent", "0", "--crop-size", crop,
                         "--zoom", "1", "1", "--rotate", "0", "--hflip", "0", "--scale", scale,
                         "--mask-values", "0", "255", "--class-crops", class_crops)
        dataset = build_dataset(args, "train")
        torch.manual_seed(0)
        items = [dataset[0] for _ in range(400)]
        shares[class_crops] = np.mean([(mask == 1).any().item() for _, mask in items])
        for image, mask in items:  # the crop still cuts the image and its mask alike
            assert ((image[0] > 135) == (mask == 1)).float().mean() > 0.99
    tops, lefts = np.arange(200 - 48 + 1), np.arange(240 - 48 + 1)  # every window of a random crop, alike
    random_share = np.mean((tops[:, None] + 48 > 150) & (tops[:, None] < 156) & (lefts + 48 > 30) & (lefts < 36))
    assert abs(shares[0] - random_share) < 0.03
    assert abs(shares[1] - (0.5 + 0.5 * random_share)) < 0.08


def test_kept_pairs_give_the_items_files_give_and_are_decoded_once(tmp_path, monkeypatch):
    """Training pairs kept decoded in memory (datasets.DecodedPairs) give, for the same seed, the items read from
    the files every time give, over two epochs (rotation, zoom, class-centred crops and a --scale included), and
    each file is decoded once; a budget of one pair keeps one."""
    rng = np.random.default_rng(3)
    for stem in ("a", "b", "c"):
        mask = (rng.random((50, 70)) > 0.7).astype(np.uint8) * 255
        save_pair(tmp_path, stem, np.stack([mask // 2 + 40] * 3, axis=2), mask)
    args = data_args("--data", tmp_path, "--dataset", "folder", "--val-percent", "0", "--crop-size", "24",
                     "--rotate", "20", "--zoom", "0.8", "1.3", "--class-crops", "0.5", "--scale", "0.8")
    kept = build_dataset(args, "train")
    assert kept.decoded is not None  # the training preset keeps pairs
    read = build_dataset(args, "train")
    read.decoded = None
    opened = []
    monkeypatch.setattr(datasets, "open_image", lambda *a: opened.append(a[0].stem) or images.open_image(*a))
    items, decoded = {}, {}
    for name, dataset in (("read", read), ("kept", kept)):
        opened.clear()
        torch.manual_seed(0)
        items[name] = [dataset[i % 3] for i in range(6)]
        decoded[name] = sorted(opened)
    for (image, mask), (kept_image, kept_mask) in zip(items["read"], items["kept"]):
        assert torch.equal(image, kept_image) and torch.equal(mask, kept_mask)
    assert decoded == {"read": ["a", "a", "b", "b", "c", "c"], "kept": ["a", "b", "c"]}
    one_pair = sum(map(datasets.decoded_bytes, kept.decode(*kept.pairs[0], as_classes=True)))
    assert one_pair == 56 * 40 * 3 + 70 * 50  # the image at --scale 0.8, the mask's class ids at full size
    kept = datasets.SegmentationFiles(kept.pairs, kept.classes, kept.mask_values, scale=0.8, cache_bytes=one_pair)
    for i in (0, 1, 2, 0, 1):
        kept[i]
    assert list(kept.decoded.pairs) == [0] and kept.decoded.used == one_pair
    worker = type("WorkerInfo", (), {"num_workers": 2})
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: worker)
    halved = datasets.SegmentationFiles(kept.pairs, kept.classes, kept.mask_values, scale=0.8, cache_bytes=one_pair)
    halved[0]
    assert not halved.decoded.pairs  # each of two workers keeps half the bytes: not this pair
    monkeypatch.setattr(datasets, "available_memory", lambda device: (8 << 30, "MemAvailable"))
    assert datasets.decoded_cache_bytes() == 2 << 30  # a quarter of the free memory
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's processes on this machine share it
    assert datasets.decoded_cache_bytes() == 512 << 20


# --- bad data -----------------------------------------------------------------------------------------------

def folder_error(tmp_path, *flags):
    with pytest.raises(DatasetError) as error:
        build_dataset(data_args("--data", tmp_path, "--dataset", "folder", *flags), "train")
    return str(error.value)


def test_image_without_mask_and_mask_without_image(tmp_path):
    image, mask = striped()
    save_pair(tmp_path, "a", image, mask)
    Image.fromarray(image).save(tmp_path / "imgs" / "lonely.png")
    message = folder_error(tmp_path)
    assert "1 image(s)" in message and "lonely.png" in message and "have no mask" in message
    (tmp_path / "imgs" / "lonely.png").unlink()
    Image.fromarray(mask).save(tmp_path / "masks" / "orphan.png")
    message = folder_error(tmp_path)
    assert "orphan.png" in message and "have no image" in message


def test_mask_size_and_values_checked(tmp_path):
    image, mask = striped()
    save_pair(tmp_path, "a", image, mask)
    save_pair(tmp_path, "b", image, mask[:, :50])
    message = folder_error(tmp_path)
    assert "'b.png'" not in message and "b.png" in message and "50x40" in message and "60x40" in message
    save_pair(tmp_path, "b", image, np.where(mask > 0, 7, 0).astype(np.uint8))
    message = folder_error(tmp_path, "--mask-values", "0", "255")
    assert "b.png" in message and "1 value(s) (7)" in message and "[0, 255]" in message
    voc = build_dataset(data_args("--data", tmp_path, "--dataset", "folder", "--val-percent", "0"), "train")
    assert voc.mask_values == [0, 7, 255]


def test_missing_and_empty_folders(tmp_path):
    assert "does not exist" in folder_error(tmp_path, "--images", tmp_path / "nope", "--masks", tmp_path)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "masks").mkdir()
    message = folder_error(tmp_path)
    assert "is empty" in message and str(tmp_path / "imgs") in message


def test_corrupt_file_named_or_skipped_with_count(tmp_path, capsys):
    image, mask = striped()
    for stem in "abc":
        save_pair(tmp_path, stem, image, mask)
    (tmp_path / "masks" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    message = folder_error(tmp_path)
    assert "b.png" in message and "corrupt" in message
    dataset = build_dataset(data_args("--data", tmp_path, "--dataset", "folder", "--skip-bad", "--val-percent", "0"),
                            "train")
    assert [p[0].stem for p in dataset.pairs] == ["a", "c"]
    assert "skipped 1 unreadable pair(s)" in capsys.readouterr().err


def test_voc_listed_file_missing_and_unknown_value(tmp_path):
    voc, _ = fake_voc_sbd(tmp_path, "ab", "", {"train": "ab", "val": "a"}, {})
    (voc / "JPEGImages" / "b.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 file\(s\) listed in .*train.txt' are missing: .*b.jpg"):
        build_dataset(data_args("--data", tmp_path, "--dataset", "voc"), "train")
    Image.fromarray(np.full((6, 8), 40, np.uint8)).save(voc / "SegmentationClass" / "a.png")
    with pytest.raises(DatasetError, match=r"a.png' holds 1 value\(s\) \(40\) outside"):
        build_dataset(data_args("--data", tmp_path, "--dataset", "voc", "--verify"), "val")
    with pytest.raises(DatasetError, match=r"a.png' holds 1 value\(s\) \(40\) outside"):
        build_dataset(data_args("--data", tmp_path, "--dataset", "voc"), "val")[0]


def test_exif_grey_rgba_and_16_bit_images(tmp_path):
    upright = np.zeros((30, 20), np.uint8)
    upright[:10] = 255
    stored = Image.fromarray(np.rot90(upright, -1).copy())  # stored on its side, EXIF says "rotate back"
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = 8
    save_pair(tmp_path, "turned", np.zeros((30, 20, 3), np.uint8), upright)
    stored.convert("RGB").save(tmp_path / "imgs" / "turned.jpg", exif=exif, quality=100)
    (tmp_path / "imgs" / "turned.png").unlink()
    Image.fromarray(np.full((30, 20), 4000, np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(np.zeros((30, 20, 4), np.uint8), "RGBA").save(tmp_path / "imgs" / "alpha.png")
    Image.fromarray(upright).save(tmp_path / "masks" / "alpha.png")
    dataset = build_dataset(data_args("--data", tmp_path, "--dataset", "folder", "--no-augment",
                                      "--val-percent", "0"), "train")
    items = {image.stem: dataset[i] for i, (image, _) in enumerate(dataset.pairs)}
    assert all(image.shape == (3, 30, 20) for image, _ in items.values())
    turned = items["turned"][0][0].float()
    assert turned[:10].mean() > 200 and turned[10:].mean() < 50  # the bright band is on top once upright
    # Read for a model of 8-bit RGB images (as every model before image forms): the 16-bit range scaled to 8 bits.
    assert images.read_image(tmp_path / "deep.png").unique().tolist() == [round(4000 * 255 / 65535)]


# --- detection, start, download -----------------------------------------------------------------------------

@pytest.mark.parametrize("level", ["", "VOCdevkit", "VOCdevkit/VOC2012"])
def test_voc_found_from_any_level(shared_data, tmp_path, level):
    link_tree(shared_data / "voc_subset" / "VOC2012", tmp_path / "VOCdevkit" / "VOC2012")
    args = data_args("--data", tmp_path / level)
    assert args[0].dataset == "voc" and len(build_dataset(args, "val")) == 50


def test_empty_data_folder_says_how_to_get_data(tmp_path):
    with pytest.raises(DatasetError) as error:
        data_args("--data", tmp_path)
    message = str(error.value)
    assert "VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}" in message
    assert "benchmark_RELEASE/dataset/{img,cls}" in message and "--dataset shapes" in message
    assert "--download" in message and "\n" not in message


def test_train_reports_bad_data_in_one_line(tmp_path):
    image, mask = striped()
    save_pair(tmp_path, "a", image, mask)
    save_pair(tmp_path, "b", image, mask[:30])
    result = subprocess.run([sys.executable, "train.py", "--data", str(tmp_path), "--epochs", "1",
                             "--steps-per-epoch", "1", "--workers", "0",
                             "--checkpoint-dir", str(tmp_path / "runs")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: mask '{tmp_path / 'masks' / 'b.png'}' is 60x30 but its image '{tmp_path / 'imgs' / 'b.png'}' "
        f"is 60x40; masks must have their image's size"]


@pytest.fixture
def served(tmp_path):
    """A local HTTP server (loopback only) for a folder."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_through_torchvision(served, tmp_path, monkeypatch):
    folder, url = served
    fake_voc_sbd(tmp_path / "made", "ab", "", {"train": "a", "val": "b"}, {})
    archive = folder / "VOCtrainval_11-May-2012.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tmp_path / "made" / "VOCdevkit", arcname="VOCdevkit")
    source = {"url": f"{url}/{archive.name}", "filename": archive.name,
              "md5": hashlib.md5(archive.read_bytes()).hexdigest(), "base_dir": "VOCdevkit/VOC2012"}
    monkeypatch.setitem(torchvision.datasets.voc.DATASET_YEAR_DICT, "2012", source)
    data = tmp_path / "data"
    args = data_args("--data", data, "--dataset", "voc", "--download")
    assert [p[0].stem for p in build_dataset(args, "val").pairs] == ["b"]
    assert not (data / archive.name).exists()  # the archive is removed once unpacked
    monkeypatch.setitem(source, "md5", "0" * 32)
    with pytest.raises(DatasetError, match="could not download http:"):
        data_args("--data", tmp_path / "other", "--dataset", "voc", "--download")


def test_rotation_brings_in_void_only_from_beyond_the_image():
    """A zoomed-out, rotated window: pixels from beyond the image are black and void, the rest keep their
    class (a uniform grey image whose mask is class 1 everywhere)."""
    image = Image.new("RGB", (80, 60), (200, 200, 200))
    mask = Image.new("L", (160, 120), 1)  # masks may come at another resolution than the decoded image
    torch.manual_seed(0)
    voids = 0
    for _ in range(10):
        window, window_mask, outside = random_zoom_crop(image, mask, 64, (0.6, 0.8), 45)
        pixels, labels = np.asarray(window)[..., 0], np.asarray(window_mask).copy()
        assert set(np.unique(labels)) <= {0, 1}  # nearest neighbour: no new values
        if outside is None:
            assert (labels == 1).all() and (pixels > 150).all()
            continue
        voids += outside.sum()
        assert (pixels[outside] < 60).all()  # black fill, up to the bilinear blend at the rim
        inside = ~outside
        assert (labels[inside] == 1).mean() > 0.97 and (pixels[inside] > 100).mean() > 0.97
    assert voids > 0  # at 45 degrees and zoomed out, some windows reach beyond the image


def test_mask_layout_counts_the_masks_labelled_pixels_and_where_they_lie(tmp_path):
    """Three 31 x 40 masks with a void value: the shares are numpy's counts of the classes over all of them, void
    aside; the asymmetries are the total variation distances of the class shares of rows 0-14 against rows 16-30
    (the middle row 15 in neither) and of columns 0-19 against 20-39."""
    rng = np.random.default_rng(0)
    masks = [rng.choice([0, 10, 20, 99], size=(31, 40), p=[0.6, 0.25, 0.1, 0.05]).astype(np.uint8) for _ in range(3)]
    masks[0][:15] = 10  # class 1 crowds the top of one mask
    for i, mask in enumerate(masks):
        save_pair(tmp_path, f"m{i}", np.zeros((31, 40, 3), np.uint8), mask)
    args = data_args("--data", tmp_path, "--dataset", "folder", "--val-percent", "0", "--mask-values", "0", "10",
                     "20", "--ignore-index", "99")

    def shares(part):
        counts = np.array([sum((part(m) == v).sum() for m in masks) for v in (0, 10, 20)])
        return counts / counts.sum()

    layout = datasets.mask_layout(build_dataset(args, "train"), 3)
    assert layout.shares == pytest.approx(shares(lambda m: m))
    assert layout.upside_down == pytest.approx(0.5 * np.abs(shares(lambda m: m[:15]) - shares(lambda m: m[16:])).sum())
    assert layout.mirrored == pytest.approx(0.5 * np.abs(shares(lambda m: m[:, :20]) - shares(lambda m: m[:, 20:])).sum())
    assert layout.upside_down > 0.2 > layout.mirrored


def test_mask_layout_stops_at_its_pixel_budget_and_skips_bad_masks():
    class Stub:
        """Ten masks of 1,000 pixels (10 x 100): mask i all of class i % 2; mask 3 unreadable."""
        skip_bad = True

        def __len__(self):
            return 10

        def class_map(self, index):
            if index == 3:
                raise DatasetError("mask 3 is corrupt")
            read.append(index)
            return np.full((10, 100), index % 2, np.uint8)

    read = []
    layout = datasets.mask_layout(Stub(), 2, most_pixels=4000)
    assert len(read) == 4 and len(set(read)) == 4 and 3 not in read
    assert layout.shares == pytest.approx([sum(i % 2 == 0 for i in read) / 4, sum(i % 2 for i in read) / 4])
    assert layout.upside_down == layout.mirrored == 0  # each mask alike in every half
    read.clear()
    datasets.mask_layout(Stub(), 2)
    assert sorted(read) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    Stub.skip_bad = False
    with pytest.raises(DatasetError, match="mask 3 is corrupt"):
        datasets.mask_layout(Stub(), 2)
