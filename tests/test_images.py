"""Images of any channel count and bit depth: reading (PIL, tifffile), the data's form, the per-channel statistics
(against numpy), the adapted first convolution, and train -> eval -> predict -> export round trips on a 16-bit set
that 8 bits cannot separate and on a 5-band TIFF set whose class shows only in band 5."""
import json

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import eval as evaluate_script
import export
import image_stats
import images
import predict
import train
from checkpoints import load_model, save_checkpoint
from datasets import DataConfig, build_dataset, resolve_data
from errors import DatasetError
from inference import preprocess
from model import IMAGENET_NORMALIZE, adapt_first_conv, build_model

TINY = ["--epochs", "2", "--steps-per-epoch", "10", "--batch-size", "4", "--base-channels", "4", "--depth", "2",
        "--workers", "0", "--no-augment", "--val-percent", "25", "--lr", "0.01"]


def squares(count, size=32, seed=0):
    """`count` masks (uint8, 0 or 1) each with a square of class 1 at a random place."""
    rng = np.random.default_rng(seed)
    masks = []
    for _ in range(count):
        mask = np.zeros((size, size), np.uint8)
        y, x = rng.integers(2, size - 14, 2)
        mask[y:y + 12, x:x + 12] = 1
        masks.append(mask)
    return masks


def write_set(root, pictures, masks, write):
    """imgs/<i>.<ext> by `write(path_without_suffix, picture)` and masks/<i>.png; returns the two folders."""
    (root / "imgs").mkdir(parents=True), (root / "masks").mkdir()
    for i, (picture, mask) in enumerate(zip(pictures, masks)):
        write(root / "imgs" / str(i), picture)
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
    return root / "imgs", root / "masks"


def png(path, picture):
    Image.fromarray(picture).save(path.with_suffix(".png"))


def tiff(path, picture):
    tifffile.imwrite(path.with_suffix(".tif"), picture, photometric="minisblack")


def exits(script, argv, capsys):
    with pytest.raises(SystemExit) as stopped:
        script.main(argv)
    assert "Traceback" not in capsys.readouterr().err
    line = stopped.value.code
    assert isinstance(line, str) and line.startswith("error: ") and "\n" not in line.strip(), line
    return line


def miou_of(predicted, truth, classes=2):
    """mean IoU over the classes present in either, from numpy counts."""
    ious = []
    for c in range(classes):
        union = ((predicted == c) | (truth == c)).sum()
        if union:
            ious.append(((predicted == c) & (truth == c)).sum() / union)
    return float(np.mean(ious))


def round_trip(tmp_path, images_dir, masks_dir, capsys):
    """train -> eval (JSON) -> predict (masks) -> export (ONNX); returns (checkpoint, eval's scores, predicted
    masks {stem: array}, the ONNX file)."""
    run = train.main(["--images", str(images_dir), "--masks", str(masks_dir), *TINY,
                      "--checkpoint-dir", str(tmp_path / "runs")])
    best = run / "best.pth"
    evaluate_script.main(["-m", str(best), "--images", str(images_dir), "--masks", str(masks_dir), "--workers", "0",
                          "--json", str(tmp_path / "scores.json"), "--overlays", str(tmp_path / "overlays")])
    predict.main(["-m", str(best), "-i", str(images_dir), "-o", str(tmp_path / "predicted"), "--overlay"])
    predicted = {p.stem.removesuffix("_mask"): np.array(Image.open(p))
                 for p in (tmp_path / "predicted").glob("*_mask.png")}
    onnx_file = export.main(["-m", str(best), "-o", str(tmp_path / "model.onnx")])
    capsys.readouterr()
    return best, json.loads((tmp_path / "scores.json").read_text()), predicted, onnx_file


def check_round_trip(tmp_path, images_dir, masks_dir, pictures, masks, capsys):
    """The round trip's scores, checked against numpy: eval's mIoU is that of predict.py's masks against the truth;
    the ONNX model takes the files' raw values and gives PyTorch's logits. Returns (mIoU, checkpoint)."""
    onnxruntime = pytest.importorskip("onnxruntime")
    best, scores, predicted, onnx_file = round_trip(tmp_path, images_dir, masks_dir, capsys)
    truth = np.stack([masks[int(stem)] for stem in sorted(predicted)])
    labels = np.stack([predicted[stem] for stem in sorted(predicted)]) // 255  # two classes: 0/255 masks
    assert scores["miou"] == pytest.approx(miou_of(labels, truth), abs=1e-9)
    assert (tmp_path / "overlays" / "0.png").is_file() and len(list(tmp_path.glob("predicted/*_overlay.png"))) > 0
    session = onnxruntime.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    raw = np.stack([np.asarray(pictures[int(stem)], np.float32).reshape(-1, *masks[0].shape)
                    for stem in sorted(predicted)])
    (logits,) = session.run(None, {"images": raw})
    model, checkpoint = load_model(best)
    with torch.no_grad():
        expected = model(preprocess(torch.from_numpy(raw), checkpoint["normalize"])).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-3, rtol=1e-3)
    assert np.mean(logits.argmax(1) == labels) > 0.99  # predict.py ran in bf16 where the CPU has it
    return scores["miou"], checkpoint


def test_sixteen_bit_set_trains_to_what_eight_bits_cannot_separate(tmp_path, capsys):
    masks = squares(8)
    rng = np.random.default_rng(1)
    # Objects 90 units brighter than the background, with noise: well below 1/256 of the 16-bit range.
    pictures = [(30000 + 90 * m.astype(np.int64) + rng.integers(-15, 16, m.shape)).astype(np.uint16) for m in masks]
    eight_bit = np.round(np.stack(pictures) * (255 / 65535)).astype(np.uint8)  # today's conversion, in numpy
    assert np.unique(eight_bit).tolist() == [117]  # one value for every pixel of every class: nothing to learn
    images_dir, masks_dir = write_set(tmp_path / "data", pictures, masks, png)
    miou, checkpoint = check_round_trip(tmp_path, images_dir, masks_dir, pictures, masks, capsys)
    # The best a model of the 8-bit images can do: a constant image gives one label map for all, at most as good
    # as labelling everything background (the squares move), mIoU = background share / 2.
    assert miou > 0.8 > np.mean(np.stack(masks) == 0) / 2
    assert checkpoint["model_args"]["in_channels"] == 1 and checkpoint["normalize"]["form"] == [1, "uint16"]


def test_five_band_tiff_set_where_only_band_five_shows_the_class(tmp_path, capsys):
    masks = squares(8, seed=2)
    rng = np.random.default_rng(3)
    pictures = []
    for mask in masks:
        bands = rng.normal(1000, 200, (5, *mask.shape))  # bands 1-4: noise, the same on both classes
        bands[4] = 500 + 400.0 * mask + rng.normal(0, 30, mask.shape)
        pictures.append(bands.astype(np.float32))
    stack, truth = np.stack(pictures), np.stack(masks).astype(bool)
    # Independently: a threshold on band 5 separates the classes; on bands 1-4 the class means differ by noise.
    assert stack[:, 4][truth].min() > stack[:, 4][~truth].max()
    assert all(abs(stack[:, b][truth].mean() - stack[:, b][~truth].mean()) < 20 for b in range(4))
    images_dir, masks_dir = write_set(tmp_path / "data", pictures, masks, tiff)
    assert images.read_pixels(images_dir / "0.tif")[1] == (5, "float32")
    miou, checkpoint = check_round_trip(tmp_path, images_dir, masks_dir, pictures, masks, capsys)
    assert miou > 0.8
    assert checkpoint["model_args"]["in_channels"] == 5 and checkpoint["normalize"]["form"] == [5, "float32"]


def test_statistics_match_numpy_and_are_cached(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    pictures = [rng.normal([[[10.0]], [[-3.0]]], [[[2.0]], [[0.5]]], (2, 40, 50)).astype(np.float32)
                for _ in range(3)]
    pictures[0][1, 0, 0] = 1e6  # an outlier, clipped away
    images_dir, _ = write_set(tmp_path / "data", pictures, squares(3, 40)[:3], tiff)
    paths = sorted(images_dir.iterdir())
    stats = image_stats.cached_statistics(paths, (2, "float32"))
    values = np.concatenate([p.reshape(2, -1) for p in pictures], axis=1).astype(np.float64)
    low, high = np.percentile(values, [0.5, 99.5], axis=1)
    clipped = np.clip(values, low[:, None], high[:, None])
    for key, expected in [("low", low), ("high", high), ("mean", clipped.mean(1)), ("std", clipped.std(1))]:
        np.testing.assert_allclose(stats[key], expected, rtol=1e-9)
    assert stats["high"][1] < 10  # the outlier did not stretch the range
    monkeypatch.setattr(image_stats, "channel_statistics", lambda *a: pytest.fail("measured again"))
    assert image_stats.cached_statistics(paths, (2, "float32")) == stats


def test_preprocess_clips_and_standardises_raw_values():
    normalize = {"low": [10.0, 0.0], "high": [20.0, 4.0], "mean": [15.0, 1.0], "std": [2.0, 0.5], "form": [2, "uint16"]}
    raw = torch.tensor([[[[5.0, 12.0, 30.0]], [[0.0, 3.0, 9.0]]]])
    expected = (np.clip(raw.numpy(), [[[10]], [[0]]], [[[20]], [[4]]]) - [[[15]], [[1]]]) / [[[2]], [[0.5]]]
    np.testing.assert_allclose(preprocess(raw, normalize).numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(preprocess(raw.to(torch.int32), normalize).numpy(), expected, rtol=1e-6)


def test_float_tiff_of_0_to_255_is_read_as_it_is(tmp_path):
    masks = squares(4)
    pictures = [np.where(m == 1, 200.0, 40.0).astype(np.float32) for m in masks]
    images_dir, masks_dir = write_set(tmp_path / "data", pictures, masks, tiff)
    data = resolve_data(DataConfig(dataset="folder", images=str(images_dir), masks=str(masks_dir), val_percent=0))
    assert data.image_form == [1, "float32"]
    image, _, _ = build_dataset(data, "train", full_resolution=True)[0]
    assert image.dtype == torch.float32 and sorted(image.unique().tolist()) == [40.0, 200.0]  # not 0..1 scaled


def test_multi_page_and_multi_sample_tiffs_read_alike(tmp_path):
    bands = np.random.default_rng(5).integers(0, 65536, (4, 6, 9), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "pages.tif", bands, photometric="minisblack")
    tifffile.imwrite(tmp_path / "samples.tif", np.moveaxis(bands, 0, -1), photometric="minisblack",
                     planarconfig="contig", extrasamples=[0, 0, 0])
    for name in ("pages.tif", "samples.tif"):
        pixels, form = images.read_pixels(tmp_path / name)
        assert form == (4, "uint16") and np.array_equal(pixels, bands)
        assert images.header_size(tmp_path / name) == (9, 6)
        assert torch.equal(images.read_image(tmp_path / name, form), torch.from_numpy(bands.astype(np.float32)))


def test_a_tiff_header_is_parsed_once_until_the_file_changes(tmp_path, monkeypatch):
    path = tmp_path / "slice.tif"
    tifffile.imwrite(path, np.zeros((6, 9), np.uint8))
    opened, tiff_file = [], tifffile.TiffFile
    monkeypatch.setattr(tifffile, "TiffFile", lambda *a, **k: opened.append(a) or tiff_file(*a, **k))
    for _ in range(3):
        assert images.tiff_header(path) == ((1, "uint8"), (9, 6), True)
    assert len(opened) == 1
    tifffile.imwrite(path, np.zeros((2, 7, 5), np.uint16), photometric="minisblack")  # the same name, new content
    assert images.tiff_header(path) == ((2, "uint16"), (5, 7), False)
    assert len(opened) == 2
    path.unlink()
    with pytest.raises(DatasetError, match="does not exist"):
        images.tiff_header(path)


@pytest.mark.parametrize("alpha", [False, True])
def test_sixteen_bit_colour_png_keeps_its_low_bits(tmp_path, alpha):
    """PIL reads a 16-bit RGB(A) PNG as 8-bit RGB; it is read as the 3 bands of uint16 values it holds."""
    import imagecodecs
    colour = np.random.default_rng(7).integers(0, 65536, (6, 9, 4 if alpha else 3), dtype=np.uint16)
    (tmp_path / "deep.png").write_bytes(imagecodecs.png_encode(colour))
    with Image.open(tmp_path / "deep.png") as image:
        assert image.mode in ("RGB", "RGBA")  # what PIL gives: 8 bits a band
    pixels, form = images.read_pixels(tmp_path / "deep.png")
    assert form == (3, "uint16") and np.array_equal(pixels, np.moveaxis(colour[..., :3], -1, 0))
    assert images.checked_image_size(tmp_path / "deep.png") == ((9, 6), (3, "uint16"))


@pytest.mark.parametrize("compression", ["lzw", "packbits", "zlib"])
def test_compressed_tiffs_read_as_they_are(tmp_path, compression):
    """LZW and PackBits (the usual microscopy compressions) decode through imagecodecs, a requirement."""
    bands = np.random.default_rng(6).integers(0, 65536, (3, 6, 9), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "c.tif", bands, photometric="minisblack", compression=compression)
    pixels, form = images.read_pixels(tmp_path / "c.tif")
    assert form == (3, "uint16") and np.array_equal(pixels, bands)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_tiff_orientation_turns_as_pil_turns_exif(tmp_path, orientation):
    grey = np.random.default_rng(orientation).integers(0, 256, (5, 7), dtype=np.uint8)
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = orientation
    Image.fromarray(grey).save(tmp_path / "a.png", exif=exif.tobytes())
    upright = np.asarray(images.upright(Image.open(tmp_path / "a.png")))
    assert np.array_equal(images.orient(grey[None], orientation)[0], upright)


def test_eight_bit_rgb_reads_as_before(tmp_path):
    rgb = np.random.default_rng(6).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "a.tif", rgb, photometric="rgb")
    for name in ("a.png", "a.tif"):
        image, size = images.open_image(tmp_path / name)
        assert image.mode == "RGB" and size == (30, 20)
        assert images.read_image(tmp_path / name).dtype == torch.uint8
        assert np.array_equal(images.read_image(tmp_path / name).permute(1, 2, 0).numpy(), rgb)


def test_adapted_first_convolution_follows_segmentation_models_pytorch():
    torch.manual_seed(0)
    rgb = build_model({"arch": "unet", "encoder": "resnet18", "num_classes": 2}).encoder.stages[0].conv1.weight
    classifier = __import__("torchvision").models.resnet18()
    classifier.conv1.weight.data.copy_(rgb)
    grey = __import__("copy").deepcopy(classifier)
    adapt_first_conv(grey, 1, pretrained=True)
    image = torch.rand(1, 1, 16, 16)
    with torch.no_grad():  # one channel: a grey image gives the features of its RGB copy
        torch.testing.assert_close(grey.conv1(image), classifier.conv1(image.expand(1, 3, 16, 16)))
    five = __import__("copy").deepcopy(classifier)
    adapt_first_conv(five, 5, pretrained=True)
    torch.testing.assert_close(five.conv1.weight, rgb[:, [0, 1, 2, 0, 1]] * 3 / 5)
    fresh = __import__("copy").deepcopy(classifier)
    adapt_first_conv(fresh, 5, pretrained=False)
    assert fresh.conv1.weight.shape == (64, 5, 7, 7) and not torch.equal(fresh.conv1.weight[:, :3], rgb)
    model = build_model({"arch": "fcn", "encoder": "vgg11", "num_classes": 2, "in_channels": 5})
    assert model(torch.zeros(1, 5, 32, 32)).shape == (1, 2, 32, 32)


def test_old_rgb_checkpoint_reads_grey_images_as_rgb(tmp_path, capsys):
    model_args = {"arch": "unet", "in_channels": 3, "num_classes": 2, "base_channels": 4, "depth": 2,
                  "bilinear": False}
    save_checkpoint({"model": build_model(model_args).state_dict(), "model_args": model_args,
                     "classes": ["background", "foreground"], "mask_values": [0, 1], "ignore_index": 255,
                     "normalize": IMAGENET_NORMALIZE}, tmp_path / "old.pth")
    masks = squares(2)
    images_dir, masks_dir = write_set(tmp_path / "data", [m * 200 for m in masks], masks, png)
    scores = evaluate_script.main(["-m", str(tmp_path / "old.pth"), "--images", str(images_dir), "--masks",
                                   str(masks_dir), "--workers", "0"])
    assert 0 <= scores["miou"] <= 1


def test_five_band_tiff_is_refused_by_an_rgb_model_not_cut(tmp_path):
    tiff(tmp_path / "five", np.zeros((5, 8, 8), np.uint8))
    with pytest.raises(DatasetError, match=r"five.tif' is a 5-channel uint8 image but the model takes 8-bit RGB"):
        images.read_image(tmp_path / "five.tif")


def test_a_set_of_mixed_band_counts_is_refused_naming_both(tmp_path, capsys):
    masks = squares(3)
    pictures = [np.zeros((5, 32, 32), np.uint16), np.zeros((5, 32, 32), np.uint16), np.zeros((4, 32, 32), np.uint16)]
    images_dir, masks_dir = write_set(tmp_path / "data", pictures, masks, tiff)
    line = exits(train, ["--images", str(images_dir), "--masks", str(masks_dir), *TINY,
                         "--checkpoint-dir", str(tmp_path / "runs")], capsys)
    assert "0.tif' is 5-channel uint16 but" in line and "2.tif' is 4-channel uint16" in line
    assert "convert them to one channel count and bit depth" in line


def test_a_float_image_with_nan_is_refused_naming_it(tmp_path, capsys):
    masks = squares(3)
    pictures = [np.ones((32, 32), np.float32) for _ in masks]
    pictures[1][3, 4] = np.nan
    images_dir, masks_dir = write_set(tmp_path / "data", pictures, masks, tiff)
    line = exits(train, ["--images", str(images_dir), "--masks", str(masks_dir), *TINY,
                         "--checkpoint-dir", str(tmp_path / "runs")], capsys)
    assert "1.tif' holds NaN or infinite pixel values; replace them with numbers" in line
