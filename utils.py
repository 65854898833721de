"""Small helpers the scripts share: the device, data-loader workers, seeds and random states, warnings."""
import os
import random
import secrets
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from errors import ConfigError


def pick_device(name):
    """--device: 'auto' (CUDA when available), or a device of this machine ('cpu', 'cuda', 'cuda:1', 'mps');
    ConfigError naming the devices there are otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device '{name}' is not a device; this machine has {', '.join(available_devices())}") \
            from None
    if device.type == "cpu" and device.index not in (None, 0):
        raise ConfigError(f"--device {name}: the CPU is one device, 'cpu'; this machine has "
                          f"{', '.join(available_devices())}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for CUDA, but torch sees no CUDA device; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: there is no such GPU; this machine has {', '.join(available_devices())}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: this machine has no Apple GPU (MPS); it has "
                          f"{', '.join(available_devices())}")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {name}: the scripts run on cpu, cuda or mps devices; this machine has "
                          f"{', '.join(available_devices())}")
    return device


def available_devices():
    """The --device names this machine offers: 'cpu', 'cuda:0'..., 'mps'."""
    cuda = [f"cuda:{index}" for index in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return ["cpu", *cuda] + (["mps"] if torch.backends.mps.is_available() else [])


def default_workers(device_type=None):
    """Data-loader processes: the CPU cores this process may use (containers and taskset count) minus the main
    process, at most 4, and 0 on a single core. Works with the spawn start method of Windows and macOS.
    `device_type` is where the model runs, when known ("cpu", "cuda"): a model computed on two CPU cores or fewer
    gets 0, as its threads already fill the cores; on 2 cores a worker never made training faster
    (benchmarks/bench_workers.py: the demo's steps 3-17% slower, the classic U-Net's about the same)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if device_type == "cpu" and cores <= 2 else min(4, max(0, cores - 1))


def spread_indices(length, count):
    """Up to `count` indices of a sequence of `length`, spread evenly from its first to its last."""
    count = min(count, length)
    return sorted({round(i * (length - 1) / max(1, count - 1)) for i in range(count)})


def check_folder(folder, flag):
    """Make `folder` if needed and check that a file can be written in it, before the work that fills it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except FileExistsError:
        raise ConfigError(f"{flag} '{folder}' is a file, not a folder; name a folder") from None
    except OSError as e:
        raise ConfigError(f"{flag}: cannot write in '{folder}' ({e.strerror}); choose a writable folder") from None
    return folder


@contextmanager
def replaced_atomically(path):
    """A binary file to write `path`'s new contents into: a temporary file beside it, named for this writer alone
    (machine, process, random part) and made with the umask's permissions, as open() makes files. It replaces
    `path` in one step (os.replace) once written and synced; on any failure it is removed, and `path` keeps
    its old contents."""
    path = Path(path)
    remove_stale_temporaries(path)
    tmp = path.with_name(f"{temporary_prefix(path)}{os.getpid()}.{secrets.token_hex(4)}.tmp")
    f = open(tmp, "xb")  # x: created here, never an existing file; named, as writers such as tifffile need
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def temporary_prefix(path):
    return f".{path.name}.{socket.gethostname()}."


def remove_stale_temporaries(path):
    """The temporary files of `path` left by writers of this machine that died mid-write (kill -9); never those
    of a writer still running, nor another machine's (on a shared disk)."""
    if os.name == "nt":  # os.kill(pid, 0) would end the process there
        return
    prefix = temporary_prefix(path)
    for tmp in path.parent.glob(f"{prefix}*.tmp"):
        pid = tmp.name[len(prefix):].split(".")[0]
        if pid.isdigit() and not process_exists(int(pid)):
            tmp.unlink(missing_ok=True)


def process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def progress_bars():
    """Progress bars on a terminal only: in a log file or a pipe they become thousands of carriage returns, and the
    scripts print one line per epoch or image there anyway."""
    return sys.stderr.isatty()


def count(number, noun):
    """'1 image', '3 images'."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def derived_seed(*numbers):
    """One 63-bit seed from several integers (seed, epoch, rank), well mixed."""
    return int(np.random.SeedSequence(numbers).generate_state(1, np.uint64)[0] >> np.uint64(1))


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_states():
    """The Python, NumPy, torch and every GPU's CUDA random states, as plain lists and tensors
    (weights_only-loadable)."""
    python = random.getstate()
    numpy = np.random.get_state(legacy=False)
    return {"python": list(python[1]), "python_gauss": python[2],
            "numpy_key": numpy["state"]["key"].tolist(), "numpy_pos": int(numpy["state"]["pos"]),
            "numpy_gauss": [int(numpy["has_gauss"]), float(numpy["gauss"])], "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}


def set_rng_states(states):
    random.setstate((3, tuple(states["python"]), states["python_gauss"]))
    np.random.set_state({"bit_generator": "MT19937", "has_gauss": states["numpy_gauss"][0],
                         "gauss": states["numpy_gauss"][1],
                         "state": {"key": np.array(states["numpy_key"], dtype=np.uint32),
                                   "pos": states["numpy_pos"]}})
    torch.set_rng_state(states["torch"])
    cuda = states["cuda"]
    if cuda is not None and torch.cuda.is_initialized():
        if isinstance(cuda, torch.Tensor):  # saved before every GPU's state was: the current GPU's alone
            torch.cuda.set_rng_state(cuda)
        else:  # the GPUs this machine has, of those saved
            torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
