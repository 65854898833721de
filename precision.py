"""The fastest safe precision and memory layout for a device: which autocast dtype, if any, and whether to put
the model and its inputs in channels_last (NHWC).

- CPUs: bf16 autocast + channels_last where bf16 is native (AMX or AVX512-BF16), channels_last there in fp32
  too; elsewhere fp32, contiguous. On an Intel Xeon with AMX, classic U-Net training steps ran at 0.63 images/s
  in fp32, 0.84 in fp32 + channels_last, 1.59 in bf16 and 3.33 in bf16 + channels_last. Without native
  support bf16 is emulated, many times slower than fp32 (tens of times on AVX2 CPUs), and channels_last slowed
  fp32 training 1.3x on an AVX2-only AMD CPU.
- CUDA GPUs: bf16 autocast where bf16 is native (compute capability 8.0 and up, and ROCm), else fp16, which
  training runs with a GradScaler; channels_last under autocast on GPUs with tensor cores (compute capability
  7.0 and up), as NVIDIA and torchvision advise.
- Other devices (MPS, ...): fp32, contiguous.

A dtype named with --amp is used as asked, on any device (fp16 on a CPU too: torch runs it, fast only on CPUs
with AMX-FP16), and so is --channels-last on or off.
"""
from dataclasses import dataclass

import torch

from errors import ConfigError

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # the --amp values besides auto
AMP_CHOICES = ("auto", *AMP_DTYPES)
CHANNELS_LAST_CHOICES = ("auto", "on", "off")


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype | None  # autocast dtype; None: fp32
    channels_last: bool
    reason: str  # why, for the printed line

    @property
    def name(self):
        return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[self.dtype]

    @property
    def needs_grad_scaler(self):
        """fp16 gradients underflow without loss scaling (torch.amp.GradScaler); bf16 has fp32's range."""
        return self.dtype == torch.float16

    def autocast(self, device_type):
        return torch.autocast(device_type, dtype=self.dtype, enabled=self.dtype is not None)

    def prepare(self, model):
        """The model, in channels_last when chosen (in place, as Module.to)."""
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    @property
    def summary(self):
        """"bf16 autocast + channels_last", "fp32", ..."""
        return (f"{self.name} autocast" if self.dtype else "fp32") + (" + channels_last" if self.channels_last else "")

    def describe(self):
        return f"{self.summary} ({self.reason})"


def cpu_native_bf16():
    """"AMX", "AVX512-BF16" or None: the CPU's native bf16 instructions, as torch detects them (torch versions
    without these probes: None, the safe answer)."""
    for name, probe in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported")):
        if getattr(torch.cpu, probe, lambda: False)():
            return name
    return None


def hardware_choice(device):
    """(fastest safe autocast dtype, channels_last under autocast, channels_last in fp32, why) for `device`."""
    if device.type == "cpu":
        native = cpu_native_bf16()
        if native:
            return torch.bfloat16, True, True, f"this CPU has native bf16: {native}"
        return None, False, False, "this CPU has no native bf16: neither AMX nor AVX512-BF16"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        # Without including_emulation=False, T4s and V100s report bf16 that they only emulate. torch answers for
        # the current GPU: made `device` for the question (--device cuda:1 on a machine of mixed GPUs).
        with torch.cuda.device(device):
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        tensor_cores = major >= 7
        why = (f"this GPU: compute capability {major}.{minor}, {'native bf16' if native else 'no native bf16'}, "
               f"{'tensor cores' if tensor_cores else 'no tensor cores'}")
        return (torch.bfloat16 if native else torch.float16), tensor_cores, False, why
    return None, False, False, f"no faster precision known for {device.type}"


def choose_precision(device, amp="auto", channels_last="auto"):
    """The Precision for `device` (torch.device or str): amp is "auto", "off", "bf16" or "fp16" (--amp),
    channels_last "auto", "on" or "off" (--channels-last). "auto" follows the rules of this module's docstring;
    the other values are honoured as given, and the reason then names them."""
    if amp not in AMP_CHOICES or channels_last not in CHANNELS_LAST_CHOICES:
        raise ConfigError(f"--amp must be one of {', '.join(AMP_CHOICES)} and --channels-last one of "
                          f"{', '.join(CHANNELS_LAST_CHOICES)}; got {amp} and {channels_last}")
    dtype, layout_amp, layout_fp32, why = hardware_choice(torch.device(device))
    if amp != "auto":
        dtype = AMP_DTYPES[amp]
    layout = (layout_amp if dtype else layout_fp32) if channels_last == "auto" else channels_last == "on"
    asked = [f"{flag} {value}" for flag, value in (("--amp", amp), ("--channels-last", channels_last))
             if value != "auto"]
    return Precision(dtype, layout, "; ".join(asked + [why]))
