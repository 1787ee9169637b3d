"""oneDNN's prepacked CPU operators as frozen modules: convolutions and linear maps whose weights are reordered once.

An ordinary CPU convolution or linear reorders its weight into oneDNN's blocked layout at every call; these keep it
reordered (the same operators inductor's weight freezing uses). For inference only: the packed weights are opaque
tensors, neither parameters nor buffers. ``ldm.accel.fast.pack_weights`` puts them into a model; ``ldm.accel.winograd`` runs its
16 products through :class:`PackedLinear`.

fp32 weights pack wherever oneDNN is; bf16 ones only on CPUs with oneDNN's bf16 kernels
(``ldm.accel.cpu.has_bf16_kernels``): elsewhere the modules refuse them with a ValueError, and ``pack_weights``
leaves such layers as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from ldm.accel.cpu import BF16_KERNELS_NEED, has_bf16_kernels


def can_pack(device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN's prepacked convolution and linear ops (the ones inductor's freezing uses) take ``dtype``
    weights on ``device``: fp32 wherever the ops are, bf16 where the CPU has oneDNN's bf16 kernels, nothing else."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._convolution_pointwise, torch.ops.mkldnn._linear_pointwise  # noqa: B018 - lookup only
    except (AttributeError, RuntimeError):
        return False
    if dtype == torch.bfloat16:
        return has_bf16_kernels()
    return dtype == torch.float32


def check_packable(weight: torch.Tensor) -> None:
    """Raise a ValueError that says why, where ``weight`` cannot be packed (rather than oneDNN's error)."""
    if can_pack(weight.device, weight.dtype):
        return
    if can_pack(weight.device) and weight.dtype == torch.bfloat16:
        why = f"{BF16_KERNELS_NEED}, which this CPU lacks"
    elif can_pack(weight.device):
        why = "only fp32 and bf16 weights are packed"
    else:
        why = "oneDNN's packed ops are for the CPU, in a torch built with oneDNN"
    raise ValueError(f"cannot pack a {weight.dtype} weight on {weight.device}: {why}; keep the layer unpacked")


class PackedConv2d(nn.Module):
    """A frozen ``nn.Conv2d`` whose weight is reordered once into oneDNN's blocked layout.

    An ordinary CPU convolution reorders its weight at every call; for the UNet's deep levels (1280 channels on a
    4×4 or 8×8 grid) that costs more than the arithmetic. Same results as the ``nn.Conv2d`` (bit for bit in bf16);
    the output is channels_last.

    Which blocked layout oneDNN's kernel wants depends on the CPU and on the input's shape, so the weight is laid out
    again for the shape of the first input, and of any input whose shape differs from the last one's: a weight laid
    out for no shape in particular suits AVX-512 kernels, and an AVX2 CPU then reorders it afresh at every call
    (emoji-tiny's 64-channel 3×3 convolutions on 8×8 latents: 2.9 ms a call against 0.36 ms unpacked and 0.25 ms
    packed for the shape, AMD EPYC, AVX2 only).
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("only zero padding given as numbers can be packed")
        weight = conv.weight.detach()
        self.args, self.packed = pack_convolution(
            weight, padding=conv.padding, stride=conv.stride, dilation=conv.dilation, groups=conv.groups
        )  # the packed weight is opaque, not a buffer
        self.packed_for: tuple[int, ...] | None = None  # the input shape the layout was chosen for
        self.bias = None if conv.bias is None else conv.bias.detach()
        self.dtype = weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape) != self.packed_for:  # the dense weight back from its packed form, exactly, then laid out anew
            self.packed = repack_convolution(self.packed, self.args, x.shape)
            self.packed_for = tuple(x.shape)
        return torch.ops.mkldnn._convolution_pointwise(x, self.packed, self.bias, *self.args, "none", [], "")


def pack_convolution(weight: torch.Tensor, *, padding, stride, dilation, groups: int,
                     input_size: torch.Size | None = None) -> tuple[tuple, torch.Tensor]:  # fmt: skip
    """A convolution weight reordered for oneDNN, and the arguments that go with it into ``_convolution_pointwise``;
    laid out for inputs of ``input_size`` where given (see :class:`PackedConv2d` for why that matters)."""
    check_packable(weight)
    args = (list(padding), list(stride), list(dilation), groups)
    size = None if input_size is None else list(input_size)
    return args, torch.ops.mkldnn._reorder_convolution_weight(weight, *args, size)


def repack_convolution(packed: torch.Tensor, args: tuple, input_size: torch.Size) -> torch.Tensor:
    """``packed`` (from :func:`pack_convolution`) laid out for inputs of ``input_size``."""
    return torch.ops.mkldnn._reorder_convolution_weight(packed.to_dense(), *args, list(input_size))


class PackedLinear(nn.Module):
    """A frozen linear map with its weight reordered once for oneDNN (see :class:`PackedConv2d`).

    ``weight`` is (out, in), or a 1×1 convolution's (out, in, 1, 1): ``PackedLinear(layer.weight, layer.bias)``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        weight = weight.detach().flatten(1)
        check_packable(weight)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)  # opaque, not a buffer
        self.bias = None if bias is None else bias.detach()
        self.dtype = weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) → (..., out)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class PackedPointwiseConv2d(PackedLinear):
    """A frozen 1×1 ``nn.Conv2d`` run as a packed linear over the cells, channels last (see :class:`PackedConv2d`).

    oneDNN's packed convolution is slow for a 1×1 kernel on some CPUs (AVX-512 without AMX: for sd-v1's 1280-channel
    projection of two 8×8 latents 38 ms against 2.0 ms as a packed linear in fp32, 47 against 1.0 ms in bf16). A
    channels_last input is already a (cells, channels) matrix, so no copy is made; the output is channels_last.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) → (B, Co, H, W)
        cells = x.permute(0, 2, 3, 1).contiguous()  # a view of a channels_last input
        return super().forward(cells).permute(0, 3, 1, 2)


def is_pointwise(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` is a plain 1×1 convolution: a linear map of each cell's channels."""
    return (
        conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding in ((0, 0), "valid")
        and conv.dilation == (1, 1) and conv.groups == 1
    )  # fmt: skip
