import math

import numpy as np
import pytest
import torch

from losses import dice_loss, segmentation_loss
from metrics import ConfusionMatrix


def test_hand_worked_example():
    # truth  pred
    # 0 0 1  0 1 1
    # 1 2 255 1 2 0   (255 is ignored)
    truth = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 0]])
    cm = ConfusionMatrix(3, ignore_index=255)
    cm.update(pred, truth)
    assert cm.mat.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]
    s = cm.compute()
    assert s["pixel_acc"] == pytest.approx(4 / 5)
    assert s["iou"] == pytest.approx([1 / 2, 2 / 3, 1.0])
    assert s["miou"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert s["dice"] == pytest.approx([2 / 3, 4 / 5, 1.0])
    assert s["class_acc"] == pytest.approx([1 / 2, 1.0, 1.0])
    assert s["mean_acc"] == pytest.approx(5 / 6)
    assert s["fwiou"] == pytest.approx(2 / 5 * 1 / 2 + 2 / 5 * 2 / 3 + 1 / 5 * 1.0)


def test_random_batches_against_sklearn():
    sk = pytest.importorskip("sklearn.metrics")  # an optional test dependency: skips this test alone
    rng = np.random.default_rng(0)
    n, cm = 6, ConfusionMatrix(6, ignore_index=255)
    truths, preds = [], []
    for _ in range(4):  # accumulate several batches: scores are over the whole set
        truth = rng.integers(0, n - 1, (2, 17, 23))  # class 5 never appears in the truth...
        truth[rng.random(truth.shape) < 0.1] = 255
        pred = rng.integers(0, n - 2, truth.shape)  # ...nor in the predictions, class 4 only in the truth
        cm.update(torch.from_numpy(pred), torch.from_numpy(truth))
        truths.append(truth.ravel()), preds.append(pred.ravel())
    truth, pred = np.concatenate(truths), np.concatenate(preds)
    keep = truth != 255
    truth, pred = truth[keep], pred[keep]
    expected = sk.confusion_matrix(truth, pred, labels=range(n))
    assert np.array_equal(cm.mat.numpy(), expected)
    s = cm.compute()
    present = [0, 1, 2, 3, 4]
    iou = sk.jaccard_score(truth, pred, labels=present, average=None)
    dice = sk.f1_score(truth, pred, labels=present, average=None)
    assert s["iou"][:5] == pytest.approx(iou.tolist())
    assert s["dice"][:5] == pytest.approx(dice.tolist())
    assert math.isnan(s["iou"][5]) and math.isnan(s["dice"][5])  # absent everywhere: n/a, not 0 or 1
    assert s["iou"][4] == 0.0  # in the truth, never predicted: a real 0
    assert s["miou"] == pytest.approx(iou.mean())
    assert s["pixel_acc"] == pytest.approx((truth == pred).mean())


def test_binary_foreground_scores():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 1, 0]))
    s = cm.compute()
    assert s["fg_iou"] == pytest.approx(1 / 3)
    assert s["fg_dice"] == pytest.approx(1 / 2)


def test_out_of_range_target_is_reported():
    with pytest.raises(ValueError, match="class 7"):
        ConfusionMatrix(3).update(torch.tensor([0]), torch.tensor([7]))


def test_dice_loss_perfect_and_ignored():
    target = torch.tensor([[[0, 1], [2, 255]]])
    logits = torch.nn.functional.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2).float() * 100
    logits[0, :, 1, 1] = torch.tensor([0.0, 100.0, 0.0])  # wrong, but on an ignored pixel
    assert dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-4)
    flipped = logits.roll(1, dims=1)  # every valid pixel wrong: per class (2*0 + 1) / (1 + 1 + 1) with eps=1
    assert dice_loss(flipped, target).item() == pytest.approx(1 - 1 / 3, abs=1e-4)


def test_losses_ignore_void_pixels():
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    voided = target.clone()
    voided[:, :4] = 255
    expected = torch.nn.functional.cross_entropy(logits[:, :, 4:], target[:, 4:])
    assert segmentation_loss(logits, voided, "ce").item() == pytest.approx(expected.item(), rel=1e-5)
    single = torch.randn(2, 1, 8, 8)
    binary = torch.randint(0, 2, (2, 8, 8))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(single[:, 0], binary.float())
    assert segmentation_loss(single, binary, "ce").item() == pytest.approx(bce.item(), rel=1e-5)
    combined = segmentation_loss(logits, target, "ce+dice")
    assert combined.item() == pytest.approx((segmentation_loss(logits, target, "ce")
                                             + dice_loss(logits, target)).item(), rel=1e-5)
