"""U-Net architectures, rebuilt from the small dict of arguments saved in every checkpoint."""
import os
import re
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from errors import ConfigError, EncoderWeightsError, check_at_least, one_line


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

    def forward(self, x, skip=None, size=None):
        """`skip` None: no skip connection at this stride, upsample to `size` (the input's height and width)."""
        x = match_size(self.up(x), skip.shape[-2:] if skip is not None else size)
        return self.conv(x if skip is None else torch.cat([skip, x], dim=1))


def match_size(x, size):
    """Pad (or crop, with negative padding) the bottom and right edges to `size`.

    With odd input sizes an upsampled map can be a pixel short of the skip connection (pooling floors) or a
    pixel over (strided convolutions round up); strided layers start at the first pixel, so the last row
    and column are the ones missing or extra."""
    return F.pad(x, [0, size[1] - x.shape[-1], 0, size[0] - x.shape[-2]])


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
        self.output_stride = 2 ** depth  # input pixels per pixel of the deepest features
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


# Pretrained torchvision encoders. The U-Net taps each stage's output: strides 1-16 for VGG (before each
# max-pool), 2-32 for ResNet and DenseNet; the decoder has one upsampling block per halving of the stride.
ENCODERS = ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn",
            "resnet18", "resnet34", "resnet50", "resnet101", "densenet121", "densenet169")
DECODER_BLOCKS = {"vgg": 4, "resnet": 5, "densenet": 5}


def encoder_family(name):
    return next(family for family in DECODER_BLOCKS if name.startswith(family))


def check_encoder(name, arch="unet"):
    known = [e for e in ENCODERS if arch == "unet" or encoder_family(e) == "vgg"]
    if name not in known:
        model = "FCN-8s" if arch == "fcn" else "the U-Net"
        raise ConfigError(f"the encoder of {model} must be one of {', '.join(known)}, got '{name}'")


def decoder_widths(encoder, decoder_channels=None):
    """The width of each decoder block, deepest first: one per upsampling block (default 256, 128, ...)."""
    blocks = DECODER_BLOCKS[encoder_family(encoder)]
    widths = list(decoder_channels or [256 // 2 ** i for i in range(blocks)])
    if len(widths) != blocks or min(widths) < 1:
        raise ConfigError(f"a {encoder} U-Net needs {blocks} positive decoder widths (--decoder-channels, deepest "
                         f"first), got {' '.join(map(str, widths))}")
    return widths


def backbone(name, weights="none"):
    """torchvision's classifier `name` with random weights ('none'), ImageNet weights ('imagenet', downloaded
    once into torch's hub cache) or the state_dict saved in a local file (a path)."""
    if weights == "none":
        return torchvision.models.get_model(name, weights=None)
    if weights == "imagenet":
        imagenet = torchvision.models.get_model_weights(name).DEFAULT
        try:
            return torchvision.models.get_model(name, weights=imagenet)
        except (OSError, RuntimeError) as e:  # URLError is an OSError; a truncated download a RuntimeError
            file = imagenet.url.rsplit("/", 1)[-1]
            raise EncoderWeightsError(
                f"could not download the ImageNet weights of {name} ({one_line(e)}); fetch {imagenet.url} "
                f"where there is internet and pass --encoder-weights /path/to/{file} "
                f"(or --encoder-weights none for random weights)") from None
    model = torchvision.models.get_model(name, weights=None)
    try:
        model.load_state_dict(read_state_dict(weights))
    except RuntimeError as e:
        raise EncoderWeightsError(f"--encoder-weights '{weights}' does not hold torchvision {name} weights "
                                  f"({one_line(e)})") from None
    return model


# torchvision's DenseNet files keep the old keys 'denselayer1.norm.1.weight' for 'denselayer1.norm1.weight'.
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var))$")


def read_state_dict(path):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EncoderWeightsError(f"--encoder-weights '{path}' is not a readable PyTorch weights file "
                                  f"({one_line(e)})") from None
    if not isinstance(state, dict):
        raise EncoderWeightsError(f"--encoder-weights '{path}' holds a {type(state).__name__}, not a state_dict")
    return {_OLD_DENSENET_KEY.sub(r"\1\2", key): value for key, value in state.items()}


def adapt_first_conv(model, in_channels, pretrained):
    """The first convolution of a torchvision classifier made to take `in_channels` channels, as
    segmentation_models_pytorch's patch_first_conv does: with random weights it is drawn afresh; pretrained RGB
    kernels are summed for one channel (a grey image then gives the features of its RGB copy), and otherwise repeated
    over the channels (R, G, B, R, ...) and scaled by 3 / in_channels."""
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    if in_channels == conv.in_channels:
        return
    rgb = conv.weight.detach()
    conv.in_channels = in_channels
    if not pretrained:
        conv.weight = nn.Parameter(torch.empty(conv.out_channels, in_channels, *conv.kernel_size))
        conv.reset_parameters()
    elif in_channels == 1:
        conv.weight = nn.Parameter(rgb.sum(1, keepdim=True))
    else:
        repeated = rgb[:, [i % rgb.shape[1] for i in range(in_channels)]]
        conv.weight = nn.Parameter(repeated * (rgb.shape[1] / in_channels))


class Encoder(nn.Module):
    """Consecutive stages of a torchvision classifier; forward returns every stage's output, shallow to deep.

    A frozen encoder gets no gradients and stays in eval mode, so its BatchNorm statistics are fixed too."""

    def __init__(self, stages, in_channels=3):
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(OrderedDict(stage)) for stage in stages)
        self.frozen = False
        with torch.no_grad():
            self.eval()
            features = self(torch.zeros(1, in_channels, 64, 64))
            self.channels = [f.shape[1] for f in features]
            self.output_stride = 64 // features[-1].shape[-1]
            self.train()

    def forward(self, x):
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def train(self, mode=True):
        return super().train(mode and not self.frozen)


def unet_stages(name, model):
    """(name, layer) lists of `model` whose outputs the U-Net taps."""
    family = encoder_family(name)
    if family == "vgg":
        layers = list(model.features.named_children())
        pools = [i for i, (_, layer) in enumerate(layers) if isinstance(layer, nn.MaxPool2d)]
        return [layers[start:end] for start, end in zip([0] + pools[:-1], pools)]  # the last max-pool unused
    if family == "resnet":
        m = model
        return [[("conv1", m.conv1), ("bn1", m.bn1), ("relu", m.relu)], [("maxpool", m.maxpool), ("layer1", m.layer1)],
                [("layer2", m.layer2)], [("layer3", m.layer3)], [("layer4", m.layer4)]]
    f = model.features
    return [[("conv0", f.conv0), ("norm0", f.norm0), ("relu0", f.relu0)],
            [("pool0", f.pool0), ("denseblock1", f.denseblock1)],
            [("transition1", f.transition1), ("denseblock2", f.denseblock2)],
            [("transition2", f.transition2), ("denseblock3", f.denseblock3)],
            [("transition3", f.transition3), ("denseblock4", f.denseblock4), ("norm5", f.norm5),
             ("relu5", nn.ReLU(inplace=True))]]


class EncoderUNet(nn.Module):
    """U-Net whose encoder is a torchvision classifier (backboned-unet, TernausNet): the decoder upsamples the
    deepest features back to the input size, concatenating the encoder's features at each stride on the way.

    decoder_channels: output width of each decoder block, deepest first (default 256, 128, ... one per block).
    bilinear: bilinear upsampling + conv instead of 2x2 transposed convolutions, as in UNet.
    encoder_weights: 'none', 'imagenet' or a state_dict file (see `backbone`).
    in_channels: the images' channels; the first convolution is adapted to them (adapt_first_conv)."""

    def __init__(self, encoder="resnet34", num_classes=2, decoder_channels=None, bilinear=False,
                 encoder_weights="none", in_channels=3):
        super().__init__()
        check_encoder(encoder)
        decoder_channels = decoder_widths(encoder, decoder_channels)
        blocks = len(decoder_channels)
        classifier = backbone(encoder, encoder_weights)
        adapt_first_conv(classifier, in_channels, encoder_weights != "none")
        self.encoder = Encoder(unet_stages(encoder, classifier), in_channels)
        skip_channels = self.encoder.channels[-2::-1] + [0] * (blocks - len(self.encoder.channels) + 1)
        in_channels = [self.encoder.channels[-1]] + decoder_channels[:-1]
        self.ups = nn.ModuleList(Up(*widths, bilinear) for widths in zip(in_channels, skip_channels, decoder_channels))
        self.outc = nn.Conv2d(decoder_channels[-1], num_classes, kernel_size=1)
        self.output_stride = self.encoder.output_stride

    def forward(self, x):
        size = x.shape[-2:]
        features = self.encoder(x)
        x = features.pop()
        for up in self.ups:
            x = up(x, features.pop() if features else None, size)
        return self.outc(x)


def bilinear_kernel(channels, kernel_size):
    """Weights of a transposed convolution that upsamples each channel bilinearly (FCN's initialisation)."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    ramp = 1 - (torch.arange(kernel_size) - center).abs() / factor
    return torch.eye(channels)[:, :, None, None] * (ramp[:, None] * ramp[None, :])


class FCN8s(nn.Module):
    """FCN-8s (Long et al., 2015) on a VGG encoder: the classifier's fully connected layers become 7x7 and 1x1
    convolutions (keeping their pretrained weights), and class scores from stride 32 are upsampled and summed
    with scores from pool4 (stride 16) and pool3 (stride 8). Any input size: padded to a multiple of 32."""

    def __init__(self, encoder="vgg13", num_classes=21, encoder_weights="none", in_channels=3):
        super().__init__()
        check_encoder(encoder, "fcn")
        vgg = backbone(encoder, encoder_weights)
        adapt_first_conv(vgg, in_channels, encoder_weights != "none")
        layers = list(vgg.features.named_children())
        ends = [i + 1 for i, (_, layer) in enumerate(layers) if isinstance(layer, nn.MaxPool2d)][2:]  # pool3-5
        fc6, fc7 = nn.Conv2d(512, 4096, 7, padding=3), nn.Conv2d(4096, 4096, 1)
        with torch.no_grad():
            for conv, linear in [(fc6, vgg.classifier[0]), (fc7, vgg.classifier[3])]:
                conv.weight.copy_(linear.weight.view(conv.weight.shape))
                conv.bias.copy_(linear.bias)
        fc = [("fc6", fc6), ("relu6", nn.ReLU(inplace=True)), ("drop6", nn.Dropout()),
              ("fc7", fc7), ("relu7", nn.ReLU(inplace=True)), ("drop7", nn.Dropout())]
        self.encoder = Encoder([layers[:ends[0]], layers[ends[0]:ends[1]], layers[ends[1]:ends[2]] + fc], in_channels)
        self.output_stride = self.encoder.output_stride
        self.score_pool3 = nn.Conv2d(self.encoder.channels[0], num_classes, 1)
        self.score_pool4 = nn.Conv2d(self.encoder.channels[1], num_classes, 1)
        self.score_fr = nn.Conv2d(self.encoder.channels[2], num_classes, 1)
        for score in (self.score_pool3, self.score_pool4):  # the skips start silent, as in the paper
            nn.init.zeros_(score.weight), nn.init.zeros_(score.bias)
        self.upscore2 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, padding=1, bias=False)
        self.upscore_pool4 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, padding=1, bias=False)
        self.upscore8 = nn.ConvTranspose2d(num_classes, num_classes, 16, stride=8, padding=4, bias=False)
        for up in (self.upscore2, self.upscore_pool4, self.upscore8):
            up.weight.data.copy_(bilinear_kernel(num_classes, up.kernel_size[0]))

    def forward(self, x):
        height, width = x.shape[-2:]
        x = F.pad(x, [0, (-width) % 32, 0, (-height) % 32])
        pool3, pool4, fc7 = self.encoder(x)
        scores = self.upscore2(self.score_fr(fc7)) + self.score_pool4(pool4)
        scores = self.upscore_pool4(scores) + self.score_pool3(pool3)
        return self.upscore8(scores)[..., :height, :width]


IMAGENET_NORMALIZE = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


TRAINING_FLAGS = ("encoder_lr_factor", "freeze_encoder_epochs")  # ModelConfig fields on how to train, not what


@dataclass
class ModelConfig:
    """The architecture flags of train.py (see flags.py), turned into a checkpoint's model_args by model_args."""
    arch: str = "unet"
    encoder: str = "none"
    encoder_weights: str = "imagenet"
    decoder_channels: list | None = None
    encoder_lr_factor: float | None = None  # None: 0.1 for pretrained encoders, 1 for random ones (encoder_lr)
    freeze_encoder_epochs: int = 0
    base_channels: int = 64
    depth: int = 4
    bilinear: bool = False
    single_logit: bool = False
    in_channels: int = 3  # not a flag: the channels of the data's images (train.py sets it)
    planned: bool = False  # not a flag: the --time plan chooses the encoder (model_choice.py); none is named

    def check(self, reads_weights=True):
        """ConfigError for impossible or clashing flags, before any data is read. reads_weights=False: the
        --encoder-weights file is not read (the weights come from a checkpoint), so it need not exist."""
        if self.arch not in ("unet", "fcn"):
            raise ConfigError(f"--arch must be unet or fcn, got '{self.arch}'")
        check_at_least(1, base_channels=self.base_channels, depth=self.depth)
        check_at_least(0, encoder_lr_factor=self.encoder_lr_factor or 0,
                       freeze_encoder_epochs=self.freeze_encoder_epochs)
        encoder = self.encoder_name()
        if encoder == "none":
            if self.planned:  # --encoder-weights for the plan's candidates (model_choice.weights_file_encoder)
                return self
            if self.encoder_weights != "imagenet" or self.decoder_channels is not None:
                raise ConfigError("--encoder-weights and --decoder-channels need --encoder (a pretrained encoder)")
            return self
        weights = self.encoder_weights
        if reads_weights and weights not in ("imagenet", "none") and not os.path.isfile(weights):
            raise ConfigError(f"--encoder-weights '{weights}' is neither 'imagenet', 'none' nor an existing file")
        check_encoder(encoder, self.arch)
        if self.arch == "fcn" and self.decoder_channels is not None:
            raise ConfigError("--decoder-channels sets the widths of a U-Net decoder; FCN-8s has none")
        if self.arch == "unet":
            decoder_widths(encoder, self.decoder_channels)
        return self

    def encoder_lr(self):
        """--encoder-lr-factor, else 0.1 for pretrained weights, which a full learning rate would wash out, and 1
        for random ones, which have everything to learn (VNC, ResNet-18 U-Net, 10 minutes: test mIoU 0.697 at 0.1,
        see docs/models.md for 1)."""
        if self.encoder_lr_factor is not None:
            return self.encoder_lr_factor
        return 1.0 if self.encoder_weights == "none" else 0.1

    def output_stride(self):
        """Input pixels per pixel of the deepest features (the built model's output_stride), from the flags."""
        encoder = self.encoder_name()
        if encoder == "none":
            return 2 ** self.depth
        return 16 if self.arch == "unet" and encoder_family(encoder) == "vgg" else 32

    def check_training_side(self, side, flag, zero=""):
        """ConfigError when training images of `side` pixels are too small for the model: its max-pool layers
        would halve them to nothing. `zero` says what 0 means for the flag, when it is allowed."""
        stride = self.output_stride()
        if (side or not zero) and side < stride:
            raise ConfigError(f"{flag} must be {zero + 'or ' if zero else ''}at least {stride}, the model's output "
                              f"stride (it halves the image {stride.bit_length() - 1} times), got {side}")

    def encoder_name(self):
        return "vgg13" if self.arch == "fcn" and self.encoder == "none" else self.encoder

    def model_args(self, num_classes):
        """The checkpoint's architecture dict for data of `num_classes` classes."""
        if self.single_logit and num_classes != 2:
            raise ConfigError(f"--single-logit needs two-class data, but the dataset has {num_classes} classes")
        num_logits = 1 if self.single_logit else num_classes
        encoder = self.encoder_name()
        if encoder == "none":
            return {"arch": "unet", "in_channels": self.in_channels, "num_classes": num_logits,
                    "base_channels": self.base_channels, "depth": self.depth, "bilinear": self.bilinear}
        # RGB encoders keep the dict they had before other channel counts were read (in_channels defaults to 3)
        channels = {"in_channels": self.in_channels} if self.in_channels != 3 else {}
        if self.arch == "fcn":
            return {"arch": "fcn", "encoder": encoder, "encoder_weights": self.encoder_weights,
                    "num_classes": num_logits, **channels}
        return {"arch": "unet", "encoder": encoder, "encoder_weights": self.encoder_weights,
                "num_classes": num_logits, "decoder_channels": decoder_widths(encoder, self.decoder_channels),
                "bilinear": self.bilinear, **channels}


def input_normalization(model_args):
    """Mean and std (of 0..1 pixels) the model expects, saved in the checkpoint: those of the encoder's
    pretrained weights (from torchvision's weights metadata, no download), ImageNet's otherwise."""
    if model_args.get("encoder_weights", "none") != "none":
        transforms = torchvision.models.get_model_weights(model_args["encoder"]).DEFAULT.transforms()
        return {"mean": list(transforms.mean), "std": list(transforms.std)}
    return IMAGENET_NORMALIZE


def parameter_groups(model, lr, encoder_lr_factor=1.0):
    """Optimizer parameter groups: every parameter once, the pretrained encoder's at lr * encoder_lr_factor.

    Frozen parameters stay in their group: without gradients the optimizer skips them until unfrozen."""
    encoder = getattr(model, "encoder", None)
    encoder_params = list(encoder.parameters()) if encoder is not None else []
    in_encoder = {id(p) for p in encoder_params}
    groups = [{"params": [p for p in model.parameters() if id(p) not in in_encoder], "lr": lr, "name": "decoder"}]
    if encoder_params:
        groups.append({"params": encoder_params, "lr": lr * encoder_lr_factor, "name": "encoder"})
    return groups


def set_encoder_frozen(model, frozen):
    """Freeze (no gradients, eval-mode BatchNorm) or unfreeze a pretrained encoder; False for models without."""
    encoder = getattr(model, "encoder", None)
    if encoder is None:
        return False
    encoder.frozen = frozen
    encoder.requires_grad_(not frozen)
    encoder.train(model.training)
    return True


def build_model(model_args, pretrained=False):
    """Rebuild a model from the `model_args` dict stored in a checkpoint.

    pretrained=True loads the encoder weights the dict names (train.py); otherwise the encoder is left random,
    never downloaded, as a checkpoint's weights replace it anyway."""
    args = dict(model_args)
    arch = args.pop("arch", "unet")
    if "encoder_weights" in args and not pretrained:
        args["encoder_weights"] = "none"
    if arch == "fcn":
        return FCN8s(**args)
    if arch != "unet":
        raise ValueError(f"unknown architecture '{arch}' (known: unet, fcn)")
    return EncoderUNet(**args) if "encoder" in args else UNet(**args)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
