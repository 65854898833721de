"""The normalisation of images that are not 8-bit RGB, as nnU-Net normalises each modality: per-channel statistics
of the training set's raw values, clipped to their 0.5 and 99.5 percentiles, then the mean and standard deviation
of the clipped values. Computed once from a sample of pixels, cached (keyed by the files' sizes and times) and
saved in the checkpoint as `normalize`, which inference.preprocess applies."""
import hashlib
import json
import sys

import numpy as np

from images import read_pixels
from model import input_normalization
from pairs import cache_folder, file_stamp
from utils import replaced_atomically

PERCENTILES = (0.5, 99.5)
PIXELS_PER_IMAGE = 10_000  # a random sample of each image's pixels, as nnU-Net samples each case's
MOST_IMAGES = 500  # a larger training set is sampled: 5 M pixels pin its percentiles down


def input_normalization_for(form, image_paths, model_args):
    """The checkpoint's `normalize` for images of `form` (images.describe_form): for 8-bit RGB (None) that of the
    encoder's pretrained weights, or ImageNet's (model.input_normalization); for any other form the training
    images' own statistics (channel_statistics, cached) and the form itself."""
    if form is None:
        return input_normalization(model_args)
    return {**cached_statistics(image_paths, tuple(form)), "form": list(form)}


def channel_statistics(image_paths, form):
    """{'low', 'high', 'mean', 'std'}: one value per channel of the images' raw values. low and high are the 0.5
    and 99.5 percentiles of the pixels (a seeded sample of PIXELS_PER_IMAGE of each larger image, and of at most
    MOST_IMAGES images); mean and std those of the pixels clipped to [low, high]. A constant channel gets a std
    of 1, not 0."""
    rng = np.random.default_rng(0)
    paths = sorted(image_paths)
    if len(paths) > MOST_IMAGES:
        paths = [paths[i] for i in sorted(rng.choice(len(paths), MOST_IMAGES, replace=False))]
    samples = []
    for path in paths:
        pixels = read_pixels(path)[0].reshape(form[0], -1)
        if pixels.shape[1] > PIXELS_PER_IMAGE:
            pixels = pixels[:, rng.integers(0, pixels.shape[1], PIXELS_PER_IMAGE)]
        samples.append(pixels)
    values = np.concatenate(samples, axis=1).astype(np.float64)
    low, high = np.percentile(values, PERCENTILES, axis=1)
    clipped = np.clip(values, low[:, None], high[:, None])
    std = clipped.std(axis=1)
    return {"low": low.tolist(), "high": high.tolist(), "mean": clipped.mean(axis=1).tolist(),
            "std": np.where(std > 0, std, 1.0).tolist()}


def cached_statistics(image_paths, form):
    """channel_statistics, read from the cache when the same files (same sizes and times) were measured before."""
    listing = sorted([str(path.resolve()), *file_stamp(path)] for path in image_paths)
    key = hashlib.sha1(json.dumps([list(form), PERCENTILES, listing]).encode()).hexdigest()[:16]
    path = cache_folder() / f"stats-{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    statistics = channel_statistics(image_paths, form)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(path) as f:  # every torchrun process may write it: each its own temporary
            f.write(json.dumps(statistics).encode())
    except OSError as e:
        print(f"note: could not cache the image statistics in '{path}' ({e}); they will be measured again",
              file=sys.stderr)
    return statistics
