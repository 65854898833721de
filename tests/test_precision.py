"""precision.choose_precision on simulated CPUs and GPUs, the --amp and --channels-last flags, and inference under
autocast: a caller's autocast kept, eval.py and predict.py in bf16 + channels_last labelling as in fp32."""
import numpy as np
import pytest
import torch
from PIL import Image

import eval as evaluate_script
import predict
from errors import ConfigError
from inference import InferenceConfig, forward_probs, use_precision
from model import build_model
from precision import Precision, choose_precision, cpu_native_bf16
from test_report import write_checkpoint

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def simulate_cpu(monkeypatch, amx=False, avx512_bf16=False):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)


def simulate_gpu(monkeypatch, capability, native_bf16):
    """A CUDA GPU of that compute capability; is_bf16_supported answers for native support only, as it must be
    asked (T4s and V100s emulate bf16)."""
    simulate_gpus(monkeypatch, [(capability, native_bf16)])


def simulate_gpus(monkeypatch, gpus):
    """CUDA GPUs, (capability, native bf16) each, cuda:0 the current one; torch.cuda.device(...) makes another
    current for a while, and is_bf16_supported, as torch's, answers for the current GPU."""
    current = [0]

    def index(device):
        return 0 if device is None else torch.device(device).index or 0

    class device_context:
        def __init__(self, device):
            self.index, self.previous = index(device), current[0]

        def __enter__(self):
            current[0] = self.index

        def __exit__(self, *exc):
            current[0] = self.previous

    def is_bf16_supported(including_emulation=True):
        assert including_emulation is False
        return gpus[current[0]][1]

    monkeypatch.setattr(torch.cuda, "device", device_context)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpus[index(device)][0])


@pytest.mark.parametrize("amx, avx512_bf16, native", [(True, True, "AMX"), (False, True, "AVX512-BF16")])
def test_cpus_with_native_bf16_run_bf16_channels_last(monkeypatch, amx, avx512_bf16, native):
    simulate_cpu(monkeypatch, amx, avx512_bf16)
    precision = choose_precision(CPU)
    assert (precision.dtype, precision.channels_last, precision.name) == (torch.bfloat16, True, "bf16")
    assert not precision.needs_grad_scaler
    assert precision.describe() == f"bf16 autocast + channels_last (this CPU has native bf16: {native})"


def test_avx2_cpus_stay_fp32_contiguous(monkeypatch):
    simulate_cpu(monkeypatch)
    precision = choose_precision("cpu")
    assert (precision.dtype, precision.channels_last, precision.name) == (None, False, "fp32")
    assert precision.describe() == "fp32 (this CPU has no native bf16: neither AMX nor AVX512-BF16)"
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # a torch without the probe: no native bf16
    assert cpu_native_bf16() is None


def test_the_chosen_gpu_is_asked_about_bf16_not_the_current_one(monkeypatch):
    """A T4 as cuda:0 (the current GPU) beside an A100 as cuda:1: --device cuda:1 runs bf16, cuda:0 fp16."""
    simulate_gpus(monkeypatch, [((7, 5), False), ((8, 0), True)])
    assert choose_precision(torch.device("cuda:1")).dtype == torch.bfloat16
    assert choose_precision(torch.device("cuda:0")).dtype == torch.float16
    assert choose_precision(CUDA).dtype == torch.float16


@pytest.mark.parametrize("capability, native_bf16, dtype, channels_last", [
    ((8, 0), True, torch.bfloat16, True),  # A100
    ((7, 0), False, torch.float16, True),  # V100
    ((7, 5), False, torch.float16, True),  # T4
    ((6, 1), False, torch.float16, False),  # Pascal: no tensor cores
])
def test_gpus(monkeypatch, capability, native_bf16, dtype, channels_last):
    simulate_gpu(monkeypatch, capability, native_bf16)
    precision = choose_precision(CUDA)
    assert (precision.dtype, precision.channels_last) == (dtype, channels_last)
    assert precision.needs_grad_scaler == (dtype == torch.float16)
    assert f"compute capability {capability[0]}.{capability[1]}" in precision.reason
    assert choose_precision(CUDA, amp="off").channels_last is False  # fp32: channels_last only under autocast


def test_other_devices_run_fp32():
    precision = choose_precision(torch.device("mps"))
    assert (precision.dtype, precision.channels_last) == (None, False) and "mps" in precision.reason


def test_named_flags_are_honoured(monkeypatch):
    simulate_cpu(monkeypatch, amx=True)
    off = choose_precision(CPU, amp="off")
    assert (off.dtype, off.channels_last) == (None, True)  # channels_last pays in fp32 too on this CPU
    assert off.describe() == "fp32 + channels_last (--amp off; this CPU has native bf16: AMX)"
    assert choose_precision(CPU, amp="off", channels_last="off") == Precision(
        None, False, "--amp off; --channels-last off; this CPU has native bf16: AMX")
    simulate_cpu(monkeypatch)
    forced = choose_precision(CPU, amp="bf16", channels_last="on")
    assert (forced.dtype, forced.channels_last) == (torch.bfloat16, True)
    assert choose_precision(CPU, amp="fp16").needs_grad_scaler
    with pytest.raises(ConfigError, match="--amp must be one of auto, off, bf16, fp16"):
        choose_precision(CPU, amp="float16")


def test_autocast_context():
    with Precision(torch.bfloat16, False, "").autocast("cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with Precision(None, False, "").autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("argv, amp, channels_last", [
    ([], "auto", "auto"), (["--amp"], "auto", "auto"), (["--amp", "off", "--channels-last"], "off", "on"),
    (["--amp", "fp16", "--channels-last", "off"], "fp16", "off")])
def test_flags(argv, amp, channels_last):
    _, inference, _ = predict.parse_args(["-i", "x.png", *argv])
    assert (inference.amp, inference.channels_last) == (amp, channels_last)


class Recorder(torch.nn.Module):
    """A 3x3 convolution that records the autocast state and the input's layout it ran with."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 3, padding=1)
        self.seen = []

    def forward(self, x):
        self.seen.append((torch.is_autocast_enabled("cpu"), x.is_contiguous(memory_format=torch.channels_last)))
        return self.conv(x)


def test_forward_probs_runs_the_given_autocast_and_keeps_the_callers():
    model, x = Recorder(), torch.randn(1, 3, 8, 8)
    forward_probs(model, x, amp_dtype=torch.bfloat16)
    forward_probs(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # training's validation: its autocast applies
        forward_probs(model, x)
    assert model.seen == [(True, False), (False, False), (True, False)]
    model.to(memory_format=torch.channels_last)
    forward_probs(model, x)
    assert model.seen[-1] == (False, True)  # inputs follow the model's layout


def test_use_precision_spells_out_the_choice(monkeypatch):
    simulate_cpu(monkeypatch, amx=True)
    model, lines = Recorder(), []
    config = use_precision(model, InferenceConfig(), log=lines.append)
    assert (config.amp, config.channels_last) == ("bf16", "on")
    assert config.options()["amp_dtype"] == torch.bfloat16
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert lines == ["precision: bf16 autocast + channels_last (this CPU has native bf16: AMX)"]


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A tiny random U-Net checkpoint whose labels vary from pixel to pixel, and three images."""
    write_checkpoint(tmp_path / "model.pth")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(images / f"{i}.png")
    return tmp_path


def label_maps(folder):
    return np.stack([np.asarray(Image.open(path)) for path in sorted(folder.iterdir())])


def float64_labels(folder):
    """The labels of the images, computed here: the checkpoint's model in float64, on inputs normalised with
    numpy, its argmax mapped to the mask values. No code of inference.py, predict.py or eval.py runs."""
    state = torch.load(folder / "model.pth", weights_only=True)
    model = build_model(state["model_args"])
    model.load_state_dict(state["model"])
    model.double().eval()
    mean, std = (np.array(state["normalize"][key]) for key in ("mean", "std"))
    labels = []
    for path in sorted((folder / "images").iterdir()):
        x = (np.asarray(Image.open(path), np.float64) / 255 - mean) / std
        with torch.no_grad():
            logits = model(torch.from_numpy(x.transpose(2, 0, 1)[None].copy()))
        labels.append(np.asarray(state["mask_values"])[logits[0].argmax(0).numpy()])
    return np.stack(labels)


@pytest.mark.parametrize("script, flags", [
    (predict, lambda folder: ["-i", str(folder / "images"), "-o"]),
    (evaluate_script, lambda folder: ["--images", str(folder / "images"), "--save-labels"])])
def test_scripts_default_to_bf16_with_the_labels_of_fp32(tiny_checkpoint, monkeypatch, capsys, script, flags):
    """bf16 labels agree with float64 ones on all but a few pixels near a tie (99.9% here), fp32 ones on all but a
    rare tie; wrong labels agree far less: the commonest class everywhere on 87%, the labels flipped on 78%."""
    simulate_cpu(monkeypatch, amx=True)  # bf16 runs on any CPU, emulated where it is not native
    args = ["-m", str(tiny_checkpoint / "model.pth"), *flags(tiny_checkpoint)]
    script.main([*args, str(tiny_checkpoint / "fast")])
    assert "precision: bf16 autocast + channels_last (this CPU has native bf16: AMX)" in capsys.readouterr().out
    script.main([*args, str(tiny_checkpoint / "fp32"), "--amp", "off", "--channels-last", "off"])
    assert "precision: fp32 (--amp off; --channels-last off; " in capsys.readouterr().out
    truth = float64_labels(tiny_checkpoint)
    fast, fp32 = label_maps(tiny_checkpoint / "fast"), label_maps(tiny_checkpoint / "fp32")
    assert fast.shape == fp32.shape == truth.shape == (3, 40, 56) and min(np.unique(truth, return_counts=True)[1]) > 500
    assert (fp32 == truth).mean() > 0.999
    assert (fast == truth).mean() > 0.98
