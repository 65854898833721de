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
    """A checkpoint's dict rebuilds the model it describes, counted by hand, and the saved weights load into it."""
    args = {"arch": "unet", "in_channels": 3, "num_classes": 4, "base_channels": 4, "depth": 3, "bilinear": True}
    rebuilt = build_model(args)
    # Widths 4, 8, 16, 32, the deepest halved to 16 (bilinear). Each DoubleConv(in, out, mid) has two bias-free
    # 3x3 convolutions and two BatchNorms: 9 * (in * mid + mid * out) + 2 * (mid + out) parameters.
    def double_conv(c_in, c_out, mid=None):
        mid = mid or c_out
        return 9 * (c_in * mid + mid * c_out) + 2 * (mid + c_out)

    encoder = double_conv(3, 4) + double_conv(4, 8) + double_conv(8, 16) + double_conv(16, 16)
    # Up blocks: upsample (no weights), concatenate the skip, DoubleConv(in + skip, out, (in + skip) / 2).
    decoder = double_conv(16 + 16, 8, 16) + double_conv(8 + 8, 4, 8) + double_conv(4 + 4, 4, 4)
    assert encoder + decoder + (4 * 4 + 4) == 17_096  # + the 1x1 output convolution
    assert count_parameters(rebuilt) == 17_096
    original = UNet(3, 4, base_channels=4, depth=3, bilinear=True)  # what the dict says, built directly
    rebuilt.load_state_dict(original.state_dict())  # strict: every name and shape matches
    with torch.no_grad():  # zeroing the last layer gives each pixel exactly its bias as logits
        original.outc.weight.zero_()
        original.outc.bias.copy_(torch.tensor([0.5, -1.0, 2.0, 3.0]))
    rebuilt.load_state_dict(original.state_dict())
    rebuilt.eval()
    logits = rebuilt(torch.randn(2, 3, 32, 40))
    assert logits.shape == (2, 4, 32, 40)
    assert torch.equal(logits, torch.tensor([0.5, -1.0, 2.0, 3.0])[None, :, None, None].expand(2, 4, 32, 40))
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model({**args, "arch": "nope"})


def test_invalid_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        UNet(num_classes=0)
