"""The command-line flags the scripts share, one argparse group per config they fill (DataConfig,
AugmentConfig, ModelConfig, InferenceConfig), and config_from to build a config from the parsed values."""
import argparse
import dataclasses
import math

from datasets import DATASETS
from model import ENCODERS
from precision import AMP_CHOICES, CHANNELS_LAST_CHOICES


def config_from(config_class, values):
    """A config dataclass from a dict of parsed flags (vars(args)): the fields it has, the rest left out."""
    names = {field.name for field in dataclasses.fields(config_class)}
    return config_class(**{key: value for key, value in values.items() if key in names})


def finite_float(text):
    """argparse type of every float flag: a number, never NaN or infinite, which would slip past every range
    check (NaN compares false with everything) and surface later as a NaN loss or a traceback."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"needs a finite number, got '{text}'")
    return value


def add_dataset_args(parser):
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="auto", choices=DATASETS,
                       help="dataset to read; 'auto' recognises the layout under --data; 'shapes' is synthetic")
    group.add_argument("--data", default="data", help="folder that holds the dataset (or the dataset's root)")
    group.add_argument("--download", action="store_true", help="first fetch Pascal VOC 2012 and/or SBD into --data")
    group.add_argument("--images", default=None, help="folder of images (--dataset folder)")
    group.add_argument("--masks", default=None, help="folder of masks named like the images (--dataset folder)")
    group.add_argument("--pairs", default=None, metavar="FILE",
                       help="CSV list of image,mask file pairs (paths relative to the file; an optional header "
                            "line), for names that share no pattern (--dataset folder)")
    group.add_argument("--mask-suffix", default=None,
                       help="mask name = image name + suffix (default: '' or '_mask', whichever matches)")
    group.add_argument("--mask-values", type=int, nargs="+", default=None,
                       help="mask value of each class, in class order (folder; default: the values found)")
    group.add_argument("--ignore-index", type=int, default=None,
                       help="mask value of void pixels, skipped by loss and metrics (VOC and SBD: 255)")
    group.add_argument("--mask-colors", default=None, metavar="FILE",
                       help="colour-coded masks: their classes, a line 'R G B name' each in class order (CamVid's "
                            "format); a line named void gives the colour to ignore (default: masks with colours "
                            "are read as colour-coded, the colours found becoming the classes)")
    group.add_argument("--class-names", default=None, metavar="FILE",
                       help="the name of each class, one a line in class order (saved in the checkpoint; shown in "
                            "eval.py's table, report and JSON)")
    group.add_argument("--roi", default=None, metavar="DIR",
                       help="folder of region-of-interest masks named like the masks (non-zero inside): pixels "
                            "outside are left out of the loss and the scores")
    group.add_argument("--val-percent", type=finite_float, default=10.0,
                       help="validation share of carvana (whole cars) and folder data")
    group.add_argument("--verify", action="store_true",
                       help="check every pair before training (readable, same size, known values); cached; "
                            "always on for folder")
    group.add_argument("--skip-bad", action="store_true",
                       help="leave out unreadable files, naming them with a count, instead of stopping")
    group.add_argument("--scale", type=finite_float, default=None,
                       help="resize factor applied when loading (default: 0.5 for carvana, 1 otherwise)")
    group.add_argument("--image-size", type=int, default=64, help="side of the synthetic shapes images")
    group.add_argument("--num-train", type=int, default=2000, help="synthetic training images")
    group.add_argument("--num-val", type=int, default=200, help="synthetic validation images")
    group.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data and of random splits")
    return group


def add_augment_args(parser):
    group = parser.add_argument_group("augmentation")
    group.add_argument("--crop-size", type=int, default=None,
                       help="side of the random training crop (0: none; else at least the model's output stride; "
                            "default: 256 on CPUs, 512 on GPUs, at most the typical image's shorter side)")
    group.add_argument("--zoom", type=finite_float, nargs=2, default=[0.7, 1.4], metavar=("MIN", "MAX"),
                       help="random zoom range applied before the crop (nnU-Net's; default 0.7 1.4, off in a --time "
                            "run too short for it)")
    group.add_argument("--hflip", type=finite_float, default=0.5, help="probability of a horizontal flip (0: off)")
    group.add_argument("--vflip", type=finite_float, default=None, metavar="PROB",
                       help="probability of a vertical flip (0: off; default: 0.5 for data with no up and down, "
                            "whose masks hold their classes alike in the top and bottom halves, as micrographs do; "
                            "else 0)")
    group.add_argument("--rotate", type=finite_float, default=10.0,
                       help="largest random rotation in degrees (0: off; default 10, off in a --time run too short "
                            "for it)")
    group.add_argument("--jitter", type=finite_float, default=0.0,
                       help="brightness, contrast and saturation jitter (0: off)")
    group.add_argument("--elastic", type=finite_float, default=None, metavar="PROB",
                       help="probability of a smooth random elastic deformation (U-Net paper; 0: off; default: on "
                            "for small datasets, chosen by the training recipe; off in a --time run too short for it)")
    group.add_argument("--class-crops", type=finite_float, default=1 / 3, metavar="PROB",
                       help="probability that a training crop is centred on a pixel of a class drawn at random from "
                            "those its mask holds, so that rare classes are seen (nnU-Net's; 0: every crop random; "
                            "default: 1/3)")
    group.add_argument("--no-augment", action="store_true", help="no random augmentation at all")
    return group


def add_model_args(parser):
    group = parser.add_argument_group("model")
    group.add_argument("--arch", default="unet", choices=["unet", "fcn"],
                       help="U-Net, or FCN-8s (on a VGG encoder, vgg13 unless --encoder says otherwise)")
    group.add_argument("--encoder", default="none", choices=("none",) + ENCODERS, metavar="NAME",
                       help=f"torchvision encoder of the U-Net: {', '.join(ENCODERS)}; 'none': the classic U-Net")
    group.add_argument("--encoder-weights", default="imagenet", metavar="imagenet|none|PATH",
                       help="encoder initialisation: torchvision's ImageNet weights (downloaded once), random, "
                            "or a torchvision state_dict file")
    group.add_argument("--decoder-channels", type=int, nargs="+", default=None, metavar="N",
                       help="encoder U-Net: decoder widths, deepest first (None: 256 128 64 32, then 16 for "
                            "ResNet and DenseNet)")
    group.add_argument("--encoder-lr-factor", type=finite_float, default=None,
                       help="the encoder's learning rate is --lr times this (default: 0.1 for pretrained weights, "
                            "1 for random ones)")
    group.add_argument("--freeze-encoder-epochs", type=int, default=0,
                       help="train only the decoder (encoder weights and BatchNorm statistics fixed) for this "
                            "many epochs first")
    group.add_argument("--base-channels", type=int, default=64, help="classic U-Net: width of the first level")
    group.add_argument("--depth", type=int, default=4, help="classic U-Net: number of down-sampling steps")
    group.add_argument("--bilinear", action="store_true", help="bilinear upsampling instead of transposed convs")
    group.add_argument("--single-logit", action="store_true",
                       help="two-class data: one sigmoid logit (BCE) instead of two softmax logits")
    return group


def add_inference_args(parser, scale=True):
    """The flags of InferenceConfig, shared by predict.py and eval.py. scale=False leaves out -s/--scale, for a
    parser that has its own --scale (eval.py's data flags)."""
    group = parser.add_argument_group("inference")
    if scale:
        group.add_argument("-s", "--scale", type=finite_float, default=None,
                           help="resize factor applied before the model (default: the one it was trained with, "
                                "saved in the checkpoint); outputs have the input's size")
    group.add_argument("--tile", type=int, default=None, metavar="SIZE",
                       help="overlap-tile inference with SIZE x SIZE tiles (default: the memory plan's choice: whole "
                            "images where they fit)")
    group.add_argument("--overlap", type=finite_float, default=0.125,
                       help="fraction of a tile shared with its neighbour (default: 0.125, which scored within 0.001 "
                            "of 0.5 on ISBI and VNC at about half the cost)")
    group.add_argument("--max-memory", default=None, metavar="SIZE",
                       help="memory the plan may fill, e.g. 4G or 512M (default: 80%% of what the system has "
                            "available); the plan chooses whole images or tiles, and the batch, to fit it")
    group.add_argument("--tta", action="store_true",
                       help="test-time augmentation: average with the horizontally flipped image's prediction "
                            "(default: all four flips for a model trained with vertical flips, else none)")
    group.add_argument("--tta-vflip", action="store_true",
                       help="average all four flips (4 passes; implies --tta): for data with no up and down")
    group.add_argument("--no-tta", action="store_true", help="one pass, whatever flips the model was trained with")
    add_precision_args(group)
    return group


def add_precision_args(group):
    """--amp and --channels-last (precision.choose_precision), the same in train.py, eval.py and predict.py."""
    group.add_argument("--amp", nargs="?", const="auto", default="auto", choices=AMP_CHOICES,
                       help="autocast dtype (default: auto, the fastest safe one: bf16 on CPUs and GPUs with native "
                            "bf16, fp16 on other GPUs (training adds loss scaling), else off, fp32)")
    group.add_argument("--channels-last", nargs="?", const="on", default="auto", choices=CHANNELS_LAST_CHOICES,
                       help="channels_last memory layout (default: auto, on where faster: CPUs with native bf16, "
                            "GPUs with tensor cores under --amp)")
