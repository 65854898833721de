"""Synthetic shapes: a dataset made on the fly, so that a fresh clone can train and score a model with no
download. `python synthetic.py --out DIR` writes a few images and their masks."""
import argparse
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from drawing import label_image
from errors import ConfigError, check_at_least, check_seeds
from metrics import IGNORE_INDEX
from utils import count


class Shapes(torch.utils.data.Dataset):
    """Synthetic circles, squares and triangles on textured, noisy backgrounds, made on the fly.

    Item i of a split is a pure function of (seed, split, i): no files, identical on every machine.
    Shape colours are random, so the classes differ by geometry alone. `with_names` adds a name to each item:
    (image, mask, '<split>_<i>').
    """

    classes = ["background", "circle", "square", "triangle"]
    mask_values = [0, 1, 2, 3]
    ignore_index = IGNORE_INDEX

    def __init__(self, length=1000, image_size=64, seed=0, split="train", with_names=False):
        self.length, self.image_size, self.seed, self.split = length, image_size, seed, split
        self.with_names = with_names
        self.split_id = {"train": 0, "val": 1, "test": 2}[split]

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(index)
        image, mask = self.render(np.random.default_rng([self.seed, self.split_id, index]))
        item = torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(mask).long()
        return (*item, f"{self.split}_{index:05d}") if self.with_names else item

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



def main(argv=None):
    parser = argparse.ArgumentParser(description="Write synthetic shapes images to OUT/images and their true masks "
                                                 "(class ids in a palette PNG) to OUT/masks: a folder that eval.py "
                                                 "scores as it is (python eval.py --images OUT/images --masks "
                                                 "OUT/masks, or --out eval for eval.py's own folder).")
    parser.add_argument("--out", default="samples", help="output folder")
    parser.add_argument("--count", type=int, default=2, help="number of images")
    parser.add_argument("--image-size", type=int, default=256, help="side of each image")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    args = parser.parse_args(argv)
    try:
        check_at_least(1, count=args.count, image_size=args.image_size)
        check_seeds(seed=args.seed)
    except ConfigError as e:
        parser.error(str(e))
    images, masks = Path(args.out) / "images", Path(args.out) / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(exist_ok=True)
    data = Shapes(args.count, args.image_size, args.seed, "test")
    for i in range(args.count):
        image, mask = data[i]
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(images / f"shapes_{i}.png")
        label_image(mask.numpy(), Shapes.mask_values).save(masks / f"shapes_{i}.png")
    print(f"wrote {count(args.count, 'image')} to {images} and their masks to {masks}")


if __name__ == "__main__":
    main()
