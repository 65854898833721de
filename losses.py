"""The training losses: cross-entropy (BCE for one logit), soft Dice, and their sum."""
import torch
import torch.nn.functional as F

from metrics import IGNORE_INDEX


def dice_loss(logits, target, ignore_index=IGNORE_INDEX, eps=1.0):
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


def cross_entropy_loss(logits, target, ignore_index=IGNORE_INDEX, class_weights=None):
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


def segmentation_loss(logits, target, kind="ce", ignore_index=IGNORE_INDEX, class_weights=None):
    """kind: 'ce' (BCE for one logit), 'dice', or 'ce+dice'."""
    loss = 0.0
    if kind in ("ce", "ce+dice"):
        loss = cross_entropy_loss(logits, target, ignore_index, class_weights)
    if kind in ("dice", "ce+dice"):
        loss = loss + dice_loss(logits, target, ignore_index)
    return loss


def balanced_class_weights(shares):
    """Cross-entropy weights from each class's share of the training pixels: 1 / sqrt(share), scaled so that the
    average pixel weighs 1 (SegNet's balancing, softened by the square root). A class of 0.6% of the pixels
    (the VNC stack's synapses) weighs 7x, the one of 74% 0.66x: a rare class is otherwise pushed down by the
    common ones faster than the few pixels it has can lift it. A class with no pixel in the sample weighs as the
    rarest one seen."""
    shares = torch.as_tensor(shares, dtype=torch.float64)
    seen = shares > 0
    if not seen.any():
        return [1.0] * len(shares)
    weights = torch.where(seen, shares.clamp(min=1e-12).rsqrt(), 0.0)
    weights[~seen] = weights.max()
    return (weights / (shares * weights).sum()).tolist()
