"""The training augmentation's resampling: the rotated zoom filters when it shrinks, elastic deformation keeps the
mask on the image, and --elastic is checked."""
import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import tv_tensors

from errors import ConfigError
from flags import add_augment_args, config_from
from transforms import AugmentConfig, SmoothElastic, random_zoom_crop, train_transform


def checkerboard(side):
    """A grey image of 1-pixel squares (0 and 255) and its mask (class 1 on the white squares)."""
    board = (np.indices((side, side)).sum(0) % 2 * 255).astype(np.uint8)
    return Image.fromarray(board).convert("RGB"), Image.fromarray(board // 255)


def blobs(height, width, seed=0):
    """An image of grey rectangles on black (values 40 and 230) and its mask: class 1 where the image is bright."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), np.uint8)
    for _ in range(8):
        top, left = rng.integers(0, height - 20), rng.integers(0, width - 20)
        mask[top:top + rng.integers(15, 40), left:left + rng.integers(15, 40)] = 1
    return np.where(mask > 0, 230, 40).astype(np.uint8), mask


def windows(image, mask, zoom, count=10):
    """`count` random 64x64 windows rotated by up to 10 degrees: (pixels of the first channel, mask, map of the
    pixels 2 or more pixels away from anything beyond the image)."""
    torch.manual_seed(0)
    for _ in range(count):
        window, window_mask, outside = random_zoom_crop(image, mask, 64, zoom, 10)
        beyond = torch.zeros(window_mask.size[::-1]) if outside is None else torch.from_numpy(outside).float()
        near_beyond = F.max_pool2d(beyond[None], 5, stride=1, padding=2)[0].bool().numpy()
        yield np.asarray(window)[..., 0].astype(int), np.array(window_mask), ~near_beyond


def test_zoomed_out_rotated_window_is_antialiased():
    """A 1-pixel checkerboard shrunk by 2 averages to flat grey, as the antialiased resize of test images makes
    it (an unfiltered resampling keeps values from ~0 to ~255)."""
    for pixels, _, inside in windows(*checkerboard(300), (0.5, 0.5)):
        assert (abs(pixels[inside] - 128) <= 10).all()


def test_zoomed_in_rotated_window_keeps_the_detail():
    """Enlarging needs no low-pass filter: the squares stay apart (bilinear between them: ~64 to ~191)."""
    for pixels, _, inside in windows(*checkerboard(300), (2.0, 2.0)):
        assert pixels.shape == (64, 64)
        assert pixels[inside].min() < 80 and pixels[inside].max() > 175


@pytest.mark.parametrize("zoom", [0.5, 2.0])
def test_rotated_window_keeps_mask_on_image(zoom):
    """The mask (at twice the image's resolution, as files may hold it) agrees with the thresholded image
    everywhere but on pixels next to a class edge."""
    image, mask = blobs(160, 200)
    mask = Image.fromarray(mask).resize((400, 320), Image.NEAREST)
    for pixels, labels, inside in windows(Image.fromarray(image).convert("RGB"), mask, (zoom, zoom)):
        padded = F.pad(torch.from_numpy(labels).float()[None], (1, 1, 1, 1), mode="replicate")
        at_edge = (F.max_pool2d(padded, 3, stride=1) != -F.max_pool2d(-padded, 3, stride=1))[0].numpy()
        assert ((pixels > 135) == (labels == 1))[inside & ~at_edge].all()


def test_elastic_deformation_keeps_mask_on_image():
    image, mask = blobs(128, 128)
    mask[-10:] = 255  # padding: black in the image, void in the mask
    image[-10:] = 0
    transform = train_transform(AugmentConfig(hflip=0, rotate=0, elastic=1.0))
    torch.manual_seed(0)
    for _ in range(5):
        out, labels = transform(tv_tensors.Image(torch.from_numpy(image)[None].expand(3, -1, -1)),
                                tv_tensors.Mask(torch.from_numpy(mask)))
        red = out[0].float()
        assert (red != torch.from_numpy(image)).float().mean() > 0.02  # deformed
        assert set(labels.unique().tolist()) <= {0, 1, 255}  # nearest neighbour, void from beyond the item
        assert (red[labels == 255] < 135).all()
        known = labels != 255
        assert torch.where(labels == 1, red > 135, red < 135)[known].float().mean() >= 0.97


def test_elastic_displacement_is_a_smooth_few_pixels():
    field = SmoothElastic().make_params([tv_tensors.Image(torch.zeros(3, 256, 256))])["displacement"] * 128
    assert field.shape == (1, 256, 256, 2)
    assert 1 < field.norm(dim=-1).mean() < 10
    assert field.diff(dim=1).abs().max() < 1 and field.diff(dim=2).abs().max() < 1  # no per-pixel noise


@pytest.mark.parametrize("elastic", [None, 0.0])
def test_no_elastic_step_unless_asked(elastic):
    transform = train_transform(AugmentConfig(elastic=elastic))
    assert "SmoothElastic" not in repr(transform)
    assert "SmoothElastic" in repr(train_transform(AugmentConfig(elastic=0.3)))
    assert train_transform(AugmentConfig(elastic=1.0, no_augment=True)) is None


@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan"])
def test_bad_elastic_is_a_config_error(value):
    parser = argparse.ArgumentParser()
    add_augment_args(parser)
    assert parser.parse_args([]).elastic is None
    config = config_from(AugmentConfig, vars(parser.parse_args(["--elastic", value])))
    with pytest.raises(ConfigError, match=r"--elastic .*\[0, 1\]"):
        config.check()
