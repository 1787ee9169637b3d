"""Device and dtype choice, and the memory a job may ask for before it starts."""

from __future__ import annotations

import os
import warnings

import torch

from ldm.errors import LdmError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MEMORY_LIMIT_ENV = "LDM_MEMORY_LIMIT_GB"
MEMORY_SHARE = 0.8  # of the machine's memory, the default limit: the rest is the OS, Python and the libraries
GIB = 1 << 30


def memory_limit() -> int:
    """Bytes a job may plan to allocate: ``$LDM_MEMORY_LIMIT_GB`` GiB, or 80 % of this machine's memory."""
    value = os.environ.get(MEMORY_LIMIT_ENV)
    if value:
        try:
            limit = float(value)
        except ValueError:
            limit = -1.0
        if not 0 < limit < float("inf"):
            raise LdmError(f"{MEMORY_LIMIT_ENV}={value!r} is not a positive number of GiB; e.g. {MEMORY_LIMIT_ENV}=16")
        return int(limit * GIB)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: a conservative guess
        total = 16 * GIB
    return int(total * MEMORY_SHARE)


def check_memory(needed: float, *, what: str, fix: str) -> None:
    """Refuse a job that would allocate about ``needed`` bytes when that is above :func:`memory_limit`: before the
    work, so that it fails at once with the numbers instead of swapping, hanging or being killed."""
    limit = memory_limit()
    if needed > limit:
        raise LdmError(
            f"{what} needs about {needed / GIB:.1f} GiB, more than the {limit / GIB:.1f} GiB limit; {fix}, or raise "
            f"the limit with {MEMORY_LIMIT_ENV}=N"
        )


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LdmError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LdmError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise LdmError("--device mps was asked for but MPS is not available; use --device cpu or auto")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in DTYPES:
        raise LdmError(f"unknown dtype '{name}'; choose one of: {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if dtype is torch.float16 and device.type == "cpu":
        warnings.warn("fp16 on the CPU is slow and may overflow; bf16 or fp32 are better there", stacklevel=2)
    return dtype
