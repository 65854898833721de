"""The clock of a --time run, on a fake clock: the loop watches the deadline between steps and ends an epoch
early, keeping the time its validation and saves need, foreseen by a probe before the first one ran; a re-planned
run says so; progress lines for a log file."""
import csv
import io
import json
import re
import time
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import engine
import progress
import recipe
import train
from checkpoints import load_checkpoint
from model import build_model, input_normalization
from recipe import Deadline, EpochPace, Plan, epoch_end_estimate, replan_note
from test_checkpoint_files import tensor_bytes
from progress import Progress


class FakeClock:
    """time.monotonic and time.perf_counter of train.py, engine.py and recipe.py: only what the test says takes
    time."""

    def __init__(self, now=0.0):
        self.now = now

    def __call__(self):
        return self.now

    def module(self):
        return SimpleNamespace(monotonic=self, perf_counter=self, strftime=__import__("time").strftime)


def on_fake_clock(monkeypatch, step, forward, save, loop_extra=0.0, probe_factor=1.0, startup=5.0):
    """A run whose training forward+backward passes take `step` seconds (`loop_extra` more in the loop than in
    the probe, whose timing is scaled by `probe_factor`), each validation image's forward pass `forward` and
    each checkpoint save `save`; the start-up took `startup`. Returns the clock."""
    clock = FakeClock(startup)
    for module in (train, engine, recipe):
        monkeypatch.setattr(module, "time", clock.module())
    build_model = train.build_model

    def timed_model(*args, **kwargs):
        model = build_model(*args, **kwargs)

        def advance(module, inputs):
            clock.now += step if module.training else forward * len(inputs[0])
        model.register_forward_pre_hook(advance)
        return model

    monkeypatch.setattr(train, "build_model", timed_model)
    update, save_checkpoint, time_step = train.StepRunner.update, train.save_checkpoint, train.time_training_step

    def slower_update(self):
        clock.now += loop_extra
        update(self)

    def timed_save(*args):
        clock.now += save
        save_checkpoint(*args)

    monkeypatch.setattr(train.StepRunner, "update", slower_update)
    monkeypatch.setattr(train, "save_checkpoint", timed_save)
    def probe_step(*args, **kwargs):
        step, one_off = time_step(*args, **kwargs)
        return step * probe_factor, one_off

    monkeypatch.setattr(train, "time_training_step", probe_step)
    return clock


RUN = ["--dataset", "shapes", "--image-size", "32", "--num-train", "16", "--num-val", "8", "--batch-size", "4",
       "--base-channels", "4", "--depth", "2", "--workers", "0", "--sample-every", "0", "--amp", "off",
       "--channels-last", "off"]  # fp32: a tiny model's real seconds are fewer there


def test_a_short_budget_ends_the_epoch_early_and_still_validates_and_saves_in_time(tmp_path, monkeypatch, capsys):
    # The run: --time 60s, one epoch, steps 8% slower in the loop (0.876 s) than in the probe (0.807 s),
    # and a validation (8 images of 1.25 s: 10 s) far slower than a guess from the training step's speed.
    clock = on_fake_clock(monkeypatch, step=0.807, forward=1.25, save=0.2, loop_extra=0.069)
    run_dir = train.main(RUN + ["--time", "60s", "--checkpoint-dir", str(tmp_path)], started=0.0)
    out = capsys.readouterr().out
    assert clock.now <= 60.0, out  # start-up, steps, validation and saves
    planned = int(re.search(r"plan: (\d+) steps", out).group(1))
    cut = re.search(r"the budget ends epoch 1 after (\d+) of its (\d+) steps \(a step took 0\.8\d+s, 0\.807s "
                    r"planned\), keeping 13\.\ds for its validation and saves", out)
    assert cut and int(cut.group(2)) == planned and int(cut.group(1)) < planned, out
    # the validation foreseen: 8 forward passes of 1.25 s (x1.25 for loading and scoring) and 1 s for the saves
    assert "a validation with its saves about 13.5s" in out
    done = int(cut.group(1))
    assert load_checkpoint(run_dir / "last.pth")["step"] == done and (run_dir / "best.pth").is_file()
    with open(run_dir / "metrics.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert int(row["step"]) == done and 0 <= float(row["miou"]) <= 1
    assert re.search(r" in \d+s of the 1m budget$", out.strip())


def test_a_replanned_run_says_so(tmp_path, monkeypatch, capsys):
    # The probe reports steps twice as slow as they run: the run fits more epochs than it planned.
    on_fake_clock(monkeypatch, step=0.5, forward=0.01, save=0.1, probe_factor=2.0)
    train.main(RUN + ["--time", "15s", "--steps-per-epoch", "5", "--checkpoint-dir", str(tmp_path)], started=0.0)
    out = capsys.readouterr().out
    epochs_line = re.findall(r"^epoch (\d+)/(\d+) ", out, re.MULTILINE)
    note = re.search(r"re-planned: (\d+) epochs instead of (\d+) \(steps ran faster than planned: 0\.5\d*s "
                     r"against 1s; a validation with its saves took [\d.]+s against [\d.]+s\)", out)
    assert note, out
    after, before = int(note.group(1)), int(note.group(2))
    assert after > before and epochs_line[0] == ("1", str(before)) and epochs_line[1] == ("2", str(after))
    assert epochs_line[-1] == (str(after), str(after))


def test_training_prints_progress_lines_into_a_log(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(progress, "PLAIN_EVERY", 0.0)  # a line every batch
    train.main(RUN + ["--epochs", "1", "--steps-per-epoch", "3", "--checkpoint-dir", str(tmp_path / "log")])
    out = capsys.readouterr().out  # pytest's capture is no terminal, as a log file is not
    assert re.findall(r"^epoch 1/1: (\d)/3 batches \(\d+%\), [\d.]+ batches/s", out, re.MULTILINE) == ["1", "2", "3"]
    monkeypatch.setattr(train, "progress_bars", lambda: True)  # on a terminal the bar shows it: no lines
    train.main(RUN + ["--epochs", "1", "--steps-per-epoch", "3", "--checkpoint-dir", str(tmp_path / "terminal")])
    assert not re.findall(r"^epoch 1/1: \d/3 batches", capsys.readouterr().out, re.MULTILINE)


def test_progress_lines_every_30_seconds_with_rate_and_time_left():
    """A resumed epoch (10 batches done before): the rate counts this session's batches only."""
    clock, log = FakeClock(100.0), io.StringIO()
    lines = Progress(100, "epoch 2/5", "batches", bar=False, done=10, out=log, clock=clock)
    for done, now in [(20, 110.0), (40, 130.0), (41, 131.0), (70, 160.0), (100, 189.0)]:
        clock.now = now
        lines.update(done - lines.done)
    # 30 batches in the first 30 s: 1 batch/s, 60 left; then 60 in 60 s
    assert log.getvalue().splitlines() == ["epoch 2/5: 40/100 batches (40%), 1.00 batches/s, 1m00s left",
                                           "epoch 2/5: 70/100 batches (70%), 1.00 batches/s, 30s left"]


def test_the_pace_of_an_epoch_is_measured_not_the_probes(monkeypatch):
    clock = FakeClock(0.0)
    monkeypatch.setattr(recipe, "time", clock.module())
    plan = Plan(4, 256, 0.0, steps_per_epoch=100, total_steps=100, warmup_steps=0, budget=100, step_seconds=1.0,
                epoch_end_seconds=10.0)
    deadline = Deadline(100, 0.0, started=0.0)  # 98 s plannable (the exit margin: 2 s)
    pace = EpochPace(plan, deadline)
    ended = None
    for step in range(1, 101):
        clock.now += 2.0  # steps twice as slow as the probe said
        if pace.out_of_time():
            ended = step
            break
    # after step k, 98 - 2k s are left: a step (2 s) and the validation (10 s) fit while 98 - 2k >= 12
    assert ended == 44 and pace.step_seconds() == 2.0
    assert EpochPace(plan, None).out_of_time() is False
    fast = EpochPace(plan, deadline)
    clock.now += 0.5
    fast.out_of_time()
    assert fast.step_seconds() == 1.0  # never faster than planned


def test_epoch_end_estimate_and_replan_note():
    # 40 forward passes of 0.25 s, x1.25; 400 MB written at 200 MB/s
    assert epoch_end_estimate(0.25, 40, 400e6) == pytest.approx(12.5 + 2.0)
    assert replan_note(3, 3, (1.0, 5.0), (0.8, 5.0)) is None
    assert replan_note(3, 4, (0.88, 4.4), (0.81, 5.2)) == (
        "re-planned: 4 epochs instead of 3 (steps ran faster than planned: 0.81s against 0.88s; a validation with "
        "its saves took 5.2s against 4.4s)")
    assert "steps ran slower" in replan_note(3, 2, (0.8, 5.0), (0.9, 5.0))


def test_the_epoch_end_probe_counts_the_images_their_size_and_the_checkpoints(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(engine, "time", clock.module())
    model_args = {"arch": "unet", "in_channels": 3, "num_classes": 2, "base_channels": 4, "depth": 2,
                  "bilinear": False}
    model = build_model(model_args)
    sides = []

    def advance(module, inputs):
        sides.append(inputs[0].shape[-1])
        clock.now += 0.1 * inputs[0].shape[-1] ** 2 / 256 ** 2  # 0.1 s for 256 x 256
    model.register_forward_pre_hook(advance)
    seconds = engine.time_epoch_end(model, input_normalization(model_args), None, 512 * 512, 10, "adamw")
    assert sides == [256] * 3  # probed at 256 a side, scaled by 4 to the 512 x 512 images
    weights, parameters = tensor_bytes(model.state_dict().values()), tensor_bytes(list(model.parameters()))
    assert seconds == pytest.approx(0.4 * 10 * 1.25 + (2 * weights + 2 * parameters) / 200e6)
    sides.clear()
    small = engine.time_epoch_end(model, input_normalization(model_args), None, 64 * 64, 3, "sgd")
    assert sides == [64] * 3
    assert small == pytest.approx(0.1 / 16 * 3 * 1.25 + (2 * weights + parameters) / 200e6)


def test_the_plan_keeps_the_first_steps_one_off_seconds_out_of_the_budget():
    """plan_run's probe says a step takes 0.5 s and the first costs 30 s more (compiling): the steps planned are
    those of a budget 30 s shorter."""
    config = SimpleNamespace(resume=None, time=300.0, epochs=None, warmup_epochs=None, steps_per_epoch=None)
    fp = SimpleNamespace(train_images=100)
    augment = SimpleNamespace(crop_size=256, elastic=0.0)

    def planned(one_off):
        started = time.monotonic()
        return recipe.plan_run(config, None, fp, 4, augment, 1, started, lambda: (0.5, one_off), lambda: 2.0)

    assert planned(0.0).total_steps - planned(30.0).total_steps == pytest.approx(60, abs=8)  # give or take a validation


def test_a_short_budget_trains_without_the_zoom_and_rotation_no_flag_asked_for(tmp_path, monkeypatch, capsys):
    """Four 64x64 images, 30 s of steps of 0.3 s: a few tens of passes over the pixels, so the plan turns off
    the zoom and the elastic deformation; the --rotate given stays."""
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
        Image.fromarray((rng.random((64, 64)) > 0.5).astype(np.uint8)).save(tmp_path / "masks" / f"{i}.png")
    on_fake_clock(monkeypatch, step=0.3, forward=0.01, save=0.1)
    built = []
    build_dataset = train.build_dataset
    monkeypatch.setattr(train, "build_dataset", lambda data, split, augment=None, **kwargs: (
        built.append(augment), build_dataset(data, split, augment, **kwargs))[1])
    argv = ["--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"), "--val-percent", "25",
            "--crop-size", "32", "--rotate", "5", "--time", "30s", "--base-channels", "4", "--depth", "2",
            "--workers", "0", "--sample-every", "0", "--amp", "off", "--channels-last", "off",
            "--checkpoint-dir", str(tmp_path / "runs")]
    run_dir = train.main(argv, started=0.0)
    assert "augmentation: zoom and elastic deformation off, as the budget shows the training pixels" \
        in capsys.readouterr().out
    saved = json.loads((run_dir / "args.json").read_text())
    assert (saved["zoom"], saved["rotate"], saved["elastic"]) == ([1.0, 1.0], 5.0, 0.0)
    trained_on = [augment for augment in built if augment is not None][-1]
    assert (tuple(trained_on.zoom), trained_on.rotate, trained_on.elastic) == ((1.0, 1.0), 5.0, 0.0)
