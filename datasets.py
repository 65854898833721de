"""Dataset readers. Every dataset yields (image uint8 CxHxW, mask int64 HxW holding class indices) and carries
`classes`, `mask_values` (class index -> value in the mask files) and `ignore_index`.
Normalisation happens on the device, in inference.preprocess, so loaders move compact uint8 tensors."""
import argparse
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

IGNORE_INDEX = 255


class ImageReadError(Exception):
    """A file that is missing or that PIL cannot decode; the message names it."""


def read_image(path):
    """Any image file -> uint8 RGB tensor 3xHxW: EXIF orientation applied; grey, RGBA and 16-bit converted."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                # 16-bit and float pixels: scale the range to 8 bits instead of clipping it.
                pixels = np.asarray(image, dtype=np.float32)
                top = 65535.0 if pixels.max() > 255 else 255.0
                image = Image.fromarray((pixels * (255.0 / top)).clip(0, 255).astype(np.uint8))
            array = np.array(image.convert("RGB"))
    except FileNotFoundError:
        raise ImageReadError(f"'{path}' does not exist") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"'{path}' is not an image file that PIL can read") from None
    except (OSError, ValueError) as e:
        raise ImageReadError(f"'{path}' could not be decoded, the file may be corrupt ({e})") from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class Shapes(torch.utils.data.Dataset):
    """Synthetic circles, squares and triangles on textured, noisy backgrounds, made on the fly.

    Item i of a split is a pure function of (seed, split, i): no files, identical on every machine.
    Shape colours are random, so the classes differ by geometry alone.
    """

    classes = ["background", "circle", "square", "triangle"]
    mask_values = [0, 1, 2, 3]
    ignore_index = IGNORE_INDEX

    def __init__(self, length=1000, image_size=64, seed=0, split="train"):
        self.length, self.image_size, self.seed = length, image_size, seed
        self.split_id = {"train": 0, "val": 1, "test": 2}[split]

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(index)
        image, mask = self.render(np.random.default_rng([self.seed, self.split_id, index]))
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(mask).long()

    def render(self, rng):
        s = self.image_size
        # Low-frequency colour texture: a coarse random grid, bilinearly enlarged, plus stripes.
        grid = rng.integers(0, 256, (rng.integers(2, 6), rng.integers(2, 6), 3), dtype=np.uint8)
        background = np.asarray(Image.fromarray(grid).resize((s, s), Image.BILINEAR), dtype=np.float32)
        yy, xx = np.mgrid[0:s, 0:s]
        angle, period = rng.uniform(0, math.pi), rng.uniform(4, 16)
        stripes = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
        background += 25 * stripes[..., None]
        image = Image.fromarray(background.clip(0, 255).astype(np.uint8))
        mask = Image.new("L", (s, s), 0)
        draw_image, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
        for _ in range(rng.integers(1, 5)):
            label = int(rng.integers(1, len(self.classes)))
            r = rng.uniform(0.08, 0.2) * s
            cx, cy = rng.uniform(r, s - r, size=2)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            if label == 1:
                points = [cx - r, cy - r, cx + r, cy + r]
                draw_image.ellipse(points, fill=colour)
                draw_mask.ellipse(points, fill=label)
            else:
                corners = 4 if label == 2 else 3
                start = rng.uniform(0, 2 * math.pi)
                points = [(cx + r * math.cos(start + 2 * math.pi * k / corners),
                           cy + r * math.sin(start + 2 * math.pi * k / corners)) for k in range(corners)]
                draw_image.polygon(points, fill=colour)
                draw_mask.polygon(points, fill=label)
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 12, (s, s, 3))
        return noisy.clip(0, 255).astype(np.uint8), np.array(mask, dtype=np.uint8)


DATASETS = ["shapes"]


def add_dataset_args(parser):
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="shapes", choices=DATASETS,
                       help="dataset to read; 'shapes' is synthetic and needs no download")
    group.add_argument("--image-size", type=int, default=64, help="side of the synthetic shapes images")
    group.add_argument("--num-train", type=int, default=2000, help="synthetic training images")
    group.add_argument("--num-val", type=int, default=200, help="synthetic validation images")
    group.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data")
    return group


def check_dataset_args(args):
    for name in ("image_size", "num_train", "num_val"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")


def build_dataset(args, split):
    """The dataset that `args` (from add_dataset_args) names, for 'train' or 'val'."""
    if args.dataset == "shapes":
        length = args.num_train if split == "train" else args.num_val
        return Shapes(length, args.image_size, args.data_seed, split)
    raise ValueError(f"unknown dataset '{args.dataset}' (known: {', '.join(DATASETS)})")


def main():
    parser = argparse.ArgumentParser(description="Write synthetic shapes images (and their masks) to a folder.")
    parser.add_argument("--out", default="samples", help="output folder")
    parser.add_argument("--count", type=int, default=2, help="number of images")
    parser.add_argument("--image-size", type=int, default=256, help="side of each image")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Shapes(args.count, args.image_size, args.seed, "test")
    for i in range(args.count):
        image, mask = data[i]
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(out / f"shapes_{i}.png")
        Image.fromarray(mask.numpy().astype(np.uint8) * 80).save(out / f"shapes_{i}_truth.png")
        print(f"wrote {out / f'shapes_{i}.png'}")


if __name__ == "__main__":
    main()
