"""export.py: the ONNX file gives PyTorch's logits (onnxruntime) at sizes other than the traced one."""
import json
import sys

import pytest
import torch

import export
from checkpoints import load_model
from inference import preprocess
from model import build_model, input_normalization
from checkpoints import save_checkpoint

MODELS = {
    "unet": {"arch": "unet", "in_channels": 3, "num_classes": 3, "base_channels": 4, "depth": 3, "bilinear": False},
    # ResNet rounds odd sizes up, so its decoder crops: the case a wrong pad in the graph would break.
    "resnet18": {"arch": "unet", "encoder": "resnet18", "encoder_weights": "imagenet", "num_classes": 3,
                 "decoder_channels": [8] * 5, "bilinear": True},
}


def write_checkpoint(model_args, path):
    torch.manual_seed(0)
    model = build_model(model_args)
    with torch.no_grad():  # BatchNorm statistics away from 0 and 1, so that the export must carry them
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5), module.running_var.uniform_(0.5, 2)
    save_checkpoint({"model": model.state_dict(), "model_args": model_args, "classes": ["bg", "a", "b"],
                     "mask_values": [0, 1, 2], "normalize": input_normalization(model_args), "ignore_index": 255},
                    path)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("name", MODELS)
def test_onnx_matches_pytorch_at_other_sizes(name, tmp_path, capsys):
    # Optional test dependencies: without them this test alone is skipped (export.py imports them lazily).
    onnx, onnxruntime = pytest.importorskip("onnx"), pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")  # torch.onnx.export's dynamo exporter
    checkpoint = tmp_path / "best.pth"
    write_checkpoint(MODELS[name], checkpoint)
    output = export.main(["-m", str(checkpoint), "--torchscript", str(tmp_path / "model.pt")])
    assert output == str(tmp_path / "best.onnx")
    assert "largest |difference|" in capsys.readouterr().out

    model, state = load_model(checkpoint)
    session = onnxruntime.InferenceSession(output, providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(tmp_path / "model.pt")
    for shape in [(2, 3, 45, 61), (1, 3, 33, 32)]:  # exported at 64 x 64
        images = torch.randint(0, 256, shape, dtype=torch.uint8)
        with torch.no_grad():
            expected = model(preprocess(images, state["normalize"]))
            assert torch.allclose(scripted(images), expected, atol=1e-5)
        (logits,) = session.run(None, {"images": images.numpy()})
        assert logits.shape == expected.shape
        assert torch.allclose(torch.from_numpy(logits), expected, atol=1e-4, rtol=1e-4)
    metadata = {p.key: json.loads(p.value) for p in onnx.load(output).metadata_props}
    assert metadata == {"classes": ["bg", "a", "b"], "mask_values": [0, 1, 2], "normalize": state["normalize"],
                        "written_by": "unet-segmentation"}  # the mark that lets a later export replace the file


@pytest.mark.parametrize("package", ["onnx", "onnxscript"])
def test_missing_onnx_gets_one_line(package, tmp_path, monkeypatch):
    if package == "onnxscript":
        pytest.importorskip("onnx")  # without onnx, export.py names onnx, which it imports first
    monkeypatch.setitem(sys.modules, package, None)  # makes `import <package>` fail
    with pytest.raises(SystemExit, match=f"^error: ONNX export needs the '{package}' package: pip install"):
        export.main(["-m", str(tmp_path / "best.pth")])
