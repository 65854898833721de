"""From uint8 images to class scores and labels: the one inference path that train, eval and predict share."""
import torch
import torch.nn.functional as F
from tqdm import tqdm

from metrics import ConfusionMatrix
from model import build_model
from utils import load_checkpoint


def preprocess(images, normalize):
    """uint8 Bx C xHxW (on any device) -> normalised float, with the mean and std saved in the checkpoint."""
    mean = torch.tensor(normalize["mean"], device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(normalize["std"], device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255 - mean) / std


def load_model(path, device="cpu"):
    """Rebuild the model a checkpoint describes, in eval mode; returns (model, checkpoint)."""
    checkpoint = load_checkpoint(path)
    model = build_model(checkpoint["model_args"])
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), checkpoint


def probabilities(logits):
    """Sigmoid for one logit (foreground probability), softmax over classes otherwise."""
    return torch.sigmoid(logits) if logits.shape[1] == 1 else logits.softmax(1)


@torch.inference_mode()
def predict_probs(model, images, normalize, scale=1.0):
    """uint8 images B x C x H x W -> class probabilities B x K x H x W at the input size.

    `scale` resizes the input before the forward pass (e.g. 0.5 for a model trained on half-size images);
    the scores are resized back, so labels always have the input's size.
    """
    height, width = images.shape[-2:]
    x = preprocess(images, normalize)
    if scale != 1.0:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
    probs = probabilities(model(x).float())
    if probs.shape[-2:] != (height, width):
        probs = F.interpolate(probs, size=(height, width), mode="bilinear", align_corners=False)
    return probs


def probs_to_labels(probs, threshold=0.5):
    """One channel: foreground where the probability exceeds `threshold`; several: argmax."""
    if probs.shape[1] == 1:
        return (probs[:, 0] > threshold).long()
    return probs.argmax(1)


def evaluate(model, loader, num_classes, normalize, ignore_index, device, distributed=False):
    """Scores over the whole loader from one confusion matrix. distributed=True: each process holds a shard
    of the set; the matrices are summed over the processes and only rank 0 draws a progress bar."""
    model.eval()
    confusion = ConfusionMatrix(max(num_classes, 2), ignore_index, device)
    quiet = distributed and torch.distributed.get_rank() > 0
    for images, masks in tqdm(loader, desc="val", leave=False, disable=quiet):
        probs = predict_probs(model, images.to(device), normalize)
        confusion.update(probs_to_labels(probs), masks.to(device))
    if distributed:
        confusion.reduce_from_all_processes()
    return confusion.compute()
