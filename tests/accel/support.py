"""What the speed-up tests share: skips for CPU features they need, and tolerances for rounding differences.

The skips ask ``ldm.accel.cpu`` and ``ldm.accel.packed``, the questions the code asks before taking the same path,
so ``LDM_CPU_FLAGS_MASK=avx512bw`` turns both the code's fallbacks and these skips on, on a CPU that has the feature.
"""

import math

import pytest
import torch

from ldm.accel.cpu import BF16_KERNELS_NEED, MASK_VARIABLE, has_bf16_kernels, masked_flags
from ldm.accel.packed import can_pack

CPU = torch.device("cpu")


def _absent(what: str) -> str:
    """A skip's reason: what the test needs, and that the CPU lacks it, or that LDM_CPU_FLAGS_MASK takes it away."""
    if masked_flags():
        return f"{what}, which {MASK_VARIABLE}={','.join(sorted(masked_flags()))} takes away"
    return f"{what}, which this CPU lacks"


NEEDS_PACKING = pytest.mark.skipif(not can_pack(CPU), reason="this torch has no oneDNN packed ops")
NEEDS_BF16_KERNELS = pytest.mark.skipif(not has_bf16_kernels(), reason=_absent(BF16_KERNELS_NEED))
# The dtypes a test of packed weights runs in: bf16 only where oneDNN has bf16 kernels
PACKED_DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, marks=NEEDS_BF16_KERNELS, id="bf16"),
]


def rounding_tolerance(dtype: torch.dtype, *, terms: int, scale: float, k: float = 4.0) -> float:
    """An absolute tolerance for two computations of the same sums that differ in rounding only.

    ``terms`` is how many products each output sums (a reduction's length, or the lengths of a chain of them added),
    ``scale`` the size of those sums (the largest output, or of what it is a weighted mean of). Two kernels that sum
    in other orders (AVX2 against AVX-512 blocking, a fused kernel against its decomposition) each round about
    √terms times with independent signs, so they differ by about ε·√terms·scale, ε the machine epsilon of the
    accumulation (fp32 for fp32 and, on CPUs, for bf16 and fp16 too), rather than the worst case terms·ε·scale; k = 4
    covers the largest of a few thousand outputs (about √(2 ln N) standard deviations). A result in a narrower dtype
    is rounded into it once more, maybe twice (before and after a bias), which adds up to 2 of its ε.

    Derived from the dtype and the reduction rather than measured on one machine's kernels, and still far below
    what a wrong term, scale or mask costs.
    """
    accumulation = torch.float64 if dtype == torch.float64 else torch.float32
    rounding = k * torch.finfo(accumulation).eps * math.sqrt(terms)
    if torch.finfo(dtype).eps > torch.finfo(accumulation).eps:
        rounding += 2 * torch.finfo(dtype).eps
    return rounding * scale


def assert_rounding_close(got: torch.Tensor, expected: torch.Tensor, *, terms: int, k: float = 4.0, scale=None):
    """``got`` is ``expected`` up to :func:`rounding_tolerance` (scale: ``expected``'s largest value, unless given)."""
    assert got.shape == expected.shape and got.dtype == expected.dtype, (got.shape, got.dtype, expected.dtype)
    scale = expected.abs().max().item() if scale is None else scale
    tolerance = rounding_tolerance(expected.dtype, terms=terms, scale=scale, k=k)
    error = (got.double() - expected.double()).abs().max().item()
    assert error <= tolerance, f"off by {error:.3g}, more than rounding explains ({tolerance:.3g})"
