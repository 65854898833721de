"""Tiny train -> eval -> predict on the synthetic shapes, and the scripts' answers to bad input."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import eval as evaluate_script
import predict
import train
from conftest import ROOT
from synthetic import Shapes
from checkpoints import load_model
from checkpoints import load_checkpoint

TINY = ["--dataset", "shapes", "--image-size", "32", "--num-train", "32", "--num-val", "8", "--epochs", "2",
        "--steps-per-epoch", "4", "--batch-size", "8", "--base-channels", "4", "--depth", "2", "--workers", "0"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train.main(TINY + ["--checkpoint-dir", str(tmp_path_factory.mktemp("checkpoints"))])


def run_script(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_shapes_is_deterministic_and_labelled():
    a, b = Shapes(4, 48, seed=3), Shapes(4, 48, seed=3)
    image, mask = a[2]
    assert image.dtype == torch.uint8 and image.shape == (3, 48, 48)
    assert torch.equal(image, b[2][0]) and torch.equal(mask, b[2][1])
    assert not torch.equal(image, Shapes(4, 48, seed=4)[2][0])
    assert not torch.equal(image, Shapes(4, 48, seed=3, split="val")[2][0])
    labels = torch.cat([Shapes(40, 48)[i][1].unique() for i in range(40)]).unique()
    assert labels.tolist() == [0, 1, 2, 3]


def test_checkpoint_holds_everything_to_rebuild(run_dir):
    assert (run_dir / "last.pth").is_file() and (run_dir / "args.json").is_file()
    state = load_checkpoint(run_dir / "best.pth")
    assert state["model_args"] == {"arch": "unet", "in_channels": 3, "num_classes": 4, "base_channels": 4,
                                   "depth": 2, "bilinear": False}
    assert state["classes"] == Shapes.classes and state["mask_values"] == [0, 1, 2, 3]
    assert set(state["normalize"]) == {"mean", "std"}
    assert {"epoch", "args"} <= set(state) and "optimizer" not in state  # only last.pth resumes
    model, _ = load_model(run_dir / "best.pth")
    assert model(torch.zeros(1, 3, 20, 28)).shape == (1, 4, 20, 28)


def test_eval_matches_training_validation(run_dir, tmp_path, capsys):
    report = tmp_path / "scores.json"
    metrics = evaluate_script.main(["-m", str(run_dir / "best.pth"), "--split", "val", "--json", str(report)])
    saved = json.loads(report.read_text())
    best = load_checkpoint(run_dir / "best.pth")
    # Against numpy: the run's validation set (8 shapes of 32 pixels, data seed 0) through the network alone,
    # argmax, a confusion matrix of (truth, prediction) counts, IoU = TP / (truth + predicted - TP) per class,
    # averaged over the classes that occur in either.
    model, _ = load_model(run_dir / "best.pth")
    images, masks = zip(*Shapes(8, 32, 0, "val"))
    pixels = torch.stack(images).double().numpy() / 255
    mean, std = (np.array(best["normalize"][key])[None, :, None, None] for key in ("mean", "std"))
    with torch.no_grad():
        logits = model(torch.from_numpy((pixels - mean) / std).float()).numpy()
    truth, predicted = torch.stack(masks).numpy().ravel(), logits.argmax(1).ravel()
    assert truth.max() < 4
    confusion = np.bincount(4 * truth + predicted, minlength=16).reshape(4, 4)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    with np.errstate(invalid="ignore"):
        iou = tp / union
    assert saved["confusion_matrix"] == confusion.tolist()
    assert saved["miou"] == pytest.approx(np.nanmean(iou), rel=1e-9)
    assert saved["pixel_acc"] == pytest.approx(tp.sum() / truth.size, rel=1e-9)
    assert 0 < saved["miou"] < 1  # neither a blank nor a perfect prediction
    # eval rebuilt the same validation set from the checkpoint's arguments as training did.
    assert saved["miou"] == pytest.approx(best["metrics"]["miou"])
    assert saved["images"] == 8 and metrics["pixel_acc"] == pytest.approx(saved["pixel_acc"])
    out = capsys.readouterr().out
    assert "mIoU" in out and "triangle" in out


def network_probabilities(checkpoint, image):
    """Class probabilities K x H x W of the network alone on an HxWx3 uint8 image normalised with numpy, softmax in
    numpy: the independent oracle."""
    model, state = load_model(checkpoint)
    mean, std = (np.array(state["normalize"][key])[:, None, None] for key in ("mean", "std"))
    pixels = (image.transpose(2, 0, 1) / 255 - mean) / std
    with torch.no_grad():
        logits = model(torch.from_numpy(pixels).float()[None])[0].double().numpy()
    exp = np.exp(logits - logits.max(0))
    return exp / exp.sum(0)


def test_predict_writes_masks_of_input_size(run_dir, tmp_path):
    inputs, pictures = [], []
    for i, (height, width) in enumerate([(44, 60), (32, 32)]):  # multiples of 4: the network sees them unpadded
        path = tmp_path / f"in{i}.png"
        shapes = Shapes(1, 64, seed=i, split="test")[0][0].permute(1, 2, 0).numpy()
        pictures.append(np.ascontiguousarray(shapes[:height, :width]))
        Image.fromarray(pictures[-1]).save(path)
        inputs.append(str(path))
    predict.main(["-m", str(run_dir / "best.pth"), "-i", *inputs, "--amp", "off", "--probs"])
    for i, size in enumerate([(44, 60), (32, 32)]):
        mask = Image.open(tmp_path / f"in{i}_mask.png")
        assert mask.size == size[::-1] and mask.mode == "P"
        expected = network_probabilities(run_dir / "best.pth", pictures[i])
        # The probabilities vary from pixel to pixel even where the tiny model's argmax does not.
        np.testing.assert_allclose(np.load(tmp_path / f"in{i}_probs.npy"), expected, atol=2e-3)
        assert np.array_equal(np.asarray(mask), expected.argmax(0))  # shapes: mask values = class indices
    out = tmp_path / "named.png"
    predict.main(["-m", str(run_dir / "best.pth"), "-i", inputs[0], "-o", str(out)])
    assert Image.open(out).size == (60, 44)


def test_predict_bad_inputs(run_dir, tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    for path, message in [(tmp_path / "missing.png", "does not exist"), (not_image, "not an image")]:
        result = run_script("predict.py", "-m", str(run_dir / "best.pth"), "-i", str(path))
        assert result.returncode != 0
        assert str(path) in result.stderr and message in result.stderr
        assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.png"]  # nothing else written
    bogus = tmp_path / "model.pth"
    bogus.write_bytes(b"not a checkpoint")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pth")
    for path, message in [(bogus, "not a readable PyTorch checkpoint"), (tmp_path / "other.pth", "not a checkpoint"),
                          (tmp_path / "absent.pth", "does not exist")]:
        result = run_script("predict.py", "-m", str(path), "-i", str(not_image))
        assert result.returncode != 0 and str(path) in result.stderr and message in result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--lr", "-0.1"], "--lr must be positive"),
    (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_train_rejects_impossible_flags(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
