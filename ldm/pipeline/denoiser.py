"""What the sampling loop may rely on in the model it calls at every step.

:class:`Denoiser` is a diffusers ``UNet2DConditionModel`` or any module with the same call (the wrappers of
``ldm.accel``): ``denoiser(sample, timestep, encoder_hidden_states=context).sample`` with the UNet's ``config``,
``dtype`` and ``device``. A denoiser that keeps state from one step to the next (deep-feature reuse does) is a
:class:`SamplingState` too, and is told when a new sampling run begins; the loop knows nothing else about it.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Denoiser(Protocol):
    """A noise (or v) predictor with a diffusers UNet's call and attributes."""

    config: Any
    dtype: torch.dtype
    device: torch.device

    def __call__(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, **kwargs) -> Any: ...


@runtime_checkable
class SamplingState(Protocol):
    """A denoiser (or a module inside one) that carries state across the steps of one sampling run."""

    def start_sampling_run(self) -> None:
        """Forget what earlier calls kept: the next call begins a new run."""


def start_sampling_run(denoiser: nn.Module) -> None:
    """Tell every :class:`SamplingState` in ``denoiser`` (it may be one, or hold some) that a new run begins."""
    for module in denoiser.modules() if isinstance(denoiser, nn.Module) else (denoiser,):
        if isinstance(module, SamplingState):
            module.start_sampling_run()


class UNetWrapper(nn.Module):
    """A module that samplers call in place of the diffusers UNet it wraps: the same config, dtype and device."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device
