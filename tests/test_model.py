import pytest
import torch

from model import UNet, build_model, count_parameters


@pytest.mark.parametrize("bilinear", [False, True])
@pytest.mark.parametrize("num_classes", [1, 2, 5])
@pytest.mark.parametrize("size", [(64, 64), (97, 131), (33, 40)])
def test_output_keeps_input_size(bilinear, num_classes, size):
    model = UNet(3, num_classes, base_channels=4, depth=4, bilinear=bilinear)
    out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, num_classes, *size)


def test_classic_parameter_counts():
    # milesial/Pytorch-UNet: 31,037,698 (transposed) and 17,263,042 (bilinear) for 3 in, 2 classes.
    assert count_parameters(UNet()) == 31_037_698
    assert count_parameters(UNet(bilinear=True)) == 17_263_042


def test_bilinear_halves_deepest_width():
    def deepest_width(model):
        return model.downs[-1][1][-2].num_features  # the last BatchNorm of the bottom DoubleConv

    assert deepest_width(UNet(base_channels=8, bilinear=False)) == 128
    assert deepest_width(UNet(base_channels=8, bilinear=True)) == 64


def test_grey_input_and_backward():
    model = UNet(1, 3, base_channels=4, depth=2)
    x = torch.randn(1, 1, 21, 19, requires_grad=True)
    model(x).sum().backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is not None for p in model.parameters())


def test_build_model_round_trip():
    args = {"arch": "unet", "in_channels": 3, "num_classes": 4, "base_channels": 4, "depth": 3, "bilinear": True}
    a, b = build_model(args), build_model(args)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 32, 32)
    a.eval(), b.eval()
    assert torch.equal(a(x), b(x))
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model({**args, "arch": "nope"})


def test_invalid_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        UNet(num_classes=0)
