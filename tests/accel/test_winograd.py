import pytest
import torch
import torch.nn.functional as F
from support import NEEDS_BF16_KERNELS, NEEDS_PACKING, assert_rounding_close
from torch import nn

import ldm.accel.packed
from ldm.accel import winograd
from ldm.accel.winograd import BIAS_TERM, WINOGRAD_MIN_CHANNELS, WinogradConv2d, can_winograd, transform_kernel

PACKING = [pytest.param(True, marks=NEEDS_PACKING, id="packed"), pytest.param(False, id="bmm")]
C = WINOGRAD_MIN_CHANNELS


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def reference(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The convolution in float64, the yardstick for both the direct and the Winograd one."""
    bias = None if conv.bias is None else conv.bias.double()
    return F.conv2d(x.double(), conv.weight.double(), bias, padding=1)


@pytest.mark.parametrize("pack", PACKING)
@pytest.mark.parametrize(
    "batch, height, width, out, bias",
    [(2, 8, 8, C, True), (1, 7, 9, C + 64, True), (3, 5, 4, C, False), (1, 1, 1, C, True), (2, 2, 3, C, True)],
)
def test_matches_the_convolution(pack, batch, height, width, out, bias):
    """Even and odd sides, one cell, with and without bias: as close to the float64 result as the direct fp32 one."""
    torch.manual_seed(0)
    conv = nn.Conv2d(C, out, 3, padding=1, bias=bias)
    if bias:
        nn.init.normal_(conv.bias)  # big enough to be seen: a bias added to the wrong products would show
    x = torch.randn(batch, C, height, width)
    expected = reference(conv, x)
    layer = WinogradConv2d(conv, pack=pack)
    direct_error = (conv(x).double() - expected).abs().max().item()
    for value in (x, x.contiguous(memory_format=torch.channels_last)):
        got = layer(value)
        assert got.shape == expected.shape and got.dtype == torch.float32
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert (got.double() - expected).abs().max().item() <= max(4 * direct_error, 1e-5)


@pytest.mark.parametrize("pack", PACKING)
def test_bands_give_the_same_result(pack, monkeypatch):
    """Tile rows taken a few at a time, the last band shorter, give what one band gives."""
    torch.manual_seed(0)
    conv = nn.Conv2d(C, C, 3, padding=1)
    x = torch.randn(2, C, 14, 6)  # 7 rows of 3 tiles
    whole = WinogradConv2d(conv, pack=pack)(x)
    monkeypatch.setattr(winograd, "BAND_BYTES", 0)
    monkeypatch.setattr(winograd, "BAND_MIN_TILES", 2 * 3 * 2)  # 2 tile rows a band: 2, 2, 2, 1
    calls = []
    layer = WinogradConv2d(conv, pack=pack)
    band = layer.band
    monkeypatch.setattr(layer, "band", lambda xp, out: calls.append(out.shape[1]) or band(xp, out))
    # products of other lengths may sum in other orders: each output adds up to 9 of the 16, each a sum over C
    assert_rounding_close(layer(x), whole, terms=9 * C)
    assert calls == [2, 2, 2, 1]


def test_kernel_transform():
    """G·w·Gᵀ by hand for each kernel, at (term, out, in); the bias term's coefficients are 1 for all four outputs."""
    w = torch.randn(3, 2, 3, 3)
    g = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
    terms = transform_kernel(w)
    assert terms.shape == (16, 3, 2) and terms.dtype == w.dtype and terms.is_contiguous()
    for o in range(3):
        for c in range(2):
            torch.testing.assert_close(terms[:, o, c].reshape(4, 4), g @ w[o, c] @ g.T)
    assert transform_kernel(w.bfloat16()).dtype == torch.bfloat16
    a = torch.tensor([[1.0, 1, 1, 0], [0, 1, -1, -1]])  # Aᵀ
    term = torch.zeros(16)
    term[BIAS_TERM] = 1
    torch.testing.assert_close(a @ term.reshape(4, 4) @ a.T, torch.ones(2, 2))


@pytest.mark.parametrize("bf16_kernels", [pytest.param(True, marks=NEEDS_BF16_KERNELS), False])
def test_packs_by_default_where_onednn_packs_the_dtype(bf16_kernels, monkeypatch):
    """pack=None: packed products for fp32 weights, and for bf16 ones where oneDNN has bf16 kernels; else the batched
    matmul, with no error from oneDNN."""
    if not bf16_kernels:
        monkeypatch.setattr(ldm.accel.packed, "has_bf16_kernels", lambda: False)
    conv = nn.Conv2d(C, C, 3, padding=1)
    assert WinogradConv2d(conv).pack == ldm.accel.packed.can_pack(torch.device("cpu"))
    half = WinogradConv2d(conv.to(torch.bfloat16))
    assert half.pack == (bf16_kernels and ldm.accel.packed.can_pack(torch.device("cpu")))
    x = torch.randn(1, C, 4, 4, dtype=torch.bfloat16)
    assert half(x).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "conv, ok",
    [
        (nn.Conv2d(C, C, 3, padding=1), True),
        (nn.Conv2d(C, 2 * C, 3, padding=1, bias=False), True),
        (nn.Conv2d(C, C // 2, 3, padding=1), False),  # too few channels out
        (nn.Conv2d(C // 2, C, 3, padding=1), False),  # too few in
        (nn.Conv2d(C, C, 1), False),
        (nn.Conv2d(C, C, 3, padding=1, stride=2), False),
        (nn.Conv2d(C, C, 3, padding=0), False),
        (nn.Conv2d(C, C, 3, padding="same"), False),
        (nn.Conv2d(C, C, 3, padding=2, dilation=2), False),
        (nn.Conv2d(C, C, 3, padding=1, groups=2), False),
        (nn.Conv2d(C, C, 3, padding=1, padding_mode="reflect"), False),
    ],
)
def test_which_convolutions(conv, ok):
    assert can_winograd(conv) == ok
    if not ok:
        with pytest.raises(ValueError, match="3×3 convolutions with stride 1, zero padding 1"):
            WinogradConv2d(conv)
