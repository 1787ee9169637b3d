"""oneDNN's prepacked operators as modules (ldm.accel.packed): same answers as the layers they replace."""

import pytest
import torch
from torch import nn

from ldm.accel.packed import PackedConv2d, PackedLinear, PackedPointwiseConv2d, can_pack, is_pointwise

pytestmark = pytest.mark.skipif(not can_pack(torch.device("cpu")), reason="this torch has no oneDNN packed ops")


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stride, padding, groups", [(1, 1, 1), (2, 1, 1), (1, 0, 4)])
def test_packed_convolution_answers_as_the_layer(dtype, stride, padding, groups):
    """Same values as nn.Conv2d (bit for bit in bf16, where both are oneDNN's), channels_last out, any layout in."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, stride=stride, padding=padding, groups=groups).to(dtype)
    x = torch.randn(2, 8, 7, 9, dtype=dtype)
    packed = PackedConv2d(conv)
    for given in (x, channels_last(x)):
        got = packed(given)
        assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
        expected = conv(channels_last(given))
        if dtype == torch.bfloat16:
            assert torch.equal(got, expected)
        else:
            torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(
    "conv", [nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.Conv2d(4, 4, 3, padding="same")]
)
def test_packed_convolution_refuses_other_padding(conv):
    with pytest.raises(ValueError, match="only zero padding given as numbers"):
        PackedConv2d(conv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_answers_as_the_layer(dtype, bias):
    torch.manual_seed(0)
    layer = nn.Linear(32, 24, bias=bias).to(dtype)
    x = torch.randn(3, 5, 32, dtype=dtype)
    got = PackedLinear(layer.weight, layer.bias)(x)
    assert got.shape == (3, 5, 24) and got.dtype == dtype
    torch.testing.assert_close(got, layer(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pointwise_convolution_is_a_linear_over_the_cells(dtype):
    """A 1×1 convolution's (out, in, 1, 1) weight as a linear over each cell's channels, either layout in."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 1).to(dtype)
    x = torch.randn(2, 16, 5, 3, dtype=dtype)
    packed = PackedPointwiseConv2d(conv.weight, conv.bias)
    for given in (x, channels_last(x)):
        got = packed(given)
        assert got.shape == (2, 8, 5, 3) and got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, conv(x))


def test_is_pointwise():
    assert is_pointwise(nn.Conv2d(4, 8, 1)) and is_pointwise(nn.Conv2d(4, 8, 1, padding="valid"))
    for conv in (
        nn.Conv2d(4, 8, 3),
        nn.Conv2d(4, 8, 1, stride=2),
        nn.Conv2d(4, 8, 1, padding=1),
        nn.Conv2d(4, 8, 1, groups=4),
    ):
        assert not is_pointwise(conv), conv


def test_can_pack_is_for_the_cpu_only():
    assert can_pack(torch.device("cpu")) and not can_pack(torch.device("meta"))
