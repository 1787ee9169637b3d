"""The denoiser: diffusers' ``UNet2DConditionModel`` with cross-attention on text hidden states.

forward: (B, C_in, h, w) noisy latents (with a task's extra channels, ``ldm.models.presets.task_input_channels``), (B,)
timesteps, (B, 77, D) text states (and an upscaler's (B,) noise levels as ``class_labels``) → (B, C, h, w) prediction.
:func:`widen_for_task` makes a text-to-image UNet into an inpainting or upscaling one that starts out the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel

MAX_DEPTH = 64  # layers of one kind in one place: far beyond any published model; more only takes minutes to build


@dataclass(frozen=True, kw_only=True)
class UNetConfig:
    sample_size: int = 64  # latent side the model was trained at (pixels / 8)
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    # Which resolution levels have transformer blocks (SD: all but the deepest).
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: int = 2
    # Per-level attention head dimension (SD 1.x: 8 heads everywhere, named "attention_head_dim" in diffusers).
    attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    cross_attention_dim: int = 768
    transformer_layers_per_block: int = 1
    norm_num_groups: int = 32
    use_linear_projection: bool = False
    upcast_attention: bool = False  # attention scores in fp32 (SD 2.1, for fp16 stability)
    # A learned embedding of this many integer class labels, added to the timestep embedding: the noise-augmentation
    # level of an upscaler's low-resolution input (SD's x4 upscaler: 1000). None: no class input.
    num_class_embeds: int | None = None
    # The width of a guidance-scale embedding added to the timestep embedding (diffusers' time_cond_proj_dim): a
    # consistency-distilled student takes the guidance scale as an input instead of running twice per step (LCM,
    # Luo et al. 2023, §4.2). None: no such input.
    guidance_embedding_dim: int | None = None

    def __post_init__(self):
        levels = len(self.block_out_channels)
        if levels < 1:
            raise ValueError("block_out_channels needs at least one level")
        for name in ("sample_size", "in_channels", "out_channels", "layers_per_block", "cross_attention_dim",
                     "transformer_layers_per_block", "norm_num_groups"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("layers_per_block", "transformer_layers_per_block"):
            if getattr(self, name) > MAX_DEPTH:
                raise ValueError(f"{name} must be at most {MAX_DEPTH} (SD uses 1 or 2, SDXL up to 10), got {getattr(self, name)}")
        if self.num_class_embeds is not None and self.num_class_embeds < 2:
            raise ValueError(f"num_class_embeds must be at least 2 (or None), got {self.num_class_embeds}")
        if self.guidance_embedding_dim is not None and (self.guidance_embedding_dim < 2 or self.guidance_embedding_dim % 2):
            raise ValueError(f"guidance_embedding_dim must be an even number ≥ 2 (or None), got {self.guidance_embedding_dim}")
        if min(self.block_out_channels) < 1 or min(self.attention_heads, default=1) < 1:
            raise ValueError("block_out_channels and attention_heads must be positive")
        for name in ("attention_levels", "attention_heads"):
            if len(getattr(self, name)) != levels:
                raise ValueError(f"{name} needs {levels} entries, one per block_out_channels level")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}")

    def diffusers_kwargs(self) -> dict:
        down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.attention_levels)
        up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.attention_levels))
        heads = self.attention_heads
        return dict(
            sample_size=self.sample_size,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            down_block_types=down,
            up_block_types=up,
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            attention_head_dim=heads[0] if len(set(heads)) == 1 else heads,
            cross_attention_dim=self.cross_attention_dim,
            transformer_layers_per_block=self.transformer_layers_per_block,
            norm_num_groups=self.norm_num_groups,
            use_linear_projection=self.use_linear_projection,
            upcast_attention=self.upcast_attention,
            num_class_embeds=self.num_class_embeds,
            time_cond_proj_dim=self.guidance_embedding_dim,
        )

    @classmethod
    def from_diffusers(cls, config: dict) -> UNetConfig:
        """The inverse of :meth:`diffusers_kwargs` for SD-style UNets; other UNets raise ValueError."""
        for key in ("addition_embed_type", "class_embed_type", "encoder_hid_dim", "projection_class_embeddings_input_dim"):
            if config.get(key) is not None:
                raise ValueError(f"UNet setting {key}={config[key]!r} (not an SD 1.x/2.x UNet) is not supported")
        if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
            raise ValueError(f"UNet mid_block_type={config['mid_block_type']!r} is not supported")
        down = list(config["down_block_types"])
        known = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
        if any(d not in known for d in down):
            raise ValueError(f"UNet down_block_types {down} are not supported")
        levels = len(config["block_out_channels"])
        heads = config.get("attention_head_dim", 8)
        heads = tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * levels
        tlpb = config.get("transformer_layers_per_block", 1)
        if not isinstance(tlpb, int):
            if len(set(tlpb)) != 1:
                raise ValueError("UNet with per-level transformer_layers_per_block is not supported")
            tlpb = tlpb[0]
        result = cls(
            sample_size=config["sample_size"],
            in_channels=config["in_channels"],
            out_channels=config["out_channels"],
            block_out_channels=tuple(config["block_out_channels"]),
            attention_levels=tuple(known[d] for d in down),
            layers_per_block=config["layers_per_block"],
            attention_heads=heads,
            cross_attention_dim=config["cross_attention_dim"],
            transformer_layers_per_block=tlpb,
            norm_num_groups=config.get("norm_num_groups", 32),
            use_linear_projection=config.get("use_linear_projection", False),
            upcast_attention=config.get("upcast_attention", False),
            num_class_embeds=config.get("num_class_embeds"),
            guidance_embedding_dim=config.get("time_cond_proj_dim"),
        )
        if tuple(result.diffusers_kwargs()["up_block_types"]) != tuple(config["up_block_types"]):
            raise ValueError(f"UNet up_block_types {config['up_block_types']} do not mirror the down blocks")
        return result


def build_unet(config: UNetConfig) -> UNet2DConditionModel:
    """A randomly initialised UNet of the given shape."""
    return UNet2DConditionModel(**config.diffusers_kwargs())


def widen_for_task(unet: UNet2DConditionModel, config: UNetConfig) -> UNet2DConditionModel:
    """A UNet of ``config`` that starts as ``unet`` does: its weights, with the input channels of ``conv_in`` beyond
    ``unet``'s zero and, where ``config`` has a class embedding that ``unet`` lacks, a zero one. So at step 0 it
    predicts what ``unet`` predicts on the first channels, whatever the extra channels and class labels hold: an
    inpainting or upscaling model made from a text-to-image one starts as that model, and learns to read its new
    inputs. Only ``in_channels`` (not fewer), ``num_class_embeds`` (added, not changed) and ``sample_size`` may
    differ from ``unet``'s config; ``unet`` is left as it is, and the new UNet has its dtype and device."""
    base = UNetConfig.from_diffusers(dict(unet.config))
    if replace(config, in_channels=base.in_channels, num_class_embeds=base.num_class_embeds,
               sample_size=base.sample_size) != base:  # fmt: skip
        raise ValueError("widen_for_task changes a UNet's input channels, class embedding and sample size only")
    if config.in_channels < base.in_channels:
        raise ValueError(f"widen_for_task adds input channels: the UNet has {base.in_channels}, more than "
                         f"{config.in_channels}")
    if base.num_class_embeds is not None and config.num_class_embeds != base.num_class_embeds:
        raise ValueError("widen_for_task adds a class embedding; the UNet's own cannot be changed")
    state = {name: tensor.detach().clone() for name, tensor in unet.state_dict().items()}
    weight = state["conv_in.weight"]  # (O, C_base, 3, 3)
    extra = weight.new_zeros(weight.shape[0], config.in_channels - weight.shape[1], *weight.shape[2:])
    state["conv_in.weight"] = torch.cat([weight, extra], dim=1)  # (O, C_config, 3, 3)
    with init_empty_weights():
        widened = UNet2DConditionModel(**config.diffusers_kwargs())
    for name, tensor in widened.state_dict().items():  # the class embedding, when new
        state.setdefault(name, torch.zeros(tensor.shape, dtype=weight.dtype, device=weight.device))
    widened.load_state_dict(state, strict=True, assign=True)
    return widened.train(unet.training)


def with_guidance_input(unet: UNet2DConditionModel, dim: int) -> UNet2DConditionModel:
    """A UNet that starts as ``unet`` does and also takes a guidance-scale embedding of width ``dim``
    (:func:`guidance_embedding`, passed as ``timestep_cond``): ``unet``'s weights, with the new projection of the
    embedding onto the timestep embedding zero, so at step 0 it predicts what ``unet`` predicts whatever the scale.
    A consistency-distilled student starts so from its teacher. ``unet`` is left as it is."""
    config = replace(UNetConfig.from_diffusers(dict(unet.config)), guidance_embedding_dim=dim)
    state = {name: tensor.detach().clone() for name, tensor in unet.state_dict().items()}
    with init_empty_weights():
        student = UNet2DConditionModel(**config.diffusers_kwargs())
    like = state["conv_in.weight"]
    for name, tensor in student.state_dict().items():  # time_embedding.cond_proj.weight (D_time, dim)
        state.setdefault(name, torch.zeros(tensor.shape, dtype=like.dtype, device=like.device))
    student.load_state_dict(state, strict=True, assign=True)
    return student.train(unet.training)


def guidance_embedding(scales: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) guidance weights ω → (B, dim) float32 sinusoidal embeddings (Vaswani et al. 2017, §3.5, of 1000·ω), the
    student's ``timestep_cond`` (LCM, Luo et al. 2023, §4.2). ω = guidance scale − 1, the weight of (ε_c − ε_u) in
    ε_c + ω·(ε_c − ε_u): diffusers' latent-consistency pipeline embeds the same, so an exported student samples alike.
    """
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) / (half - 1) * torch.arange(half, dtype=torch.float32))  # (dim/2,)
    angles = 1000.0 * scales.float()[:, None] * frequencies[None, :]  # (B, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (B, dim)
