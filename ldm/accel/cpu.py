"""What this CPU computes: the questions the speed-ups ask before taking a path, and their tests before running.

The fast path picks bf16 only where the CPU computes it natively (:func:`has_native_bf16`) and packs bf16 weights
only where oneDNN has bf16 kernels (:func:`has_bf16_kernels`); the tests that need either skip on the same answer,
so a CPU without the feature gets the fallback and a skip with its reason, never oneDNN's error.

The flags are /proc/cpuinfo's, less those that the CPU's own answer (CPUID, as torch reads it, and as oneDNN
dispatches on) denies. On real hardware the two agree; under an emulator such as ``qemu-x86_64 -cpu Haswell``
/proc/cpuinfo is the host's (AVX-512 listed) while CPUID is the emulated model's (AVX2 only), and torch and oneDNN
follow CPUID.

``LDM_CPU_FLAGS_MASK`` takes flags away: a comma-separated list of /proc/cpuinfo flag names (``avx512bw``,
``avx512_bf16``, ``amx_bf16``, ...) that every answer here treats as absent. It cannot add a feature the CPU lacks;
it is for checking, on a CPU that has them, what a CPU without them does: ``LDM_CPU_FLAGS_MASK=avx512bw python -m
pytest tests/accel`` runs the fallbacks and skips of an AVX2-only CPU.
"""

from __future__ import annotations

import os
import platform
from functools import cache
from pathlib import Path

import torch

MASK_VARIABLE = "LDM_CPU_FLAGS_MASK"
# oneDNN computes bf16 on x86 with AVX-512 BW, VL and DQ, or with AVX-NE-CONVERT; without either, torch refuses to
# pack a bf16 weight ("bf16 path needs the cpu support avx_ne_convert or avx512bw, avx512vl and avx512dq").
BF16_KERNEL_FLAGS = (frozenset({"avx512bw", "avx512vl", "avx512dq"}), frozenset({"avx_ne_convert"}))
BF16_KERNELS_NEED = "oneDNN's bf16 kernels need avx512bw, avx512vl and avx512dq, or avx_ne_convert"
# Native bf16 arithmetic (bf16 products faster than fp32 ones): AVX512-BF16 or AMX.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@cache
def _cpuinfo_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


# /proc/cpuinfo's name → the name torch.cpu.get_capabilities() gives the same CPUID bit, where the two differ
# (besides the AVX-512 ones, "avx512bw" → "avx512_bw")
CPUID_NAMES = {"fma": "fma3", "bmi1": "bmi", "sha_ni": "sha", "pni": "sse3", "abm": "lzcnt"}


def _cpuid_name(flag: str) -> str:
    if flag.startswith("avx512") and not flag.startswith("avx512_"):
        return "avx512_" + flag.removeprefix("avx512")
    return CPUID_NAMES.get(flag, flag)


def cpuid_denied(flags: frozenset[str]) -> frozenset[str]:
    """Those of ``flags`` that CPUID, as torch reads it, says the CPU lacks (a flag torch does not name stays)."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # absent from older torch: /proc/cpuinfo alone
    if capabilities is None or not is_x86():
        return frozenset()
    known = capabilities()
    return frozenset(flag for flag in flags if known.get(_cpuid_name(flag), True) is False)


def masked_flags() -> frozenset[str]:
    """The flags ``LDM_CPU_FLAGS_MASK`` names (read at every call, so a test can set it)."""
    return frozenset(name.strip().lower() for name in os.environ.get(MASK_VARIABLE, "").split(",") if name.strip())


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none, e.g. macOS) that CPUID confirms, less the
    masked ones."""
    flags = _cpuinfo_flags()
    return flags - cpuid_denied(flags) - masked_flags()


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def has_bf16_kernels() -> bool:
    """Whether oneDNN computes bf16 convolutions and linears on this CPU, which packing bf16 weights needs.

    torch's own answer (the check it makes before packing a bf16 weight); on x86, where /proc/cpuinfo lists the
    flags, they must say so too, so that ``LDM_CPU_FLAGS_MASK`` can take the feature away.
    """
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        supported = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the query
        return False
    if not supported or not is_x86() or not _cpuinfo_flags():
        return supported
    flags = cpu_flags()
    return any(needed <= flags for needed in BF16_KERNEL_FLAGS)


def has_native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls and convolutions run natively (faster than fp32) on ``device``.

    On x86 CPUs that is AVX512-BF16 or AMX, with oneDNN's bf16 kernels: without them oneDNN emulates bf16, which is
    slower than fp32, or has no bf16 kernels at all.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu" or not is_x86():
        return False
    return (
        torch.backends.cpu.get_cpu_capability().startswith("AVX512")
        and bool(NATIVE_BF16_FLAGS & cpu_flags())
        and has_bf16_kernels()
    )
