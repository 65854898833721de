"""What the classes of folder data are called and coloured: a colour table for colour-coded masks (--mask-colors,
`R G B name` a line, the format CamVid ships) and a list of class names (--class-names, one a line)."""
from dataclasses import dataclass
from pathlib import Path

from errors import ConfigError


@dataclass
class ColourTable:
    """The classes of colour-coded masks in order: their colours ([R, G, B]) and names, and the void colour (the
    line named 'void', in any case), or None."""
    colours: list
    names: list
    void: list | None = None


def table_lines(path, flag):
    """(line number, words) of each line of a text file that is not blank or a '#' comment."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{flag} '{path}' cannot be read ({type(e).__name__}: {e})") from None
    lines = [(number, line.split()) for number, line in enumerate(text.splitlines(), 1)]
    lines = [(number, words) for number, words in lines if words and not words[0].startswith("#")]
    if not lines:
        raise ConfigError(f"{flag} '{path}' is empty")
    return lines


def read_colour_table(path):
    """A ColourTable from a file of lines `R G B name` (0-255 each; the name may hold spaces)."""
    colours, names, void = [], [], None
    for number, words in table_lines(path, "--mask-colors"):
        try:
            colour = [int(word) for word in words[:3]]
        except ValueError:
            colour = []
        if len(words) < 4 or len(colour) != 3 or not all(0 <= c <= 255 for c in colour):
            raise ConfigError(f"--mask-colors '{path}' line {number} is '{' '.join(words)}'; each line must be "
                              f"'R G B name' with R, G and B in 0-255 (as '64 128 64 Animal')")
        if colour in colours or colour == void:
            raise ConfigError(f"--mask-colors '{path}' line {number}: the colour {' '.join(words[:3])} is listed "
                              f"twice; give each class its own colour")
        name = " ".join(words[3:])
        if name.lower() == "void":
            void = colour
        else:
            colours.append(colour)
            names.append(name)
    if len(colours) < 2:
        raise ConfigError(f"--mask-colors '{path}' lists {len(colours)} class colour(s) besides void; a "
                          f"segmentation needs at least 2")
    return ColourTable(colours, names, void)


def read_class_names(path):
    """The class names of a file, one a line, in class order."""
    return [" ".join(words) for _, words in table_lines(path, "--class-names")]


def check_class_names(names, count, path):
    """ConfigError unless `names` (read from `path`, or None: the dataset's own) names `count` classes."""
    if names is not None and len(names) != count:
        where = f"--class-names '{path}'" if path else "the checkpoint's class names"
        raise ConfigError(f"{where} names {len(names)} classes but the data has {count}; give one name a line, in "
                          f"class order (the order of --mask-values, of --mask-colors, or of the sorted mask "
                          f"values)")
