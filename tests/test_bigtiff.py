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


@pytest.mark.parametrize("layout", [{"rowsperstrip": 7}, {"tile": (32, 48)},
                                    {"rowsperstrip": 16, "compression": "zlib"},
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


def test_predict_reads_a_large_tiff_by_windows_and_blends_by_bands(tmp_path, monkeypatch, capsys):
    """A striped TIFF above the window threshold: read a band of rows at a time, never whole; its labels and
    probabilities equal the tiled prediction of the same image read whole."""
    import bigtiff
    import predict
    from checkpoints import load_model
    from inference import predict_probs, probs_to_labels
    from test_predict import write_checkpoint

    checkpoint = write_checkpoint(tmp_path / "model.pth", 3, [0, 10, 20], spread=100.0)
    array = pixels(300, 200, 3)
    tifffile.imwrite(tmp_path / "scan.tif", array, photometric="rgb", rowsperstrip=8)
    monkeypatch.setattr(bigtiff, "WINDOW_PIXELS", 1000)
    reads = []
    rows = TiffWindows.rows
    monkeypatch.setattr(TiffWindows, "rows",
                        lambda self, top, bottom: reads.append(bottom - top) or rows(self, top, bottom))
    predict.main(["-m", checkpoint, "-i", str(tmp_path / "scan.tif"), "--tile", "64", "--overlap", "0.25", "--probs",
                  "--amp", "off"])
    assert reads and max(reads) == 64  # one row of tiles at a time
    model, saved = load_model(checkpoint)
    whole = torch.from_numpy(array.transpose(2, 0, 1).copy())[None]
    expected = predict_probs(model, whole, saved["normalize"], tile=64, overlap=0.25)
    mask = np.asarray(Image.open(tmp_path / "scan_mask.png"))
    np.testing.assert_array_equal(mask, np.array([0, 10, 20])[probs_to_labels(expected)[0].numpy()])
    np.testing.assert_allclose(np.load(tmp_path / "scan_probs.npy"), expected[0].numpy(), atol=1e-3)
    assert len(np.unique(mask)) == 3
