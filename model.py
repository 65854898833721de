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


def build_model(model_args):
    """Rebuild a model from the `model_args` dict stored in a checkpoint."""
    args = dict(model_args)
    arch = args.pop("arch", "unet")
    if arch != "unet":
        raise ValueError(f"unknown architecture '{arch}' (known: unet)")
    return UNet(**args)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
