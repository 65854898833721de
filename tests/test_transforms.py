"""The training augmentation's resampling: the rotated zoom filters when it shrinks, masks are resampled as their
images (thin lines keep their place and width), elastic deformation keeps the mask on the image, and --elastic is
checked."""
import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision import tv_tensors

from errors import ConfigError
from flags import add_augment_args, config_from
from transforms import AugmentConfig, SmoothElastic, class_centre, random_zoom_crop, train_transform


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


def thin_lines(height, width, seed=0):
    """An image of 3-pixel lines (value 230) at random angles on black (40), like membranes, and its mask."""
    rng = np.random.default_rng(seed)
    mask = Image.new("L", (width, height), 0)
    for _ in range(12):
        ends = [tuple(int(v) for v in rng.integers(0, (width, height))) for _ in range(2)]
        ImageDraw.Draw(mask).line(ends, fill=1, width=3)
    mask = np.array(mask)
    return np.where(mask > 0, 230, 40).astype(np.uint8), mask


def agreement(pixels, labels, where):
    """The share of the pixels at `where` whose class is the thresholded image's (class 1 where it is bright)."""
    return ((pixels > 135) == (labels == 1))[where].mean()


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


@pytest.mark.parametrize("zoom", [0.5, 0.7, 1.0, 1.4])
def test_thin_lines_keep_their_place_and_width(zoom):
    """The mask is resampled as the image is: on lines 3 pixels wide, even the pixels at their edges get the class
    that the resampled image shows (nearest neighbour, which snaps edges by up to half a pixel and drops rows of a
    shrunk line, disagrees on 1-3% of all pixels: 10-30% of the lines' pixels)."""
    image, mask = thin_lines(160, 200)
    for pixels, labels, inside in windows(Image.fromarray(image).convert("RGB"), Image.fromarray(mask), (zoom, zoom)):
        assert agreement(pixels, labels, inside) >= 0.995


@pytest.mark.parametrize("augment", [AugmentConfig(hflip=0, rotate=0, elastic=1.0),
                                     AugmentConfig(hflip=0, rotate=30, crop_size=None)], ids=["elastic", "rotation"])
def test_warps_keep_mask_on_image(augment):
    """Elastic deformation, and rotation without a crop, warp the mask as the image (edges of thin lines included)
    and make the pixels pulled from beyond the item void."""
    image, mask = thin_lines(128, 128)
    mask[-10:] = 255  # padding: black in the image, void in the mask
    image[-10:] = 0
    transform = train_transform(augment)
    torch.manual_seed(0)
    for _ in range(5):
        out, labels = transform(tv_tensors.Image(torch.from_numpy(image)[None].expand(3, -1, -1)),
                                tv_tensors.Mask(torch.from_numpy(mask)))
        red, labels = out[0].numpy().astype(int), labels.numpy()
        assert (red != image).mean() > 0.02  # deformed
        assert set(np.unique(labels)) <= {0, 1, 255}  # the item's ids, and void
        assert (red[labels == 255] < 135).all()
        assert agreement(red, labels, labels != 255) >= 0.995


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


def test_vertical_flip_flips_image_and_mask_together():
    """--vflip 1 (and no other step) turns every item upside down, image and mask alike; 0 adds no step."""
    image, mask = blobs(40, 50)
    image, mask = tv_tensors.Image(torch.from_numpy(image)[None]), tv_tensors.Mask(torch.from_numpy(mask))
    flipped_image, flipped_mask = train_transform(AugmentConfig(hflip=0, vflip=1.0, rotate=0))(image, mask)
    assert torch.equal(flipped_image, image.flip(-2)) and torch.equal(flipped_mask, mask.flip(-2))
    assert "RandomVerticalFlip" not in repr(train_transform(AugmentConfig(vflip=0.0)))


@pytest.mark.parametrize("flag", ["--hflip", "--vflip", "--elastic", "--class-crops"])
@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_bad_probability_is_a_config_error(flag, value):
    parser = argparse.ArgumentParser()
    add_augment_args(parser)
    assert parser.parse_args([]).elastic is None
    config = config_from(AugmentConfig, vars(parser.parse_args([flag, value])))
    with pytest.raises(ConfigError, match=flag + r" .*\[0, 1\]"):
        config.check()


def test_class_centre_draws_each_present_class_alike_and_never_void():
    """Classes 0 (most pixels), 2 (one pixel) and void: class 2's pixel is drawn about half the time, the
    centre of a pixel of class 0 the rest, never a void one; an all-void mask has no centre."""
    classes = np.zeros((30, 40), np.uint8)
    classes[:, :10] = 255
    classes[7, 25] = 2
    torch.manual_seed(0)
    centres = [class_centre(classes) for _ in range(2000)]
    on_rare = [centre == (25.5, 7.5) for centre in centres]
    assert abs(np.mean(on_rare) - 0.5) < 0.04
    assert all(classes[int(y), int(x)] == 0 and x % 1 == y % 1 == 0.5
               for (x, y), rare in zip(centres, on_rare) if not rare)
    assert class_centre(np.full((5, 5), 255, np.uint8)) is None


@pytest.mark.parametrize("centre", [(100.5, 60.5), (2.5, 118.5)])
def test_centred_crop_holds_its_centre_and_stays_in_the_image(centre):
    """A window centred on the point where the image allows it, pushed inside where it does not."""
    image, mask = blobs(120, 160)
    mask[int(centre[1]), int(centre[0])] = 2
    window, window_mask, outside = random_zoom_crop(Image.fromarray(image), Image.fromarray(mask), 32, (1, 1),
                                                    centre=centre)
    assert outside is None and window.size == (32, 32)
    rows, cols = np.nonzero(np.array(window_mask) == 2)
    left, top = min(max(0, round(centre[0] - 16)), 160 - 32), min(max(0, round(centre[1] - 16)), 120 - 32)
    assert (rows.tolist(), cols.tolist()) == ([int(centre[1]) - top], [int(centre[0]) - left])
    assert np.array_equal(np.asarray(window), image[top:top + 32, left:left + 32])


def test_nan_elastic_is_refused_by_the_parser_and_the_config(capsys):
    parser = argparse.ArgumentParser()
    add_augment_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--elastic", "nan"])
    assert "argument --elastic: needs a finite number, got 'nan'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"--elastic .*\[0, 1\]"):  # a config built in code is checked too
        AugmentConfig(elastic=float("nan")).check()
