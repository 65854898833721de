"""The recipe and the planner (recipe.py): durations, batch and crop from the data, epochs for tiny and large
datasets, budgets from 30 seconds to hours, re-planning from measured times."""
import argparse
import math

import pytest

from datasets import MaskLayout
from recipe import (AUGMENT_PASSES, MAX_VALIDATIONS, MIN_STEPS_PER_EPOCH, Deadline, Fingerprint, Plan,
                    budget_augment, default_batch_and_crop, default_elastic, duration_text, fit_recipe, image_sizes,
                    parse_duration, passes_over_pixels, plan_budget, plan_epochs)
from train import TrainConfig
from transforms import AugmentConfig


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("10m", 600), ("2h", 7200), ("1h30m", 5400),
                                           ("1.5h", 5400), ("2m30s", 150), (" 45S ", 45)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["10", "ten minutes", "10m5", "m", "0s", "-5m", "5d"])
def test_bad_durations_say_how_to_write_one(text):
    with pytest.raises(argparse.ArgumentTypeError, match="90s, 10m|must be positive"):
        parse_duration(text)


def test_duration_text():
    assert [duration_text(s) for s in (0, 59.6, 120, 5400, 3725)] == ["0s", "1m", "2m", "1h30m", "1h2m5s"]


@pytest.mark.parametrize("size, device, expected", [
    ((512, 512), "cpu", (4, 256)),  # ISBI: crop 256 on a CPU
    ((360, 480), "cpu", (4, 256)),  # street scenes
    ((100, 150), "cpu", (16, 96)),  # small images: a crop within them, more of them a batch
    ((375, 500), "cuda", (8, 352)),  # VOC on a GPU: crop within the shorter side
    ((1280, 1918), "cuda", (4, 512)),
])
def test_batch_and_crop_follow_the_images_and_the_device(size, device, expected):
    assert default_batch_and_crop(Fingerprint(100, size, 0), device) == expected


def test_image_sizes_sample_the_whole_of_a_small_dataset(tmp_path):
    """Fewer images than the sample's limit: every one is read, the last included (not just the first part)."""
    from PIL import Image

    class Files:
        scale = 1.0
        pairs = []
    for i in range(10):
        path = tmp_path / f"{i}.png"
        Image.new("L", (10 + i, 20 + i)).save(path)
        Files.pairs.append((path, None))
    Files.__len__ = lambda self: len(self.pairs)
    assert image_sizes(Files(), limit=64) == [(20 + i, 10 + i) for i in range(10)]
    assert image_sizes(Files(), limit=3) == [(20, 10), (24, 14), (29, 19)]


def test_fixed_size_images_are_not_cropped():
    batch, crop = default_batch_and_crop(Fingerprint(2000, (64, 64), 0, fixed_size=True), "cpu")
    assert (batch, crop) == (16, 0)


def test_small_datasets_get_elastic_deformation():
    assert default_elastic(Fingerprint(23, (512, 512), 0)) > 0
    assert default_elastic(Fingerprint(10582, (375, 500), 0)) == 0


@pytest.mark.parametrize("upside_down, mirrored, vflip", [
    (0.041, 0.047, 0.5),  # the VNC stack: no up and down
    (0.006, 0.025, 0.5),  # ISBI 2012
    (0.124, 0.039, 0.0),  # the VOC subset: sky up, ground down
    (0.093, 0.029, 0.0),  # the Carvana sample: the car above its shadow
    (0.009, 0.001, 0.5),  # under the floor
    (0.033, 0.011, 0.0),  # 3x the left/right asymmetry: in doubt, none
    (0.060, 0.070, 0.0),  # above the cap
])
def test_vertical_flips_only_for_masks_with_no_up_and_down(upside_down, mirrored, vflip):
    fp = Fingerprint(14, (1024, 1024), 0, masks=MaskLayout([0.5, 0.5], upside_down, mirrored))
    _, augment = fit_recipe(TrainConfig(), AugmentConfig(), fp, "cpu")
    assert augment.vflip == vflip
    _, given = fit_recipe(TrainConfig(), AugmentConfig(vflip=0.25), fp, "cpu")
    assert given.vflip == 0.25  # --vflip overrides
    assert fit_recipe(TrainConfig(), AugmentConfig(no_augment=True), fp, "cpu")[1].vflip == 0.0
    assert fit_recipe(TrainConfig(), AugmentConfig(), Fingerprint(14, (64, 64), 0), "cpu")[1].vflip == 0.0


def test_tiny_datasets_get_epochs_of_enough_steps():
    plan = plan_epochs(10, train_images=23, batch_size=4, crop_size=256, elastic=0.5)
    assert plan.steps_per_epoch == MIN_STEPS_PER_EPOCH  # not 5 steps, nor 23 // 16 = 1 with the last dropped
    assert plan.total_steps == 10 * MIN_STEPS_PER_EPOCH and plan.epochs == 10
    assert plan.warmup_steps == round(0.03 * plan.total_steps)


def test_large_datasets_get_an_epoch_per_pass():
    plan = plan_epochs(3, train_images=10582, batch_size=8, crop_size=480, elastic=0.0, batches_per_step=4)
    assert plan.steps_per_epoch == math.ceil(10582 / 32) and plan.total_steps == 3 * plan.steps_per_epoch
    assert plan_epochs(3, 10582, 8, 480, 0.0, warmup_epochs=0.5).warmup_steps == round(0.5 * math.ceil(10582 / 8))
    assert plan_epochs(3, 10582, 8, 480, 0.0, steps_per_epoch=100).total_steps == 300


def run_of(plan, seconds_left, step, end):
    """The seconds the plan's steps and validations take: every epoch's steps, then its validation."""
    return plan.total_steps * step + plan.epochs * end


@pytest.mark.parametrize("budget", [30, 90, 600, 1800, 7200, 36000])
@pytest.mark.parametrize("step, validation", [(0.05, 0.2), (0.6, 2.0), (2.0, 30.0)])
def test_budget_plans_fit_the_time_and_use_most_of_it(budget, step, validation):
    seconds_left = budget * 0.97 - 3  # after start-up and the exit margin
    plan = plan_budget(budget, seconds_left, step, validation, train_images=500, batch_size=4, crop_size=256,
                       elastic=0.0)
    end = validation + 1.0  # the first guess at a validation with its saves
    if seconds_left < step + end:  # not even one step and a validation fit: one of each all the same
        assert plan.total_steps == 1
        return
    assert run_of(plan, seconds_left, step, end) <= seconds_left
    assert 1 <= plan.epochs <= MAX_VALIDATIONS + 1
    if seconds_left > 20 * (step + end):  # room for real training: most of it goes to steps
        assert plan.total_steps * step >= 0.7 * seconds_left
        assert plan.epochs * end <= 0.12 * seconds_left + end
    assert plan.warmup_steps < plan.total_steps or plan.total_steps == 1
    assert plan.budget == budget and plan.step_seconds == step


def test_a_budget_too_short_for_anything_still_trains_a_step_and_validates():
    plan = plan_budget(30, 5.0, step_seconds=20.0, validation_seconds=10.0, train_images=10, batch_size=4,
                       crop_size=256, elastic=0.5)
    assert plan.total_steps == 1 and plan.epochs == 1


def test_replanning_follows_the_measured_times():
    plan = plan_budget(600, 590, step_seconds=1.0, validation_seconds=4.0, train_images=23, batch_size=4,
                       crop_size=256, elastic=0.5)
    first = plan.steps_per_epoch
    # After the first epoch the steps turn out twice as slow: fewer steps in the rest of the budget, and
    # epochs of half as many steps, so that validations keep their pace.
    plan.step_seconds, plan.epoch_end_seconds = 2.0, 5.0
    seconds_left = 590 - first * 1.0 - 5.0
    total = plan.replan(first, seconds_left)
    per_epoch = plan.steps_per_epoch
    assert per_epoch == first // 2
    remaining = total - first
    epochs_left = math.ceil(remaining / per_epoch)
    assert remaining * 2.0 + epochs_left * 5.0 <= seconds_left < (remaining + per_epoch) * 2.0 + epochs_left * 5.0
    # Mid-epoch, the epoch under way is finished first; 30 s are left after it: a validation (5 s) and 12 steps.
    total = plan.replan(first + 3, 30.0 + (per_epoch - 3) * 2.0 + 5.0, left_in_epoch=per_epoch - 3)
    assert total == first + 3 + (per_epoch - 3) + 12
    # 2 steps would be left: fewer than a quarter of an epoch is not worth its own validation.
    assert plan.replan(first + 3, 10.0 + (per_epoch - 3) * 2.0 + 5.0, left_in_epoch=per_epoch - 3) == first + 25
    # At the end of an epoch cut short, or of one re-timed, the next starts afresh whatever the step count.
    assert plan.replan(first + 7, -1.0) == first + 7
    # A run whose epochs the user set keeps them.
    fixed = plan_budget(600, 590, 1.0, 4.0, 23, 4, 256, 0.5, steps_per_epoch=30)
    fixed.step_seconds = 2.0
    fixed.replan(30, 500)
    assert fixed.steps_per_epoch == 30


def test_out_of_time_ends_at_the_epoch_boundary_or_after_one_more_step():
    plan = Plan(4, 256, 0.0, steps_per_epoch=10, total_steps=100, warmup_steps=3, budget=60, step_seconds=1.0,
                epoch_end_seconds=5.0)
    assert plan.replan(20, seconds_left=-3.0) == 20  # at a boundary: no more steps
    assert plan.replan(25, seconds_left=-3.0, left_in_epoch=5) == 26  # mid-epoch: one step, then validate
    assert plan.epochs == 3  # the third one cut short


def test_deadline_counts_earlier_sessions(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("recipe.time.monotonic", lambda: clock[0])
    deadline = Deadline(budget=600, spent=200, started=990.0)
    assert deadline.left() == 390 and deadline.used() == 210 and deadline.plannable() == 390 - 7
    clock[0] += 100
    assert deadline.left() == 290 and deadline.used() == 310


def test_the_plan_says_when_validation_eats_the_budget():
    quick = plan_budget(600, 590, 1.0, 4.0, 23, 4, 256, 0.5).describe()
    slow = plan_budget(600, 590, 1.0, 400.0, 1449, 4, 256, 0.0).describe()
    assert quick.startswith("plan: ") and "budget 10m: a step takes 1s" in quick and "note" not in quick
    assert "note: one validation takes about 401s of the 10m" in slow and "--val-percent" in slow


def test_passes_over_the_training_pixels_by_hand():
    vnc = Fingerprint(14, (1024, 1024), 2 * 1024 ** 2)  # 14 sections of 1024x1024
    plan = Plan(4, 256, 0.5, 88, 1310, 39, 600.0)  # 1310 steps of 4 crops of 256x256
    assert passes_over_pixels(plan, vnc, 1) == pytest.approx(1310 * 4 * 256 ** 2 / (14 * 1024 ** 2))  # 23.4
    assert passes_over_pixels(plan, vnc, 2) == pytest.approx(2 * 23.39, abs=0.01)  # two processes
    small = Fingerprint(10, (100, 200), 0)  # images smaller than the crop: a crop shows all of an image
    assert passes_over_pixels(plan, small, 1) == pytest.approx(1310 * 4 / 10)


def test_a_short_budget_turns_off_the_geometric_augmentation_no_flag_set():
    vnc = Fingerprint(14, (1024, 1024), 2 * 1024 ** 2)
    augment = AugmentConfig(crop_size=256, zoom=[0.7, 1.4], rotate=10.0, elastic=0.5, planned=("elastic", "zoom"))
    plan = Plan(4, 256, 0.5, 88, 1310, 39, 600.0)
    light, note = budget_augment(augment, plan, vnc, 1)
    assert (light.zoom, light.rotate, light.elastic, light.hflip) == ((1.0, 1.0), 10.0, 0.0, 0.5)  # --rotate given
    assert plan.elastic == 0.0 and note.startswith("augmentation: zoom and elastic deformation off")
    assert "23 times" in note
    long_plan = Plan(4, 256, 0.5, 88, math.ceil(1310 * AUGMENT_PASSES / 23.39), 39, 3600.0)
    assert budget_augment(augment, long_plan, vnc, 1) == (augment, None)  # enough passes: all of it stays
    shapes = Fingerprint(2000, (64, 64), 0, fixed_size=True)  # made at their size: no augmentation to turn off
    assert budget_augment(augment, Plan(8, 0, 0.0, 50, 100, 5, 60.0), shapes, 1) == (augment, None)
