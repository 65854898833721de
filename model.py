"""U-Net architectures, rebuilt from the small dict of arguments saved in every checkpoint."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class DoubleConv(nn.Sequential):
    """(3x3 conv, padded -> BatchNorm -> ReLU) x 2: keeps height and width."""

    def __init__(self, in_channels, out_channels, mid_channels=None):
        mid_channels = mid_channels or out_channels
        super().__init__(
            nn.Conv2d(in_channels, mid_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """Upsample x2, concatenate the skip connection, DoubleConv."""

    def __init__(self, in_channels, skip_channels, out_channels, bilinear):
        super().__init__()
        if bilinear:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = DoubleConv(in_channels + skip_channels, out_channels, (in_channels + skip_channels) // 2)
        else:
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(in_channels // 2 + skip_channels, out_channels)

    def forward(self, x, skip):
        x = self.up(x)
        # Odd input sizes: pooling floored, so the upsampled map can be a pixel short of the skip.
        dy, dx = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
        x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """Ronneberger et al. (2015) U-Net with padded convolutions and BatchNorm.

    num_classes=1 gives one logit for binary masks (sigmoid); num_classes>=2 one logit per class (softmax).
    bilinear=True halves the deepest widths, as in milesial/Pytorch-UNet, for a lighter model.
    """

    def __init__(self, in_channels=3, num_classes=2, base_channels=64, depth=4, bilinear=False):
        super().__init__()
        if num_classes < 1 or depth < 1 or base_channels < 1:
            raise ValueError(f"UNet needs num_classes, depth and base_channels >= 1, got "
                             f"{num_classes}, {depth}, {base_channels}")
        widths = [base_channels * 2 ** i for i in range(depth + 1)]
        factor = 2 if bilinear else 1
        self.inc = DoubleConv(in_channels, widths[0])
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), DoubleConv(widths[i], widths[i + 1] // (factor if i == depth - 1 else 1)))
            for i in range(depth)
        )
        self.ups = nn.ModuleList()
        in_ch = widths[depth] // factor
        for i in reversed(range(depth)):
            out_ch = widths[i] // factor if i > 0 else widths[0]
            self.ups.append(Up(in_ch, widths[i], out_ch, bilinear))
            in_ch = out_ch
        self.outc = nn.Conv2d(widths[0], num_classes, kernel_size=1)

    def forward(self, x):
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.outc(x)


IMAGENET_NORMALIZE = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def add_model_args(parser):
    group = parser.add_argument_group("model")
    group.add_argument("--base-channels", type=int, default=64, help="width of the first U-Net level")
    group.add_argument("--depth", type=int, default=4, help="number of down-sampling steps")
    group.add_argument("--bilinear", action="store_true", help="bilinear upsampling instead of transposed convs")
    group.add_argument("--single-logit", action="store_true",
                       help="two-class data: one sigmoid logit (BCE) instead of two softmax logits")
    return group


def model_args_from(args, num_classes):
    """The checkpoint's architecture dict, from train.py's arguments and the dataset's number of classes."""
    if args.single_logit and num_classes != 2:
        raise ValueError(f"--single-logit needs two-class data, but the dataset has {num_classes} classes")
    for name in ("base_channels", "depth"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return {"arch": "unet", "in_channels": 3, "num_classes": 1 if args.single_logit else num_classes,
            "base_channels": args.base_channels, "depth": args.depth, "bilinear": args.bilinear}


def input_normalization(model_args):
    """Mean and std (of 0..1 pixels) the model expects; saved in the checkpoint."""
    return IMAGENET_NORMALIZE


def parameter_groups(model, lr):
    """Optimizer parameter groups (pretrained encoders may get their own, lower, learning rate)."""
    return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]


def build_model(model_args):
    """Rebuild a model from the `model_args` dict stored in a checkpoint."""
    args = dict(model_args)
    arch = args.pop("arch", "unet")
    if arch != "unet":
        raise ValueError(f"unknown architecture '{arch}' (known: unet)")
    return UNet(**args)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
