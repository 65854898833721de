"""predict.py end to end on small checkpoints built here: folders, formats, outputs, thresholds, bad files."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from conftest import ROOT
from model import IMAGENET_NORMALIZE, UNet, build_model
from checkpoints import load_model, save_checkpoint
from drawing import voc_palette


def write_checkpoint(path, num_classes, mask_values, bias=None, seed=0, train_args=None, spread=None):
    """A tiny U-Net checkpoint with the keys train.py writes. With `bias`, the last layer is zeroed and its bias
    set, so every pixel gets exactly those logits; `spread` multiplies the last layer's weights instead, so that
    the random network's near-uniform probabilities vary from pixel to pixel."""
    model_args = {"arch": "unet", "in_channels": 3, "num_classes": num_classes, "base_channels": 4, "depth": 2,
                  "bilinear": False}
    torch.manual_seed(seed)
    model = build_model(model_args)
    if bias is not None:
        with torch.no_grad():
            model.outc.weight.zero_()
            model.outc.bias.copy_(torch.tensor(bias))
    if spread is not None:
        with torch.no_grad():
            model.outc.weight.mul_(spread)
            model.outc.bias.zero_()
            noise = torch.from_numpy(rgb(32, 32, seed=99).transpose(2, 0, 1) / 255 - 0.5).float()[None]
            model.outc.bias.sub_(model.eval()(noise).mean((0, 2, 3)))  # centred: every class gets pixels
    save_checkpoint({"model": model.state_dict(), "model_args": model_args,
                     "classes": [f"class{i}" for i in range(len(mask_values))], "mask_values": mask_values,
                     "ignore_index": 255, "normalize": IMAGENET_NORMALIZE, "optimizer": {}, "epoch": 1,
                     "metrics": {}, "args": train_args or {}, "best_score": 0.0}, path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "random": write_checkpoint(root / "random.pth", 3, [0, 10, 20]),
        "spread": write_checkpoint(root / "spread.pth", 3, [0, 10, 20], spread=100.0),
        "class1": write_checkpoint(root / "class1.pth", 3, [0, 10, 20], bias=[0.0, 2.0, 1.0]),
        "p0.6": write_checkpoint(root / "p06.pth", 1, [0, 255], bias=[float(np.log(0.6 / 0.4))]),
    }


def rgb(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_formats(folder):
    """One image per format and pixel kind; returns {file name: (height, width) once EXIF is applied}."""
    folder.mkdir(exist_ok=True)
    Image.fromarray(rgb(30, 41)).save(folder / "photo.jpg", quality=95)
    Image.fromarray(rgb(33, 20)[..., 0]).save(folder / "grey.png")
    Image.fromarray(np.dstack([rgb(25, 35), np.full((25, 35), 128, np.uint8)])).save(folder / "alpha.png")
    Image.fromarray((rgb(28, 30)[..., 0].astype(np.uint16) * 257)).save(folder / "deep16.png")
    Image.fromarray(rgb(40, 24)).save(folder / "scan.tif")
    Image.fromarray(rgb(18, 26)).save(folder / "old.bmp")
    Image.fromarray(rgb(22, 31)).save(folder / "web.webp", lossless=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers rotate it by 90 degrees
    Image.fromarray(rgb(20, 50)).save(folder / "phone.jpg", exif=exif)
    return {"photo.jpg": (30, 41), "grey.png": (33, 20), "alpha.png": (25, 35), "deep16.png": (28, 30),
            "scan.tif": (40, 24), "old.bmp": (18, 26), "web.webp": (22, 31), "phone.jpg": (50, 20)}


def test_folder_in_folder_out_every_format(models, tmp_path, capsys):
    sizes = write_formats(tmp_path / "in")
    (tmp_path / "in" / "notes.txt").write_text("not an image, and not named like one: ignored")
    Image.fromarray(rgb(8, 8)).save(tmp_path / "in" / "photo_mask.png")  # an earlier run's output: skipped
    predict.main(["-m", models["random"], "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                  "--workers", "2", "--batch-size", "3"])
    written = sorted(os.listdir(tmp_path / "out"))
    assert written == sorted(f"{name.rsplit('.', 1)[0]}_mask.png" for name in sizes)
    for name, (height, width) in sizes.items():
        mask = Image.open(tmp_path / "out" / f"{name.rsplit('.', 1)[0]}_mask.png")
        assert mask.size == (width, height) and mask.mode == "P"
        assert set(np.unique(np.asarray(mask))) <= {0, 10, 20}
    assert f"{len(sizes)} images in" in capsys.readouterr().out


def test_default_outputs_beside_inputs_and_extras(models, tmp_path):
    image = rgb(24, 32)
    Image.fromarray(image).save(tmp_path / "a.png")
    predict.main(["-m", models["class1"], "-i", str(tmp_path / "*.png"), "--overlay", "--viz", "--probs",
                  "-t", "0.99"])
    assert sorted(os.listdir(tmp_path)) == ["a.png", "a_mask.png", "a_overlay.png", "a_probs.npy", "a_viz.png"]
    mask = np.asarray(Image.open(tmp_path / "a_mask.png"))
    assert (mask == 10).all()  # argmax of the logits (0, 2, 1) is class 1 whose mask value is 10; -t ignored
    probs = np.load(tmp_path / "a_probs.npy")
    softmax = np.exp([0.0, 2.0, 1.0]) / np.exp([0.0, 2.0, 1.0]).sum()
    assert probs.shape == (3, 24, 32) and probs.dtype == np.float16
    np.testing.assert_allclose(probs[:, 5, 7], softmax, atol=1e-3)
    colour = voc_palette()[10].astype(float)  # the class's colour in the mask's palette
    overlay = np.asarray(Image.open(tmp_path / "a_overlay.png"), dtype=float)
    np.testing.assert_allclose(overlay[:24], 0.5 * image + 0.5 * colour, atol=1)
    viz = np.asarray(Image.open(tmp_path / "a_viz.png"))
    assert viz.shape[1:] == (64, 3) and viz.shape[0] > 24
    assert (viz[:24, :32] == image).all() and (viz[:24, 32:] == colour).all()
    for picture in (overlay, viz):  # below the picture, a key with the swatch of the class shown
        key = picture[24:]
        assert key.shape[0] > 0 and (key == colour).all(-1).any() and (key == 0).all(-1).any()  # swatch, text
    predict.main(["-m", models["class1"], "-i", str(tmp_path / "a.png"), "-n", "--overlay"])
    assert len(os.listdir(tmp_path)) == 5  # -n writes nothing


@pytest.mark.parametrize("threshold, expected", [(None, 255), ("0.5", 255), ("0.59", 255), ("0.61", 0)])
def test_single_logit_threshold(models, tmp_path, threshold, expected):
    Image.fromarray(rgb(16, 20)).save(tmp_path / "x.jpg")
    out = tmp_path / "x.png"
    flags = [] if threshold is None else ["-t", threshold]
    predict.main(["-m", models["p0.6"], "-i", str(tmp_path / "x.jpg"), "-o", str(out), *flags])
    mask = np.asarray(Image.open(out))  # every pixel has foreground probability 0.6
    assert mask.shape == (16, 20) and Image.open(out).mode == "L" and (mask == expected).all()


def test_masks_follow_the_probabilities(models, tmp_path):
    """--tile 32 --overlap 0.5 --tta on 40 x 48: the probabilities written are the Gaussian-weighted mean over the
    tiles of each tile's softmax averaged with its mirror image's, and the mask holds the mask value of their
    argmax; against numpy, with only the network itself run by torch."""
    image = rgb(40, 48, seed=3)
    Image.fromarray(image).save(tmp_path / "x.png")
    predict.main(["-m", models["spread"], "-i", str(tmp_path / "x.png"), "--probs", "--tile", "32",
                  "--overlap", "0.5", "--tta", "--amp", "off"])  # numpy's float64 is matched in fp32
    probs = np.load(tmp_path / "x_probs.npy").astype(np.float32)
    mask = np.asarray(Image.open(tmp_path / "x_mask.png"))

    model, _ = load_model(models["spread"])
    mean, std = (np.array(IMAGENET_NORMALIZE[key])[:, None, None] for key in ("mean", "std"))
    x = (image.transpose(2, 0, 1) / 255 - mean) / std

    def softmax(tile):
        with torch.no_grad():
            logits = model(torch.from_numpy(np.ascontiguousarray(tile[None], np.float32)))[0].double().numpy()
        e = np.exp(logits - logits.max(0))
        return e / e.sum(0)

    side = np.exp(-((np.arange(32) - 15.5) ** 2) / (2 * 4.0 ** 2))  # sigma = tile / 8, peak 1
    weight = np.outer(side, side)
    total, weights = np.zeros((3, 40, 48)), np.zeros((40, 48))
    # A stride of 32 * 0.5 = 16 (a multiple of the depth-2 U-Net's 4), the last tile flush with the border.
    for y in (0, 8):
        for x0 in (0, 16):
            tile = x[:, y:y + 32, x0:x0 + 32]
            mean_of_flips = (softmax(tile) + softmax(tile[:, :, ::-1])[:, :, ::-1]) / 2
            total[:, y:y + 32, x0:x0 + 32] += mean_of_flips * weight
            weights[y:y + 32, x0:x0 + 32] += weight
    expected = total / weights
    np.testing.assert_allclose(probs, expected, atol=1e-3)  # saved as float16
    top2 = np.sort(expected, axis=0)[-2:]
    clear = top2[1] - top2[0] > 1e-4
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(mask[clear], np.array([0, 10, 20])[expected.argmax(0)][clear])
    assert set(np.unique(mask)) == {0, 10, 20}  # every class shows, so the argmax is tested


def test_newest_best_checkpoint_is_the_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    old = write_checkpoint(tmp_path / "checkpoints" / "old" / "best.pth", 3, [0, 1, 2], bias=[0.0, 2.0, 1.0])
    write_checkpoint(tmp_path / "checkpoints" / "new" / "best.pth", 3, [0, 1, 2], bias=[0.0, 1.0, 2.0])
    os.utime(old, (1e9, 1e9))
    Image.fromarray(rgb(10, 12)).save("x.png")
    predict.main(["-i", "x.png"])
    assert f"using the newest checkpoint, {os.path.join('checkpoints', 'new', 'best.pth')}" in capsys.readouterr().out
    assert (np.asarray(Image.open("x_mask.png")) == 2).all()


def test_simulated_cuda_out_of_memory_falls_back_to_tiles(models, tmp_path, monkeypatch, capsys):
    forward = UNet.forward

    def limited(self, x):
        if x.shape[-2] * x.shape[-1] > 150 * 150:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, x)

    monkeypatch.setattr(UNet, "forward", limited)
    for i, size in enumerate([(300, 200), (120, 90), (260, 260)]):
        Image.fromarray(rgb(*size)).save(tmp_path / f"{i}.png")
    predict.main(["-m", models["random"], "-i", str(tmp_path), "--workers", "0"])
    err = capsys.readouterr().err
    # 300x200 fails whole and with 256 x 200 tiles, then runs with 128; the later images keep the 128 tiles.
    assert err.count("CUDA out of memory") == 2
    assert "falling back to --tile 256" in err and "with --tile 256; falling back to --tile 128" in err
    for i, size in enumerate([(300, 200), (120, 90), (260, 260)]):
        assert Image.open(tmp_path / f"{i}_mask.png").size == size[::-1]


def test_bad_files_are_skipped_summarised_and_fail_the_run(models, tmp_path):
    Image.fromarray(rgb(12, 14)).save(tmp_path / "good.png")
    (tmp_path / "random.jpg").write_bytes(np.random.default_rng(0).bytes(300))
    Image.fromarray(rgb(64, 64)).save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:200])
    (tmp_path / "whole.png").unlink()
    result = subprocess.run([sys.executable, "predict.py", "-m", models["random"], "-i", str(tmp_path),
                             str(tmp_path / "gone.png"), str(tmp_path / "nothing*.tif")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    summary = result.stderr[result.stderr.index("error: 4 of 5 inputs failed:"):].splitlines()
    assert len(summary) == 5
    for name, reason in [("cut.png", "could not be decoded"), ("random.jpg", "not an image file"),
                         ("gone.png", "does not exist"), ("nothing*.tif", "no image file")]:
        assert any(name in line and reason in line for line in summary[1:]), (name, summary)
    assert (tmp_path / "good_mask.png").is_file() and "1 image in" in result.stdout


@pytest.mark.parametrize("flags, message", [
    (["-i", "{a}", "-o", "{a}"], "would overwrite the input"),
    (["-i", "{a}", "{b}", "-o", "{tmp}/x.png"], "2 input images but 1 output names"),
    (["-i", "{a}", "-o", "{tmp}/x.jpg"], "masks are written as PNG"),
    (["-i", "{a}", "{tmp}/sub/a.png", "-o", "{tmp}/out"], "would both be written to"),
    (["-i", "{a}", "--tile", "8"], "--tile must be at least 16"),
    (["-i", "{a}", "--overlap", "1"], "--overlap must lie in [0, 1)"),
])
def test_output_and_flag_errors(models, tmp_path, flags, message, capsys):
    (tmp_path / "sub").mkdir()
    for path in (tmp_path / "a.png", tmp_path / "b.png", tmp_path / "sub" / "a.png"):
        Image.fromarray(rgb(8, 8)).save(path)
    argv = ["-m", models["random"]] + [f.format(a=tmp_path / "a.png", b=tmp_path / "b.png", tmp=tmp_path)
                                       for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        predict.main(argv)
    assert message in str(exit_info.value.code) + capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.png", "sub"]


@pytest.mark.parametrize("train_args, flags, expected", [
    ({"dataset": "carvana", "scale": None}, [], 0.5),  # Carvana's default training scale
    ({"dataset": "folder", "scale": 0.25}, [], 0.25),  # the scale the run was trained at
    ({"dataset": "carvana", "scale": None}, ["-s", "1"], 1.0),  # -s overrides it
])
def test_default_scale_is_the_training_scale(tmp_path, monkeypatch, train_args, flags, expected):
    checkpoint = write_checkpoint(tmp_path / "model.pth", 2, [0, 255], train_args=train_args)
    image = tmp_path / "car.png"
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(image)
    seen = []
    real = predict.predict_probs_or_tile

    def spy(model, images, normalize, log=print, **options):
        seen.append(options["scale"])
        return real(model, images, normalize, log=log, **options)

    monkeypatch.setattr(predict, "predict_probs_or_tile", spy)
    predict.main(["-m", checkpoint, "-i", str(image), *flags])
    assert seen == [expected]
    assert Image.open(tmp_path / "car_mask.png").size == (60, 40)


def test_torchrun_splits_the_inputs_across_processes(models, tmp_path):
    """Two gloo processes on the CPU: every input segmented exactly once, by one process, and the masks are those
    of one process; a missing input is counted once in the summary."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(rgb(24 + 8 * i, 40, seed=i)).save(folder / f"{i}.png")
    common = [str(ROOT / "predict.py"), "-m", models["spread"], "-i", str(folder), str(tmp_path / "gone.png"),
              "--device", "cpu", "--workers", "0"]
    single = subprocess.run([sys.executable, *common, "-o", str(tmp_path / "one")], capture_output=True, text=True,
                            timeout=300)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *common,
               "-o", str(tmp_path / "two")]
    double = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert single.returncode == 1 and double.returncode != 0, double.stderr[-3000:]
    assert "error: 1 of 6 inputs failed" in single.stderr and double.stderr.count("error: 1 of 6 inputs failed") == 1
    assert "5 images in" in double.stdout and "2 processes" in double.stdout
    for i in range(5):
        assert double.stdout.count(f"{i}.png -> ") == 1
        one, two = (np.asarray(Image.open(tmp_path / run / f"{i}_mask.png")) for run in ("one", "two"))
        np.testing.assert_array_equal(one, two)
    assert double.stdout.count("memory plan:") >= 1 and double.stdout.count("precision:") == 1


def test_ctrl_c_stops_in_one_line_and_keeps_the_masks_written(models, tmp_path, monkeypatch, capsys):
    for i in range(3):
        Image.fromarray(rgb(16, 16, seed=i)).save(tmp_path / f"{i}.png")
    save = predict.save_outputs

    def interrupt_third(image, labels, probs, mask_path, checkpoint, outputs):
        if mask_path.name == "2_mask.png":
            raise KeyboardInterrupt
        return save(image, labels, probs, mask_path, checkpoint, outputs)

    monkeypatch.setattr(predict, "save_outputs", interrupt_third)
    with pytest.raises(SystemExit) as stop:
        predict.main(["-m", models["random"], "-i", str(tmp_path), "--batch-size", "1", "--workers", "0"])
    assert stop.value.code == "interrupted: 2 images segmented and kept, 1 not done"
    assert sorted(p.name for p in tmp_path.glob("*_mask.png")) == ["0_mask.png", "1_mask.png"]
