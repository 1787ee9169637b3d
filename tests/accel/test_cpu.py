"""The CPU feature questions (ldm.accel.cpu) that the speed-ups and their tests both ask, and the mask that checks
their fallbacks on a CPU that has the features."""

import pytest
import torch

import ldm.accel.cpu
from ldm.accel.cpu import MASK_VARIABLE, cpu_flags, has_bf16_kernels, has_native_bf16, is_x86, masked_flags

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
