"""The whole model's config, and the named presets (``micro``, ``emoji-tiny``, ``sd-v1``, ``sd-v2``).

Each preset also stands in ``configs/<name>.yaml``; a test keeps the two equal. The tiny autoencoders distilled from
a bundle's VAE (``train_tiny_vae.py``) have presets of their own, :data:`TINY_AUTOENCODER_PRESETS`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ldm.errors import ConfigError
from ldm.models.autoencoder import AutoencoderConfig
from ldm.models.labels import Conditioning
from ldm.models.tasks import Task, task_input_channels
from ldm.models.text_encoder import Activation, Padding, TextEncoderConfig
from ldm.models.tiny_autoencoder import TinyAutoencoderConfig
from ldm.models.unet import UNetConfig
from ldm.pipeline.schedule import Prediction, ScheduleConfig


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    vae: AutoencoderConfig
    text_encoder: TextEncoderConfig
    unet: UNetConfig
    schedule: ScheduleConfig = ScheduleConfig()
    task: Task = Task.TEXT_TO_IMAGE
    upscale_factor: int = 1  # task upscale: output side / input side (2 or more); 1 for the other tasks
    # What the UNet cross-attends to: text (the text encoder), or one learned token per class (labels.safetensors,
    # ldm.models.labels), or one token always (unconditional). The text encoder stays in a class model's bundle.
    conditioning: Conditioning = Conditioning.TEXT
    classes: tuple[str, ...] = ()  # conditioning class: the class names, in label order

    def __post_init__(self):
        if self.unet.cross_attention_dim != self.text_encoder.width:
            raise ValueError(
                f"unet.cross_attention_dim ({self.unet.cross_attention_dim}) must equal text_encoder.width ({self.text_encoder.width})"
            )
        c = self.vae.latent_channels
        if self.unet.out_channels != c:
            raise ValueError(f"unet.out_channels must equal vae.latent_channels ({c})")
        if self.unet.in_channels != self.unet_input_channels:
            raise ValueError(f"unet.in_channels must be {self.unet_input_channels} for task {self.task.value} "
                             f"(vae.latent_channels {c}), got {self.unet.in_channels}")  # fmt: skip
        if (self.task is Task.UPSCALE) != (self.upscale_factor > 1) or self.upscale_factor < 1:
            raise ValueError(f"upscale_factor must be 2 or more for task upscale and 1 otherwise, got "
                             f"{self.upscale_factor} for {self.task.value}")  # fmt: skip
        if (self.conditioning is Conditioning.CLASS) != bool(self.classes):
            raise ValueError("classes are the labels of conditioning 'class' and need at least one; other conditionings "
                             "have none")  # fmt: skip
        if len(set(self.classes)) != len(self.classes) or "" in self.classes:
            raise ValueError("class names must be distinct and non-empty ('' is the null label)")
        if (self.task is Task.UPSCALE) != (self.unet.num_class_embeds is not None):
            raise ValueError("unet.num_class_embeds (the noise-augmentation levels) is set for task upscale only")

    @property
    def unet_input_channels(self) -> int:
        """The UNet's input channels that :attr:`task` implies."""
        return task_input_channels(self.task, self.vae.latent_channels)

    def for_task(self, task: Task, *, upscale_factor: int = 2, noise_levels: int = 1000) -> ModelConfig:
        """This text-to-image model's config made over for ``task``: the UNet's input channels, and for an upscaler
        its noise-level embedding (``noise_levels``) and the sizes ``upscale_factor`` times larger."""
        if self.task is not Task.TEXT_TO_IMAGE:
            raise ValueError(f"for_task starts from a text_to_image model, this one is {self.task.value}")
        factor = upscale_factor if task is Task.UPSCALE else 1
        unet = replace(self.unet, num_class_embeds=noise_levels if task is Task.UPSCALE else None,
                       sample_size=self.unet.sample_size * factor,
                       in_channels=task_input_channels(task, self.vae.latent_channels))  # fmt: skip
        return replace(self, unet=unet, vae=replace(self.vae, sample_size=self.vae.sample_size * factor), task=task,
                       upscale_factor=factor)  # fmt: skip

    @property
    def default_size(self) -> int:
        """Pixel side the UNet was trained at."""
        return self.unet.sample_size * self.vae.downsampling_factor


__all__ = ["PRESETS", "TINY_AUTOENCODER_PRESETS", "Conditioning", "ModelConfig", "Task", "get_preset",
           "get_tiny_preset", "task_input_channels"]  # fmt: skip

PRESETS: dict[str, ModelConfig] = {
    # Builds and runs in well under a second: for tests.
    "micro": ModelConfig(
        vae=AutoencoderConfig(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=64),
        text_encoder=TextEncoderConfig(width=32, layers=2, heads=2, mlp_width=64),
        unet=UNetConfig(
            sample_size=8,
            block_out_channels=(32, 64),
            attention_levels=(True, True),
            layers_per_block=1,
            attention_heads=(2, 2),
            cross_attention_dim=32,
            norm_num_groups=8,
        ),
    ),
    # Trainable from scratch on 2 CPU cores, and small enough to ship in fp16 under 32 MB with its tokenizer:
    # 64×64 pixels, 8×8×16 latents (16 channels reconstructed 0.8 dB better than 8 after 450 equal steps side by
    # side, at almost no UNet cost). The VAE normalises groups of 4+ channels: with 32 groups, its 32-channel level
    # became a per-channel (instance) norm and learned colour markedly slower. The text tower is narrow because its
    # 49,408-row token table dominates its size; emoji captions are short.
    "emoji-tiny": ModelConfig(
        vae=AutoencoderConfig(
            block_out_channels=(32, 64, 128, 128), latent_channels=16, layers_per_block=1, norm_num_groups=8, sample_size=64
        ),
        text_encoder=TextEncoderConfig(width=64, layers=4, heads=2, mlp_width=256),
        unet=UNetConfig(
            sample_size=8,
            in_channels=16,
            out_channels=16,
            block_out_channels=(64, 128, 128),
            attention_levels=(True, True, True),
            layers_per_block=1,
            attention_heads=(2, 4, 4),
            cross_attention_dim=64,
        ),
    ),
    # Stable Diffusion 1.x: CLIP ViT-L/14 text encoder, 860M-parameter UNet, KL-f8 VAE, ε-prediction at 512.
    "sd-v1": ModelConfig(
        vae=AutoencoderConfig(sample_size=512, scaling_factor=0.18215),
        text_encoder=TextEncoderConfig(),
        unet=UNetConfig(),
    ),
    # Stable Diffusion 2.x (768-v): OpenCLIP ViT-H/14 text encoder, v-prediction at 768. The tower keeps 23 of
    # its 24 layers, because SD 2 conditions on the penultimate layer's output (after the final layer norm).
    "sd-v2": ModelConfig(
        vae=AutoencoderConfig(sample_size=768, scaling_factor=0.18215),
        text_encoder=TextEncoderConfig(
            width=1024, layers=23, heads=16, mlp_width=4096, activation=Activation.GELU, padding=Padding.ZERO
        ),
        unet=UNetConfig(sample_size=96, attention_heads=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True),
        schedule=ScheduleConfig(prediction=Prediction.V),
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}") from None


# The shapes of the tiny autoencoders train_tiny_vae.py distils; the latent channels are the bundle's VAE's
# (filled in from it), the levels must give its downsampling factor.
TINY_AUTOENCODER_PRESETS: dict[str, TinyAutoencoderConfig] = {
    # Builds and runs in milliseconds: for tests (four levels, as the micro VAE).
    "micro": TinyAutoencoderConfig(encoder_channels=8, decoder_channels=8, encoder_blocks=(1, 1, 1, 1),
                                   decoder_blocks=(1, 1, 1, 1)),  # fmt: skip
    # For emoji-tiny's 64-px VAE, whose decoder is small already (32 channels at full size): under a third of its
    # multiply-adds, and small enough for the 32 MB bundle in fp16. The encoder (img2img's, not the previews') has
    # no block at full size, where a block would cost as much as all the others.
    "emoji-tiny": TinyAutoencoderConfig(encoder_channels=32, decoder_channels=32, encoder_blocks=(0, 2, 2, 2),
                                        decoder_blocks=(3, 3, 3, 1)),  # fmt: skip
    # TAESD's published shape (64 channels; 1, 3, 3, 3 encoder blocks and 3, 3, 3, 1 decoder blocks), for SD-sized VAEs.
    "taesd": TinyAutoencoderConfig(encoder_channels=64, decoder_channels=64),
}


def get_tiny_preset(name: str, *, latent_channels: int) -> TinyAutoencoderConfig:
    """The tiny autoencoder preset ``name`` for a VAE of ``latent_channels``."""
    try:
        return replace(TINY_AUTOENCODER_PRESETS[name], latent_channels=latent_channels)
    except KeyError:
        raise ConfigError(f"unknown tiny autoencoder preset '{name}'; choose one of: "
                          f"{', '.join(TINY_AUTOENCODER_PRESETS)}") from None  # fmt: skip
