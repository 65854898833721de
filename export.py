"""Export a checkpoint to ONNX (any batch size, height and width) and, optionally, TorchScript.

Example: python export.py -m checkpoints/RUN/best.pth -o model.onnx --torchscript model.pt

The exported model takes images B x C x H x W as the training files hold them (the checkpoint's normalisation is
inside): uint8 for 8-bit data (RGB, C = 3, or grey, C = 1), float32 of the raw values for any other (16-bit, float,
multi-band: the files' values, not rescaled); it returns logits B x K x H x W: argmax over K for several classes,
sigmoid > threshold for one logit. The ONNX file's metadata holds the class names, their mask values and the
normalisation (JSON; its 'form' is [C, dtype of the files] for data other than 8-bit RGB). When onnxruntime is
installed the script runs the ONNX file on a random image of another size and prints the largest difference to
PyTorch.
"""
import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from checkpoints import find_checkpoint, load_model
from errors import UserError
from inference import preprocess
from outputs import MARK, MARK_KEY, Planned, check_outputs


class WithPreprocessing(nn.Module):
    """uint8 images in, logits out: the one-file model to deploy."""

    def __init__(self, model, normalize):
        super().__init__()
        self.model, self.normalize = model, normalize

    def forward(self, images):
        return self.model(preprocess(images, self.normalize))


def example_images(normalize, height=64, width=64, batch=1, seed=0):
    """Random input images of the model that `normalize` describes: uint8 for 8-bit data, else float32 spread over
    each channel's training range (normalize's low to high, with a margin beyond)."""
    generator = torch.Generator().manual_seed(seed)
    form = normalize.get("form")
    shape = (batch, form[0] if form else 3, height, width)
    if form is None or form[1] == "uint8":
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    low, high = (torch.tensor(normalize[key]).view(1, -1, 1, 1) for key in ("low", "high"))
    return low + (high - low) * (torch.rand(shape, generator=generator) * 1.2 - 0.1)


def input_description(normalize):
    """What the exported model takes, e.g. 'uint8 images B x 3 x H x W'."""
    form = normalize.get("form")
    dtype = "uint8" if form is None or form[1] == "uint8" else f"float32 (the {form[1]} values of the files)"
    return f"{dtype} images B x {form[0] if form else 3} x H x W"


def export_onnx(model, path, metadata, opset=18):
    dynamic = torch.export.Dim.DYNAMIC
    program = torch.onnx.export(model, (example_images(model.normalize),), input_names=["images"],
                                output_names=["logits"],
                                dynamic_shapes=({0: dynamic, 2: dynamic, 3: dynamic},), opset_version=opset,
                                dynamo=True, verbose=False)
    program.model.metadata_props.update({key: json.dumps(value) for key, value in metadata.items()})
    program.save(path, external_data=False)


def onnx_difference(model, path, images):
    """Largest absolute difference between onnxruntime's and PyTorch's logits on `images`."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        return float((torch.from_numpy(logits) - model(images)).abs().max())


def export_torchscript(model, path):
    with warnings.catch_warnings():  # the normalisation constants are meant to be baked in; deprecation said below
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, example_images(model.normalize))
    traced.save(str(path), _extra_files={MARK_KEY: MARK})  # the mark that lets a later export replace it


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=None, help="checkpoint (default: the newest best.pth under checkpoints/)")
    p.add_argument("-o", "--output", default=None, help="ONNX file to write (default: the checkpoint's with .onnx)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset version")
    p.add_argument("--torchscript", default=None, metavar="FILE", help="also write a traced TorchScript model")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        import onnx  # noqa: F401  (torch.onnx needs onnx and onnxscript)
        import onnxscript  # noqa: F401
    except ImportError as e:
        sys.exit(f"error: ONNX export needs the '{e.name}' package: pip install -r requirements-dev.txt")
    try:
        checkpoint_path = find_checkpoint(args.model)
        output = args.output or str(checkpoint_path).rsplit(".", 1)[0] + ".onnx"
        planned = [Planned(Path(output), "-o")] + ([Planned(Path(args.torchscript), "--torchscript")]
                                                    if args.torchscript else [])
        check_outputs(planned, [checkpoint_path], fix="choose another file")
        model, checkpoint = load_model(checkpoint_path)
    except UserError as e:
        sys.exit(f"error: {e}")
    deployable = WithPreprocessing(model, checkpoint["normalize"]).eval()
    metadata = {MARK_KEY: MARK, **{key: checkpoint[key] for key in ("classes", "mask_values", "normalize")}}
    export_onnx(deployable, output, metadata, args.opset)
    print(f"wrote {output}: {input_description(checkpoint['normalize'])} -> logits B x "
          f"{checkpoint['model_args']['num_classes']} x H x W")
    check = example_images(checkpoint["normalize"], 67, 93, batch=2, seed=1)
    try:
        difference = onnx_difference(deployable, output, check)
        print(f"onnxruntime vs PyTorch on {' x '.join(map(str, check.shape))} images: largest |difference| "
              f"{difference:.2e}")
    except ImportError:
        print("onnxruntime is not installed: the ONNX file was not checked (pip install -r requirements-dev.txt)")
    if args.torchscript:
        export_torchscript(deployable, args.torchscript)
        print(f"wrote {args.torchscript} (TorchScript, deprecated by PyTorch but still loadable with torch.jit.load)")
    return output


if __name__ == "__main__":
    main()
