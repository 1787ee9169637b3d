"""Sampling: the denoising loop (:mod:`ldm.pipeline.text_to_image`), the samplers (:mod:`ldm.pipeline.schedule`)
and what the loop asks of the model it calls (:mod:`ldm.pipeline.denoiser`)."""

from ldm.pipeline.text_to_image import (
    DEFAULT_GUIDANCE,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    Request,
    check_settings,
    encode_prompts,
    generate,
    to_uint8,
)

__all__ = [
    "DEFAULT_GUIDANCE", "DEFAULT_SAMPLER", "DEFAULT_STEPS", "Request", "check_settings", "encode_prompts", "generate",
    "to_uint8",
]  # fmt: skip
