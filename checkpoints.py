"""Checkpoints: written atomically, read safely (weights_only=True), and the model one describes rebuilt."""
import os
import pickle
import tempfile
from pathlib import Path

import torch

from errors import CheckpointError, one_line

CHECKPOINT_KEYS = ("model", "model_args", "classes", "mask_values", "normalize")


def save_checkpoint(state, path):
    """Write to a temporary file in the same folder, then rename: a crash mid-save leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a save that was killed (kill -9)
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files; checkpoints follow the umask
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(path, map_location="cpu"):
    """Load one of our checkpoints with weights_only=True; CheckpointError with a one-line reason otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message would suggest weights_only=False: the unsafe way
        if "global" not in str(e).lower():  # "Unsupported global", "unsupported GLOBAL ... is blocked"
            raise CheckpointError(f"'{path}' is not a readable PyTorch checkpoint (not a file torch.save wrote, or "
                                  f"a damaged one)") from None
        raise CheckpointError(f"'{path}' is not a checkpoint written by train.py: it holds Python objects other than "
                              f"tensors and plain values, which could run code when loaded, so it was refused for "
                              f"safety") from None
    except Exception as e:
        raise CheckpointError(f"'{path}' is not a readable PyTorch checkpoint ({one_line(e, 120)})") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"'{path}' is not a checkpoint written by train.py (missing: {', '.join(missing)})")
    return state


def newest_checkpoint(root="checkpoints", name="best.pth"):
    """The most recently written `name` under `root`, or None."""
    found = list(Path(root).glob(f"**/{name}"))
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def find_checkpoint(path=None, root="checkpoints"):
    """`path`, or the newest best.pth under `root` (saying which); CheckpointError when there is none."""
    if path is not None:
        return Path(path)
    path = newest_checkpoint(root)
    if path is None:
        raise CheckpointError(f"no -m/--model given and no best.pth under {root}/; train a model first")
    print(f"using the newest checkpoint, {path}")
    return path


def load_model(path, device="cpu"):
    """Rebuild the model a checkpoint describes, in eval mode; returns (model, checkpoint).
    CheckpointError with one line when the file is not a checkpoint of ours or its weights do not fit."""
    from model import build_model

    checkpoint = load_checkpoint(path)
    try:
        model = build_model(checkpoint["model_args"])
        model.load_state_dict(checkpoint["model"])
    except (ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"'{path}' holds a model this code cannot rebuild ({one_line(e)})") from None
    return model.to(device).eval(), checkpoint
