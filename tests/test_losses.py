"""Class-weighted cross-entropy / BCE and soft Dice against independent computations."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from losses import balanced_class_weights, cross_entropy_loss, dice_loss, segmentation_loss


def test_weighted_cross_entropy_matches_torch_and_numpy():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 5, 6), torch.randint(0, 3, (2, 5, 6))
    target[0, :2] = 255
    weights = torch.tensor([0.2, 1.0, 3.0])
    expected = F.cross_entropy(logits, target, weight=weights, ignore_index=255)
    assert cross_entropy_loss(logits, target, 255, weights).item() == pytest.approx(expected.item(), rel=1e-6)
    # numpy: sum over valid pixels of w[y] * -log softmax[y], over the sum of w[y]
    x, y = logits.permute(0, 2, 3, 1).reshape(-1, 3).double().numpy(), target.flatten().numpy()
    keep = y != 255
    log_p = x - np.log(np.exp(x).sum(1, keepdims=True))
    w = weights.double().numpy()[y[keep]]
    manual = (w * -log_p[keep, y[keep]]).sum() / w.sum()
    assert segmentation_loss(logits, target, "ce", 255, weights).item() == pytest.approx(manual, rel=1e-6)


def test_weighted_bce_for_one_logit():
    logits = torch.tensor([[[[2.0, -1.0], [0.5, 3.0]]]])
    target = torch.tensor([[[1, 0], [255, 0]]])
    weights = torch.tensor([1.0, 4.0])  # background, foreground
    # hand-worked: pixels (x=2, y=1, w=4), (x=-1, y=0, w=1), (x=3, y=0, w=1); the third is ignored
    bce = [np.log1p(np.exp(-2.0)), np.log1p(np.exp(-1.0)), np.log1p(np.exp(3.0))]
    expected = (4 * bce[0] + bce[1] + bce[2]) / 6
    assert cross_entropy_loss(logits, target, 255, weights).item() == pytest.approx(expected, rel=1e-6)
    assert cross_entropy_loss(logits, target, 255).item() == pytest.approx(np.mean(bce), rel=1e-6)


def test_all_pixels_ignored_gives_zero_not_nan():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    target = torch.full((1, 4, 4), 255)
    for kind in ("ce", "dice", "ce+dice"):
        loss = segmentation_loss(logits, target, kind)
        assert loss.item() == 0.0
        loss.backward()  # still differentiable


def test_dice_averages_over_classes_present_in_the_batch():
    # 3 classes, class 2 absent from the truth. Probabilities given directly through log-probabilities.
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])  # 4 pixels
    logits = probs.log().T.reshape(1, 3, 2, 2)
    target = torch.tensor([[[0, 1], [0, 1]]])
    p = probs.numpy()
    dice0 = (2 * (0.7 + 0.6) + 1) / (p[:, 0].sum() + 2 + 1)
    dice1 = (2 * (0.8 + 0.2) + 1) / (p[:, 1].sum() + 2 + 1)
    assert dice_loss(logits, target).item() == pytest.approx(1 - (dice0 + dice1) / 2, rel=1e-5)


def test_dice_for_one_logit_counts_background_when_foreground_is_absent():
    logits = torch.tensor([[[[-2.0, 1.0]]]])  # foreground probabilities sigmoid(-2), sigmoid(1)
    target = torch.tensor([[[0, 0]]])
    fg = torch.sigmoid(logits).flatten().numpy()
    background = 1 - fg
    dice_bg = (2 * background.sum() + 1) / (background.sum() + 2 + 1)  # foreground absent: not averaged
    assert dice_loss(logits, target).item() == pytest.approx(1 - dice_bg, rel=1e-5)


def test_balanced_class_weights_by_hand():
    # shares 0.75 and 0.25: 1/sqrt gives 1.1547 and 2, whose pixel-weighted mean is 0.866 + 0.5 = 1.366
    assert balanced_class_weights([0.75, 0.25]) == pytest.approx([1.1547 / 1.366, 2 / 1.366], rel=1e-4)
    weights = balanced_class_weights([0.6, 0.0, 0.4])  # a class the sample never saw weighs as the rarest seen
    assert weights[1] == weights[2] > weights[0]
    assert 0.6 * weights[0] + 0.4 * weights[2] == pytest.approx(1.0)
    assert balanced_class_weights([0.0, 0.0]) == [1.0, 1.0]
