"""The bad-input battery: every case ends with the expected exit status and one line that names the file or value
at fault, with no traceback, and nothing the user had is lost or overwritten. Scripts run in-process (fast); one
case runs eval.py in a subprocess to see what a data-loader worker's error looks like on the terminal."""
import dataclasses
import json
import os
import re
import socket
import stat
import subprocess
import struct
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import engine
import eval as eval_script
import export
import predict
import rundir
import train
from checkpoints import load_checkpoint, save_checkpoint
from errors import CheckpointError
from conftest import ROOT
from datasets import DataConfig, build_dataset
from flags import config_from
from images import read_image
from pairs import held_out
from transforms import AugmentConfig
from utils import replaced_atomically

TINY = ["--dataset", "shapes", "--image-size", "32", "--num-train", "16", "--num-val", "4", "--epochs", "1",
        "--steps-per-epoch", "2", "--batch-size", "8", "--base-channels", "4", "--depth", "2", "--workers", "0",
        "--sample-every", "0"]
FOLDER_RUN = ["--dataset", "folder", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "4",
              "--base-channels", "4", "--depth", "2",
              "--workers", "0", "--sample-every", "0", "--crop-size", "16", "--val-percent", "25"]


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """A finished 1-epoch run on the synthetic shapes (4 classes, mask values 0-3)."""
    return train.main(TINY + ["--checkpoint-dir", str(tmp_path_factory.mktemp("runs"))])


def make_folder(root, count=4, values=(0, 1), size=(24, 32), suffix=".png"):
    """imgs/ and masks/ of `count` random images whose masks hold `values`; returns root."""
    rng = np.random.default_rng(0)
    for folder in ("imgs", "masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        mask = np.asarray(values, np.uint8)[rng.integers(0, len(values), size)]
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / "imgs" / f"{i}{suffix}")
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
    return root


def exits(script, argv, capsys):
    """(exit status, the one line of its message): SystemExit's text, or argparse's last stderr line."""
    with pytest.raises(SystemExit) as stopped:
        script.main(argv)
    code, err = stopped.value.code, capsys.readouterr().err
    assert "Traceback" not in err
    if isinstance(code, str):
        assert code.startswith("error: ") and "\n" not in code.strip(), code
        return 1, code
    return code, err.strip().splitlines()[-1]


def fingerprint(path):
    return path.read_bytes() if path.is_file() else None


# Flags: argparse's usage line and status 2, before anything is read or written.
@pytest.mark.parametrize("script, argv, message", [
    (train, TINY + ["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (train, TINY + ["--lr", "-1"], "--lr must be positive"),
    (train, TINY + ["--crop-size", "-3"], "--crop-size, --rotate and --jitter cannot be negative"),
    (train, TINY + ["--zoom", "2", "1"], "--zoom needs 0 < MIN <= MAX"),
    (train, TINY + ["--device", "banana"], "--device 'banana' is not a device"),
    (train, TINY + ["--val-percent", "100"], "--val-percent must lie in [0, 100)"),
    (train, TINY + ["--ignore-index", "70000"], "--ignore-index must be a mask value in [0, 65535]"),
    (train, TINY + ["--encoder-weights", "none"], "need --encoder"),
    (train, TINY + ["--resume", "missing.pth"], "--resume: checkpoint 'missing.pth' does not exist"),
    (train, TINY + ["--resume", "a.pth", "--load", "b.pth"], "give only one"),
    (eval_script, ["--device", "banana"], "--device 'banana' is not a device"),
    (eval_script, ["--tile", "8"], "--tile must be at least 16 pixels"),
    (eval_script, ["--batch-size", "0"], "--batch-size must be at least 1"),
    (eval_script, ["--max-memory", "4X"], "--max-memory '4X' is not an amount of memory"),
    (predict, ["-i", "x.png", "--batch-size", "0"], "--batch-size must be at least 1"),
    (predict, ["-i", "x.png", "--overlap", "1"], "--overlap must lie in [0, 1)"),
    (predict, ["-i", "x.png", "-t", "2"], "--mask-threshold must lie in [0, 1]"),
    (predict, ["-i", "x.png", "--workers", "-1"], "--workers cannot be negative"),
])
def test_impossible_flags(script, argv, message, capsys):
    code, line = exits(script, argv, capsys)
    assert code == 2 and message in line


@pytest.mark.parametrize("name", ["/tmp/elsewhere", "..", "../up", "a/b", "."])
def test_a_run_name_that_is_a_path_is_refused(name, tmp_path, capsys):
    code, line = exits(train, TINY + ["--name", name, "--checkpoint-dir", str(tmp_path / "runs")], capsys)
    assert code == 2 and f"--name {name!r} is not a folder name" in line
    assert not (tmp_path / "runs").exists()


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    """Same --name (with a dot), same second: each run its own folder, the timestamp kept; a folder that another
    process makes between a check and the mkdir (Path.exists says no) is no traceback either."""
    monkeypatch.setattr(rundir.time, "strftime", lambda fmt: "20260101-120000")
    monkeypatch.setattr(rundir.Path, "exists", lambda self: False)
    made = [rundir.new_run_dir(tmp_path, "v1.5") for _ in range(3)]
    assert [p.name for p in made] == ["v1.5-20260101-120000", "v1.5-20260101-120000.1", "v1.5-20260101-120000.2"]
    assert all(p.is_dir() for p in made)


NOT_FINITE = "needs a finite number, got"


# Every float flag of the scripts: NaN and infinities slip past range checks (NaN compares false with everything).
@pytest.mark.parametrize("script, argv", [
    *[(train, TINY + [flag, value]) for flag in ("--rotate", "--jitter", "--weight-decay", "--warmup-epochs",
                                                 "--clip-grad", "--lr", "--momentum", "--hflip", "--elastic",
                                                 "--val-percent", "--scale", "--encoder-lr-factor")
      for value in ("nan", "inf")],
    (train, TINY + ["--zoom", "0.7", "inf"]),
    (train, TINY + ["--zoom", "nan", "1"]),
    (train, TINY + ["--class-weights", "1", "nan", "1", "1"]),
    (train, TINY + ["--class-weights", "1", "1", "inf", "1"]),
    (eval_script, ["--overlap", "nan"]),
    (eval_script, ["--scale", "inf"]),
    (predict, ["-i", "x.png", "-s", "nan"]),
    (predict, ["-i", "x.png", "--overlap=-inf"]),
    (predict, ["-i", "x.png", "-t", "nan"]),
])
def test_float_flags_must_be_finite(script, argv, capsys):
    code, line = exits(script, argv, capsys)
    assert code == 2 and NOT_FINITE in line


@pytest.mark.parametrize("script, argv, message", [
    (train, TINY + ["--time", "1s"], "the least time budget is 5s, got '1s': start-up, one timed training step"),
    (train, TINY + ["--time", "0.5s"], "the least time budget is 5s, got '0.5s'"),
    (train, ["--dataset", "shapes", "--time", "9" * 400 + "s"], "must be a finite duration"),
    (train, TINY + ["--crop-size", "1"], "--crop-size must be 0 (no crop) or at least 4, the model's output stride"),
    (train, TINY + ["--crop-size", "3"], "--crop-size must be 0 (no crop) or at least 4"),
    (train, ["--dataset", "shapes", "--crop-size", "15"], "--crop-size must be 0 (no crop) or at least 16"),
    (train, ["--dataset", "shapes", "--encoder", "resnet18", "--crop-size", "31"], "or at least 32"),
    (train, TINY + ["--image-size", "1"], "--image-size must be at least 4, the model's output stride (it halves the "
                                          "image 2 times), got 1"),
    (train, TINY + ["--seed", "-1"], "--seed must be a whole number from 0 to 2^63 - 1"),
    (train, TINY + ["--seed", str(2 ** 64)], f"--seed must be a whole number from 0 to 2^63 - 1 (9223372036854775807), "
                                             f"got {2 ** 64}"),
    (train, TINY + ["--data-seed", "-5"], "--data-seed must be a whole number from 0 to 2^63 - 1"),
    (train, TINY + ["--mask-values", "70000"], "--mask-values must be mask values in [0, 65535], got 70000"),
    (train, TINY + ["--mask-values", "-1", "0", "255"], "--mask-values must be mask values in [0, 65535], got -1"),
    (train, TINY + ["--mask-values", "0", "1", "1"], "--mask-values names 1 more than once"),
    (train, TINY + ["--device", "mps"], "--device mps: this machine has no Apple GPU (MPS); it has cpu"),
    (train, TINY + ["--device", "meta"], "--device meta: the scripts run on cpu, cuda or mps devices; this machine "
                                         "has cpu"),
    (train, TINY + ["--device", "cpu:5"], "--device cpu:5: the CPU is one device, 'cpu'; this machine has cpu"),
    (predict, ["-i", "x.png", "--device", "meta"], "the scripts run on cpu, cuda or mps devices"),
])
def test_impossible_values_name_the_least_or_the_range(script, argv, message, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # "this machine has cpu" on a GPU box too
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    code, line = exits(script, argv, capsys)
    assert code == 2 and message in line


def test_eval_refuses_repeated_mask_values(shapes_run, capsys):
    code, line = exits(eval_script, ["-m", str(shapes_run / "best.pth"), "--split", "val", "--mask-values", "0", "0",
                                     "1", "2", "--workers", "0"], capsys)
    assert code == 1 and "--mask-values names 0 more than once" in line


def test_synthetic_refuses_a_seed_out_of_range(capsys):
    import synthetic
    code, line = exits(synthetic, ["--seed", "-1", "--out", "unused"], capsys)
    assert code == 2 and "--seed must be a whole number from 0 to 2^63 - 1" in line


def test_a_gpu_beyond_those_present_names_the_ones_there(monkeypatch):
    from errors import ConfigError
    from utils import pick_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match=r"^--device cuda:2: there is no such GPU; this machine has cpu, cuda:0, "
                                          r"cuda:1$"):
        pick_device("cuda:2")


def test_training_refuses_bad_places_and_data_before_the_work(tmp_path, capsys):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    code, line = exits(train, TINY + ["--checkpoint-dir", str(not_a_folder)], capsys)
    assert code == 1 and "--checkpoint-dir" in line and "is a file, not a folder" in line
    # Two images share a stem: either could be paired with the mask.
    data = make_folder(tmp_path / "twins")
    Image.open(data / "imgs" / "1.png").save(data / "imgs" / "1.jpg")
    code, line = exits(train, FOLDER_RUN + ["--data", str(data), "--checkpoint-dir", str(tmp_path / "runs")], capsys)
    assert code == 1 and "'1.jpg' and '1.png'" in line and "keep one" in line
    # A few stray pixels of 128 in a 0/255 task.
    data = make_folder(tmp_path / "stray", values=(0, 255))
    mask = np.asarray(Image.open(data / "masks" / "2.png")).copy()
    mask[0, :3] = 128
    Image.fromarray(mask).save(data / "masks" / "2.png")
    code, line = exits(train, FOLDER_RUN + ["--data", str(data), "--checkpoint-dir", str(tmp_path / "runs")], capsys)
    assert code == 1 and "mask value 128 covers only 3 pixel(s)" in line and "--ignore-index 128" in line
    # Image and mask folders swapped: the "masks" are photographs.
    data = make_folder(tmp_path / "swapped")
    code, line = exits(train, FOLDER_RUN + ["--images", str(data / "masks"), "--masks", str(data / "imgs"),
                                            "--checkpoint-dir", str(tmp_path / "runs")], capsys)
    assert code == 1 and "swapped" in line
    code, line = exits(train, FOLDER_RUN + ["--data", str(make_folder(tmp_path / "ok")), "--val-percent", "0",
                                            "--checkpoint-dir", str(tmp_path / "runs")], capsys)
    assert code == 1 and "--val-percent above 0" in line and "'data'" not in line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no empty run folders left


def test_a_truncated_jpeg_is_caught_up_front(tmp_path, capsys):
    data = make_folder(tmp_path / "data", suffix=".jpg")
    jpeg = data / "imgs" / "3.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:len(jpeg.read_bytes()) // 2])
    code, line = exits(train, FOLDER_RUN + ["--data", str(data), "--checkpoint-dir", str(tmp_path / "runs")], capsys)
    assert code == 1 and str(jpeg) in line and "truncated" in line and "--skip-bad" in line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def decompression_bomb(path, side=100_000):
    """A valid PNG header that claims side x side RGB pixels (30 GB decoded), with one byte of data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))


def symlink_loop(path):
    path.symlink_to(path.name)


@pytest.mark.parametrize("make_bad, message", [
    (decompression_bomb, "is refused: Image size (10000000000 pixels) exceeds limit"),
    (symlink_loop, "cannot be read (Too many levels of symbolic links)"),
])
def test_a_bomb_or_a_symlink_loop_in_the_data_is_named(tmp_path, make_bad, message, capsys):
    data = make_folder(tmp_path / "data", count=6)
    for folder in ("imgs", "masks"):
        make_bad(data / folder / "bad.png")
    argv = FOLDER_RUN + ["--data", str(data), "--checkpoint-dir", str(tmp_path / "runs")]
    code, line = exits(train, argv, capsys)
    assert code == 1 and f"'{data / 'imgs' / 'bad.png'}' {message}" in line and "--skip-bad" in line
    run_dir = train.main(argv + ["--skip-bad"])
    out, err = capsys.readouterr()
    assert f"skipped 1 unreadable pair(s): '{data / 'imgs' / 'bad.png'}' {message}" in err
    assert sum(map(int, re.search(r"(\d+) train / (\d+) val images", out).groups())) == 6  # the good pairs
    with pytest.raises(SystemExit) as stopped:
        predict.main(["-m", str(run_dir / "best.pth"), "-i", str(data / "imgs"), "-o", str(tmp_path / "out"),
                      "--workers", "0"])
    summary = str(stopped.value.code).splitlines()
    assert summary[0] == "error: 1 of 7 inputs failed:" and "bad.png" in summary[1] and len(summary) == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{i}_mask.png" for i in range(6)]


def test_predict_names_a_symlink_loop_given_as_input(tmp_path, shapes_run):
    symlink_loop(tmp_path / "loop.png")
    with pytest.raises(SystemExit) as stopped:
        predict.main(["-m", str(shapes_run / "best.pth"), "-i", str(tmp_path / "loop.png"), "-o", str(tmp_path)])
    assert str(stopped.value.code).splitlines() == [
        "error: 1 of 1 inputs failed:", f"  '{tmp_path / 'loop.png'}' is a symbolic link that loops or leads nowhere"]


def test_no_score_at_any_epoch_fails_and_points_at_last_pth(tmp_path, monkeypatch, capsys):
    """--metric dice on validation masks without foreground (and none predicted) scores n/a at every epoch: no
    best.pth is chosen, and the run says so instead of printing a best.pth that does not exist."""
    monkeypatch.setattr(train, "score_of", lambda metrics, name, num_classes: float("nan"))
    code, line = exits(train, TINY + ["--metric", "dice", "--checkpoint-dir", str(tmp_path)], capsys)
    (last,) = tmp_path.glob("*/last.pth")
    assert code == 1 and "no validation score to pick best.pth by (dice was n/a at every epoch)" in line
    assert f"last.pth is {last}" in line and not list(tmp_path.glob("*/best.pth"))


@pytest.mark.parametrize("budget, failing_call, saved", [("10m", 1, False), (None, 1, False), (None, 4, True)])
def test_out_of_memory_in_training_is_one_line(budget, failing_call, saved, tmp_path, monkeypatch, capsys):
    """A training step out of memory (mocked): in the step a --time run times at start-up, or in the first step,
    nothing was saved and no run folder is left; in epoch 2 (call 4: 2 steps an epoch) the line names the last
    good checkpoint, which is kept."""
    calls, real_forward_backward = [0], engine.StepRunner.forward_backward

    def out_of_memory(runner, *args, **kwargs):
        calls[0] += 1
        if calls[0] == failing_call:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward_backward(runner, *args, **kwargs)

    monkeypatch.setattr(engine.StepRunner, "forward_backward", out_of_memory)
    argv = TINY[:8] + TINY[12:] + ["--time", budget] if budget else TINY + ["--epochs", "2"]
    code, line = exits(train, argv + ["--checkpoint-dir", str(tmp_path)], capsys)
    assert code == 1 and line.startswith("error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB): "
                                         "give a smaller --batch-size or --crop-size")
    last = list(tmp_path.glob("*/last.pth"))
    assert (f"the last good checkpoint is {last[0]}" in line) if saved else not any(tmp_path.iterdir())


def test_masks_without_zero_train_with_rotation(tmp_path):
    """Values {1, 2}, no 0: the corners a rotation brings in from beyond the image are void (255), never class 0
    (value 1) nor an unknown value 0. The training masks hold value 2 alone (class 1), value 1 only the validation
    mask: the rotated training items (no elastic deformation, which makes void of its own) may hold class 1 and
    void, nothing else, and some hold void."""
    data = make_folder(tmp_path / "data", values=(2,))
    (val_stem,) = held_out({str(i) for i in range(4)}, 25, 0)
    Image.fromarray(np.where(np.arange(32) < 16, 1, 2).astype(np.uint8)[None].repeat(24, 0)).save(
        data / "masks" / f"{val_stem}.png")
    run_dir = train.main(FOLDER_RUN + ["--data", str(data), "--rotate", "30", "--checkpoint-dir", str(tmp_path)])
    args = load_checkpoint(run_dir / "best.pth")["args"]
    assert args["mask_values"] == [1, 2]
    train_set = build_dataset(config_from(DataConfig, args), "train",
                              dataclasses.replace(config_from(AugmentConfig, args), zoom=[0.7, 0.7], elastic=0.0))
    torch.manual_seed(0)
    masks = [train_set[i % len(train_set)][1] for i in range(12)]
    assert set(torch.cat([m.flatten() for m in masks]).tolist()) == {1, 255}


@pytest.mark.parametrize("resume", [False, True])
def test_ctrl_c_during_the_start_up_is_one_line(resume, shapes_run, tmp_path, monkeypatch, capsys):
    """Ctrl-C while the model is built (before any step): status 130, one line, no run folder, the checkpoint of a
    --resume untouched."""
    def ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "build_run_model", ctrl_c)
    last = shapes_run / "last.pth"
    before = fingerprint(last)
    argv = ["--resume", str(last)] if resume else TINY + ["--checkpoint-dir", str(tmp_path)]
    code, line = exits(train, argv, capsys)
    assert code == 130 and line == "interrupted during start-up: nothing was saved" + (
        f"; {last} is unchanged" if resume else "")
    assert fingerprint(last) == before and not any(tmp_path.iterdir())


def test_resume_keeps_its_data_and_its_finished_run(shapes_run, tmp_path, capsys):
    last = shapes_run / "last.pth"
    before = fingerprint(last), (shapes_run / "args.json").read_text()
    code, line = exits(train, ["--resume", str(last), "--images", str(tmp_path), "--masks", str(tmp_path)], capsys)
    assert code == 2 and "continues a run on its own data" in line and f"--load {last}" in line
    code, line = exits(train, ["--resume", str(last), "--epochs", "1"], capsys)
    assert code == 1 and "has finished its 1 epochs" in line and "--epochs N with N > 1" in line
    assert (fingerprint(last), (shapes_run / "args.json").read_text()) == before


def test_load_of_another_architecture_is_refused(shapes_run, tmp_path, capsys):
    code, line = exits(train, TINY + ["--load", str(shapes_run / "best.pth"), "--base-channels", "8",
                                      "--checkpoint-dir", str(tmp_path)], capsys)
    assert code == 1 and "holds another architecture" in line and "leave out the architecture flags" in line
    assert not any(tmp_path.iterdir())


def test_eval_refuses_masks_of_another_task(shapes_run, tmp_path, capsys):
    """A 4-class shapes model on 0/255 masks used to score 1.0: 255 was dropped as void."""
    data = make_folder(tmp_path, values=(0, 255))
    code, line = exits(eval_script, ["-m", str(shapes_run / "best.pth"), "--images", str(data / "imgs"),
                                     "--masks", str(data / "masks"), "--workers", "0"], capsys)
    assert code == 1 and "value(s) (255) outside the known mask values [0, 1, 2, 3]" in line
    assert "--mask-values" in line and "--ignore-index" in line


def test_outputs_never_overwrite_a_checkpoint(shapes_run, tmp_path, capsys):
    best = shapes_run / "best.pth"
    before = fingerprint(best)
    for script, argv, flag in [
            (eval_script, ["-m", str(best), "--split", "val", "--json", str(best), "--workers", "0"], "--json"),
            (eval_script, ["-m", str(best), "--split", "val", "--confusion", str(best), "--workers", "0"],
             "--confusion"),
            (export, ["-m", str(best), "-o", str(best)], "-o"),
            (export, ["-m", str(best), "-o", str(tmp_path / "m.onnx"), "--torchscript", str(best)], "--torchscript")]:
        code, line = exits(script, argv, capsys)
        assert code == 1 and f"{flag} '{best}' would overwrite the input" in line
    assert fingerprint(best) == before


def test_eval_outputs_are_checked_before_the_work(shapes_run, tmp_path, capsys):
    best = str(shapes_run / "best.pth")
    code, line = exits(eval_script, ["-m", best, "--split", "val", "--confusion", str(tmp_path), "--workers", "0"],
                       capsys)
    assert code == 1 and "is a folder; name a file" in line
    scores = tmp_path / "new" / "folder" / "scores.json"  # a missing folder is made, not a traceback at the end
    eval_script.main(["-m", best, "--split", "val", "--json", str(scores), "--workers", "0"])
    assert json.loads(scores.read_text())["images"] == 4


def test_checkpoints_that_are_not_ours(tmp_path, capsys):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"model": Payload()}, tmp_path / "evil.pth")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    for name, message in [("evil.pth", "refused for safety"), ("other.pth", "not a checkpoint written by train.py"),
                          ("garbage.pth", "not a readable PyTorch checkpoint"), ("absent.pth", "does not exist")]:
        code, line = exits(predict, ["-m", str(tmp_path / name), "-i", str(tmp_path)], capsys)
        assert code == 1 and name in line and message in line and "weights_only" not in line
    assert not marker.exists()


def altered(checkpoint_path, folder, change):
    """A copy of the checkpoint at `checkpoint_path`, in `folder`, after `change(state)`."""
    state = torch.load(checkpoint_path, weights_only=True)
    change(state)
    path = folder / "altered.pth"
    torch.save(state, path)
    return path


# What a checkpoint must hold, with what it held and what the scripts say; for --resume also the training state.
@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("optimizer"), "cannot be continued: it lacks optimizer"),
    (lambda s: s.pop("rng"), "cannot be continued: it lacks rng"),
    (lambda s: s["plan"].update(extra=1), "cannot be continued: it has a plan with unknown field(s) extra"),
    (lambda s: s["plan"].pop("total_steps"), "cannot be continued: it lacks plan.total_steps"),
    (lambda s: s.pop("normalize"), "not a checkpoint written by train.py (missing: normalize)"),
])
def test_resume_refuses_a_checkpoint_it_cannot_continue(shapes_run, tmp_path, change, message, capsys):
    path = altered(shapes_run / "last.pth", tmp_path, change)
    code, line = exits(train, ["--resume", str(path)], capsys)
    assert code == 2 and message in line and str(path) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["altered.pth"]


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(mask_values=[0.5, 1, 2, 3]),
     "its mask values must be whole numbers (or R G B colours of them), got [0.5, 1, 2, 3]"),
    (lambda s: s.update(mask_values=[0, 1, True, 3]), "its mask values must be whole numbers"),
    (lambda s: s.update(mask_values=[[0, 0, 0], [0, 0.5, 0], [1, 1, 1], [2, 2, 2]]), "must be whole numbers (or R G B"),
    (lambda s: s.update(mask_values=[[0, 0], [1, 1], [2, 2], [3, 3]]), "must be whole numbers (or R G B colours"),
    (lambda s: s.update(normalize={"mean": [0.5] * 3, "std": [0.2, 0.0, 0.2]}),
     "its input normalisation must hold one finite mean and one positive std per channel"),
    (lambda s: s.update(normalize={"mean": [0.5, float("nan"), 0.5], "std": [0.2] * 3}),
     "its input normalisation must hold"),
    (lambda s: s["model"]["inc.0.weight"].__setitem__((1, 2, 0, 1), float("nan")),
     "holds weights that are not finite (NaN or infinite values in inc.0.weight)"),
    (lambda s: s["model"]["outc.weight"].__setitem__(0, float("-inf")),
     "NaN or infinite values in outc.weight"),
])
@pytest.mark.parametrize("script", [predict, eval_script, export, train])
def test_checkpoints_that_would_give_wrong_numbers_are_refused(shapes_run, tmp_path, change, message, script,
                                                               capsys):
    path = altered(shapes_run / "best.pth", tmp_path, change)
    argv = {predict: ["-m", str(path), "-i", str(tmp_path), "-o", str(tmp_path / "out")],
            eval_script: ["-m", str(path), "--split", "val", "--workers", "0"],
            export: ["-m", str(path), "-o", str(tmp_path / "m.onnx")],
            train: TINY + ["--load", str(path), "--checkpoint-dir", str(tmp_path / "runs")]}[script]
    code, line = exits(script, argv, capsys)
    assert code in (1, 2) and message in line and str(path) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["altered.pth"]


def test_checkpoints_of_colour_coded_masks_load(shapes_run, tmp_path):
    colours = [[0, 0, 0], [128, 0, 0], [0, 128, 0], [0, 0, 128]]
    path = altered(shapes_run / "best.pth", tmp_path, lambda s: s.update(mask_values=colours))
    assert load_checkpoint(path)["mask_values"] == colours


def test_resume_and_load_do_not_read_the_encoder_weights_file(shapes_run, tmp_path):
    """The weights come from the checkpoint: an --encoder-weights file moved since the run began is not needed."""
    def encoder_run(state):
        state["args"].update(encoder="resnet18", encoder_weights=str(tmp_path / "moved.pth"))

    path = altered(shapes_run / "last.pth", tmp_path, encoder_run)
    for flag in ("--resume", "--load"):
        *_, model_config, flags = train.parse_args([flag, str(path)])
        assert (model_config.encoder, model_config.encoder_weights) == ("resnet18", str(tmp_path / "moved.pth"))
    with pytest.raises(SystemExit):  # a new run reads it: still refused
        train.parse_args(["--encoder", "resnet18", "--encoder-weights", str(tmp_path / "moved.pth")])


def test_load_takes_this_runs_training_flags_and_resume_the_runs_own(shapes_run, tmp_path):
    def fine_tuned(state):
        state["args"].update(freeze_encoder_epochs=3, encoder_lr_factor=0.5)

    path = altered(shapes_run / "last.pth", tmp_path, fine_tuned)
    *_, model_config, _ = train.parse_args(["--load", str(path)])
    assert (model_config.freeze_encoder_epochs, model_config.encoder_lr_factor) == (0, None)  # the defaults
    assert model_config.base_channels == 4  # the architecture is the checkpoint's
    *_, model_config, _ = train.parse_args(["--load", str(path), "--freeze-encoder-epochs", "2"])
    assert model_config.freeze_encoder_epochs == 2
    *_, model_config, _ = train.parse_args(["--resume", str(path)])
    assert (model_config.freeze_encoder_epochs, model_config.encoder_lr_factor) == (3, 0.5)


def test_predict_goes_on_past_bad_and_tiny_images(shapes_run, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for name, (width, height) in {"one": (1, 1), "three": (3, 3), "line": (1, 50), "good": (40, 30)}.items():
        Image.fromarray(np.full((height, width, 3), 120, np.uint8)).save(folder / f"{name}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(SystemExit) as stopped:  # the summary: a line, then one indented line per failure
        predict.main(["-m", str(shapes_run / "best.pth"), "-i", str(folder), "-o", str(tmp_path / "out"),
                      "--workers", "0"])
    summary = str(stopped.value.code).splitlines()
    assert summary[0] == "error: 1 of 5 inputs failed:" and "broken.png" in summary[1] and len(summary) == 2
    assert "Traceback" not in capsys.readouterr().err
    written = {path.name: Image.open(path).size for path in (tmp_path / "out").iterdir()}
    assert written == {"one_mask.png": (1, 1), "three_mask.png": (3, 3), "line_mask.png": (1, 50),
                       "good_mask.png": (40, 30)}


def test_eval_reports_a_bad_file_from_a_worker_in_one_line(tmp_path):
    """Run as a user would: Carvana's images are first read in a data-loader worker; a corrupt one reaches the
    terminal as one line at the end, and the other images are scored and written."""
    model_run = train.main(FOLDER_RUN + ["--data", str(make_folder(tmp_path / "binary")),
                                         "--checkpoint-dir", str(tmp_path / "runs")])
    cars = tmp_path / "carvana"
    for folder in ("imgs", "masks"):
        (cars / folder).mkdir(parents=True)
    for view in range(1, 4):
        Image.fromarray(np.full((32, 48, 3), 60 * view, np.uint8)).save(cars / "imgs" / f"car_{view:02d}.jpg")
        Image.fromarray(np.eye(32, 48, dtype=np.uint8)).save(cars / "masks" / f"car_{view:02d}_mask.gif")
    (cars / "imgs" / "car_02.jpg").write_bytes(b"corrupt")
    result = subprocess.run([sys.executable, "eval.py", "-m", str(model_run / "best.pth"), "--dataset", "carvana",
                             "--data", str(cars), "--split", "all", "--workers", "1",
                             "--save-labels", str(tmp_path / "labels")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(errors) == 1 and "1 of 3 images could not be read" in errors[0] and "car_02.jpg" in errors[0]
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == ["car_01.png", "car_03.png"]


@pytest.mark.parametrize("top", [255, 256, 4095, 65535])
def test_16_bit_images_keep_their_brightness(tmp_path, top):
    """Scaled by the 16-bit range, never by the image's own maximum: a value means one brightness in every file."""
    pixels = np.array([[0, top]], np.uint16)
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert read_image(tmp_path / "deep.png")[0, 0].tolist() == [0, round(top * 255 / 65535)]


def test_checkpoints_follow_the_umask_without_changing_it(tmp_path, monkeypatch):
    """os.umask sets the mask to read it: another thread creating a file meanwhile would get mode 0666."""
    previous = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("save_checkpoint changed the umask"))
        save_checkpoint({"x": torch.zeros(1)}, tmp_path / "last.pth")
    finally:
        monkeypatch.undo()
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "last.pth").stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]


def test_a_save_removes_only_its_own_and_dead_writers_temporary_files(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    left_by_kill_9 = tmp_path / f".last.pth.{host}.{dead.stdout.strip()}.1a2b3c4d.tmp"
    being_written = tmp_path / f".last.pth.{host}.{os.getppid()}.5e6f7a8b.tmp"  # a live process's save
    other_machine = tmp_path / f".last.pth.another-host.{dead.stdout.strip()}.9c0d1e2f.tmp"
    for path in (left_by_kill_9, being_written, other_machine):
        path.write_bytes(b"partial")
    save_checkpoint({"x": torch.zeros(1)}, tmp_path / "last.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.pth", being_written.name, other_machine.name])


def test_two_writers_of_one_file_never_share_a_temporary(tmp_path):
    """torchrun processes each write the mask-scan cache: interleaved writes must not clobber one another."""
    target = tmp_path / "cache.json"
    with replaced_atomically(target) as first, replaced_atomically(target) as second:
        first.write(b"first")
        second.write(b"second")
        assert len(list(tmp_path.glob(".cache.json.*.tmp"))) == 2
    assert target.read_bytes() == b"first" and sorted(p.name for p in tmp_path.iterdir()) == ["cache.json"]


def test_the_scan_cache_is_written_under_a_name_of_its_own(tmp_path, monkeypatch):
    import pairs
    data = make_folder(tmp_path / "data")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rival = pairs.cache_file(data / "masks").with_suffix(".tmp")  # the name every process used to share
    rival.parent.mkdir(parents=True)
    rival.write_text("another process's cache, half written")
    pairs.scan_pairs(pairs.pair_by_stem(data / "imgs", data / "masks"))
    assert rival.read_text() == "another process's cache, half written"
    assert len(json.loads(pairs.cache_file(data / "masks").read_text())) == 4


def full_disk(state, f):
    f.write(b"half a checkpoint")
    raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")


def test_a_full_disk_leaves_the_last_good_checkpoint_intact(tmp_path, monkeypatch):
    save_checkpoint({"step": torch.tensor(1)}, tmp_path / "last.pth")
    before = fingerprint(tmp_path / "last.pth")
    monkeypatch.setattr(torch, "save", full_disk)
    for name, kept in [("last.pth", "the checkpoint saved there before is intact"),
                       ("best.pth", "no checkpoint was saved there yet")]:
        with pytest.raises(CheckpointError) as failed:
            save_checkpoint({"step": torch.tensor(2)}, tmp_path / name)
        assert str(failed.value) == (f"saving the checkpoint '{tmp_path / name}' failed ([enforce fail at "
                                     f"inline_container.cc:664] . unexpected pos 64 vs 0: is the disk full?); {kept}")
    assert fingerprint(tmp_path / "last.pth") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="ulimit -f: Linux")
def test_training_on_a_full_disk_ends_in_one_line(tmp_path):
    """ulimit -f 100: the run folder's small files fit, its first checkpoint (about 150 kB) does not."""
    command = " ".join([sys.executable, "train.py", *TINY, "--checkpoint-dir", str(tmp_path)])
    result = subprocess.run(["bash", "-c", f"ulimit -f 100 && {command}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(errors) == 1 and "last.pth' failed" in errors[0] and "is the disk full?" in errors[0]
    assert not list(tmp_path.glob("*/.*.tmp"))
