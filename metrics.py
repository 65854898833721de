"""One confusion matrix for every segmentation score, and how the reports name and print the scores."""
import math

import torch

from errors import DatasetError

IGNORE_INDEX = 255  # class index of void pixels in every mask tensor: skipped by the losses and the scores


class ConfusionMatrix:
    """Accumulates a num_classes x num_classes matrix (rows: truth, columns: prediction) over a whole set.

    Every score is derived from the summed matrix, never averaged over batches, so a score over a set
    equals the score of the set taken as one image. Pixels whose truth is `ignore_index` are skipped.
    """

    def __init__(self, num_classes, ignore_index=IGNORE_INDEX, device="cpu"):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self.ignored = torch.zeros((), dtype=torch.int64, device=device)  # void pixels seen: not scored

    def update(self, pred, target):
        """pred and target: integer class maps of the same shape."""
        pred, target = pred.flatten().to(self.mat.device), target.flatten().to(self.mat.device)
        keep = target != self.ignore_index
        self.ignored += keep.numel() - keep.sum()  # stays on the device: no sync per batch
        pred, target = pred[keep].long(), target[keep].long()
        if target.numel() and (target.min() < 0 or target.max() >= self.num_classes):
            raise DatasetError(f"target holds class {int(target.max())} but there are {self.num_classes} classes "
                             f"(ignore index {self.ignore_index}); check the mask values")
        n = self.num_classes
        self.mat += torch.bincount(target * n + pred, minlength=n * n).reshape(n, n)

    def reduce_from_all_processes(self):
        """Sum the matrix over the processes of a torch.distributed run, so every rank scores the whole set."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.mat)

    def compute(self):
        """Scores as floats; per-class lists hold NaN for a class absent from both truth and prediction."""
        h = self.mat.double()
        tp = h.diag()
        truth, predicted = h.sum(1), h.sum(0)
        union = truth + predicted - tp
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        iou = torch.where(union > 0, tp / union, nan)
        dice = torch.where(truth + predicted > 0, 2 * tp / (truth + predicted), nan)
        class_acc = torch.where(truth > 0, tp / truth, nan)
        total = h.sum()
        freq = truth / total if total > 0 else truth
        present = ~iou.isnan()
        scores = {
            "pixel_acc": float(tp.sum() / total) if total > 0 else float("nan"),
            "mean_acc": float(class_acc.nanmean()),
            "miou": float(iou.nanmean()),
            "fwiou": float((freq[present] * iou[present]).sum()),
            "mean_dice": float(dice.nanmean()),
            "iou": iou.tolist(),
            "dice": dice.tolist(),
            "class_acc": class_acc.tolist(),
        }
        if self.num_classes == 2:  # binary tasks are judged on the foreground class alone
            scores.update(fg_iou=float(iou[1]), fg_dice=float(dice[1]))
        return scores


# The set-wide scores of ConfusionMatrix.compute, as eval.py's table and its HTML report name them.
SCORE_NAMES = [("pixel_acc", "pixel accuracy"), ("mean_acc", "mean class accuracy"), ("miou", "mIoU"),
               ("fwiou", "frequency-weighted IoU"), ("mean_dice", "mean Dice"), ("fg_iou", "foreground IoU"),
               ("fg_dice", "foreground Dice")]


def score_text(x):
    """A score to 4 decimals; 'n/a' for a class with no score (NaN, or None as read back from JSON)."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def absent_classes(metrics, classes):
    """Classes in neither the truth nor the predictions: no score, left out of the means."""
    return [name for name, iou in zip(classes, metrics["iou"]) if math.isnan(iou)]
