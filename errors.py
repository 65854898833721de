"""The errors the library raises for bad input. Each message is one line that names the file, flag or value
at fault and how to fix it; the scripts print it as `error: ...` and exit with status 1."""
import re


class UserError(Exception):
    """Bad input from the user (a flag, a file, a dataset), as opposed to a bug."""


class ConfigError(UserError, ValueError):
    """An impossible flag value, or flags that do not go together."""


class DatasetError(UserError, ValueError):
    """Bad or missing data."""


class ImageReadError(DatasetError):
    """A file that is missing or that PIL cannot decode."""


class ColourMaskError(DatasetError):
    """A mask whose pixels hold colours where class values were expected."""


class CheckpointError(UserError):
    """A checkpoint file that is missing, unreadable, not one of ours, or does not fit its architecture."""


class EncoderWeightsError(UserError):
    """Pretrained encoder weights that cannot be downloaded or read."""


def check_at_least(minimum, **values):
    """ConfigError naming the first flag (given as dest=value) below `minimum`."""
    for name, value in values.items():
        if value < minimum:
            need = "cannot be negative" if minimum == 0 else f"must be at least {minimum}"
            raise ConfigError(f"--{name.replace('_', '-')} {need}, got {value:g}")


MAX_SEED = 2 ** 63 - 1  # seeds are mixed into 63-bit ones (utils.derived_seed); torch takes at most 2^64 - 1


def check_seeds(**values):
    """ConfigError naming the first seed flag (given as dest=value) outside [0, MAX_SEED]."""
    for name, value in values.items():
        if not 0 <= value <= MAX_SEED:
            raise ConfigError(f"--{name.replace('_', '-')} must be a whole number from 0 to 2^63 - 1 "
                              f"({MAX_SEED}), got {value}")


def one_line(error, limit=200):
    """An exception's message on one line (its lines joined), cut to `limit` characters; its type if empty."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def error_line(error):
    """The message of a UserError, also one re-raised by a DataLoader worker: torch appends the worker's
    traceback and ends with the original 'module.Class: message' line, which is the one kept."""
    lines = str(error).strip().splitlines()
    if len(lines) > 1 and "Traceback" in str(error):
        return re.sub(r"^[\w.]+: ", "", lines[-1])
    return " ".join(line.strip() for line in lines)
