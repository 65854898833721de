"""Files sized for the people who share them: best.pth holds the model and what reads it (no optimizer state)
and loads everywhere; last.pth adds the optimizer state that --resume needs, and nothing more."""
import numpy as np
import pytest
import torch
from PIL import Image

import eval as eval_script
import export
import hubconf
import predict
import train
from checkpoints import load_checkpoint
from model import build_model
from test_bad_input import TINY, exits

# base 32: weights large beside the file's overhead (1.9 MB in 32 x 32 images: the run takes seconds)
SMALL = TINY[:TINY.index("--base-channels")] + ["--base-channels", "32"] + TINY[TINY.index("--base-channels") + 2:]
# the zip layout (a record per tensor, AdamW's step counts included), the arguments, the plan, the scores and
# (last.pth) the random states
OVERHEAD = 128 * 1024


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train.main(SMALL + ["--checkpoint-dir", str(tmp_path_factory.mktemp("runs"))])


def tensor_bytes(tensors):
    """numpy's count of the bytes in a list of tensors."""
    return sum(int(np.prod(t.shape)) * np.dtype(str(t.dtype).removeprefix("torch.")).itemsize for t in tensors)


def test_best_pth_holds_the_weights_and_last_pth_adds_adams_moments(run_dir):
    best = load_checkpoint(run_dir / "best.pth")
    model = build_model(best["model_args"])  # an independent count: the architecture rebuilt, not the file
    weights = tensor_bytes(model.state_dict().values())
    parameters = tensor_bytes(list(model.parameters()))
    assert parameters > 10 * OVERHEAD  # an optimizer moment, or a copy of the weights, could not hide
    best_size, last_size = (run_dir / "best.pth").stat().st_size, (run_dir / "last.pth").stat().st_size
    assert weights <= best_size <= weights + OVERHEAD
    # AdamW keeps two moments of every parameter (exp_avg, exp_avg_sq), nothing of the buffers
    assert weights + 2 * parameters <= last_size <= weights + 2 * parameters + OVERHEAD
    assert not {"optimizer", "scheduler", "scaler", "rng"} & set(best)
    last = load_checkpoint(run_dir / "last.pth")
    assert {"optimizer", "scheduler", "scaler", "rng"} <= set(last)
    for key in ("model_args", "classes", "mask_values", "normalize", "args", "epoch", "best_score", "metrics"):
        assert best[key] == last[key], key
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])


def test_best_pth_loads_everywhere(run_dir, tmp_path, capsys):
    best = str(run_dir / "best.pth")
    scores = eval_script.main(["-m", best, "--split", "val", "--workers", "0"])
    assert scores["miou"] == pytest.approx(load_checkpoint(best)["metrics"]["miou"], abs=1e-6)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "x.png")
    predict.main(["-m", best, "-i", str(tmp_path / "x.png"), "-o", str(tmp_path / "out")])
    assert (tmp_path / "out" / "x_mask.png").is_file()
    pytest.importorskip("onnxruntime"), pytest.importorskip("onnxscript")
    export.main(["-m", best, "--torchscript", str(tmp_path / "model.pt"), "-o", str(tmp_path / "model.onnx")])
    assert (tmp_path / "model.pt").is_file()
    model = hubconf.unet(checkpoint=best)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 4, 32, 32)
    loaded = train.main(SMALL + ["--load", best, "--checkpoint-dir", str(tmp_path / "runs")])
    assert "loaded" in capsys.readouterr().out and (loaded / "best.pth").is_file()


def test_resume_from_best_pth_points_at_last_pth(run_dir, capsys):
    code, line = exits(train, ["--resume", str(run_dir / "best.pth")], capsys)
    assert code == 2 and "without the optimizer state that --resume needs" in line
    assert f"--resume {run_dir / 'last.pth'}" in line and f"--load {run_dir / 'best.pth'}" in line
