"""Sampling: the denoising loop (:mod:`ldm.pipeline.text_to_image`), the samplers (:mod:`ldm.pipeline.schedule`),
what the loop asks of the model it calls (:mod:`ldm.pipeline.denoiser`) and how it reads prompts
(:mod:`ldm.pipeline.prompts`)."""

from ldm.images import to_uint8  # generate's images, (B, 3, H, W) in [0, 1], as 8-bit pixels
from ldm.pipeline.text_to_image import (
    DEFAULT_GUIDANCE,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    Request,
    StepHook,
    StopSampling,
    check_generation_memory,
    check_settings,
    decode,
    encode_prompts,
    generate,
)

__all__ = [
    "DEFAULT_GUIDANCE", "DEFAULT_SAMPLER", "DEFAULT_STEPS", "Request", "StepHook", "StopSampling", "check_generation_memory", "check_settings",
    "decode", "encode_prompts", "generate", "to_uint8",
]  # fmt: skip
