"""Checkpoints: written atomically, read safely (weights_only=True), and the model one describes rebuilt."""
import dataclasses
import math
import pickle
from pathlib import Path

import torch

from errors import CheckpointError, one_line
from recipe import Plan
from utils import replaced_atomically

CHECKPOINT_KEYS = ("model", "model_args", "classes", "mask_values", "normalize")
# What only --resume needs: AdamW's two moments alone take twice the weights' bytes. last.pth holds them,
# best.pth (the file people share, evaluate, export and --load) does not.
RESUME_ONLY_KEYS = ("optimizer", "scheduler", "scaler", "rng")


def without_resume_state(state):
    """A checkpoint's state less RESUME_ONLY_KEYS: the weights, the model's config, classes, normalisation and the
    run's arguments (its data description), all that eval.py, predict.py, export.py, hubconf and --load read."""
    return {key: value for key, value in state.items() if key not in RESUME_ONLY_KEYS}


def save_checkpoint(state, path):
    """Write to a temporary file in the same folder, then rename: a save that fails (a full disk) or is killed
    leaves the old file intact. CheckpointError with one line when the save fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with replaced_atomically(path) as f:
            torch.save(state, f)
    except (OSError, RuntimeError) as e:  # a full disk: OSError from the file, RuntimeError from torch's writer
        kept = ("the checkpoint saved there before is intact" if path.is_file()
                else "no checkpoint was saved there yet")
        raise CheckpointError(f"saving the checkpoint '{path}' failed ({one_line(e, 120)}: is the disk full?); "
                              f"{kept}") from None


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
    check_contents(state, path)
    return state


def check_contents(state, path):
    """CheckpointError for what would otherwise give wrong numbers without a word: mask values that are not
    whole numbers, a normalisation that divides by zero, weights that hold NaN or infinities."""
    values = state["mask_values"]
    if not isinstance(values, (list, tuple)) or not all(whole_number(v) or isinstance(v, (list, tuple)) and len(v) == 3
                                                        and all(map(whole_number, v)) for v in values):
        raise CheckpointError(f"'{path}' is damaged: its mask values must be whole numbers (or R G B colours of them), "
                              f"got {values}")
    if not valid_normalization(state["normalize"]):
        raise CheckpointError(f"'{path}' is damaged: its input normalisation must hold one finite mean and one "
                              f"positive std per channel, got {state['normalize']}")
    weights = state["model"]
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        raise CheckpointError(f"'{path}' is damaged: its 'model' entry is not a state_dict of tensors")
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"'{path}' holds weights that are not finite (NaN or infinite values in {name}), "
                                  f"from a run that diverged: use an earlier checkpoint or train again")


def whole_number(value):
    return isinstance(value, int) and not isinstance(value, bool)


def valid_normalization(normalize):
    """{"mean": [...], "std": [...]}: as many finite means as finite positive stds (a zero std makes NaNs)."""
    if not isinstance(normalize, dict):
        return False
    mean, std = normalize.get("mean"), normalize.get("std")
    return finite_numbers(mean) and finite_numbers(std) and len(mean) == len(std) and min(std) > 0


def finite_numbers(values):
    return isinstance(values, (list, tuple)) and len(values) > 0 and all(
        isinstance(x, (int, float)) and math.isfinite(x) for x in values)


RESUME_KEYS = ("optimizer", "scheduler", "scaler", "rng", "epoch", "best_score", "metrics", "epoch_progress", "step")


def check_resumable(state, path):
    """CheckpointError unless `state` holds all that continuing its run needs (train.py --resume): the training
    state, and a plan (when it has one) that this code's Plan can be rebuilt from."""
    missing = [key for key in RESUME_KEYS if key not in state]
    plan = state.get("plan") or {}
    fields = {field.name: field for field in dataclasses.fields(Plan)}
    if plan:
        missing += [f"plan.{name}" for name, field in fields.items()
                    if field.default is dataclasses.MISSING and name not in plan]
    unknown = sorted(set(plan) - set(fields))
    if missing and set(missing) == set(RESUME_ONLY_KEYS):  # a best.pth: the run's last.pth continues it
        raise CheckpointError(f"'{path}' holds the model without the optimizer state that --resume needs; resume "
                              f"from the run's last.pth: --resume {Path(path).with_name('last.pth')} (or start a new "
                              f"run from these weights with --load {path})")
    if missing or unknown:
        what = f"lacks {', '.join(missing)}" if missing else f"has a plan with unknown field(s) {', '.join(unknown)}"
        raise CheckpointError(f"'{path}' cannot be continued: it {what}, so this train.py did not save it; start a "
                              f"new run from its weights with --load {path}")


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
