"""The rules of the speed-up settings, apart from the modules that run them: cheap to import and to call, so a
command checks its flags before it loads a model."""

from __future__ import annotations

import math
from enum import Enum

from ldm.errors import LdmError


class Backend(Enum):
    """What runs the UNet: torch (with or without the speed-ups), or OpenVINO's CPU runtime (``ldm.accel.openvino``,
    an optional extra)."""

    TORCH = "torch"
    OPENVINO = "openvino"

    @property
    def recorded(self) -> str | None:
        """What a PNG's parameters record: nothing for torch, the default, so its PNGs read as they always did."""
        return None if self is Backend.TORCH else self.value


def check_interval(interval: int, *, off: bool = True) -> None:
    """The one rule for a deep-cache interval, whoever takes it: 2 or more, or 0 (reuse off) where ``off``."""
    if interval >= 2 or (off and interval == 0):
        return
    allowed = "0 (off) or 2 or more" if off else "2 or more"
    raise LdmError(f"--deep-cache N runs the whole UNet every N-th step; N must be {allowed}, not {interval}")


def check_ratio(ratio: float) -> None:
    """The one rule for a token-merging ratio, whoever takes it: 0 (off) up to, not including, 1."""
    if not (0.0 <= ratio < 1.0) or math.isnan(ratio):
        raise LdmError(f"--token-merging R merges a fraction R of the self-attention's tokens; R must be at least 0 "
                       f"(off) and below 1, e.g. 0.5, not {ratio}")  # fmt: skip


def check(
    *, fast: bool = False, compile: bool = False, deep_cache: int = 0, token_merging: float = 0.0, dtype: str = "fp32",
    backend: Backend = Backend.TORCH, device: str = "cpu",
) -> None:  # fmt: skip
    """Reject speed-up settings that cannot run, or not together, each with the fix.

    ``dtype`` is the name (``ldm.runtime.DTYPES``) the weights are, or will be, loaded in, ``device`` the type of the
    device they run on. Cheap, and needs no model: a command calls it on its flags before loading one, and
    :func:`prepare` calls it again.
    """
    if backend is Backend.OPENVINO:
        torch_only = [flag for flag, on in (("--fast", fast), ("--compile", compile), ("--deep-cache", deep_cache),
                                            ("--token-merging", token_merging)) if on]  # fmt: skip
        if torch_only:
            raise LdmError(f"{' and '.join(torch_only)} speed up torch's UNet, which --backend openvino replaces; "
                           "drop one or the other")  # fmt: skip
        if dtype != "fp32" or device != "cpu":
            raise LdmError(f"--backend openvino runs fp32 weights on the CPU, not --dtype {dtype} on {device}; drop "
                           "--dtype and --device, or use --backend torch")  # fmt: skip
    if compile and not fast:
        raise LdmError("--compile speeds up the fast path; add --fast")
    check_interval(deep_cache)
    check_ratio(token_merging)
    if token_merging and deep_cache:
        raise LdmError("--token-merging and --deep-cache do not combine (the reuse's shallow steps bypass the merging); "
                       "pick one")  # fmt: skip
    if fast and dtype != "fp32":
        raise LdmError(f"--fast sets the UNet's precision itself and needs fp32 weights, not --dtype {dtype}")
