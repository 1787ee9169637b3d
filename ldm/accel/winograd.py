"""Winograd convolutions: a 3×3 convolution (stride 1, padding 1) as 16 matrix products over 2×2 output tiles.

The minimal filtering algorithm F(2×2, 3×3) computes each 2×2 block of outputs from the 4×4 block of inputs around
it. The input block and the 3×3 kernel are each transformed into 4×4 terms, multiplied term by term (summed over
the input channels: one matrix product per term), and the 16 products are transformed back into the 4 outputs. Per
output and channel pair that is 16/4 = 4 multiply-adds instead of 9 (2.25× fewer); what it costs is two elementwise
transforms per call (the kernel's is done once). The transforms' entries are 0, ±1 and ±½, so the results differ
from a direct convolution by rounding only: in fp32 about 1e-6 relative, and in the tests no further from the float64
convolution than oneDNN's direct one.

In bf16 the rounding of the transformed tiles and of the 16 products counts: the largest error of one convolution
against float64 went from about 4e-3 (direct) to 9e-3 of its largest output, and sd-v1's fast-path images (bf16
steps with these convolutions too) from 1.4-1.6/255 to 1.9/255 away from diffusers' fp32 ones, too near the 2/255
the fast path keeps to. So ``ldm.accel.fast`` uses it for fp32 weights only: the high-noise UNet steps and the VAE.

It pays where the matrix products dominate: many channels on a small grid. On a 2-core AVX-512 CPU (fp32, against
oneDNN's prepacked direct convolution) it ran sd-v1's UNet convolutions (320-2560 channels, 4×4 to 32×32 grids)
1.2-1.9× faster and its VAE decoder's 512-channel ones 1.5-1.7×; at 256 channels 1.15× on a 128×128 grid, 1.0× on
256×256; at 128 channels on 256×256 0.84×, its transforms moving more memory than its products save. Hence
``WINOGRAD_MIN_CHANNELS``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.accel.packed import PackedLinear, can_pack

# The kernel transform G (4×3): U = G·w·Gᵀ per channel pair. The input transform Bᵀ and the output transform Aᵀ
# are written out as additions in WinogradConv2d.forward: Bᵀ = [[1,0,-1,0], [0,1,1,0], [0,-1,1,0], [0,1,0,-1]],
# Aᵀ = [[1,1,1,0], [0,1,-1,-1]].
KERNEL_TRANSFORM = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
# The product whose output transform coefficient is 1 for all four outputs (row 1, column 1 of the 4×4 terms): the
# bias goes into it, so it is added once per output by the matrix product itself.
BIAS_TERM = 5
# Transformed tiles are made and used a band of tile rows at a time, each band's about this size, so that they are
# still in the cache when the products read them.
BAND_BYTES = 4 * 2**20
BAND_MIN_TILES = 512  # but not so few tiles that the products run short
TRANSFORM_BLOCK = 2**15  # kernels transformed at a time (in float64: 2.4 MB in, 4 MB out)
# Convolutions with fewer input or output channels stay direct (speeds in the module docstring).
WINOGRAD_MIN_CHANNELS = 256


def can_winograd(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` is a 3×3 convolution F(2×2, 3×3) computes (stride 1, zero padding 1, no dilation or groups)
    with at least ``WINOGRAD_MIN_CHANNELS`` input and output channels."""
    return (
        type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
        and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
        and min(conv.in_channels, conv.out_channels) >= WINOGRAD_MIN_CHANNELS
    )  # fmt: skip


def transform_kernel(weight: torch.Tensor) -> torch.Tensor:
    """(out, in, 3, 3) → (16, out, in): the 4×4 terms G·w·Gᵀ of each kernel, computed in float64, in its dtype.

    G·w·Gᵀ, read row by row, is (G ⊗ G)·vec(w): one (16, 9) × (9, out·in) product gives every kernel's terms already
    term-major. A block of output channels at a time, so that the float64 copies stay in the cache: for sd-v1's UNet
    and VAE an einsum over whole weights took 23 of the fast path's 31 s of set-up, this 7 s.
    """
    out, c = weight.shape[:2]
    gg = torch.kron(*[torch.tensor(KERNEL_TRANSFORM, dtype=torch.float64, device=weight.device)] * 2)  # (16, 9)
    terms = torch.empty(16, out, c, dtype=weight.dtype, device=weight.device)
    kernels = weight.detach().reshape(out, c * 9)
    rows = max(1, TRANSFORM_BLOCK // c)
    for top in range(0, out, rows):
        block = kernels[top : top + rows].reshape(-1, 9).double()  # (rows·in, 9)
        terms[:, top : top + rows] = (gg @ block.T).view(16, -1, c)
    return terms


class WinogradConv2d(nn.Module):
    """A frozen 3×3 ``nn.Conv2d`` (see :func:`can_winograd`) computed by F(2×2, 3×3), for inference.

    The 16 products are oneDNN linears with prepacked weights (``ldm.accel.packed.PackedLinear``; ``pack=True``, or
    by default where oneDNN packs the weight's dtype), else one batched matmul. Any input layout and grid size (odd
    sides are padded by a zero row or column, whose outputs are dropped); the output is channels_last.
    """

    def __init__(self, conv: nn.Conv2d, *, pack: bool | None = None):
        super().__init__()
        if not can_winograd(conv):
            raise ValueError("Winograd F(2×2, 3×3) takes 3×3 convolutions with stride 1, zero padding 1, no dilation "
                             f"or groups, and at least {WINOGRAD_MIN_CHANNELS} channels in and out; got {conv}")  # fmt: skip
        terms = transform_kernel(conv.weight)  # (16, out, in)
        self.out_channels = conv.out_channels
        self.dtype = conv.weight.dtype
        self.bias = None if conv.bias is None else conv.bias.detach()
        self.pack = can_pack(conv.weight.device, conv.weight.dtype) if pack is None else pack
        if self.pack:
            self.linears = nn.ModuleList(
                PackedLinear(t, self.bias if i == BIAS_TERM else None) for i, t in enumerate(terms)
            )
        else:
            self.terms = terms.transpose(1, 2).contiguous()  # (16, in, out) for the batched matmul

    def products(self, tiles: torch.Tensor) -> list[torch.Tensor]:
        """(16, T, in) transformed input tiles → the 16 (T, out) products, the bias in ``BIAS_TERM``'s."""
        if self.pack:
            return [linear(term) for linear, term in zip(self.linears, tiles)]
        products = list(torch.bmm(tiles, self.terms).unbind(0))
        if self.bias is not None:
            products[BIAS_TERM] = products[BIAS_TERM] + self.bias
        return products

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) → (N, out, H, W), channels_last
        n, c, height, width = x.shape
        h, w = (height + 1) // 2, (width + 1) // 2  # tiles per column and row
        # zero padding 1, and one more row/column on an odd side: (N, 2h+2, 2w+2, C), channels innermost
        xp = F.pad(x, (1, 1 + width % 2, 1, 1 + height % 2)).permute(0, 2, 3, 1)
        out = torch.empty(n, h, 2, w, 2, self.out_channels, dtype=x.dtype, device=x.device)
        # bands of tile rows whose transformed tiles fit in a cache (about BAND_BYTES), one after another
        band = max(-(-BAND_MIN_TILES // (n * w)), BAND_BYTES // (16 * n * w * c * x.element_size()))
        for top in range(0, h, band):
            rows = min(band, h - top)
            self.band(xp[:, 2 * top : 2 * (top + rows) + 2], out[:, top : top + rows])
        out = out.view(n, 2 * h, 2 * w, self.out_channels).permute(0, 3, 1, 2)
        if (height, width) != (2 * h, 2 * w):  # an odd side's extra outputs dropped
            out = out[:, :, :height, :width].contiguous(memory_format=torch.channels_last)
        return out

    def band(self, xp: torch.Tensor, out: torch.Tensor) -> None:
        """Padded input rows (N, 2h+2, 2w+2, C) → the (N, h, 2, w, 2, out) outputs of their h rows of tiles."""
        n, h, _, w, _, k = out.shape
        c = xp.shape[-1]
        rows = [xp[:, i : i + 2 * h : 2] for i in range(4)]  # row i of every tile: (N, h, 2w+2, C)
        r = (rows[0] - rows[2], rows[1] + rows[2], rows[2] - rows[1], rows[1] - rows[3])  # Bᵀ·d
        tiles = torch.empty(16, n, h, w, c, dtype=xp.dtype, device=xp.device)
        for i, ri in enumerate(r):  # (Bᵀ·d)·B, column by column
            col = [ri[:, :, j : j + 2 * w : 2] for j in range(4)]
            torch.sub(col[0], col[2], out=tiles[4 * i])
            torch.add(col[1], col[2], out=tiles[4 * i + 1])
            torch.sub(col[2], col[1], out=tiles[4 * i + 2])
            torch.sub(col[1], col[3], out=tiles[4 * i + 3])
        m = self.products(tiles.view(16, n * h * w, c))
        # Aᵀ·m·A: first over the term rows (s: output row 0, d: output row 1), then over the columns
        d = [m[4 + j] - m[8 + j] - m[12 + j] for j in range(4)]
        s = [m[j].add_(m[4 + j]).add_(m[8 + j]) for j in range(4)]
        for row, t in enumerate((s, d)):
            out[:, :, row, :, 0] = (t[0] + t[1] + t[2]).view(n, h, w, k)
            out[:, :, row, :, 1] = (t[1] - t[2] - t[3]).view(n, h, w, k)
