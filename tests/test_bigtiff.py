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


@pytest.fixture
def huge_above_1000(monkeypatch):
    """Images of 1,000 pixels or more count as huge (BigTIFF masks), and the TIFFs written have 32-pixel tiles."""
    import bigtiff
    import drawing
    monkeypatch.setattr(drawing, "TIFF_MASK_PIXELS", 1000)
    monkeypatch.setattr(bigtiff, "WRITE_TILE", 32)


def tiny_checkpoint(tmp_path, mask_values=(0, 10, 20)):
    from test_predict import write_checkpoint
    return write_checkpoint(tmp_path / "model.pth", len(mask_values), list(mask_values), spread=100.0)


def test_rows_regrouped_into_runs_as_they_come():
    from bigtiff import tile_rows
    bands = [np.full((rows, 3), i) for i, rows in enumerate([5, 2, 9, 1, 4])]  # 21 rows
    runs = list(tile_rows(iter(bands), 4))
    assert [len(run) for run in runs] == [4, 4, 4, 4, 4, 1]
    np.testing.assert_array_equal(np.concatenate(runs), np.concatenate(bands))


@pytest.mark.parametrize("rows, tile", [(40, 32), (17, 32), (80, 32), (60, 16)])
def test_a_tiff_of_the_wrong_row_count_is_refused_and_not_written(tmp_path, monkeypatch, rows, tile):
    """write_by_rows for a 60-row image: too few rows (a row of tiles missing, or a short last one) or too many
    raise ValueError, and nothing is left behind (the temporary file is removed)."""
    import bigtiff
    monkeypatch.setattr(bigtiff, "WRITE_TILE", tile)
    bands = iter([np.zeros((rows, 5), np.uint8)])
    if rows == 60:
        bigtiff.write_by_rows(tmp_path / "ok.tif", (60, 5), np.uint8, bands)
        assert tifffile.imread(tmp_path / "ok.tif").shape == (60, 5)
        return
    with pytest.raises(ValueError, match=f"{rows} rows for an image of 60"):
        bigtiff.write_by_rows(tmp_path / "m.tif", (60, 5), np.uint8, bands)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mask_values, dtype, samples", [((0, 10, 20), np.uint8, ()), ((0, 300, 7), np.uint16, ()),
                                                         (((0, 0, 0), (255, 0, 0), (0, 9, 9)), np.uint8, (3,))])
def test_label_tiff_holds_the_mask_pixels_of_the_png(tmp_path, huge_above_1000, mask_values, dtype, samples):
    """write_label_file: a .tif path gives a marked, tiled, deflate BigTIFF whose pixels are the PNG mask's."""
    from drawing import write_label_file
    from outputs import MARK, is_own_output
    labels = np.random.default_rng(1).integers(0, 3, (70, 45)).astype(np.uint8)
    classes = ["a", "b", "c"]
    write_label_file(labels, tmp_path / "m.tif", classes, mask_values)
    write_label_file(labels, tmp_path / "m.png", classes, mask_values)
    png = np.asarray(Image.open(tmp_path / "m.png"))
    expected = np.asarray(mask_values, dtype)[labels]  # by hand: each class's mask value (or colour)
    np.testing.assert_array_equal(png, expected)
    with tifffile.TiffFile(tmp_path / "m.tif") as tiff:
        page = tiff.pages.first
        assert tiff.is_bigtiff and page.is_tiled and page.tilelength == 32
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE and page.software == MARK
        assert page.description == ('{"classes": ["a", "b", "c"], "pixel_values": '
                                    f'{np.asarray(mask_values).tolist()}}}')
        assert page.shape == (70, 45, *samples) and page.dtype == dtype
        np.testing.assert_array_equal(page.asarray(), expected)
    assert is_own_output(tmp_path / "m.tif")
    tifffile.imwrite(tmp_path / "foreign.tif", expected)
    assert not is_own_output(tmp_path / "foreign.tif")


def test_predict_writes_a_huge_images_mask_by_bands(tmp_path, huge_above_1000, monkeypatch, capsys):
    """A 300x200 image above the (lowered) threshold: its mask is a BigTIFF <stem>_mask.tif whose labels equal the
    PNG mask of the same prediction; the writer receives bands of at most a row of tiles while the tiles below are
    still to be computed, never the whole label image; --overlay is skipped with a note."""
    import bigtiff
    import inference
    import predict
    checkpoint = tiny_checkpoint(tmp_path)
    Image.fromarray(pixels(300, 200, 3)).save(tmp_path / "scan.png")
    passes, received = [0], []
    forward = inference.forward_probs
    monkeypatch.setattr(inference, "forward_probs", lambda *a, **k: passes.__setitem__(0, passes[0] + 1) or
                        forward(*a, **k))
    tile_rows = bigtiff.tile_rows

    def spy(bands, rows):
        for band in bands:
            received.append((band.shape, passes[0]))
            yield band
    monkeypatch.setattr(bigtiff, "tile_rows", lambda bands, rows: tile_rows(spy(bands, rows), rows))
    flags = ["-m", checkpoint, "--tile", "64", "--overlap", "0.25", "--amp", "off"]
    predict.main([*flags, "-i", str(tmp_path / "scan.png"), "--overlay"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth", "scan.png", "scan_mask.tif"]
    assert "their masks are BigTIFFs written by rows" in capsys.readouterr().out
    assert len(received) > 3 and all(shape[0] <= 64 and shape[1] == 200 for shape, _ in received)
    assert sum(shape[0] for shape, _ in received) == 300
    assert received[0][1] < passes[0]  # the first band was written before the last tiles were computed
    monkeypatch.setattr(bigtiff, "tile_rows", tile_rows)
    monkeypatch.undo()  # the usual threshold: a PNG mask of the same prediction
    predict.main([*flags, "-i", str(tmp_path / "scan.png"), "-o", str(tmp_path / "scan.png.png")])
    png = np.asarray(Image.open(tmp_path / "scan.png.png"))
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "scan_mask.tif"), png)
    assert len(np.unique(png)) == 3


def test_huge_masks_replace_only_their_own_tiffs_atomically(tmp_path, huge_above_1000, monkeypatch, capsys):
    """A second run replaces its own marked BigTIFF; a foreign .tif of that name is refused before any work; a run
    stopped midway (Ctrl-C) leaves the old mask whole and no temporary file; -o x.png for a huge image is refused."""
    import inference
    import predict
    checkpoint = tiny_checkpoint(tmp_path)
    Image.fromarray(pixels(120, 100, 3)).save(tmp_path / "scan.png")
    mask = tmp_path / "scan_mask.tif"
    run = ["-m", checkpoint, "-i", str(tmp_path / "scan.png"), "--tile", "32", "--amp", "off"]
    predict.main(run)
    first = mask.read_bytes()
    predict.main(run)  # replaced: its own file
    assert mask.read_bytes() == first
    passes = [0]
    forward = inference.forward_probs

    def interrupted(*args, **kwargs):
        passes[0] += 1
        if passes[0] == 5:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)
    monkeypatch.setattr(inference, "forward_probs", interrupted)
    with pytest.raises(SystemExit, match="interrupted: 0 images segmented and kept"):
        predict.main(run)
    assert mask.read_bytes() == first and sorted(p.name for p in tmp_path.iterdir()) == [
        "model.pth", "scan.png", "scan_mask.tif"]
    tifffile.imwrite(mask, pixels(4, 4, 1)[..., 0])  # someone else's file of that name
    with pytest.raises(SystemExit, match="scan_mask.tif' .*is an image or mask that this tool did not write"):
        predict.main(run)
    with pytest.raises(SystemExit, match=r"-o '.*x\.png': '.*scan\.png' has 0 M pixels, too many for a PNG mask"):
        predict.main([*run, "-o", str(tmp_path / "x.png")])


def test_eval_save_labels_of_huge_images_are_bigtiffs(tmp_path, huge_above_1000, capsys):
    """eval.py --save-labels writes <name>.tif for a huge image, equal to the PNG it writes otherwise, and no
    overlay (said in a warning)."""
    import eval as evaluate_script
    import drawing
    checkpoint = tiny_checkpoint(tmp_path)
    (tmp_path / "images").mkdir()
    Image.fromarray(pixels(40, 30, 3)).save(tmp_path / "images" / "small.png")  # 1,200 pixels: huge here
    flags = ["-m", checkpoint, "--images", str(tmp_path / "images"), "--amp", "off", "--tile", "32"]
    evaluate_script.main([*flags, "--save-labels", str(tmp_path / "tif"), "--overlays", str(tmp_path / "over")])
    assert [p.name for p in (tmp_path / "tif").iterdir()] == ["small.tif"]
    assert not (tmp_path / "over").exists() or not any((tmp_path / "over").iterdir())
    assert "small: no overlay for an image" in capsys.readouterr().err
    drawing.TIFF_MASK_PIXELS = 10 ** 9  # restored by the fixture's monkeypatch
    evaluate_script.main([*flags, "--save-labels", str(tmp_path / "png")])
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "tif" / "small.tif"),
                                  np.asarray(Image.open(tmp_path / "png" / "small.png")))
