"""oneDNN's prepacked operators as modules (ldm.accel.packed): same answers as the layers they replace."""

import pytest
import torch
from support import NEEDS_PACKING, PACKED_DTYPES, assert_rounding_close
from torch import nn

import ldm.accel.cpu
import ldm.accel.packed
from ldm.accel.packed import PackedConv2d, PackedLinear, PackedPointwiseConv2d, can_pack, is_pointwise

pytestmark = NEEDS_PACKING


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", PACKED_DTYPES)
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
            assert_rounding_close(got, expected, terms=8 // groups * 3 * 3)


@pytest.mark.parametrize("dtype", PACKED_DTYPES)
def test_packed_convolution_lays_its_weight_out_for_each_new_input_shape(dtype):
    """The weight is laid out again for the shape it is called with (oneDNN's kernel wants a layout per CPU and
    shape); the exact weight survives every relayout and the answers stay the layer's as the shape comes and goes."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1).to(dtype)
    packed = PackedConv2d(conv)
    assert packed.packed_for is None
    for shape in [(2, 16, 8, 8), (2, 16, 8, 8), (8, 16, 4, 4), (2, 16, 8, 8)]:
        x = torch.randn(shape, dtype=dtype)
        got = packed(x)
        assert packed.packed_for == shape
        assert torch.equal(packed.packed.to_dense(), conv.weight)
        expected = conv(channels_last(x))
        if dtype == torch.bfloat16:
            assert torch.equal(got, expected)
        else:
            assert_rounding_close(got, expected, terms=16 * 3 * 3)


@pytest.mark.parametrize(
    "conv", [nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.Conv2d(4, 4, 3, padding="same")]
)
def test_packed_convolution_refuses_other_padding(conv):
    with pytest.raises(ValueError, match="only zero padding given as numbers"):
        PackedConv2d(conv)


@pytest.mark.parametrize("dtype", PACKED_DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_answers_as_the_layer(dtype, bias):
    torch.manual_seed(0)
    layer = nn.Linear(32, 24, bias=bias).to(dtype)
    x = torch.randn(3, 5, 32, dtype=dtype)
    got = PackedLinear(layer.weight, layer.bias)(x)
    assert got.shape == (3, 5, 24) and got.dtype == dtype
    assert_rounding_close(got, layer(x), terms=32)


@pytest.mark.parametrize("dtype", PACKED_DTYPES)
def test_pointwise_convolution_is_a_linear_over_the_cells(dtype):
    """A 1×1 convolution's (out, in, 1, 1) weight as a linear over each cell's channels, either layout in."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 1).to(dtype)
    x = torch.randn(2, 16, 5, 3, dtype=dtype)
    packed = PackedPointwiseConv2d(conv.weight, conv.bias)
    for given in (x, channels_last(x)):
        got = packed(given)
        assert got.shape == (2, 8, 5, 3) and got.is_contiguous(memory_format=torch.channels_last)
        assert_rounding_close(got, conv(x), terms=16)


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
    assert not can_pack(torch.device("cpu"), torch.float16) and not can_pack(torch.device("cpu"), torch.int8)


def test_bf16_packing_follows_the_cpu(monkeypatch):
    """bf16 weights pack where oneDNN has bf16 kernels; where it has none the modules refuse them with a reason,
    before oneDNN would fail, and fp32 weights still pack."""
    cpu = torch.device("cpu")
    assert can_pack(cpu, torch.bfloat16) == ldm.accel.cpu.has_bf16_kernels()
    monkeypatch.setattr(ldm.accel.packed, "has_bf16_kernels", lambda: False)
    assert not can_pack(cpu, torch.bfloat16) and can_pack(cpu, torch.float32)
    conv, linear = nn.Conv2d(4, 4, 3, padding=1), nn.Linear(8, 4)
    message = "cannot pack a torch.bfloat16 weight on cpu: oneDNN's bf16 kernels need avx512bw, avx512vl and avx512dq"
    for make in (lambda: PackedConv2d(conv.to(torch.bfloat16)), lambda: PackedLinear(linear.weight.bfloat16())):
        with pytest.raises(ValueError, match=message):
            make()
    with pytest.raises(ValueError, match="only fp32 and bf16 weights are packed"):
        PackedLinear(linear.weight.half())
    PackedLinear(linear.weight.float())
