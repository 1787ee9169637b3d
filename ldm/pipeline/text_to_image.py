"""The latent diffusion sampling loop, top to bottom, for every mode.

tokenize → encode text → first latents → for each timestep: UNet on (uncond, cond) in one batch, guidance,
scheduler step → VAE decode. Classifier-free guidance: Ho & Salimans 2022, ε̂ = ε_u + s·(ε_c − ε_u). The image
inputs (img2img, inpainting, upscaling) are pieces the loop calls at fixed points: :mod:`ldm.pipeline.modes`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from ldm.errors import LdmError
from ldm.images import MAX_SIDE, signed_to_unit
from ldm.models.autoencoder import decode_latents
from ldm.models.tiny_autoencoder import TRAIN_COMMAND, tiny_decode
from ldm.models.unet import guidance_embedding
from ldm.pipeline.denoiser import start_sampling_run
from ldm.pipeline.modes import DEFAULT_NOISE_LEVEL, Fill
from ldm.pipeline.modes import start as start_latents
from ldm.pipeline.prompts import apply_weights, chunk_prompt
from ldm.pipeline.schedule import LCM_GRID_STEPS, Sampler, build_scheduler
from ldm.runtime import check_memory

if TYPE_CHECKING:
    from ldm.formats.bundle import Bundle
    from ldm.models.embeddings import EmbeddingSet
    from ldm.models.presets import ModelConfig

# What generate.py draws with unless told otherwise; train_unet's validation grids use the same.
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 7.5
DEFAULT_SAMPLER = "dpmpp_2m"

StepHook = Callable[[int, int, torch.Tensor], None]  # (steps done, steps in all, the latents (B, C, H/f, W/f))


class StopSampling(Exception):
    """Raised by an ``on_step`` hook to end the loop early: :func:`generate` decodes the latents it has so far (a
    server's interrupt returns the partly denoised images instead of nothing)."""


@dataclass(frozen=True, kw_only=True)
class Request:
    """One batch of images to make: ``prompts[i]`` with ``seeds[i]``, and the image inputs of a mode
    (:mod:`ldm.pipeline.modes`), all at ``width``×``height`` but the upscaler's input."""

    prompts: list[str]
    negative_prompts: list[str]
    seeds: list[int]
    steps: int
    guidance_scale: float
    sampler: Sampler
    width: int
    height: int
    image: torch.Tensor | None = None  # (B, 3, H, W) in [0, 1]: img2img's start, inpainting's original
    strength: float = 1.0  # img2img's denoising strength: 1 ignores the image, 0 returns its VAE round trip
    mask: torch.Tensor | None = None  # (B, 1, H, W) in [0, 1], 1 = repaint; soft edges blend the final composite
    fill: Fill = Fill.ORIGINAL  # what the masked region starts from when strength < 1
    low_res: torch.Tensor | None = None  # (B, 3, H/s, W/s) in [0, 1]: an upscaler's input (s its factor)
    noise_level: int = DEFAULT_NOISE_LEVEL  # an upscaler's noise augmentation of its input
    clip_skip: int = 1  # A1111's "Clip skip": condition on the N-th text-encoder layer from the end
    embeddings: EmbeddingSet | None = None  # textual-inversion embeddings the prompts may name (ldm.models.embeddings)
    tiny_vae: bool = False  # decode with the bundle's tiny autoencoder (ldm.models.tiny_autoencoder), not its VAE

    def __post_init__(self):
        if not len(self.prompts) == len(self.negative_prompts) == len(self.seeds) > 0:
            raise ValueError("prompts, negative_prompts and seeds must be non-empty and of one length")
        # the sizes against the VAE's downsampling factor: in generate, which has the model
        check_settings(steps=self.steps, width=self.width, height=self.height, guidance_scale=self.guidance_scale)


def check_settings(
    *, steps: int, width: int, height: int, guidance_scale: float, factor: int | None = None,
    train_timesteps: int | None = None,
) -> None:  # fmt: skip
    """Reject settings the loop cannot run, each with the fix.

    ``factor``: the VAE's downsampling factor (``bundle.config.vae.downsampling_factor``), which the width and height
    must be multiples of; a caller that has no model yet passes None, and only positive sizes are checked then.
    ``train_timesteps``: the schedule's ``num_train_timesteps``, the most sampling steps it has.
    """
    if steps <= 0:
        raise LdmError(f"steps must be a positive number, got {steps}; try --steps 20")
    if train_timesteps is not None and steps > train_timesteps:
        raise LdmError(f"steps must be at most {train_timesteps} (the model's training timesteps), got {steps}; "
                       "20-50 is usual")  # fmt: skip
    for name, value in (("width", width), ("height", height)):
        if value > MAX_SIDE:
            raise LdmError(f"{name} must be at most {MAX_SIDE} pixels, got {value}; generate smaller and upscale")
        if factor is None and value <= 0:
            raise LdmError(f"{name} must be a positive number of pixels, got {value}; leave it out for the model's size")
        if factor is not None and (value <= 0 or value % factor):
            fix = max(factor, value // factor * factor)
            raise LdmError(f"{name} must be a positive multiple of {factor} (the VAE's downsampling factor), got {value}; "
                           f"try {fix}")  # fmt: skip
    if not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise LdmError(f"guidance scale must be a finite number ≥ 0, got {guidance_scale}; ≤ 1 turns guidance off, "
                       "5–9 is usual")  # fmt: skip


def check_sampler_steps(request: Request) -> None:
    """The LCM sampler takes its steps from the grid of skipping steps a consistency model is trained on."""
    if request.sampler.name == "lcm" and request.steps > LCM_GRID_STEPS:
        raise LdmError(f"the LCM sampler takes at most {LCM_GRID_STEPS} steps, got {request.steps}; 2-8 is usual "
                       "(a consistency model or an LCM-LoRA samples in few steps)")  # fmt: skip


LIVE_TENSORS = 4  # activations of a level's size alive at once in an inference pass: input, norm, output, residual


def check_generation_memory(config: ModelConfig, *, width: int, height: int, batch: int) -> None:
    """Refuse a batch whose activations would not fit the memory limit (:func:`ldm.runtime.check_memory`), before
    any work: a rough bound from the UNet's levels at the latent size (a guided batch is two halves) and the VAE
    decoder's levels at the image size, each level a quarter the area of the one above."""
    factor = config.vae.downsampling_factor

    def level_bytes(channels, pixels: int, images: int) -> float:
        return 4.0 * images * pixels * sum(c / 4**level for level, c in enumerate(channels)) * LIVE_TENSORS

    unet = level_bytes(config.unet.block_out_channels, (width // factor) * (height // factor), 2 * batch)
    vae = level_bytes(config.vae.block_out_channels, width * height, batch)
    check_memory(max(unet, vae) + 4.0 * batch * 3 * width * height, what=f"a batch of {batch} at {width}×{height}",
                 fix="lower --width/--height or --batch-size")  # fmt: skip


@torch.no_grad()
def encode_prompts(bundle: Bundle, prompts: list[str], *, dtype: torch.dtype | None = None, clip_skip: int = 1,
                   embeddings: EmbeddingSet | None = None) -> torch.Tensor:  # fmt: skip
    """(B,) prompts → (B, k·L, D) text hidden states in ``dtype`` (default: the UNet's), read in A1111's prompt
    language (:mod:`ldm.pipeline.prompts`): each prompt k chunks of L tokens, encoded chunk by chunk and weighted;
    the words that name one of ``embeddings`` read as its vectors.

    k is the most chunks any of the prompts needs: one batch, one sequence length, so the prompts with fewer are
    padded with the empty prompt's chunk. Each distinct prompt is encoded once, each distinct chunk too.

    A class-conditional or unconditional model (:mod:`ldm.models.labels`) reads each prompt as a class name ("" the
    null label): (B, 1, D).
    """
    if bundle.labels is not None:  # clip_skip has no meaning here: there is one token
        labels = bundle.labels
        return labels(labels.labels(prompts)).hidden_states.to(dtype or bundle.unet.dtype)  # (B, 1, D)
    cfg = bundle.config.text_encoder
    row = {prompt: i for i, prompt in enumerate(dict.fromkeys(prompts))}  # distinct prompts, first-seen order
    chunked = [chunk_prompt(bundle.tokenizer, p, context_length=cfg.context_length, pad_id=cfg.pad_id,
                            embeddings=embeddings) for p in row]  # fmt: skip
    k = max(len(c) for c in chunked)
    if k > 1:
        empty = chunk_prompt(bundle.tokenizer, "", context_length=cfg.context_length, pad_id=cfg.pad_id)
        chunked = [c.padded(k, empty) for c in chunked]
    ids = torch.cat([c.ids for c in chunked])  # (U·k, L)
    weights = torch.cat([c.weights for c in chunked])  # (U·k, L)
    vectors = embeddings.vectors if embeddings is not None and bool((ids < 0).any()) else None
    hidden = _encode_distinct(bundle.text_encoder, ids, clip_skip, vectors)  # (U·k, L, D)
    hidden = apply_weights(hidden, weights).to(dtype or bundle.unet.dtype)
    if k > 1:
        hidden = hidden.reshape(len(row), k * cfg.context_length, hidden.shape[-1])  # (U, k·L, D): chunks in a row
    if len(row) == len(prompts):
        return hidden
    return hidden[torch.tensor([row[p] for p in prompts], device=hidden.device)]  # (B, k·L, D)


def _encode_distinct(text_encoder: nn.Module, ids: torch.Tensor, clip_skip: int = 1,
                     vectors: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """(N, L) token ids → (N, L, D) hidden states, each distinct row through the encoder once (the empty prompt's
    chunk that pads a batch is often one of its prompts' too). Rows all distinct: the encoder's tensor itself.
    ``vectors``: the embeddings' table that negative ids index (:class:`~ldm.models.text_encoder.TextEncoder`)."""
    first = {}  # a row's ids → its position among the distinct rows
    index = [first.setdefault(tuple(r), len(first)) for r in ids.tolist()]
    kwargs = {"clip_skip": clip_skip} if clip_skip != 1 else {}  # the plain call unless asked: any encoder takes it
    if vectors is not None:
        kwargs["vectors"] = vectors
    if len(first) == len(index):
        return text_encoder(ids, **kwargs).hidden_states
    hidden = text_encoder(torch.tensor(list(first), dtype=ids.dtype), **kwargs).hidden_states  # (U, L, D), in order
    return hidden[torch.tensor(index, device=hidden.device)]  # (N, L, D)


@torch.no_grad()
def generate(
    bundle: Bundle, request: Request, *, progress: bool = True, on_step: StepHook | None = None
) -> torch.Tensor:
    """Run one batch; returns (B, 3, H, W) float32 images in [0, 1] on the CPU.

    ``on_step(done, total, latents)`` is called after each step (progress, previews); it may raise
    :class:`StopSampling` to stop there, and the latents of that step are decoded. It must not change the latents.
    """
    factor = bundle.config.vae.downsampling_factor
    check_settings(steps=request.steps, width=request.width, height=request.height,
                   guidance_scale=request.guidance_scale, factor=factor)  # fmt: skip
    unet = bundle.unet
    device, dtype = unet.device, unet.dtype  # once: diffusers' properties walk every submodule (1.5 ms each)
    batch = len(request.prompts)
    check_sampler_steps(request)
    # A consistency-distilled student takes the guidance scale as an input (one UNet call per step, no unconditional
    # half); any other UNet is guided by its two halves.
    embeds_guidance = unet.config.get("time_cond_proj_dim") is not None
    guided = request.guidance_scale > 1.0 and not embeds_guidance

    # Text: the unconditional (negative) half first, then the conditional half, as one UNet batch; one text
    # encoder call for both halves, each distinct prompt once.
    texts = (request.negative_prompts + request.prompts) if guided else request.prompts
    context = encode_prompts(bundle, texts, dtype=dtype, clip_skip=request.clip_skip,
                             embeddings=request.embeddings)  # (2B or B, k·L, D)  # fmt: skip

    start_sampling_run(unet)  # a denoiser that keeps state across steps starts afresh
    scheduler = build_scheduler(bundle.config.schedule, request.sampler)
    scheduler.set_timesteps(request.steps, device=device)

    # One CPU generator per image: an image depends on its own seed only, on any device and at any batch size.
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in request.seeds]
    shape = (batch, bundle.config.vae.latent_channels, request.height // factor, request.width // factor)
    latents, timesteps, inputs = start_latents(bundle, request, scheduler, generators, shape=shape, device=device,
                                               dtype=dtype)  # (B, C, H/f, W/f); the timesteps strength leaves  # fmt: skip
    step_kwargs = _step_kwargs(scheduler, generators)
    unet_kwargs = inputs.unet_kwargs(guided=guided)
    if embeds_guidance:
        omega = torch.full((batch,), request.guidance_scale - 1.0)  # the weight ω of (ε_c − ε_u)
        unet_kwargs["timestep_cond"] = guidance_embedding(omega, unet.config["time_cond_proj_dim"]).to(device, dtype)

    for i, t in enumerate(tqdm(timesteps, desc="sampling", disable=not progress, leave=False)):
        model_input = torch.cat([latents] * 2) if guided else latents  # (2B or B, C, h, w)
        model_input = inputs.model_input(scheduler.scale_model_input(model_input, t), guided=guided)
        prediction = unet(model_input, t, encoder_hidden_states=context, **unet_kwargs).sample
        if guided:
            uncond, cond = prediction.chunk(2)
            prediction = uncond + request.guidance_scale * (cond - uncond)  # (B, C, h, w)
        latents = scheduler.step(prediction, t, latents, **step_kwargs).prev_sample
        latents = inputs.after_step(latents, scheduler, timesteps[i + 1] if i + 1 < len(timesteps) else None)
        if on_step is not None:
            try:
                on_step(i + 1, len(timesteps), latents)
            except StopSampling:
                break

    images = decode(bundle, latents, tiny=request.tiny_vae)  # (B, 3, H, W)
    return inputs.finish(signed_to_unit(images))


def decode(bundle: Bundle, latents: torch.Tensor, *, tiny: bool = False) -> torch.Tensor:
    """(B, C, h, w) latents as the UNet makes them → (B, 3, f·h, f·w) images in about [-1, 1]: the VAE's decoder,
    or with ``tiny`` the bundle's tiny autoencoder (faster, and close to it), which takes the latents as they are."""
    if not tiny:
        return decode_latents(bundle.vae, latents, scaling_factor=bundle.config.vae.scaling_factor)
    if bundle.tiny_vae is None:
        raise LdmError(f"the model has no tiny autoencoder; distil one into it with `{TRAIN_COMMAND}`, or decode "
                       "with its VAE (no --tiny-vae)")  # fmt: skip
    return tiny_decode(bundle.tiny_vae, latents)


def _step_kwargs(scheduler, generators: list[torch.Generator]) -> dict:
    """Stochastic samplers (DDPM, Euler a) draw their noise from the per-image generators; DDIM runs with η = 0."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generators
    return kwargs
