"""The CPU feature questions (ldm.accel.cpu) that the speed-ups and their tests both ask, and the mask that checks
their fallbacks on a CPU that has the features."""

import pytest
import torch

import ldm.accel.cpu
from ldm.accel.cpu import (
    MASK_VARIABLE,
    cpu_flags,
    cpuid_denied,
    has_bf16_kernels,
    has_native_bf16,
    is_x86,
    masked_flags,
)

CPU = torch.device("cpu")
X86_FLAGS = pytest.mark.skipif(
    not (is_x86() and ldm.accel.cpu._cpuinfo_flags()), reason="needs an x86 CPU whose flags /proc/cpuinfo lists"
)


@pytest.fixture(autouse=True)
def unmasked(monkeypatch):
    monkeypatch.delenv(MASK_VARIABLE, raising=False)


def test_the_mask_takes_flags_away(monkeypatch):
    flags = cpu_flags()
    monkeypatch.setenv(MASK_VARIABLE, " AVX512BW, avx2,,nothing_of_the_kind")
    assert masked_flags() == {"avx512bw", "avx2", "nothing_of_the_kind"}
    assert cpu_flags() == flags - {"avx512bw", "avx2"}  # it takes away, never adds


def test_cpuid_takes_away_what_cpuinfo_alone_claims(monkeypatch):
    """Under an emulator /proc/cpuinfo is the host's: a flag that CPUID (torch's reading) denies is absent; one
    that torch does not name stays as /proc/cpuinfo says."""
    cpuinfo = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16", "hypervisor"})
    cpuid = {"avx2": True, "fma3": True, "avx512_f": False, "avx512_bw": False, "avx512_bf16": False}
    monkeypatch.setattr(ldm.accel.cpu, "_cpuinfo_flags", lambda: cpuinfo)
    monkeypatch.setattr(ldm.accel.cpu, "is_x86", lambda: True)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: cpuid)
    assert cpuid_denied(cpuinfo) == {"avx512f", "avx512bw", "avx512_bf16"}
    assert cpu_flags() == {"avx2", "fma", "amx_bf16", "hypervisor"}
    monkeypatch.setenv(MASK_VARIABLE, "amx_bf16")
    assert cpu_flags() == {"avx2", "fma", "hypervisor"}


@X86_FLAGS
def test_every_flag_kept_is_one_cpuid_confirms():
    """Natively and under an emulator alike, no flag the answers use is one the CPU would fault on."""
    if not hasattr(torch.cpu, "get_capabilities"):
        pytest.skip("this torch cannot read CPUID (no torch.cpu.get_capabilities)")
    capabilities = torch.cpu.get_capabilities()
    named = {flag: ldm.accel.cpu._cpuid_name(flag) for flag in cpu_flags()}
    assert all(capabilities.get(name, True) is True for name in named.values())


@X86_FLAGS
def test_bf16_kernels_are_torchs_answer_unless_masked(monkeypatch):
    assert has_bf16_kernels() == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    monkeypatch.setenv(MASK_VARIABLE, "avx512bw,avx_ne_convert")  # neither way to oneDNN's bf16 kernels is left
    assert not has_bf16_kernels()
    monkeypatch.setenv(MASK_VARIABLE, "avx512_bf16,amx_bf16")  # native bf16 arithmetic is another question
    assert has_bf16_kernels() == torch.ops.mkldnn._is_mkldnn_bf16_supported()


@X86_FLAGS
def test_native_bf16_needs_the_flags_and_the_kernels(monkeypatch):
    """The fast path's bf16 choice: AVX512-BF16 or AMX, and oneDNN's bf16 kernels; without either, no bf16."""
    if has_native_bf16(CPU):
        assert has_bf16_kernels() and {"avx512_bf16", "amx_bf16"} & cpu_flags()
    monkeypatch.setenv(MASK_VARIABLE, "avx512_bf16,amx_bf16")
    assert not has_native_bf16(CPU)
    monkeypatch.delenv(MASK_VARIABLE)
    monkeypatch.setattr(ldm.accel.cpu, "has_bf16_kernels", lambda: False)
    assert not has_native_bf16(CPU)


def test_no_native_bf16_off_the_cpu_and_cuda():
    assert not has_native_bf16(torch.device("meta"))
