"""One confusion matrix for every segmentation score, and the training losses."""
import torch
import torch.nn.functional as F


class ConfusionMatrix:
    """Accumulates a num_classes x num_classes matrix (rows: truth, columns: prediction) over a whole set.

    Every score is derived from the summed matrix, never averaged over batches, so a score over a set
    equals the score of the set taken as one image. Pixels whose truth is `ignore_index` are skipped.
    """

    def __init__(self, num_classes, ignore_index=255, device="cpu"):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred, target):
        """pred and target: integer class maps of the same shape."""
        pred, target = pred.flatten().to(self.mat.device), target.flatten().to(self.mat.device)
        keep = target != self.ignore_index
        pred, target = pred[keep].long(), target[keep].long()
        if target.numel() and (target.min() < 0 or target.max() >= self.num_classes):
            raise ValueError(f"target holds class {int(target.max())} but there are {self.num_classes} classes "
                             f"(ignore index {self.ignore_index}); check the mask values")
        n = self.num_classes
        self.mat += torch.bincount(target * n + pred, minlength=n * n).reshape(n, n)

    def reduce_from_all_processes(self):
        """Sum the matrix over the processes of a torch.distributed run, so every rank scores the whole set."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.mat)

    def reset(self):
        self.mat.zero_()

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


def dice_loss(logits, target, ignore_index=255, eps=1.0):
    """Soft Dice loss over the whole batch, averaged over the classes present in the batch's valid pixels.

    A class absent from the batch would otherwise score (0 + eps) / (predicted mass + eps), a large loss for
    the faint probability every class keeps, however right the prediction. One logit (binary, target 0/1)
    counts as two classes, background 1 - p and foreground p, so an image without foreground still counts.
    """
    logits = logits.float()
    valid = (target != ignore_index).unsqueeze(1)
    target = torch.where(valid.squeeze(1), target, 0)
    if logits.shape[1] == 1:
        foreground = torch.sigmoid(logits)
        probs = torch.cat([1 - foreground, foreground], 1)
    else:
        probs = logits.softmax(1)
    one_hot = F.one_hot(target, probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    probs, one_hot = probs * valid, one_hot * valid
    dims = (0, 2, 3)
    inter = (probs * one_hot).sum(dims)
    truth = one_hot.sum(dims)
    dice = (2 * inter + eps) / (probs.sum(dims) + truth + eps)
    present = truth > 0
    if not present.any():  # every pixel ignored: no signal, but keep the graph
        return logits.sum() * 0
    return 1 - dice[present].mean()


def cross_entropy_loss(logits, target, ignore_index=255, class_weights=None):
    """Cross-entropy over the valid pixels (BCE-with-logits for one logit), weighted by the true class's
    `class_weights` entry (background first; two entries for one logit) and normalised by the weights' sum,
    as torch's cross_entropy does. A batch with no valid pixel gives 0, not NaN."""
    logits = logits.float()
    valid = target != ignore_index
    target = torch.where(valid, target, 0)
    if logits.shape[1] > 1:
        per_pixel = F.cross_entropy(logits, target, reduction="none")
    else:
        per_pixel = F.binary_cross_entropy_with_logits(logits[:, 0], target.float(), reduction="none")
    weights = valid.float() if class_weights is None else class_weights[target] * valid
    return (weights * per_pixel).sum() / weights.sum().clamp(min=1e-12)


def segmentation_loss(logits, target, kind="ce", ignore_index=255, class_weights=None):
    """kind: 'ce' (BCE for one logit), 'dice', or 'ce+dice'."""
    loss = 0.0
    if kind in ("ce", "ce+dice"):
        loss = cross_entropy_loss(logits, target, ignore_index, class_weights)
    if kind in ("dice", "ce+dice"):
        loss = loss + dice_loss(logits, target, ignore_index)
    return loss
