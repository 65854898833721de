"""torch.hub entry point. Examples (a clone on disk; for GitHub, replace the path with 'owner/repo' and drop
source='local'):

    model = torch.hub.load("path/to/clone", "unet", source="local", encoder="resnet34", num_classes=21)
    model = torch.hub.load("path/to/clone", "unet", source="local", arch="fcn", num_classes=21)
    model = torch.hub.load("path/to/clone", "unet", source="local", checkpoint="checkpoints/RUN/best.pth")
"""
from checkpoints import load_model
from model import build_model, input_normalization

dependencies = ["torch", "torchvision"]


def unet(checkpoint=None, arch="unet", encoder=None, num_classes=2, encoder_weights="none", **options):
    """A U-Net (classic, or on a torchvision `encoder`) or, with arch='fcn', an FCN-8s on a VGG encoder.

    checkpoint: a file written by train.py: that model with its weights, in eval mode (the other arguments
        are then ignored).
    encoder_weights: 'none' (random), 'imagenet' (torchvision's weights, downloaded once) or a state_dict file.
    options: base_channels, depth, bilinear (classic U-Net); decoder_channels, bilinear (encoder U-Net).
    The model's `normalize` attribute holds the mean and std its input expects (inference.preprocess), and
    with a checkpoint `classes` and `mask_values` too.
    """
    if checkpoint is not None:
        model, state = load_model(checkpoint)
        model.normalize, model.classes, model.mask_values = state["normalize"], state["classes"], state["mask_values"]
        return model
    model_args = {"arch": arch, "num_classes": num_classes, **options}
    if encoder is not None or arch == "fcn":
        model_args.update(encoder=encoder or "vgg13", encoder_weights=encoder_weights)
    model = build_model(model_args, pretrained=True)
    model.normalize = input_normalization(model_args)
    return model
