"""Large TIFFs read by windows: every layout tifffile writes (strips, tiles, compressed, grey, RGBA) against the
whole file read at once."""
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from bigtiff import TiffWindows, open_windows


def pixels(height, width, samples, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, samples), dtype=np.uint8)


@pytest.mark.parametrize("layout", [{"rowsperstrip": 7}, {"tile": (32, 48)}, {"rowsperstrip": 16, "compression": "zlib"},
                                    {"tile": (16, 16), "compression": "zlib", "bigtiff": True}])
@pytest.mark.parametrize("samples", [1, 3, 4])
def test_windows_equal_the_whole_image(tmp_path, layout, samples):
    array = pixels(100, 70, samples)
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, array if samples > 1 else array[..., 0],
                     photometric="rgb" if samples > 1 else "minisblack", **layout)
    windows = TiffWindows(path)
    rgb = np.repeat(array, 3, 2) if samples == 1 else array[..., :3]
    whole = torch.from_numpy(rgb.transpose(2, 0, 1).copy())
    assert windows.shape == (3, 100, 70)
    for top, bottom in [(0, 100), (0, 1), (5, 40), (31, 33), (63, 100), (99, 100)]:
        torch.testing.assert_close(windows[:, top:bottom], whole[:, top:bottom])
    torch.testing.assert_close(windows.read(), whole)
    windows.close()


def test_only_large_upright_8bit_tiffs_are_read_by_windows(tmp_path):
    tifffile.imwrite(tmp_path / "small.tif", pixels(20, 30, 3), photometric="rgb")
    assert open_windows(tmp_path / "small.tif") is None  # below the threshold: read whole
    assert open_windows(tmp_path / "small.tif", min_pixels=600).shape == (3, 20, 30)
    tifffile.imwrite(tmp_path / "deep.tif", pixels(20, 30, 1).astype(np.uint16) * 257)
    assert open_windows(tmp_path / "deep.tif", min_pixels=1) is None  # 16-bit: read_image converts it
    Image.fromarray(pixels(20, 30, 3)).save(tmp_path / "photo.png")
    assert open_windows(tmp_path / "photo.png", min_pixels=1) is None
