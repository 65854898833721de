"""The network a --time run chooses when none is named: the learning curves' arithmetic, the choice from mocked step
times, the flags that override it, ImageNet weights found (or not) in a temporary torch hub cache, and a run that
prints, saves and trains the choice."""
import dataclasses
import json
import math

import pytest
import torch
import torchvision

import model_choice
import train
from checkpoints import load_checkpoint
from errors import ConfigError
from model import ModelConfig, build_model
from model_choice import LEARNING_CURVES, Timed, candidate_weights, choose, expected_share, probe, \
    weights_file_encoder
from recipe import plan_budget
from test_budget_clock import on_fake_clock

SHAPES = ["--dataset", "shapes", "--image-size", "32", "--num-train", "16", "--num-val", "4", "--batch-size", "4",
          "--workers", "0", "--sample-every", "0", "--amp", "off", "--channels-last", "off"]


def test_expected_share_interpolates_in_log_steps_and_is_flat_beyond_the_curve():
    curve = ((100, 0.5), (400, 0.9))
    assert expected_share(curve, 200) == pytest.approx(0.7)  # log 200 lies halfway between log 100 and log 400
    assert expected_share(curve, 50) == pytest.approx(0.25)  # in proportion to the steps below the first point
    assert expected_share(curve, 10_000) == 0.9
    for curve in LEARNING_CURVES.values():  # the measured curves only rise
        shares = [expected_share(curve, steps) for steps in (10, 50, 100, 300, 1000, 5000)]
        assert shares == sorted(shares)


def timed(seconds_per_candidate, budget_seconds):
    """probe() with mocked step times: each candidate gets the steps a `budget_seconds` budget pays for."""
    def plan_steps(step, end, one_off):
        return plan_budget(budget_seconds, budget_seconds, step, end, 100, 4, 256, 0.0).total_steps
    return probe(lambda network, weights: (seconds_per_candidate[network], 1.0, 0.0), plan_steps, weights="none",
                 candidates=list(seconds_per_candidate))


def test_a_short_budget_takes_the_fastest_candidate_a_long_one_the_best_curve():
    seconds = {"resnet18": 0.5, "resnet34": 0.8}
    short = timed(seconds, 30)
    assert [t.network for t in short] == ["resnet18", "resnet34"]  # fastest first
    assert short[0].steps > short[1].steps and choose(short).network == "resnet18"
    long = timed(seconds, 36_000)  # 10 h: every candidate beyond its curve's last point
    best = max(seconds, key=lambda network: LEARNING_CURVES[network][-1][1])
    assert min(t.steps for t in long) > max(c[-1][0] for c in LEARNING_CURVES.values())
    assert choose(long).network == best


def test_choose_takes_the_higher_share_and_more_steps_between_equals():
    ties = [Timed("resnet34", "none", 0.8, 1.0, 10_000), Timed("resnet34", "none", 0.5, 1.0, 20_000)]
    assert choose(ties).steps == 20_000
    # The curves' last points: unet16 1.00 at 1,500 steps, the ResNet-18 U-Net 0.99. With more steps and a step
    # timed faster (a probe's noise between two networks of about the same speed), it still scores lower.
    unet16, resnet18 = Timed("unet16", "none", 0.32, 1.0, 1_670), Timed("resnet18", "none", 0.30, 1.0, 1_760)
    assert (unet16.expected, resnet18.expected) == (1.0, 0.99)
    assert choose([resnet18, unet16]) is unet16
    worse = Timed("resnet18", "none", 0.1, 1.0, 5)  # far more steps but a much lower expected share
    better = Timed("resnet34", "none", 0.8, 1.0, 10_000)
    assert choose([worse, better]) is better


@pytest.mark.parametrize("argv, planned", [
    (["--time", "1m"], True),
    (["--time", "1m", "--encoder", "resnet18"], False),
    (["--time", "1m", "--base-channels", "32"], False),
    (["--time", "1m", "--arch", "fcn"], False),
    (["--time", "1m", "--dep", "3"], False),  # an abbreviated flag names the network too
    (["--epochs", "2"], False),  # without --time the classic U-Net stays the default
])
def test_naming_a_network_overrides_the_choice(argv, planned):
    model_config = train.parse_args(["--dataset", "shapes", *argv])[3]
    assert model_config.planned is planned


def test_imagenet_weights_found_in_the_hub_cache_or_not(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # torch.hub.get_dir() follows it
    assert candidate_weights("resnet18") == "none"
    note = model_choice.missing_weights_note(["resnet18", "resnet34"])
    assert str(tmp_path / "hub" / "checkpoints") in note and "resnet18-f37072fd.pth" in note
    cached = model_choice.imagenet_weights_file("resnet18")
    assert cached == tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    weights = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(weights, cached)
    assert candidate_weights("resnet18") == "imagenet" and candidate_weights("resnet34") == "none"
    assert candidate_weights("resnet18", "none") == "none"  # --encoder-weights none: random weights asked for
    # the model is built from the cached file, with no download
    built = torchvision.models.get_model("resnet18", weights=torchvision.models.ResNet18_Weights.DEFAULT)
    assert torch.equal(built.conv1.weight, weights["conv1.weight"])


def test_a_weights_file_is_matched_to_its_encoder(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    assert weights_file_encoder(path) == "resnet34"
    assert candidate_weights("resnet34", str(path)) == str(path) and candidate_weights("resnet18", str(path)) == "none"
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, other)
    with pytest.raises(ConfigError, match="holds the weights of none of the networks the plan chooses from"):
        weights_file_encoder(other)
    with pytest.raises(SystemExit):  # argparse's one line, before any data is read
        train.parse_args(["--dataset", "shapes", "--time", "1m", "--encoder-weights", str(other)])


def fake_probe(monkeypatch, seconds_by_network):
    """time_training_step of train.py returns these seconds for the classic U-Net and the ResNet-18 and ResNet-34
    U-Nets."""
    def time_training_step(runner, model, *args, **kwargs):
        if not hasattr(model, "encoder"):
            return seconds_by_network["unet16"], 0.0
        layers = len(model.encoder.stages[-1][0])  # resnet18's layer4 holds 2 blocks, resnet34's 3
        return seconds_by_network[{2: "resnet18", 3: "resnet34"}[layers]], 0.0
    monkeypatch.setattr(train, "time_training_step", time_training_step)


def test_a_budgeted_run_prints_saves_and_trains_the_choice(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached weights
    on_fake_clock(monkeypatch, step=0.3, forward=0.01, save=0.1)
    fake_probe(monkeypatch, {"unet16": 2.0, "resnet18": 0.3, "resnet34": 0.6})
    run_dir = train.main(SHAPES + ["--time", "20s", "--checkpoint-dir", str(tmp_path)], started=0.0)
    out = capsys.readouterr().out
    assert "network: the plan chose among these U-Nets" in out and "note: no ImageNet weights on disk" in out
    lines = {network: line for line in out.splitlines() for network in ("unet16", "resnet18", "resnet34")
             if line.strip().startswith(network)}
    assert "a step 0.3s" in lines["resnet18"] and "<- chosen" in lines["resnet18"]
    assert "a step 0.6s" in lines["resnet34"] and "chosen" not in lines["resnet34"]
    assert "a step 2s" in lines["unet16"] and "chosen" not in lines["unet16"]
    saved = json.loads((run_dir / "args.json").read_text())
    choice = saved["network_choice"]
    assert choice["chosen"] == "resnet18" and saved["encoder"] == "resnet18" and saved["encoder_weights"] == "none"
    steps = {c["network"]: c["steps"] for c in choice["candidates"]}
    assert steps["resnet18"] > steps["resnet34"] > steps["unet16"] > 0
    checkpoint = load_checkpoint(run_dir / "best.pth")
    assert checkpoint["model_args"]["encoder"] == "resnet18" and checkpoint["args"]["network_choice"] == choice
    # the candidates' lighter decoder, timed and trained, and rebuilt from the checkpoint
    assert "decoder widths 128 64 32 16 16" in out and saved["decoder_channels"] == [128, 64, 32, 16, 16]
    model = build_model(checkpoint["model_args"])
    assert [up.conv[3].out_channels for up in model.ups] == [128, 64, 32, 16, 16]
    model.load_state_dict(checkpoint["model"])
    # the choice's own probe planned the run: its step time, not another timing
    assert math.isclose(saved["plan"]["step_seconds"], 0.3, rel_tol=0.2)


def test_the_classic_candidate_chosen_trains_a_classic_unet_of_width_16(tmp_path, monkeypatch, capsys):
    on_fake_clock(monkeypatch, step=0.3, forward=0.01, save=0.1)
    fake_probe(monkeypatch, {"unet16": 0.2, "resnet18": 0.3, "resnet34": 0.6})
    flat = {network: ((10, share),) for network, share in (("unet16", 1.0), ("resnet18", 0.9), ("resnet34", 0.9))}
    monkeypatch.setattr(model_choice, "LEARNING_CURVES", flat)
    run_dir = train.main(SHAPES + ["--time", "20s", "--checkpoint-dir", str(tmp_path)], started=0.0)
    (chosen,) = [line for line in capsys.readouterr().out.splitlines() if line.endswith("<- chosen")]
    assert chosen.strip().startswith("unet16 ") and "(random weights)" in chosen
    saved = json.loads((run_dir / "args.json").read_text())
    assert saved["network_choice"]["chosen"] == "unet16"
    assert (saved["encoder"], saved["base_channels"], saved["decoder_channels"]) == ("none", 16, None)
    checkpoint = load_checkpoint(run_dir / "best.pth")
    assert "encoder" not in checkpoint["model_args"] and checkpoint["model_args"]["base_channels"] == 16
    build_model(checkpoint["model_args"]).load_state_dict(checkpoint["model"])


def test_images_smaller_than_the_candidates_stride_keep_the_classic_unet(tmp_path, monkeypatch, capsys):
    on_fake_clock(monkeypatch, step=4.0, forward=0.01, save=0.1)  # a few steps of the 31 M-parameter U-Net
    argv = SHAPES + ["--image-size", "16", "--time", "30s", "--checkpoint-dir", str(tmp_path)]  # no network named
    run_dir = train.main(argv, started=0.0)
    assert "network: the classic U-Net, as the training images (16 pixels a side)" in capsys.readouterr().out
    assert "encoder" not in load_checkpoint(run_dir / "best.pth")["model_args"]



def test_the_encoder_learning_rate_follows_its_weights():
    """Random encoder weights learn at the full rate, pretrained ones at a tenth; the flag overrides both."""
    config = ModelConfig(encoder="resnet18", encoder_weights="none")
    assert config.encoder_lr() == 1.0
    assert dataclasses.replace(config, encoder_weights="imagenet").encoder_lr() == 0.1
    assert dataclasses.replace(config, encoder_lr_factor=0.5).encoder_lr() == 0.5


def test_a_candidate_with_pretrained_weights_on_disk_comes_first():
    random18 = Timed("resnet18", "none", 0.5, 1.0, 1000)
    pretrained34 = Timed("resnet34", "imagenet", 0.8, 1.0, 600)
    assert random18.expected > pretrained34.expected  # by the curves alone, the faster network
    assert choose([random18, pretrained34]) is pretrained34
    assert choose([random18, Timed("resnet34", "none", 0.8, 1.0, 600)]) is random18


def test_an_unreadable_weights_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit):
        train.parse_args(["--dataset", "shapes", "--time", "1m", "--encoder-weights", str(path)])
    assert "is not a readable PyTorch weights file" in capsys.readouterr().err


def test_the_chosen_mark_follows_the_name_not_the_object():
    """Under torchrun the choice is rank 0's, a copy of its Timed: the line still marks it."""
    timed = [Timed("resnet18", "none", 0.5, 1.0, 1000), Timed("resnet34", "none", 0.8, 1.0, 600)]
    lines = model_choice.describe(timed, Timed("resnet18", "none", 0.5, 1.0, 1000)).splitlines()
    assert lines[1].endswith("<- chosen") and "chosen" not in lines[2]


def test_compile_time_is_measured_per_candidate_and_leaves_fewer_steps(tmp_path, monkeypatch, capsys):
    """With --compile the probe compiles each candidate: the first step's extra seconds (here a fake compiler's
    20 s on the fake clock) are printed, kept, and taken from that candidate's budget."""
    clock = on_fake_clock(monkeypatch, step=0.3, forward=0.01, save=0.1)
    compiled = []

    class FakeCompiled(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.first = model, True
            compiled.append(model)

        def forward(self, x):
            if self.first:
                clock.now, self.first = clock.now + 20.0, False
            return self.model(x)

    monkeypatch.setattr(torch, "compile", FakeCompiled)
    run_dir = train.main(SHAPES + ["--time", "2m", "--compile", "--checkpoint-dir", str(tmp_path)], started=0.0)
    lines = [line for line in capsys.readouterr().out.splitlines()
             if line.strip().startswith(model_choice.CANDIDATES)]
    assert len(lines) == 3 and all("after 20s to compile" in line for line in lines)
    assert len(compiled) == 4  # each candidate in the probe, then the run's model
    choice = json.loads((run_dir / "args.json").read_text())["network_choice"]
    assert [c["one_off_seconds"] for c in choice["candidates"]] == pytest.approx([20.0, 20.0, 20.0])


def test_a_candidate_slow_to_compile_gets_the_steps_of_a_shorter_budget():
    seen = []

    def plan_steps(step, end, one_off):
        seen.append(one_off)
        return plan_budget(120, 120 - one_off, step, end, 100, 4, 256, 0.0).total_steps

    timed = probe(lambda network, weights: (0.5, 1.0, {"resnet18": 0.0, "resnet34": 40.0}[network]), plan_steps,
                  weights="none", candidates=["resnet18", "resnet34"])
    steps = {t.network: t.steps for t in timed}
    assert sorted(seen) == [0.0, 40.0]
    assert steps["resnet18"] == plan_budget(120, 120, 0.5, 1.0, 100, 4, 256, 0.0).total_steps
    assert steps["resnet34"] == plan_budget(120, 80, 0.5, 1.0, 100, 4, 256, 0.0).total_steps < steps["resnet18"]
    assert "after 40s to compile" in model_choice.describe(timed, timed[0], compiled=True)
