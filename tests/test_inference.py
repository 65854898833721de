"""Overlap-tile inference, flip TTA and the out-of-memory fallback, against independent numpy computations."""
import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import inference
from inference import InferenceConfig, predict_probs, predict_probs_or_tile, probs_to_labels, tile_starts
from model import ENCODERS, IMAGENET_NORMALIZE, EncoderUNet, FCN8s, UNet
from checkpoints import save_checkpoint
from errors import CheckpointError

PLAIN = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}  # x = pixel / 255


def tiny_unet(num_classes=3, depth=2, seed=0):
    torch.manual_seed(seed)
    model = UNet(3, num_classes, base_channels=4, depth=depth).eval()
    with torch.no_grad():
        model.outc.weight.mul_(20)  # spread the probabilities so that differences show
    return model


def random_images(*shape, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


class PositionModel(torch.nn.Module):
    """One logit: the mean of the input channels plus a ramp across the tile, so that tiles disagree."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # gives the model a device

    def forward(self, x):
        ramp = torch.linspace(-2, 2, x.shape[-1])
        return (x.mean(1, keepdim=True) + ramp)


def numpy_gaussian(n):
    i = np.arange(n)
    return np.exp(-((i - (n - 1) / 2) ** 2) / (2 * (n / 8) ** 2))


def numpy_blend(image, tile, overlap):
    """PositionModel's probabilities of a uint8 3 x H x W image in tiles, blended over the whole image at once."""
    pixels = image.numpy().astype(np.float64) / 255
    height, width = pixels.shape[1:]
    weight = np.outer(numpy_gaussian(tile), numpy_gaussian(tile))
    total, weights = np.zeros((height, width)), np.zeros((height, width))
    for y in tile_starts(height, tile, overlap):
        for x in tile_starts(width, tile, overlap):
            logits = pixels[:, y:y + tile, x:x + tile].mean(0) + np.linspace(-2, 2, tile)
            total[y:y + tile, x:x + tile] += weight / (1 + np.exp(-logits))
            weights[y:y + tile, x:x + tile] += weight
    return total / weights


def test_tile_starts_cover_the_image_evenly():
    assert tile_starts(112, 64, 0.75) == [0, 16, 32, 48]
    assert tile_starts(100, 64, 0.5) == [0, 32, 36]  # stride 32, the last tile flush with the border
    assert tile_starts(100, 60, 0.5, align=8) == [0, 24, 40]  # stride 30 rounded down to a multiple of 8
    assert tile_starts(129, 64, 0.0) == [0, 64, 65]
    assert tile_starts(64, 64, 0.5) == [0] and tile_starts(30, 64, 0.5) == [0]


@pytest.mark.parametrize("side, tile, overlap, align, expected", [
    (2048, 1536, 0.25, 32, 1184),  # 2 tiles either way: 1184 + 1184 - 2048 = 320 px shared, a quarter of 1184 is 296
    (2048, 512, 0.5, 32, 480),  # 7 tiles of 512 (stride 256) or of 480 (stride 224, last flush)
    (1000, 1000, 0.5, 1, 1000),  # one tile: as large as the image
    (300, 64, 0.125, 16, 64),  # 6 tiles; 48-px tiles would need 8
])
def test_balanced_tile_spreads_the_same_number_of_tiles_evenly(side, tile, overlap, align, expected):
    balanced = inference.balanced_tile(side, tile, overlap, align)
    assert balanced == expected and balanced % align == 0 or balanced == tile
    count = len(tile_starts(side, tile, overlap, align))
    assert len(tile_starts(side, balanced, overlap, align)) == count
    if balanced > align:  # one stride less would need more tiles
        assert len(tile_starts(side, balanced - align, overlap, align)) > count


def test_gaussian_blend_is_the_weighted_mean_of_the_tiles():
    image = random_images(1, 3, 50, 70)
    tile, overlap = 32, 0.5
    got = predict_probs(PositionModel(), image, PLAIN, tile=tile, overlap=overlap, batch_size=3)[0, 0].numpy()
    np.testing.assert_allclose(got, numpy_blend(image[0], tile, overlap), atol=1e-5)


def test_band_wise_blending_equals_whole_image_blending():
    """The bands come top to bottom, each final when no later tile covers it, and put together they are the
    blend computed over the whole image at once (numpy); the accumulator spans one row of tiles."""
    image = random_images(3, 150, 90)
    tile, overlap = 48, 0.5
    bands = list(inference.sliding_window_bands(PositionModel(), image, PLAIN, tile, overlap, batch_size=2))
    tops = [top for top, _ in bands]
    assert tops == [0] + [top + band.shape[1] for top, band in bands[:-1]]  # contiguous, in order
    assert tops == inference.tile_starts(150, 48, 0.5)  # one band per row of tiles, ending at the next row
    assert max(band.shape[1] for _, band in bands) <= tile
    got = torch.cat([band for _, band in bands], 1)[0].numpy()
    np.testing.assert_allclose(got, numpy_blend(image, tile, overlap), atol=1e-5)


@pytest.mark.parametrize("size, tile, overlap", [((112, 144), 64, 0.75), ((100, 140), 64, 0.5)])
def test_tiled_equals_whole_image(size, tile, overlap):
    # Sizes that are multiples of the model's pooling factor (4): every tile pools on the whole image's grid.
    model = tiny_unet()
    image = random_images(1, 3, *size)
    whole = predict_probs(model, image, IMAGENET_NORMALIZE)
    tiled = predict_probs(model, image, IMAGENET_NORMALIZE, tile=tile, overlap=overlap, batch_size=5)
    assert tiled.shape == whole.shape == (1, 3, *size)
    assert (tiled - whole).abs().max() < 0.03
    assert (probs_to_labels(tiled) == probs_to_labels(whole)).float().mean() > 0.999
    naive = predict_probs(model, image, IMAGENET_NORMALIZE, tile=32, overlap=0.0)  # no context at tile borders
    assert (naive - whole).abs().max() > 0.1  # so the tolerance above means something


# Input pixels per pixel of the deepest features, worked out from each architecture's downsampling layers:
# UNet halves `depth` times with max-pools; a VGG U-Net taps before 4 of VGG's 5 max-pools (16); FCN-8s goes
# through all 5 (32; fc6 and fc7 keep the size); ResNet halves in conv1, the max-pool and layer2-4 (32) and
# DenseNet in conv0, pool0 and its three transitions (32): one MaxPool2d each, so counting max-pools gave 2.
ENCODER_STRIDES = {"vgg": 16, "resnet": 32, "densenet": 32}


def encoder_stride(name):
    return next(stride for family, stride in ENCODER_STRIDES.items() if name.startswith(family))


@pytest.mark.parametrize("make, stride", [
    *[(lambda depth=depth: UNet(3, 2, base_channels=4, depth=depth), 2 ** depth) for depth in (1, 2, 3, 5)],
    *[(lambda name=name: EncoderUNet(name, 2), encoder_stride(name)) for name in ENCODERS],
    (lambda: FCN8s("vgg11", 2), 32), (lambda: FCN8s("vgg16_bn", 2), 32),
], ids=[f"unet-depth{d}" for d in (1, 2, 3, 5)] + list(ENCODERS) + ["fcn8s-vgg11", "fcn8s-vgg16_bn"])
def test_output_stride_of_every_family(make, stride):
    with torch.device("meta"):  # shapes only: no memory for VGG's classifier, no time spent initialising it
        model = make()
    assert model.output_stride == stride


def test_tiles_of_an_encoder_unet_lie_on_its_32_pixel_grid():
    """ResNet-18 downsamples by 32: tile offsets must be multiples of 32 for tiles to pool exactly as the whole
    image does, so that, away from the tile borders the Gaussian weighting plays down, tiles agree with it."""
    torch.manual_seed(0)
    model = EncoderUNet("resnet18", num_classes=2, decoder_channels=[8] * 5).eval()
    image = random_images(1, 3, 128, 192)  # sides multiples of 32
    with torch.no_grad():  # random weights give logits within +-0.01: spread them to a std of 2
        logits = model(inference.preprocess(image, IMAGENET_NORMALIZE))
        model.outc.weight.mul_(2 / (logits[:, 1] - logits[:, 0]).std())
        model.outc.bias.zero_()
    whole = predict_probs(model, image, IMAGENET_NORMALIZE)
    assert whole[:, 1].std() > 0.1
    # tile 96, overlap 0.75: a stride of 24 pixels, rounded to 32 by the alignment (to 24 by the old factor 2).
    tiled = predict_probs(model, image, IMAGENET_NORMALIZE, tile=96, overlap=0.75)
    assert tiled.shape == whole.shape == (1, 2, 128, 192)
    assert (tiled - whole).abs().max() < 0.01
    assert (probs_to_labels(tiled) == probs_to_labels(whole)).float().mean() > 0.999
    model.output_stride = 2  # what counting max-pools gave: tiles at multiples of 24, off the 32-pixel grid
    misaligned = predict_probs(model, image, IMAGENET_NORMALIZE, tile=96, overlap=0.75)
    assert (misaligned - whole).abs().max() > 0.05  # so the tolerance above means something


@pytest.mark.parametrize("tile, used", [(16, 32), (31, 32), (40, 32), (70, 64)])
def test_tiles_are_rounded_to_the_output_stride_and_cover_every_pixel(tile, used):
    """A tile below the model's stride (32 for ResNet U-Nets, FCN-8s, --depth 5) stepped by a whole stride and
    left uncovered stripes: NaN probabilities there. Tiles are now whole strides (aligned_tile)."""
    assert inference.aligned_tile(tile, 32) == used
    model = tiny_unet(depth=5)  # stride 32
    image = random_images(1, 3, 96, 128)
    tiled = predict_probs(model, image, IMAGENET_NORMALIZE, tile=tile, overlap=0.5)
    assert not tiled.isnan().any()
    torch.testing.assert_close(tiled.sum(1), torch.ones(1, 96, 128))  # softmax: every pixel blended
    reference = predict_probs(model, image, IMAGENET_NORMALIZE, tile=used, overlap=0.5)
    torch.testing.assert_close(tiled, reference)


def test_normalization_tensors_are_made_once_per_device(monkeypatch):
    made = []
    for name in ("tensor", "as_tensor"):  # every way of making the mean and std tensors is counted
        original = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _original=original, **k: made.append(a) or _original(*a, **k))
    # Normalisations that no other test uses, so that nothing is cached yet.
    first = {"mean": [0.125, 0.25, 0.375], "std": [0.5, 0.25, 0.0625]}
    second = {"mean": [0.75, 0.5, 0.25], "std": [2.0, 0.125, 1.0]}
    images = [random_images(2, 3, 5, 7, seed=seed) for seed in range(3)]

    def expected(image, normalize):
        mean, std = (np.array(normalize[key], np.float64)[None, :, None, None] for key in ("mean", "std"))
        return (image.numpy() / 255 - mean) / std

    got = inference.preprocess(images[0], first)
    assert made  # the first call makes the tensors
    np.testing.assert_allclose(got.numpy(), expected(images[0], first), rtol=1e-5, atol=1e-6)
    made.clear()
    for image in images[1:]:
        got = inference.preprocess(image, first)
        np.testing.assert_allclose(got.numpy(), expected(image, first), rtol=1e-5, atol=1e-6)
    got = inference.preprocess(images[0][:, :, :2], dict(first))  # an equal dict, another batch size
    np.testing.assert_allclose(got.numpy(), expected(images[0][:, :, :2], first), rtol=1e-5, atol=1e-6)
    assert made == []  # every later batch on the same device reuses them
    got = inference.preprocess(images[1], second)  # another normalisation gets its own tensors
    assert made
    np.testing.assert_allclose(got.numpy(), expected(images[1], second), rtol=1e-5, atol=1e-6)


def test_normalization_made_while_tracing_is_not_reused_after():
    """Tensors made while torch.export traces (as export.py's torch.onnx.export does) are placeholders of that
    trace: a cache that keeps them hands them to later eager calls, which then fail or compute nonsense."""
    normalize = {"mean": [0.25, 0.5, 0.75], "std": [0.5, 0.125, 0.25]}  # no other test uses it: made in the trace

    class Preprocess(torch.nn.Module):
        def forward(self, images):
            return inference.preprocess(images, normalize)

    image = random_images(1, 3, 4, 6)
    torch.export.export(Preprocess(), (image,))
    got = inference.preprocess(image, normalize)
    mean, std = (np.array(normalize[key])[None, :, None, None] for key in ("mean", "std"))
    np.testing.assert_allclose(got.numpy(), (image.numpy() / 255 - mean) / std, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("vertical, numpy_axes", [(False, [(), (3,)]), (True, [(), (3,), (2,), (2, 3)])])
def test_tta_is_the_mean_of_the_flipped_predictions(vertical, numpy_axes):
    """--tta averages the horizontal flip, which training shows the model; --tta-vflip all four flips."""
    model = tiny_unet(num_classes=2)
    image = random_images(2, 3, 40, 56)
    options = InferenceConfig(tta=True, tta_vflip=vertical, amp="off").options()
    got = predict_probs(model, image, IMAGENET_NORMALIZE, **options)
    assert got.shape == (2, 2, 40, 56)
    x = inference.preprocess(image, IMAGENET_NORMALIZE).numpy()
    expected = 0
    for axes in numpy_axes:
        with torch.no_grad():
            logits = model(torch.from_numpy(np.flip(x, axes).copy())).numpy()
        softmax = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        expected = expected + np.flip(softmax, axes) / len(numpy_axes)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    assert not torch.allclose(got, predict_probs(model, image, IMAGENET_NORMALIZE), atol=1e-3)
    tiled = predict_probs(model, image, IMAGENET_NORMALIZE, **{**options, "tile": 32, "overlap": 0.5})
    assert tiled.shape == got.shape


def pil_resize(channels, size):
    """PIL's bilinear resize (antialiased when shrinking) of each H x W channel, as float32 (mode F), to size
    (height, width)."""
    return np.stack([np.asarray(Image.fromarray(c.astype(np.float32)).resize(size[::-1], Image.BILINEAR))
                     for c in channels])


def numpy_softmax(logits):
    e = np.exp(logits - logits.max(0))
    return e / e.sum(0)


def test_scale_returns_the_input_size():
    """--scale 0.4 on 45 x 61: the model sees an 18 x 24 image (rounded sides), its probabilities come back
    to 45 x 61; against PIL's bilinear resizing around a per-pixel model (whose tiles cannot disagree)."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 3, 1).eval()
    weight, bias = model.weight[:, :, 0, 0].detach().double().numpy(), model.bias.detach().double().numpy()
    image = random_images(1, 3, 45, 61)
    pixels = image[0].numpy()
    mean, std = (np.array(IMAGENET_NORMALIZE[key])[:, None, None] for key in ("mean", "std"))

    def probs_of(x):  # normalised 3 x 18 x 24 -> probabilities at the input size
        return pil_resize(numpy_softmax(np.einsum("kc,chw->khw", weight, x) + bias[:, None, None]), (45, 61))

    # Whole images: the normalised input is resized; tiles: the uint8 image is, before cutting it up.
    whole = probs_of(pil_resize(pixels / 255 - mean, (18, 24)) / std)
    shrunk = np.asarray(Image.fromarray(pixels.transpose(1, 2, 0)).resize((24, 18), Image.BILINEAR))
    tiled = probs_of((shrunk.transpose(2, 0, 1) / 255 - mean) / std)
    for tile, expected, tolerance in [(None, whole, 1e-5), (16, tiled, 4e-3)]:  # PIL may round uint8 1 off
        probs = predict_probs(model, image, IMAGENET_NORMALIZE, scale=0.4, tile=tile)
        assert probs.shape == (1, 3, 45, 61)
        np.testing.assert_allclose(probs[0].numpy(), expected, atol=tolerance)
        assert torch.allclose(probs.sum(1), torch.ones(1, 45, 61), atol=1e-5)
    unscaled = predict_probs(model, image, IMAGENET_NORMALIZE)[0].numpy()
    assert np.abs(unscaled - whole).max() > 0.1  # the scale matters: the tolerances above mean something


def test_labels_threshold_one_logit_and_argmax_many(monkeypatch):
    monkeypatch.setattr(inference, "LABEL_ROWS", 2)  # the row-chunked path must agree with one-shot numpy
    rng = np.random.default_rng(0)
    foreground = rng.random((2, 1, 5, 7)).astype(np.float32)
    for threshold in (0.3, 0.5, 0.8):
        labels = probs_to_labels(torch.from_numpy(foreground), threshold, dtype=torch.uint8)
        assert labels.dtype == torch.uint8
        np.testing.assert_array_equal(labels.numpy(), foreground[:, 0] > threshold)
    scores = rng.random((2, 4, 5, 7)).astype(np.float32)
    np.testing.assert_array_equal(probs_to_labels(torch.from_numpy(scores), 0.99).numpy(), scores.argmax(1))


def fail_above(model, monkeypatch, pixels):
    """Make the model raise CUDA's out-of-memory error on inputs of more than `pixels` pixels."""
    forward, sizes = model.forward, []

    def limited(x):
        sizes.append(tuple(x.shape[-2:]))
        if x.shape[-2] * x.shape[-1] > pixels:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return forward(x)

    monkeypatch.setattr(model, "forward", limited)
    return sizes


def test_out_of_memory_falls_back_to_smaller_tiles(monkeypatch):
    model = tiny_unet()
    image = random_images(1, 3, 600, 520)
    expected = predict_probs(model, image, IMAGENET_NORMALIZE, tile=128, overlap=0.25)
    sizes = fail_above(model, monkeypatch, 200 * 200)
    messages = []
    probs, options = predict_probs_or_tile(model, image, IMAGENET_NORMALIZE, log=messages.append, overlap=0.25)
    assert options["tile"] == 128 and options["overlap"] == 0.25
    assert len(messages) == 3 and "falling back to --tile 512" in messages[0] and "--tile 128" in messages[2]
    assert sizes[:3] == [(600, 520), (512, 512), (256, 256)]
    torch.testing.assert_close(probs, expected)
    small = random_images(1, 3, 150, 150)
    again, _ = predict_probs_or_tile(model, small, IMAGENET_NORMALIZE, log=messages.append, **options)
    assert again.shape == (1, 3, 150, 150) and len(messages) == 3  # the tile that worked is kept

    fail_above(model, monkeypatch, 64 * 64)
    with pytest.raises(torch.OutOfMemoryError, match="CUDA out of memory .* even at the smallest tile"):
        predict_probs_or_tile(model, image, IMAGENET_NORMALIZE, log=messages.append)


def test_refused_cpu_allocation_falls_back_and_other_errors_pass(monkeypatch):
    model = tiny_unet()
    forward = model.forward

    def refuse(x):
        if x.shape[-1] > 300:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 107374182400 bytes. Error code 12 (Cannot allocate memory)")
        if x.shape[-1] == 7:
            raise RuntimeError("some other failure")
        return forward(x)

    monkeypatch.setattr(model, "forward", refuse)
    messages = []
    probs, options = predict_probs_or_tile(model, random_images(1, 3, 64, 400), IMAGENET_NORMALIZE,
                                           log=messages.append)
    assert probs.shape == (1, 3, 64, 400) and options["tile"] == 256
    assert messages == ["CPU out of memory on a 400x64 input with no tiles; falling back to --tile 256 "
                        "(accumulated on the CPU)"]
    with pytest.raises(RuntimeError, match="some other failure"):
        predict_probs_or_tile(model, random_images(1, 3, 64, 7), IMAGENET_NORMALIZE, log=messages.append)


def test_checkpoint_of_the_wrong_kind_is_one_clear_line(tmp_path):
    args = {"arch": "unet", "in_channels": 3, "num_classes": 2, "base_channels": 4, "depth": 2, "bilinear": False}
    state = {"model": UNet(3, 2, base_channels=4, depth=3).state_dict(), "model_args": args, "classes": ["a", "b"],
             "mask_values": [0, 255], "normalize": IMAGENET_NORMALIZE}
    for name, model_args in [("mismatch.pth", args), ("unknown.pth", {**args, "arch": "segformer"})]:
        save_checkpoint({**state, "model_args": model_args}, tmp_path / name)
        with pytest.raises(CheckpointError, match=f"'{tmp_path / name}' holds a model this code cannot rebuild") as e:
            checkpoints.load_model(tmp_path / name)
        assert "\n" not in str(e.value)
