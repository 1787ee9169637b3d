"""Device and dtype choice."""

from __future__ import annotations

import warnings

import torch

from ldm.errors import LdmError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
