"""Segment images with a trained checkpoint. Example: python predict.py -m best.pth -i img.jpg -o mask.png"""
import argparse
import sys
from pathlib import Path

import torch

from datasets import ImageReadError, read_image
from inference import load_model, predict_probs, probs_to_labels
from utils import CheckpointError, label_image, newest_checkpoint, pick_device


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-m", "--model", default=None,
                   help="checkpoint file (default: the newest best.pth under checkpoints/)")
    p.add_argument("-i", "--input", nargs="+", required=True, help="image files")
    p.add_argument("-o", "--output", nargs="+", default=None,
                   help="output mask files, one per input (default: <input stem>_mask.png beside each input)")
    p.add_argument("-t", "--mask-threshold", type=float, default=0.5,
                   help="foreground probability threshold of single-logit models")
    p.add_argument("-s", "--scale", type=float, default=1.0, help="resize factor applied before the model")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    args = p.parse_args(argv)
    if args.output is not None and len(args.output) != len(args.input):
        p.error(f"got {len(args.input)} inputs but {len(args.output)} outputs; give one output per input or none")
    if not args.scale > 0:
        p.error(f"--scale must be positive, got {args.scale}")
    if not 0 <= args.mask_threshold <= 1:
        p.error(f"--mask-threshold must lie in [0, 1], got {args.mask_threshold}")
    return args


def output_path(image_path, output):
    return Path(output) if output else image_path.with_name(f"{image_path.stem}_mask.png")


def main(argv=None):
    args = parse_args(argv)
    checkpoint_path = args.model or newest_checkpoint()
    if checkpoint_path is None:
        sys.exit("error: no -m/--model given and no best.pth under checkpoints/; train a model first")
    device = pick_device(args.device)
    try:
        model, checkpoint = load_model(checkpoint_path, device)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    if args.model is None:
        print(f"using {checkpoint_path}")
    failed = 0
    for i, name in enumerate(args.input):
        path = Path(name)
        try:
            image = read_image(path)
        except ImageReadError as e:
            print(f"error: {e}; skipped", file=sys.stderr)
            failed += 1
            continue
        probs = predict_probs(model, image.unsqueeze(0).to(device), checkpoint["normalize"], args.scale)
        labels = probs_to_labels(probs, args.mask_threshold)[0].cpu().numpy()
        out = output_path(path, args.output[i] if args.output else None)
        out.parent.mkdir(parents=True, exist_ok=True)
        label_image(labels, checkpoint["mask_values"]).save(out)
        print(f"{path} -> {out}")
    if failed:
        sys.exit(f"{failed} of {len(args.input)} images failed")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
