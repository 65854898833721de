"""A training run's folder: its name, its removal when the run saved nothing, metrics.csv, curves.png,
TensorBoard events and sample grids."""
import csv
import itertools
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from drawing import plot_curves, sample_grid, viewable
from errors import ConfigError
from inference import predict_probs_or_tile, probs_to_labels
from utils import warn

try:
    from torch.utils.tensorboard import SummaryWriter
except ImportError:  # TensorBoard is optional
    SummaryWriter = None


@contextmanager
def removed_if_unsaved(run_dir):
    """A run folder this run created is removed if the run fails before saving a checkpoint in it."""
    try:
        yield
    except BaseException:
        if run_dir is not None and not any(run_dir.glob("*.pth")):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def check_run_name(name):
    """--name names one folder inside --checkpoint-dir: a path ('/abs', '..', 'a/b') would put the run elsewhere."""
    if name is not None and (Path(name).name != name or name in ("", ".", "..")):
        raise ConfigError(f"--name {name!r} is not a folder name: the run goes to --checkpoint-dir/<name>-<timestamp>; "
                          f"give a name without '/' (and pick the folder with --checkpoint-dir)")


def new_run_dir(checkpoint_dir, name):
    """<checkpoint_dir>/<name>-<timestamp>, created; runs started in the same second (even at the same moment,
    in two processes) get .1, .2, ... after the timestamp, never the same folder."""
    first = Path(checkpoint_dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    first.parent.mkdir(parents=True, exist_ok=True)
    for suffix in itertools.count():
        run_dir = first.with_name(f"{first.name}.{suffix}") if suffix else first
        try:
            run_dir.mkdir()  # atomic: of two runs making the same folder, one fails and takes the next suffix
            return run_dir
        except FileExistsError:
            continue


def number(text):
    """A metrics.csv cell: integer columns (epoch, step) stay integers across a resume."""
    return int(text) if text.lstrip("-").isdigit() else float(text)


class RunLog:
    """metrics.csv (one row per epoch), curves.png, TensorBoard events when installed. Rank 0 only.
    A resumed run keeps the rows of the epochs its checkpoint had finished."""

    def __init__(self, run_dir, metric, resumed_epoch=0):
        self.csv_path, self.curves_path, self.metric = run_dir / "metrics.csv", run_dir / "curves.png", metric
        self.history = []
        if resumed_epoch and self.csv_path.is_file():
            with open(self.csv_path, newline="") as f:
                rows = [{k: number(v) for k, v in row.items()} for row in csv.DictReader(f)]
            self.history = [row for row in rows if row["epoch"] <= resumed_epoch]
        self.rewrite()
        self.tensorboard = SummaryWriter(run_dir / "tensorboard") if SummaryWriter else None

    def rewrite(self):
        with open(self.csv_path, "w", newline="") as f:
            if self.history:
                writer = csv.DictWriter(f, fieldnames=list(self.history[0]))
                writer.writeheader()
                writer.writerows(self.history)

    def append(self, row):
        self.history.append(row)
        with open(self.csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if len(self.history) == 1:
                writer.writeheader()
            writer.writerow(row)
        plot_curves(self.history, self.curves_path, self.metric)
        if self.tensorboard:
            for key, value in row.items():
                self.tensorboard.add_scalar(key, value, int(row["epoch"]))
            self.tensorboard.flush()


def save_samples(model, dataset, normalize, scale, amp_dtype, device, path, count=4):
    """image | truth | prediction for the first `count` images of `dataset` (whole validation images)."""
    model.eval()
    images, truths, _ = zip(*(dataset[i] for i in range(min(count, len(dataset)))))
    predictions = [probs_to_labels(predict_probs_or_tile(model, image[None].to(device), normalize, log=warn,
                                                         scale=scale, amp_dtype=amp_dtype)[0])[0].cpu()
                   for image in images]
    path.parent.mkdir(exist_ok=True)
    shown = [viewable(image, normalize) for image in images]
    sample_grid(shown, truths, predictions, dataset.classes, dataset.mask_values,
                grey_void=getattr(dataset, "rois", None) is not None).save(path)
