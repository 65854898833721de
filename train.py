"""Train a U-Net. Example: python train.py --dataset shapes --epochs 10 --base-channels 16"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from datasets import add_dataset_args, build_dataset, check_dataset_args
from inference import evaluate, preprocess
from metrics import segmentation_loss
from model import add_model_args, build_model, count_parameters, input_normalization, model_args_from, \
    parameter_groups, set_encoder_frozen
from utils import pick_device, save_checkpoint

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataset_args(p)
    add_model_args(p)
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=10, help="training epochs")
    o.add_argument("--batch-size", type=int, default=16, help="images per step")
    o.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    o.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay")
    o.add_argument("--optimizer", default="adamw", choices=["adam", "adamw"], help="optimizer")
    o.add_argument("--loss", default="ce", choices=["ce", "dice", "ce+dice"],
                   help="cross-entropy (BCE for a single logit), soft Dice, or their sum")
    o.add_argument("--metric", default="miou", choices=["miou", "dice"],
                   help="validation score that picks best.pth (dice: foreground Dice for two classes)")
    r = p.add_argument_group("run")
    r.add_argument("--name", default=None, help="run name (default: the dataset); the run folder adds a timestamp")
    r.add_argument("--checkpoint-dir", default="checkpoints", help="folder that holds the run folders")
    r.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1'...")
    r.add_argument("--workers", type=int, default=min(4, max(0, (os.cpu_count() or 1) - 1)),
                   help="data-loader worker processes")
    r.add_argument("--seed", type=int, default=0, help="seed of the weights and the data order")
    args = p.parse_args(argv)
    try:
        check_args(args)
    except ValueError as e:
        p.error(str(e))
    return args


def check_args(args):
    check_dataset_args(args)
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if args.weight_decay < 0:
        raise ValueError(f"--weight-decay cannot be negative, got {args.weight_decay}")
    if args.workers < 0:
        raise ValueError(f"--workers cannot be negative, got {args.workers}")


def train_one_epoch(model, loader, optimizer, args, normalize, ignore_index, device, epoch):
    model.train()
    total, count = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch}/{args.epochs}", leave=False)
    for images, masks in bar:
        images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        logits = model(preprocess(images, normalize))
        loss = segmentation_loss(logits, masks, args.loss, ignore_index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(images)
        count += len(images)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return total / count


def score_of(metrics, name, num_classes):
    if name == "dice":
        return metrics["fg_dice"] if num_classes <= 2 else metrics["mean_dice"]
    return metrics["miou"]


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    train_set, val_set = build_dataset(args, "train"), build_dataset(args, "val")
    classes = list(train_set.classes)
    try:
        model_args = model_args_from(args, len(classes))
        model = build_model(model_args, pretrained=True).to(device)
    except ValueError as e:
        sys.exit(f"error: {e}")
    num_logits = model_args["num_classes"]
    normalize = input_normalization(model_args)
    ignore_index = train_set.ignore_index

    loader_args = {"batch_size": args.batch_size, "num_workers": args.workers,
                   "pin_memory": device.type == "cuda", "persistent_workers": args.workers > 0}
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = torch.utils.data.DataLoader(train_set, shuffle=True, drop_last=len(train_set) > args.batch_size,
                                               generator=generator, **loader_args)
    val_loader = torch.utils.data.DataLoader(val_set, shuffle=False, **loader_args)
    optimizer_class = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    optimizer = optimizer_class(parameter_groups(model, args.lr, encoder_lr_factor=args.encoder_lr_factor),
                                lr=args.lr, weight_decay=args.weight_decay)

    run_dir = Path(args.checkpoint_dir) / f"{args.name or args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 1
    while run_dir.exists():  # two runs started in the same second never share a folder
        run_dir = run_dir.with_name(f"{run_dir.name.rsplit('.', 1)[0]}.{suffix}")
        suffix += 1
    run_dir.mkdir(parents=True)
    (run_dir / "args.json").write_text(json.dumps(vars(args), indent=2))
    print(f"{count_parameters(model) / 1e6:.2f} M parameters, {len(train_set)} train / {len(val_set)} val images, "
          f"device {device}, run folder {run_dir}")

    best_score = -1.0
    for epoch in range(1, args.epochs + 1):
        set_encoder_frozen(model, epoch <= args.freeze_encoder_epochs)
        start = time.perf_counter()
        loss = train_one_epoch(model, train_loader, optimizer, args, normalize, ignore_index, device, epoch)
        metrics = evaluate(model, val_loader, num_logits, normalize, ignore_index, device)
        score = score_of(metrics, args.metric, num_logits)
        state = {
            "model": model.state_dict(), "model_args": model_args, "classes": classes,
            "mask_values": list(train_set.mask_values), "ignore_index": ignore_index, "normalize": normalize,
            "optimizer": optimizer.state_dict(), "epoch": epoch, "metrics": metrics, "args": vars(args),
            "best_score": max(best_score, score),
        }
        save_checkpoint(state, run_dir / "last.pth")
        improved = score > best_score
        if improved:
            best_score = score
            save_checkpoint(state, run_dir / "best.pth")
        print(f"epoch {epoch}/{args.epochs}  loss {loss:.4f}  mIoU {metrics['miou']:.4f}  "
              f"pixel acc {metrics['pixel_acc']:.4f}  {args.metric} {score:.4f}"
              f"{'  (best)' if improved else ''}  {time.perf_counter() - start:.1f}s")
    print(f"best {args.metric} {best_score:.4f}: {run_dir / 'best.pth'}")
    return run_dir


if __name__ == "__main__":
    main()
