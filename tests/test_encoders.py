"""U-Nets on torchvision encoders and FCN-8s: odd sizes, tapped features, pretrained weights from a file or a
failed download, optimizer groups, encoder freezing, the flags, and the torch.hub entry point."""
import argparse
import copy
import re
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision

import model as model_module
import train
from conftest import ROOT
from checkpoints import load_model
from errors import ConfigError, EncoderWeightsError
from flags import add_model_args, config_from
from model import (ENCODERS, EncoderUNet, FCN8s, ModelConfig, UNet, backbone, bilinear_kernel, build_model,
                   input_normalization, parameter_groups, set_encoder_frozen)
from checkpoints import load_checkpoint, save_checkpoint

ODD = (67, 93)
TINY_DECODER = [8] * 5


def parse(*argv):
    """A checked ModelConfig from model flags, as train.py builds it."""
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    return config_from(ModelConfig, vars(parser.parse_args(argv))).check()


def model_args_from(config, num_classes):
    return config.model_args(num_classes)


# Widths of torchvision's architectures, and tap sizes for a 67 x 93 input worked out by hand: VGG's max-pools
# floor; ResNet's strided convolutions and max-pool round up; DenseNet's stem rounds up, its transitions floor.
VGG = ([64, 128, 256, 512, 512], [(67, 93), (33, 46), (16, 23), (8, 11), (4, 5)])
RESNET_SIZES = [(34, 47), (17, 24), (9, 12), (5, 6), (3, 3)]
DENSENET_SIZES = [(34, 47), (17, 24), (8, 12), (4, 6), (2, 3)]
TAPS = {
    "vgg11": VGG, "vgg11_bn": VGG, "vgg13": VGG, "vgg13_bn": VGG, "vgg16": VGG, "vgg16_bn": VGG,
    "resnet18": ([64, 64, 128, 256, 512], RESNET_SIZES), "resnet34": ([64, 64, 128, 256, 512], RESNET_SIZES),
    "resnet50": ([64, 256, 512, 1024, 2048], RESNET_SIZES), "resnet101": ([64, 256, 512, 1024, 2048], RESNET_SIZES),
    "densenet121": ([64, 256, 512, 1024, 1024], DENSENET_SIZES),
    "densenet169": ([64, 256, 512, 1280, 1664], DENSENET_SIZES),
}


@pytest.mark.parametrize("encoder", ENCODERS)
def test_every_encoder_taps_each_stride_and_trains_on_odd_sizes(encoder):
    torch.manual_seed(0)
    bilinear = ENCODERS.index(encoder) % 2 == 1  # both decoders, across every family
    model = EncoderUNet(encoder, num_classes=3, bilinear=bilinear)
    x = torch.randn(1, 3, *ODD)
    channels, sizes = TAPS[encoder]
    assert [tuple(f.shape) for f in model.encoder(x)] == [(1, c, *s) for c, s in zip(channels, sizes)]
    logits = model(x)
    assert logits.shape == (1, 3, *ODD)
    F.cross_entropy(logits, torch.randint(0, 3, (1, *ODD))).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_fcn8s_on_the_vgg_classifier_convolutionalised(monkeypatch):
    torch.manual_seed(0)
    vgg = torchvision.models.vgg11()
    monkeypatch.setattr(model_module, "backbone", lambda name, weights: vgg)
    model = FCN8s("vgg11", num_classes=5)
    deepest = model.encoder.stages[2]
    pool5 = torch.randn(1, 512, 7, 7)
    with torch.no_grad():  # on a 7x7 pool5 the centre of fc6 sees exactly what the classifier's first layer sees
        hidden = vgg.classifier[0](pool5.flatten(1))
        assert torch.allclose(deepest.fc6(pool5)[0, :, 3, 3], hidden[0], atol=1e-4)
        fc7 = deepest.fc7(hidden[:, :, None, None])[0, :, 0, 0]
        assert torch.allclose(fc7, vgg.classifier[3](hidden)[0], atol=1e-4)
    pool3, pool4, fc7 = model.encoder(torch.randn(1, 3, 64, 96))
    assert pool3.shape == (1, 256, 8, 12) and pool4.shape == (1, 512, 4, 6) and fc7.shape == (1, 4096, 2, 3)
    logits = model(torch.randn(2, 3, *ODD))  # padded to 96 x 96 inside, cropped back
    assert logits.shape == (2, 5, *ODD)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bilinear_kernel_upsamples_like_interpolate():
    up = torch.nn.ConvTranspose2d(2, 2, 4, stride=2, padding=1, bias=False)
    up.weight.data.copy_(bilinear_kernel(2, 4))
    x = torch.randn(1, 2, 5, 7)
    expected = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    with torch.no_grad():  # equal away from the border, where interpolate clamps and the convolution sees zeros
        assert torch.allclose(up(x)[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], atol=1e-6)


def torchvision_keys(encoder, prefix=""):
    """The encoder's state_dict under torchvision's names: 'stages.1.layer1.0.conv1.weight' -> 'layer1...'."""
    return {prefix + key.split(".", 2)[2]: value for key, value in encoder.state_dict().items()}


def test_local_weights_file_initialises_the_encoder(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18().state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(reference, path)
    model_args = model_args_from(parse("--encoder", "resnet18", "--encoder-weights", str(path)), 3)
    loaded = torchvision_keys(build_model(model_args, pretrained=True).encoder)
    assert set(loaded) == {key for key in reference if not key.startswith("fc.")}
    assert all(torch.equal(value, reference[key]) for key, value in loaded.items())
    path.unlink()  # rebuilding from a checkpoint never reads the file: the checkpoint's weights replace it
    rebuilt = torchvision_keys(build_model(model_args).encoder)
    assert not torch.equal(rebuilt["conv1.weight"], reference["conv1.weight"])


def test_densenet_file_with_torchvisions_old_keys(tmp_path):
    torch.manual_seed(2)
    reference = torchvision.models.densenet121().state_dict()
    old = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", key): value
           for key, value in reference.items() if not key.endswith("num_batches_tracked")}  # as in the 2017 files
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    path = tmp_path / "densenet121-a639ec97.pth"
    torch.save(old, path)
    loaded = torchvision_keys(EncoderUNet("densenet121", encoder_weights=str(path)).encoder, "features.")
    assert all(torch.equal(value, reference[key]) for key, value in loaded.items())
    assert len(loaded) == len([key for key in reference if not key.startswith("classifier.")])


def test_unusable_weights_files_get_one_line(tmp_path):
    resnet18_file, garbage, not_a_dict = tmp_path / "r18.pth", tmp_path / "garbage.pth", tmp_path / "list.pth"
    torch.save(torchvision.models.resnet18().state_dict(), resnet18_file)
    garbage.write_bytes(b"not a checkpoint")
    torch.save([1, 2], not_a_dict)
    for path, reason in [(resnet18_file, "does not hold torchvision resnet34 weights"),
                         (garbage, "not a readable PyTorch weights file"), (not_a_dict, "holds a list")]:
        with pytest.raises(EncoderWeightsError, match=reason) as info:
            backbone("resnet34", str(path))
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def unreachable(*args, **kwargs):
    raise urllib.error.URLError("network is unreachable")


def test_failed_download_says_how_to_pass_a_local_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: torchvision has to download
    monkeypatch.setattr(torch.hub, "urlopen", unreachable)
    model_args = model_args_from(parse("--encoder", "resnet18"), 2)
    assert model_args["encoder_weights"] == "imagenet"
    with pytest.raises(EncoderWeightsError) as info:
        build_model(model_args, pretrained=True)
    message = str(info.value)
    assert "\n" not in message and "network is unreachable" in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert "--encoder-weights /path/to/resnet18-f37072fd.pth" in message
    build_model(model_args)  # rebuilding (eval, predict, hub) never downloads


TINY_TRAIN = ["--dataset", "shapes", "--image-size", "32", "--num-train", "16", "--num-val", "8", "--epochs", "1",
              "--steps-per-epoch", "2", "--batch-size", "8", "--workers", "0", "--encoder", "resnet18",
              "--decoder-channels", "8", "8", "8", "8",
              "8", "--lr", "0.01"]


def test_train_fails_in_one_line_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "urlopen", unreachable)
    with pytest.raises(SystemExit, match="^error: could not download the ImageNet weights of resnet18 .*"
                                         "--encoder-weights /path/to/resnet18-f37072fd.pth"):
        train.main(TINY_TRAIN + ["--checkpoint-dir", str(tmp_path)])


def test_train_with_frozen_pretrained_encoder(tmp_path):
    torch.manual_seed(3)
    reference = torchvision.models.resnet18().state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(reference, path)
    run_dir = train.main(TINY_TRAIN + ["--encoder-weights", str(path), "--freeze-encoder-epochs", "1",
                                       "--checkpoint-dir", str(tmp_path / "runs")])
    state = load_checkpoint(run_dir / "last.pth")
    assert state["model_args"] == {"arch": "unet", "encoder": "resnet18", "encoder_weights": str(path),
                                   "num_classes": 4, "decoder_channels": [8] * 5, "bilinear": False}
    assert state["normalize"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert [group["initial_lr"] for group in state["optimizer"]["param_groups"]] == pytest.approx([0.01, 0.001])
    model, _ = load_model(run_dir / "last.pth")
    # The frozen epoch left every encoder tensor, BatchNorm statistics included, as the file had it.
    assert all(torch.equal(value, reference[key]) for key, value in torchvision_keys(model.encoder).items())
    assert model(torch.zeros(1, 3, 29, 35)).shape == (1, 4, 29, 35)


@pytest.mark.parametrize("make", [lambda: UNet(3, 2, base_channels=4, depth=2),
                                  lambda: EncoderUNet("resnet18", 3, TINY_DECODER)], ids=["unet", "resnet18"])
def test_parameter_groups_hold_every_parameter_once(make):
    model = make()
    groups = parameter_groups(model, 1e-3, encoder_lr_factor=0.1)
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    assert len(grouped) == len(set(grouped))
    if isinstance(model, UNet):
        assert [group["lr"] for group in groups] == [1e-3]
    else:
        encoder_ids = {id(p) for p in model.encoder.parameters()}
        assert {id(p) for p in groups[1]["params"]} == encoder_ids and groups[1]["lr"] == pytest.approx(1e-4)
        assert not encoder_ids & {id(p) for p in groups[0]["params"]} and groups[0]["lr"] == 1e-3
    torch.optim.AdamW(groups, lr=1e-3)


def train_step(model, optimizer):
    model.train()
    logits = model(torch.randn(2, 3, 40, 40))
    loss = F.cross_entropy(logits, torch.randint(0, logits.shape[1], (2, 40, 40)))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def changed(before, module):
    return {key for key, value in module.state_dict().items() if not torch.equal(value, before[key])}


def test_frozen_encoder_stays_fixed_until_unfrozen():
    torch.manual_seed(0)
    model = EncoderUNet("resnet18", 2, TINY_DECODER)
    optimizer = torch.optim.AdamW(parameter_groups(model, 1e-2, encoder_lr_factor=0.1), weight_decay=0.1)
    encoder, decoder = copy.deepcopy(model.encoder.state_dict()), copy.deepcopy(model.ups.state_dict())
    assert set_encoder_frozen(model, True)
    train_step(model, optimizer)
    assert not changed(encoder, model.encoder)  # weights and BatchNorm statistics alike
    assert changed(decoder, model.ups) and model.ups.training and not model.encoder.training
    set_encoder_frozen(model, False)
    train_step(model, optimizer)
    assert {"stages.0.conv1.weight", "stages.0.bn1.running_mean"} <= changed(encoder, model.encoder)
    assert not set_encoder_frozen(UNet(base_channels=4, depth=2), True)


def test_model_flags_build_the_checkpoint_dict():
    assert model_args_from(parse("--encoder", "vgg13", "--bilinear"), 3) == {
        "arch": "unet", "encoder": "vgg13", "encoder_weights": "imagenet", "num_classes": 3,
        "decoder_channels": [256, 128, 64, 32], "bilinear": True}
    assert model_args_from(parse("--arch", "fcn", "--encoder-weights", "none", "--single-logit"), 2) == {
        "arch": "fcn", "encoder": "vgg13", "encoder_weights": "none", "num_classes": 1}
    assert model_args_from(parse("--encoder", "densenet121"), 2)["decoder_channels"] == [256, 128, 64, 32, 16]
    assert model_args_from(parse(), 2)["base_channels"] == 64  # no encoder: the classic U-Net
    assert input_normalization({"encoder": "resnet34", "encoder_weights": "imagenet"}) == {
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


@pytest.mark.parametrize("argv, message", [
    (["--encoder-weights", "none"], "need --encoder"),
    (["--encoder", "resnet18", "--encoder-weights", "missing.pth"], "'missing.pth' is neither"),
    (["--encoder", "resnet18", "--decoder-channels", "8", "8"], "needs 5 positive decoder widths"),
    (["--encoder", "vgg11", "--decoder-channels", "8", "8", "8", "0"], "needs 4 positive decoder widths"),
    (["--arch", "fcn", "--encoder", "resnet18"], "FCN-8s must be one of vgg11, vgg11_bn"),
    (["--arch", "fcn", "--decoder-channels", "8"], "FCN-8s has none"),
    (["--encoder", "resnet18", "--encoder-lr-factor", "-1"], "--encoder-lr-factor cannot be negative"),
    (["--freeze-encoder-epochs", "-2"], "--freeze-encoder-epochs cannot be negative"),
])
def test_bad_model_flags_get_one_line(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        model_args_from(parse(*argv), 3)


def test_hub_builds_architectures_and_loads_checkpoints(tmp_path):
    hub = dict(repo_or_dir=str(ROOT), model="unet", source="local")
    model = torch.hub.load(**hub, encoder="resnet18", num_classes=3, decoder_channels=TINY_DECODER, bilinear=True)
    assert isinstance(model, EncoderUNet) and model(torch.zeros(1, 3, 35, 41)).shape == (1, 3, 35, 41)
    assert model.normalize == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert isinstance(torch.hub.load(**hub, base_channels=4, depth=2), UNet)

    torch.manual_seed(4)
    model_args = {"arch": "unet", "encoder": "resnet18", "encoder_weights": "imagenet", "num_classes": 3,
                  "decoder_channels": TINY_DECODER, "bilinear": False}
    trained = build_model(model_args)
    train_step(trained, torch.optim.SGD(trained.parameters(), lr=0.1))  # BatchNorm statistics move too
    path = tmp_path / "best.pth"
    save_checkpoint({"model": trained.state_dict(), "model_args": model_args, "classes": ["a", "b", "c"],
                     "mask_values": [0, 1, 2], "normalize": input_normalization(model_args), "ignore_index": 255}, path)
    loaded = torch.hub.load(**hub, checkpoint=str(path))
    x = torch.randn(1, 3, 37, 45)
    with torch.no_grad():
        assert torch.equal(loaded(x), trained.eval()(x))
    assert loaded.classes == ["a", "b", "c"] and not loaded.training
