"""train.py at scale: exact resume, Ctrl-C, the NaN stop, atomic saves, logs, curves, samples, torchrun."""
import copy
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

try:
    import resource
except ImportError:  # Windows
    resource = None

import drawing
import engine
import eval as eval_py
import predict as predict_py
import inference
import recipe
import rundir
import sampling
import train
import utils
from conftest import ROOT
from synthetic import Shapes
from checkpoints import load_model
from inference import evaluate, predict_probs, probs_to_labels
from checkpoints import load_checkpoint, save_checkpoint
from drawing import voc_palette
from errors import CheckpointError
from model import build_model
from precision import Precision

# 32 training images in batches of 8: 4 steps an epoch.
TINY = ["--dataset", "shapes", "--image-size", "32", "--num-train", "32", "--num-val", "6", "--epochs", "3",
        "--steps-per-epoch", "4", "--batch-size", "8", "--base-channels", "4", "--depth", "2", "--workers", "0",
        "--lr", "1e-2",
        "--warmup-epochs", "0.5", "--sample-every", "2", "--amp", "off"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted 3-epoch run."""
    return train.main(TINY + ["--checkpoint-dir", str(tmp_path_factory.mktemp("full"))])


def assert_same_weights(a, b):
    state_a, state_b = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def read_log(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def interrupt_after(monkeypatch, target, name, calls):
    """Send this process a real SIGINT once `target.name` has been called `calls` times."""
    original, count = getattr(target, name), [0]

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        count[0] += 1
        if count[0] == calls:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(target, name, wrapped)


def interrupted_run(argv):
    """train.main stopped by Ctrl-C: it exits with status 130 (so job scripts see the interruption); its run folder."""
    with pytest.raises(SystemExit) as stopped:
        train.main(argv)
    assert stopped.value.code == 130
    return next(Path(argv[argv.index("--checkpoint-dir") + 1]).glob("*/last.pth")).parent


def test_ctrl_c_mid_epoch_then_resume_equals_uninterrupted_run(full_run, tmp_path, monkeypatch, capsys):
    # SIGINT during step 6 (epoch 2): the run finishes step 7, saves, and returns instead of dying.
    interrupt_after(monkeypatch, engine.StepRunner, "update", 6)
    run_dir = interrupted_run(TINY + ["--checkpoint-dir", str(tmp_path)])
    monkeypatch.undo()
    state = load_checkpoint(run_dir / "last.pth")  # weights_only=True
    assert (state["epoch"], state["step"]) == (1, 7)
    assert {"scheduler", "scaler", "rng", "optimizer", "best_score", "args"} <= set(state)
    assert f"--resume {run_dir / 'last.pth'}" in capsys.readouterr().out
    # Only the checkpoint is needed: the other flags come from it.
    assert train.main(["--resume", str(run_dir / "last.pth")]) == run_dir
    assert_same_weights(run_dir / "last.pth", full_run / "last.pth")
    assert read_log(run_dir) == read_log(full_run)
    with open(run_dir / "metrics.csv", newline="") as f:  # rows kept from before the interruption stay integral
        assert [row[:2] for row in list(csv.reader(f))[1:]] == [["1", "4"], ["2", "8"], ["3", "12"]]


def test_stop_during_validation_saves_the_epoch_then_resume_is_exact(full_run, tmp_path, monkeypatch):
    interrupt_after(monkeypatch, train, "evaluate", 1)
    run_dir = interrupted_run(TINY + ["--checkpoint-dir", str(tmp_path)])
    monkeypatch.undo()
    assert (load_checkpoint(run_dir / "last.pth")["epoch"], len(read_log(run_dir))) == (1, 1)
    train.main(TINY + ["--resume", str(run_dir / "last.pth")])
    assert_same_weights(run_dir / "last.pth", full_run / "last.pth")
    assert_same_weights(run_dir / "best.pth", full_run / "best.pth")


def test_a_second_ctrl_c_during_the_save_lets_it_complete_then_aborts_in_one_line(tmp_path, monkeypatch, capsys):
    """Ctrl-C in step 6, a second one (more than a second later) while step 7's last.pth is being written: the
    save completes, and the run aborts with one line naming it, whole and resumable."""
    interrupt_after(monkeypatch, engine.StepRunner, "update", 6)
    real_save = torch.save

    def second_ctrl_c_during_the_save(state, f):
        if state.get("step") == 7:
            time.sleep(1.1)  # a Ctrl-C within a second of the first is taken as torchrun's forward of it
            os.kill(os.getpid(), signal.SIGINT)
        real_save(state, f)

    monkeypatch.setattr(torch, "save", second_ctrl_c_during_the_save)
    run_dir = interrupted_run(TINY + ["--checkpoint-dir", str(tmp_path)])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"aborted by a second Ctrl-C: {run_dir / 'last.pth'} is whole: continue "
                                            f"with --resume {run_dir / 'last.pth'}")
    assert load_checkpoint(run_dir / "last.pth")["step"] == 7
    assert sorted(p.name for p in run_dir.glob("*.pth*")) == ["best.pth", "last.pth"]  # no temporary file


def test_nan_loss_stops_and_names_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = [0]
    real_loss = engine.segmentation_loss

    def loss_turning_nan(*args, **kwargs):
        calls[0] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls[0] == 6 else loss  # batch 2 of epoch 2

    monkeypatch.setattr(engine, "segmentation_loss", loss_turning_nan)
    with pytest.raises(SystemExit) as stopped:
        train.main(TINY + ["--checkpoint-dir", str(tmp_path)])
    last = next(tmp_path.glob("*/last.pth"))
    message = str(stopped.value.code)
    assert "loss is nan at epoch 2, batch 2" in message and f"last good checkpoint is {last}" in message
    state = load_checkpoint(last)
    assert state["epoch"] == 1 and all(t.isfinite().all() for t in state["model"].values())


def test_interrupted_save_leaves_the_old_checkpoint_loadable(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    old = {"model": {"w": torch.ones(3)}, "model_args": {}, "classes": [], "mask_values": [],
           "normalize": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    save_checkpoint(old, path)

    def save_half_then_ctrl_c(state, f):
        f.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_half_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({**old, "model": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temporary file left behind


def test_metric_dice_picks_best_pth_by_mean_dice(tmp_path):
    """--metric dice on 4 classes: each epoch's score is its mean Dice, best.pth the epoch with the highest, and the
    curves are drawn (they looked for a column 'dice' that no row has)."""
    run_dir = train.main(TINY + ["--metric", "dice", "--epochs", "2", "--sample-every", "0",
                                 "--checkpoint-dir", str(tmp_path)])
    rows = read_log(run_dir)
    assert [row["score"] for row in rows] == [row["mean_dice"] for row in rows]
    best = max(rows, key=lambda row: row["score"])
    assert load_checkpoint(run_dir / "best.pth")["metrics"]["mean_dice"] == pytest.approx(best["mean_dice"])
    assert (run_dir / "curves.png").is_file()


def test_log_curves_and_samples_hold_the_run(full_run):
    rows = read_log(full_run)
    last = load_checkpoint(full_run / "last.pth")
    assert [row["epoch"] for row in rows] == [1, 2, 3] and [row["step"] for row in rows] == [4, 8, 12]
    for key in ("miou", "pixel_acc", "mean_dice"):
        assert rows[-1][key] == pytest.approx(last["metrics"][key], rel=1e-12)
    assert max(row["score"] for row in rows) == pytest.approx(last["best_score"])
    assert all(math.isfinite(row["train_loss"]) for row in rows)
    with Image.open(full_run / "curves.png") as curves:
        assert curves.format == "PNG" and curves.width > 600
    # Samples every 2 epochs and at the last one: headings, then rows of image | truth | prediction enlarged 5x
    # (32-pixel images to 160-pixel panels), then the key of the classes shown.
    assert sorted(p.name for p in (full_run / "samples").iterdir()) == ["epoch_002.png", "epoch_003.png"]
    grid = np.asarray(Image.open(full_run / "samples" / "epoch_003.png"))
    side, top = 160, drawing.text_strip(["image", "truth", "prediction"], 160, 480).height
    assert grid.shape[1:] == (3 * side, 3) and grid.shape[0] > top + 4 * side  # the first 4 of 6 validation images
    assert (grid[:top] != 255).any()  # the headings
    model, checkpoint = load_model(full_run / "last.pth")
    enlarge = lambda a: a.repeat(5, 0).repeat(5, 1)  # noqa: E731
    for i in range(4):
        image, mask = Shapes(6, 32, 0, "val")[i]
        prediction = probs_to_labels(predict_probs(model, image[None], checkpoint["normalize"]))[0]
        row = grid[top + side * i:top + side * (i + 1)]
        assert np.array_equal(row[:, :side], enlarge(image.permute(1, 2, 0).numpy()))
        assert np.array_equal(row[:, side:2 * side], enlarge(voc_palette()[mask.numpy()]))  # shapes: values = classes
        assert np.array_equal(row[:, 2 * side:], enlarge(voc_palette()[prediction.numpy()]))
    key = grid[top + 4 * side:]
    assert key.shape[0] > 0 and (key == voc_palette()[1]).all(-1).any()  # a circle's swatch


def test_torchrun_gloo_score_equals_single_process_score(tmp_path):
    """Two CPU processes: 7 validation images split 4 + 3, confusion matrices summed across ranks."""
    # --standalone: a rendezvous on a free port, not the fixed 29500 that a parallel run or another job may hold.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *TINY,
               "--num-val", "7", "--epochs", "2", "--batch-size", "4", "--accumulate", "2", "--optimizer", "sgd",
               "--device", "cpu", "--checkpoint-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("device cpu x 2") == 1  # only rank 0 prints
    (run_dir,) = tmp_path.iterdir()  # and only rank 0 writes
    model, checkpoint = load_model(run_dir / "last.pth")
    loader = torch.utils.data.DataLoader(Shapes(7, 32, 0, "val"), batch_size=7)
    single = evaluate(model, loader, 4, checkpoint["normalize"], 255, "cpu")
    assert checkpoint["metrics"]["iou"] == pytest.approx(single["iou"], rel=1e-12, nan_ok=True)
    assert checkpoint["metrics"]["pixel_acc"] == single["pixel_acc"]
    assert [row["epoch"] for row in read_log(run_dir)] == [1, 2]
    assert checkpoint["step"] == 2 * 4  # --steps-per-epoch 4, 2 batches of 4 a step


def test_schedules_scale_every_parameter_group():
    plan = recipe.plan_epochs(2, train_images=80, batch_size=8, crop_size=0, elastic=0.0, warmup_epochs=0.5,
                              steps_per_epoch=10)  # 20 steps, 5 of warm-up
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": params[:1], "lr": 0.1}, {"params": params[1:], "lr": 0.01}], lr=0.1)
    scheduler = engine.build_scheduler(optimizer, "poly", plan)
    lrs = []
    for _ in range(20):
        lrs.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    expected = [(t + 1) / 5 if t < 5 else (1 - (t - 5) / 15) ** 0.9 for t in range(20)]
    assert [lr[0] for lr in lrs] == pytest.approx([0.1 * f for f in expected])
    assert [lr[1] for lr in lrs] == pytest.approx([0.01 * f for f in expected])
    optimizer = torch.optim.SGD(params, lr=0.1)
    scheduler = engine.build_scheduler(optimizer, "cosine", plan)
    for _ in range(10):  # 5 warm-up steps, then 5 of 15 cosine steps
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 3)))
    # A re-planned budget moves the end of the decay: 5 of 25 steps after the warm-up.
    plan.total_steps = 30
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 6 / 25)))


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_the_fused_optimizer_updates_the_weights_as_the_per_tensor_loop_does(name):
    torch.manual_seed(0)
    # (no bias before BatchNorm: its gradient is rounding noise, which Adam scales up to whole steps)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
    config = train.TrainConfig(optimizer=name, lr=0.01, weight_decay=1e-2, momentum=0.9)
    optimizer = engine.build_optimizer(model, config, encoder_lr_factor=1.0)
    assert all(group["fused"] for group in optimizer.param_groups)
    twin = copy.deepcopy(model)
    twin_of = dict(zip(map(id, model.parameters()), twin.parameters()))
    groups = [{"params": [twin_of[id(p)] for p in group["params"]], "weight_decay": group["weight_decay"]}
              for group in optimizer.param_groups]  # parameter_groups spares BatchNorm and biases the decay
    momentum = {"momentum": 0.9} if name == "sgd" else {}
    looped = type(optimizer)(groups, lr=0.01, foreach=False, **momentum)
    for _ in range(3):
        x = torch.randn(2, 1, 8, 8)
        for net, opt in ((model, optimizer), (twin, looped)):
            net(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for fused_weight, looped_weight in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(fused_weight, looped_weight)


def test_load_takes_matching_weights_for_a_new_number_of_classes(full_run, tmp_path, capsys):
    checkpoint = load_checkpoint(full_run / "best.pth")
    source = checkpoint["model"]
    model_config = train.parse_args(TINY + ["--single-logit"])[3]  # 1 logit instead of 4: the last layer differs
    model = build_model(model_config.model_args(2))
    engine.load_weights(model, "best.pth", checkpoint, num_logits=1)
    state = model.state_dict()
    assert torch.equal(state["inc.0.weight"], source["inc.0.weight"])
    assert state["outc.weight"].shape == (1, 4, 1, 1)
    assert f"loaded {len(state) - 2} of {len(state)} tensors" in capsys.readouterr().out  # all but outc's 2
    wider = build_model({**checkpoint["model_args"], "base_channels": 8})
    with pytest.raises(CheckpointError, match=r"holds another architecture \(\d+ tensor\(s\) differ"):
        engine.load_weights(wider, "best.pth", checkpoint, num_logits=4)


def test_load_takes_the_architecture_from_the_checkpoint(full_run):
    """--load with no architecture flags rebuilds the checkpoint's model (TINY's base 4, depth 2), not the
    default 31 M-parameter U-Net; flags given on the command line still win."""
    model_config = train.parse_args(["--dataset", "shapes", "--load", str(full_run / "best.pth")])[3]
    assert (model_config.base_channels, model_config.depth) == (4, 2)
    model_config = train.parse_args(["--dataset", "shapes", "--load", str(full_run / "best.pth"), "--depth", "3"])[3]
    assert (model_config.base_channels, model_config.depth) == (4, 3)


@pytest.mark.parametrize("flags, message", [
    (["--resume", "a.pth", "--load", "b.pth"], "give only one"),
    (["--warmup-epochs", "10", "--epochs", "10"], "--warmup-epochs (10) must be shorter"),
    (["--accumulate", "0"], "--accumulate must be at least 1"),
    (["--resume", "missing.pth"], "--resume: checkpoint 'missing.pth' does not exist"),
])
def test_train_rejects_bad_run_flags(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_wrong_number_of_class_weights_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"--class-weights needs 4 values .* got 2"):
        train.main(TINY + ["--class-weights", "1", "2", "--checkpoint-dir", str(tmp_path)])


def test_balanced_class_weights_are_measured_printed_and_saved(tmp_path, capsys):
    run_dir = train.main(TINY + ["--epochs", "1", "--checkpoint-dir", str(tmp_path)])  # balanced by default
    counts = np.zeros(4)
    for i in np.linspace(0, 31, 32).round().astype(int):  # the 32 training images (all: fewer than 64)
        counts += np.bincount(Shapes(32, 32, 0, "train")[i][1].numpy().ravel(), minlength=4)
    shares = counts / counts.sum()
    expected = shares ** -0.5 / (shares * shares ** -0.5).sum()
    saved = json.loads((run_dir / "args.json").read_text())["class_weights"]
    assert saved == pytest.approx(expected, abs=1e-3)
    assert "class weights (balanced, from the training masks' pixels): background " in capsys.readouterr().out
    unweighted = train.main(TINY + ["--epochs", "1", "--class-weights", "none", "--checkpoint-dir", str(tmp_path)])
    assert json.loads((unweighted / "args.json").read_text())["class_weights"] is None
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train.main(TINY + ["--class-weights", "balanced", "2", "--checkpoint-dir", str(tmp_path)])
    assert "--class-weights takes 'balanced' or 'none' alone, or one number per class" in capsys.readouterr().err


def discs(folder, sky=False):
    """Eight 32 x 32 grey images and their masks: a centred disc (class 1) of a random radius, alike upside down
    and mirrored; with `sky`, the top 8 rows are class 2 in every mask."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True), (folder / "masks").mkdir()
    y, x = np.mgrid[:32, :32] + 0.5
    for i in range(8):
        mask = ((y - 16) ** 2 + (x - 16) ** 2 < rng.uniform(4, 12) ** 2).astype(np.uint8)
        if sky:
            mask[:8] = 2
        Image.fromarray((mask * 100 + rng.integers(0, 20, mask.shape)).astype(np.uint8)).save(
            folder / "images" / f"{i}.png")
        Image.fromarray(mask).save(folder / "masks" / f"{i}.png")
    return ["--images", str(folder / "images"), "--masks", str(folder / "masks")]


def test_data_with_no_up_and_down_train_with_vertical_flips_and_eval_averages_four(tmp_path, capsys):
    """Centred discs: the run chooses vertical flips, says so and saves them; eval.py then averages the four flips
    unless --no-tta. A sky atop every mask: no vertical flips, and eval.py makes one pass."""
    tiny = ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "4", "--base-channels", "4", "--depth", "2",
            "--workers", "0", "--amp", "off", "--sample-every", "0", "--val-percent", "25",
            "--checkpoint-dir", str(tmp_path / "runs")]
    data = discs(tmp_path / "discs")
    run_dir = train.main(data + tiny)
    assert "augmentation: vertical flips too (--vflip 0.5)" in capsys.readouterr().out
    assert json.loads((run_dir / "args.json").read_text())["vflip"] == 0.5
    scores = tmp_path / "scores.json"
    score = data + ["--json", str(scores), "--amp", "off"]
    eval_py.main(["-m", str(run_dir / "best.pth")] + score)
    assert "predictions of the four flips are averaged" in capsys.readouterr().out
    averaged = json.loads(scores.read_text())
    eval_py.main(["-m", str(run_dir / "best.pth"), "--no-tta"] + score)
    assert "four flips" not in capsys.readouterr().out
    one_pass = json.loads(scores.read_text())
    assert averaged["options"]["tta_vflip"] and not one_pass["options"]["tta_vflip"]
    with pytest.raises(SystemExit):
        eval_py.main(["-m", str(run_dir / "best.pth"), "--no-tta", "--tta"] + score)
    assert "--no-tta asks for one pass and --tta or --tta-vflip for flipped ones" in capsys.readouterr().err
    segment = ["-m", str(run_dir / "best.pth"), "-i", str(tmp_path / "discs" / "images" / "0.png"), "-o",
               str(tmp_path / "out.png"), "--amp", "off"]
    predict_py.main(segment)
    assert "predictions of the four flips are averaged" in capsys.readouterr().out
    predict_py.main(segment + ["--no-tta"])
    assert "four flips" not in capsys.readouterr().out
    sky = discs(tmp_path / "sky", sky=True)
    upright = train.main(sky + tiny)
    assert "vertical flips" not in capsys.readouterr().out
    assert json.loads((upright / "args.json").read_text())["vflip"] == 0
    eval_py.main(["-m", str(upright / "best.pth"), *sky, "--json", str(scores), "--amp", "off"])
    assert not json.loads(scores.read_text())["options"]["tta_vflip"]


def test_the_masks_are_not_read_where_no_default_needs_them(tmp_path, monkeypatch):
    def unwanted(*args):
        raise AssertionError("the masks were read for nothing")

    monkeypatch.setattr(train, "mask_layout", unwanted)
    run_dir = train.main(TINY + ["--epochs", "1", "--vflip", "0", "--class-weights", "none",
                                 "--checkpoint-dir", str(tmp_path)])
    assert json.loads((run_dir / "args.json").read_text())["vflip"] == 0
    with pytest.raises(AssertionError, match="read for nothing"):
        train.main(TINY + ["--epochs", "1", "--vflip", "0", "--checkpoint-dir", str(tmp_path)])  # balanced weights


def test_the_shared_micrographs_get_vertical_flips_and_photos_do_not(shared_data):
    """The rule on real masks: the VNC stack and ISBI 2012 (sections of tissue) have no up and down; the VOC
    subset (sky above ground) and the Carvana sample (each car above its shadow) do."""
    def chosen_vflip(*flags):
        config, data, augment, _, _ = train.parse_args([*flags, "--workers", "0"])
        return train.prepare_data(config, data, augment, torch.device("cpu"), main_process=False)[-1].vflip

    vnc, isbi = shared_data / "vnc" / "train", shared_data / "isbi2012" / "train"
    assert chosen_vflip("--images", str(vnc / "images"), "--masks", str(vnc / "masks")) == 0.5
    assert chosen_vflip("--images", str(isbi / "image"), "--masks", str(isbi / "label")) == 0.5
    assert chosen_vflip("--dataset", "voc", "--data", str(shared_data / "voc_subset")) == 0
    assert chosen_vflip("--dataset", "carvana", "--data", str(shared_data / "carvana_sample")) == 0

@pytest.mark.parametrize("workers", ["0", "1"])
def test_bad_mask_found_while_loading_is_one_line(tmp_path, shared_data, workers):
    """Without --verify, a corrupt Carvana mask is only met when loaded, maybe in a worker: still one line."""
    source = shared_data / "carvana_sample"
    (tmp_path / "imgs").mkdir(), (tmp_path / "masks").mkdir()
    for image in sorted((source / "imgs").glob("*.jpg")):
        (tmp_path / "imgs" / image.name).symlink_to(image)
        mask = f"{image.stem}_mask.gif"
        (tmp_path / "masks" / mask).symlink_to(source / "masks" / mask)
    broken = sorted((tmp_path / "masks").iterdir())[0]
    broken.unlink()
    broken.write_bytes(b"GIF89a broken")
    result = subprocess.run(
        [sys.executable, "train.py", "--dataset", "carvana", "--data", str(tmp_path), "--scale", "0.05",
         "--crop-size", "0", "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "32", "--base-channels", "4",
         "--depth", "2",
         "--workers", workers, "--checkpoint-dir", str(tmp_path / "runs")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: mask ") and broken.name in last and "Traceback" not in result.stderr


def test_augmented_resume_is_exact_whatever_the_workers(tmp_path, monkeypatch):
    """Each item's augmentation (zoom, rotation, crop, flip, jitter) is seeded by (seed, epoch, index): a run
    stopped mid-epoch and resumed with a data-loader worker ends with the weights of an uninterrupted run
    that loaded everything in the main process."""
    rng = np.random.default_rng(0)
    for folder in ("imgs", "masks"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    for i in range(12):
        mask = np.zeros((40, 48), np.uint8)
        top, left = rng.integers(0, 20, 2)
        mask[top:top + 20, left:left + 20] = 1
        image = (rng.integers(0, 60, (40, 48, 3)) + mask[..., None] * 150).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / "data" / "imgs" / f"{i}.png")
        Image.fromarray(mask).save(tmp_path / "data" / "masks" / f"{i}.png")
    flags = ["--dataset", "folder", "--data", str(tmp_path / "data"), "--val-percent", "25", "--crop-size", "32",
             "--jitter", "0.2", "--elastic", "0.5", "--epochs", "2", "--steps-per-epoch", "3", "--batch-size", "3",
             "--base-channels", "4", "--depth", "2",
             "--lr", "1e-2", "--sample-every", "0"]
    full = train.main(flags + ["--workers", "0", "--checkpoint-dir", str(tmp_path / "full")])
    interrupt_after(monkeypatch, engine.StepRunner, "update", 4)  # in epoch 2 (3 steps an epoch)
    stopped = interrupted_run(flags + ["--workers", "1", "--checkpoint-dir", str(tmp_path / "stopped")])
    monkeypatch.undo()
    assert load_checkpoint(stopped / "last.pth")["epoch"] == 1
    train.main(["--resume", str(stopped / "last.pth")])
    assert_same_weights(stopped / "last.pth", full / "last.pth")


def sgd_and_schedule():
    weights = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weights], lr=0.1, momentum=0.9)
    return weights, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)


def test_fp16_resume_of_an_fp32_checkpoint_starts_a_fresh_loss_scale(capsys):
    """--resume with --amp fp16 from a run without it: that run saved an empty scaler state, which GradScaler
    cannot load; the loss scale starts afresh and the rest is restored."""
    weights, optimizer, scheduler = sgd_and_schedule()
    weights.grad = torch.ones(2)
    optimizer.step(), scheduler.step()  # a momentum buffer and a step to restore
    fp32_scaler = torch.amp.GradScaler("cpu", enabled=False)
    checkpoint = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                  "scaler": fp32_scaler.state_dict(), "epoch": 2, "best_score": 0.25, "metrics": {"miou": 0.25},
                  "epoch_progress": None, "rng": [{"rank": 0}]}
    assert checkpoint["scaler"] == {}  # what an fp32 run saves
    _, optimizer, scheduler = sgd_and_schedule()
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    run, rng = engine.restore_training(checkpoint, optimizer, scheduler, scaler, rank=0, world_size=1)
    assert run == {"epoch": 2, "best_score": 0.25, "metrics": {"miou": 0.25}, "epoch_progress": None}
    assert rng == {"rank": 0}
    assert scheduler.last_epoch == 1 and optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert torch.equal(optimizer.state_dict()["state"][0]["momentum_buffer"], torch.ones(2))
    assert scaler.is_enabled() and scaler.get_scale() == 2.0 ** 16  # GradScaler's initial scale
    assert "no fp16 loss-scaler state" in capsys.readouterr().out
    # An fp16 run's scale is restored.
    checkpoint["scaler"] = torch.amp.GradScaler("cpu", init_scale=1024.0).state_dict()
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    engine.restore_training(checkpoint, *sgd_and_schedule()[1:], scaler, rank=0, world_size=1)
    assert scaler.get_scale() == 1024.0


class RandomItems(torch.utils.data.Dataset):
    """Item i: i + three draws from torch's global generator, as a random augmentation makes them."""

    def __len__(self):
        return 10

    def __getitem__(self, index):
        return index + torch.rand(3)


def test_checkpoints_hold_and_restore_every_gpus_random_state(tmp_path, monkeypatch):
    """Two GPUs (CUDA calls mocked): a checkpoint holds both generators' states and a resume restores both; a
    checkpoint of the current GPU's state alone (older runs) still restores it."""
    gpus = [torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([3, 4], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [state.clone() for state in gpus])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.append(("all", states)))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: restored.append(("current", state)))
    torch.save({"rng": [utils.rng_states()]}, tmp_path / "rng.pth")
    saved = torch.load(tmp_path / "rng.pth", weights_only=True)["rng"][0]
    utils.set_rng_states(saved)
    ((which, states),) = restored
    assert which == "all" and [s.tolist() for s in states] == [[1, 2], [3, 4]]
    utils.set_rng_states({**saved, "cuda": gpus[1]})
    assert restored[1][0] == "current" and restored[1][1].tolist() == [3, 4]


def test_seeded_items_reseed_the_cpu_generator_alone(monkeypatch):
    """SeededItems seeds each item's draws; reseeding the CUDA generators too (torch.manual_seed) would reset
    the caller's CUDA random state, which fork_rng(devices=[]) does not restore."""
    items = sampling.SeededItems(RandomItems())
    caller_state = torch.get_rng_state()
    seeded = []
    for name in ("manual_seed", "manual_seed_all"):
        monkeypatch.setattr(torch.cuda, name, lambda seed, _name=name: seeded.append((_name, seed)))
    item = items[(3, 42)]
    assert seeded == []  # no CUDA generator touched
    assert torch.equal(torch.get_rng_state(), caller_state)  # the caller's CPU random state is left alone
    assert torch.equal(item, 3 + torch.rand(3, generator=torch.Generator().manual_seed(42)))
    assert torch.equal(items[(3, 42)], item) and not torch.equal(items[(3, 43)], item)
    assert seeded == []


FROZEN_ENCODER_UNDER_DDP = """
import torch
from distributed import all_gather_objects, init_distributed
from engine import StepRunner, wrap_for_steps
from losses import segmentation_loss
from model import ModelConfig, build_model, input_normalization, set_encoder_frozen

device, rank, world_size = init_distributed(torch.device("cpu"))
args = ModelConfig(encoder="resnet18", encoder_weights="none", decoder_channels=[8] * 5).model_args(2)
torch.manual_seed(0)
model = build_model(args)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
runner = StepRunner(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
                    torch.amp.GradScaler("cpu", enabled=False), segmentation_loss, input_normalization(args))
batches = torch.Generator().manual_seed(rank)  # each process its own batches: their gradients differ
moved = []
for frozen in (True, True, False, False):  # as train.py: wrapped again when the encoder's state changes
    if set_encoder_frozen(model, frozen) and (not moved or frozen != moved[-1][0]):
        runner.model, runner.ddp = wrap_for_steps(model, False, device, world_size)
    before = [p.detach().clone() for p in model.encoder.parameters()]
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=batches)
    runner.forward_backward(images, torch.randint(0, 2, (2, 32, 32), generator=batches))
    runner.update()
    moved.append((frozen, any(not torch.equal(a, b) for a, b in zip(before, model.encoder.parameters()))))
mine, theirs = all_gather_objects([p.detach() for p in model.parameters()])
if rank == 0:
    print("encoder moved", moved, "processes agree", all(torch.equal(a, b) for a, b in zip(mine, theirs)))
torch.distributed.destroy_process_group()
"""


def test_ddp_trains_a_frozen_then_thawed_encoder_in_step_across_processes(tmp_path):
    """Two gloo processes, each on its own batches, through train.py's wrap_for_steps and StepRunner: two steps
    with the encoder frozen (DDP leaves its parameters out: no unused-parameter error, and they do not move),
    two with it thawed (the wrapper rebuilt: its gradients averaged too, so both processes keep the same weights)."""
    script = tmp_path / "frozen_encoder_ddp.py"
    script.write_text(FROZEN_ENCODER_UNDER_DDP)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == ("encoder moved [(True, False), (True, False), (False, True), (False, True)] "
                                     "processes agree True")


ENCODER_RUN = ["--dataset", "shapes", "--image-size", "32", "--num-train", "8", "--num-val", "2",
               "--steps-per-epoch", "1", "--batch-size", "8", "--workers", "0", "--encoder", "resnet18",
               "--encoder-weights", "none",
               "--decoder-channels", "8", "8", "8", "8", "8", "--sample-every", "0"]


@pytest.mark.parametrize("epochs, freeze, expected", [(3, 1, [True, False]), (1, 0, [False])])
def test_training_rewraps_when_the_encoder_thaws(tmp_path, monkeypatch, epochs, freeze, expected):
    """The step model is (re)built with the encoder's frozen state at the first epoch and when it changes."""
    wraps, original = [], train.wrap_for_steps

    def spy(model, compile_model, device, world_size):
        wraps.append(not all(p.requires_grad for p in model.parameters()))  # wrapped with a frozen encoder
        return original(model, compile_model, device, world_size)

    monkeypatch.setattr(train, "wrap_for_steps", spy)
    train.main(ENCODER_RUN + ["--epochs", str(epochs), "--freeze-encoder-epochs", str(freeze),
                              "--checkpoint-dir", str(tmp_path)])
    assert wraps == expected


BUDGET_RUN = ["--dataset", "shapes", "--image-size", "32", "--num-train", "32", "--num-val", "6", "--batch-size", "8",
              "--base-channels", "4", "--depth", "2", "--workers", "0", "--sample-every", "0", "--time", "8s"]


def budgeted_run_stopped_and_resumed(folder, capsys):
    """An 8 s run stopped by Ctrl-C in step 30, then resumed: (seconds the resumed run took, seconds its budget
    had left, its last checkpoint)."""
    started = time.monotonic()
    with pytest.MonkeyPatch.context() as patch:  # undone after the first run; cpu_clock's patches stay
        interrupt_after(patch, engine.StepRunner, "update", 30)
        with pytest.raises(SystemExit):
            train.main(BUDGET_RUN + ["--checkpoint-dir", str(folder)], started=started)
    (run_dir,) = folder.iterdir()
    stopped = load_checkpoint(run_dir / "last.pth")
    plan = stopped["plan"]
    assert plan["budget"] == 8 and 0 < plan["spent"] < 8 and stopped["step"] == 31  # SIGINT in step 30: 31 saved
    assert json.loads((run_dir / "args.json").read_text())["plan"]["steps_per_epoch"] == plan["steps_per_epoch"]
    assert f"plan: {plan['total_steps']} steps of batch 8" in capsys.readouterr().out
    # The resumed run continues the plan: the same budget, less what the first session used.
    resumed_at = time.monotonic()
    train.main(["--resume", str(run_dir / "last.pth")], started=resumed_at)
    seconds = time.monotonic() - resumed_at
    final = load_checkpoint(run_dir / "last.pth")
    assert final["plan"]["budget"] == 8 and final["step"] == final["plan"]["total_steps"] > 31
    assert (run_dir / "best.pth").is_file()
    out = capsys.readouterr().out
    assert "resuming after step 31" in out and "of the 8s budget" in out
    # A finished run may be resumed with a longer --time (a run that ended early with time left goes on); one
    # whose new budget is spent says so. The two sessions used most of their budget:
    assert final["plan"]["spent"] >= 5
    spent_budget = f"{int(final['plan']['spent'])}s"
    with pytest.raises(SystemExit, match=f"has used its {spent_budget} budget; to train it longer pass --time with"):
        train.main(["--resume", str(run_dir / "last.pth"), "--time", spent_budget], started=time.monotonic())
    return seconds, 8 - plan["spent"], final


@pytest.fixture
def cpu_clock(monkeypatch):
    """The process's CPU time as the clock of time budgets, on one thread: the time the machine gave the run, which
    other processes on a shared machine do not take from it (they stall the wall clock for seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(time, "monotonic", time.process_time)
    monkeypatch.setattr(time, "perf_counter", time.process_time)
    yield
    torch.set_num_threads(threads)


def test_budgeted_run_ends_within_its_budget_and_resumes_its_plan(tmp_path, capsys, cpu_clock):
    seconds, left, final = budgeted_run_stopped_and_resumed(tmp_path, capsys)
    assert seconds <= left * 1.05 + 0.5 and final["plan"]["spent"] <= 8 * 1.05


def children_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


CPU_CLOCK_SITE = """import os, time
if "LOCAL_RANK" in os.environ or os.environ.get("CPU_CLOCK") == "all":
    time.monotonic = time.perf_counter = time.process_time
"""


@pytest.fixture
def cpu_clock_env(tmp_path):
    """The environment of a child process whose budget clock is its CPU time, on one thread (as cpu_clock):
    a sitecustomize module, imported at start-up, swaps the clocks; under torchrun, in the training processes only."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(CPU_CLOCK_SITE)
    return {**os.environ, "OMP_NUM_THREADS": "1", "CPU_CLOCK": "all",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


@pytest.mark.skipif(resource is None, reason="resource: POSIX only")
def test_budget_run_from_the_command_line_ends_in_time(tmp_path, cpu_clock_env):
    """The whole process, start-up included, ends within the budget + 5% of its CPU time, its wall time on a
    machine that no other process slows down; and it used most of its budget."""
    start = children_cpu_seconds()
    result = subprocess.run([sys.executable, "train.py", *BUDGET_RUN, "--time", "12s", "--checkpoint-dir",
                             str(tmp_path / "runs")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=cpu_clock_env)
    seconds = children_cpu_seconds() - start
    assert result.returncode == 0, result.stderr[-2000:]
    assert 12 * 0.6 <= seconds <= 12 * 1.05, result.stdout
    assert re.search(r" in \d+s of the 12s budget$", result.stdout.strip()) and list(tmp_path.glob("runs/*/best.pth"))


def test_validation_scores_what_eval_py_scores(tmp_path):
    """Training validation reads whole images of varied sizes at the files' resolution, as eval.py does: the
    checkpoint's scores are eval.py's on the same split."""
    rng = np.random.default_rng(1)
    for folder in ("imgs", "masks"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    for i in range(8):
        height, width = (40, 48) if i % 2 else (52, 36)
        mask = np.zeros((height, width), np.uint8)
        top, left = rng.integers(0, 16, 2)
        mask[top:top + 20, left:left + 18] = 1
        image = (rng.integers(0, 90, (height, width, 3)) + mask[..., None] * 120).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / "data" / "imgs" / f"{i}.png")
        Image.fromarray(mask).save(tmp_path / "data" / "masks" / f"{i}.png")
    run_dir = train.main(["--dataset", "folder", "--data", str(tmp_path / "data"), "--val-percent", "50",
                          "--crop-size", "32", "--epochs", "1", "--steps-per-epoch", "3", "--batch-size", "4",
                          "--base-channels", "4", "--depth", "2", "--workers", "0", "--sample-every", "0",
                          "--checkpoint-dir", str(tmp_path / "runs")])
    trained = load_checkpoint(run_dir / "best.pth")["metrics"]
    scores = tmp_path / "scores.json"
    eval_py.main(["-m", str(run_dir / "best.pth"), "--split", "val", "--json", str(scores), "--workers", "0"])
    scored = json.loads(scores.read_text())
    assert trained["pixel_acc"] == scored["pixel_acc"]
    assert trained["iou"] == pytest.approx(scored["iou"], rel=1e-12)


def test_validation_out_of_memory_falls_back_to_tiles_as_eval_py_does(tmp_path, monkeypatch, capsys):
    """A whole validation image that does not fit (torch.OutOfMemoryError, mocked for untiled passes over the
    160-pixel images) is scored in tiles, as eval.py scores it: the run ends with its checkpoints and sample
    grid, and its scores are eval.py's with --tile 128, the first fallback tile."""
    real_predict_probs = inference.predict_probs

    def no_room_for_whole_images(model, images, normalize, **options):
        if not options.get("tile") and images.shape[-1] > 128:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real_predict_probs(model, images, normalize, **options)

    monkeypatch.setattr(inference, "predict_probs", no_room_for_whole_images)
    run_dir = train.main(["--dataset", "shapes", "--image-size", "160", "--num-train", "4", "--num-val", "2",
                          "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--base-channels", "4",
                          "--depth", "2", "--workers", "0", "--sample-every", "1", "--amp", "off",
                          "--checkpoint-dir", str(tmp_path / "runs")])
    assert "out of memory on a 160x160 input with no tiles; falling back to --tile 128" in capsys.readouterr().err
    assert (run_dir / "samples" / "epoch_001.png").is_file()
    monkeypatch.undo()
    scores = tmp_path / "scores.json"
    eval_py.main(["-m", str(run_dir / "best.pth"), "--split", "val", "--tile", "128", "--json", str(scores),
                  "--workers", "0", "--amp", "off"])
    scored, trained = json.loads(scores.read_text()), load_checkpoint(run_dir / "best.pth")["metrics"]
    assert trained["pixel_acc"] == scored["pixel_acc"]
    assert trained["iou"] == pytest.approx(scored["iou"], rel=1e-12, nan_ok=True)


def test_a_failed_run_keeps_its_folder_once_it_holds_a_checkpoint(tmp_path):
    """A run that fails removes the folder it made only while no checkpoint is in it."""
    for name, saved in (("unsaved", []), ("saved", ["last.pth"]), ("best only", ["best.pth"])):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "args.json").write_text("{}")
        for checkpoint in saved:
            (folder / checkpoint).write_bytes(b"")
        with pytest.raises(torch.OutOfMemoryError), rundir.removed_if_unsaved(folder):
            raise torch.OutOfMemoryError("CUDA out of memory")
        assert folder.exists() == bool(saved)


@pytest.mark.parametrize("cores, device, workers", [(1, "cpu", 0), (2, "cpu", 0), (4, "cpu", 3), (1, "cuda", 0),
                                                   (2, "cuda", 1), (16, "cuda", 4)])
def test_worker_default_follows_the_cores_and_the_device(monkeypatch, cores, device, workers):
    """On two CPU cores the model's threads fill both: loading in the main process is faster than a worker."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert utils.default_workers(device) == workers


def test_training_without_workers_flag_picks_them_for_its_device(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    loaders, make_loader = [], train.make_loader
    monkeypatch.setattr(train, "make_loader", lambda *args: loaders.append(args[3].workers) or make_loader(*args))
    train.main(["--dataset", "shapes", "--image-size", "32", "--num-train", "8", "--num-val", "2", "--epochs", "1",
                "--steps-per-epoch", "1", "--base-channels", "4", "--depth", "2", "--sample-every", "0",
                "--device", "cpu", "--checkpoint-dir", str(tmp_path)])
    assert loaders == [0, 0]  # validation and training


@pytest.mark.parametrize("batch_size, warned", [(1, True), (2, False)])
def test_a_batch_of_one_image_gets_a_batchnorm_note(batch_size, warned, tmp_path, capsys):
    train.main(TINY + ["--epochs", "1", "--steps-per-epoch", "1", "--batch-size", str(batch_size),
                       "--checkpoint-dir", str(tmp_path)])
    assert ("note: with --batch-size 1 BatchNorm" in capsys.readouterr().err) == warned


def test_the_default_precision_is_chosen_for_the_machine_and_printed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    train.main(TINY + ["--amp", "auto", "--epochs", "1", "--checkpoint-dir", str(tmp_path / "plain")])
    assert "precision: fp32 (" in capsys.readouterr().out
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    run_dir = train.main(TINY + ["--amp", "auto", "--epochs", "1", "--checkpoint-dir", str(tmp_path / "bf16")])
    assert "precision: bf16 autocast + channels_last (this CPU has native bf16" in capsys.readouterr().out
    assert load_checkpoint(run_dir / "last.pth")["scaler"] == {}  # no loss scaling for bf16


@pytest.mark.parametrize("precision, model_sees", [
    (Precision(torch.bfloat16, True, ""), (True, torch.bfloat16, True)),
    (Precision(None, False, ""), (False, None, False))])
def test_the_step_runs_in_its_precision_and_the_loss_sees_fp32_logits(precision, model_sees):
    """The step runs the model under the Precision's autocast and memory layout; the logits the loss sees are fp32
    (softmax, and the soft Dice's sums over every pixel of the batch, must not run in bf16, whose 8-bit mantissa
    loses the sums)."""
    seen, loss_sees = [], []

    class Recorder(torch.nn.Conv2d):
        def forward(self, x):
            enabled = torch.is_autocast_enabled("cpu")
            seen.append((enabled, torch.get_autocast_dtype("cpu") if enabled else None,
                         x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()))
            return super().forward(x)

    def criterion(logits, masks):
        loss_sees.append(logits.dtype)
        return logits.mean()

    runner = engine.StepRunner(Recorder(3, 2, 1), None, None, torch.amp.GradScaler("cpu", enabled=False),
                               criterion, {"mean": [0.5] * 3, "std": [0.5] * 3}, precision)
    runner.forward_backward(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), torch.zeros(1, 4, 4, dtype=torch.long))
    assert seen == [model_sees] and loss_sees == [torch.float32]


@pytest.mark.skipif(resource is None, reason="resource: POSIX only")
def test_torchrun_budgeted_run_follows_rank_0s_plan(tmp_path, cpu_clock_env):
    """A budgeted run under torchrun: one plan (rank 0's, which every process follows), printed once, carried
    out to its last step within the budget."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
               *BUDGET_RUN, "--time", "20s", "--device", "cpu", "--checkpoint-dir", str(tmp_path / "runs")]
    start = children_cpu_seconds()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**cpu_clock_env, "CPU_CLOCK": "workers"})
    assert result.returncode == 0, result.stderr[-3000:]
    # CPU time, which other processes do not inflate: two one-thread processes within the budget, and torchrun
    # (its start-up and rendezvous) on top.
    assert children_cpu_seconds() - start < 2 * 20 * 1.05 + 10
    (run_dir,) = (tmp_path / "runs").iterdir()
    checkpoint = load_checkpoint(run_dir / "last.pth")
    assert checkpoint["step"] == checkpoint["plan"]["total_steps"] > 0
    assert len(re.findall(r"^plan: ", result.stdout, re.M)) == 1  # the training plan (validation's "memory plan:" aside)
