"""The text encoder: a CLIP text transformer (Radford et al. 2021) as transformers' ``CLIPTextModel``.

One interface for every tower: token ids (B, L) → hidden states (B, L, D) after the final layer norm, plus the
pooled state at the end token (B, D). OpenAI CLIP (SD 1.x) and OpenCLIP towers (SD 2.x, or trained here with
open_clip) share the architecture, so an open_clip text tower is stored in this form (see
:func:`state_dict_from_open_clip`) and every bundle exports to diffusers unchanged.
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.models.tokenizer import VOCAB_SIZE


class Activation(enum.Enum):
    QUICK_GELU = "quick_gelu"  # OpenAI CLIP
    GELU = "gelu"  # OpenCLIP ViT-H/14, ViT-bigG/14


class Padding(enum.Enum):
    END = "end"  # pad with <|endoftext|> (SD 1.x)
    ZERO = "zero"  # pad with id 0, "!" (SD 2.x)


@dataclass(frozen=True, kw_only=True)
class TextEncoderConfig:
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    activation: Activation = Activation.QUICK_GELU
    context_length: int = 77
    vocab_size: int = VOCAB_SIZE
    padding: Padding = Padding.END

    def __post_init__(self):
        for name in ("width", "layers", "heads", "mlp_width", "context_length", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.layers > 256:
            raise ValueError(f"layers must be at most 256 (the largest CLIP text towers have 32), got {self.layers}")
        if self.context_length < 3:
            raise ValueError(f"context_length must be at least 3 (start, a token, end), got {self.context_length}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")

    @property
    def pad_id(self) -> int:
        return self.vocab_size - 1 if self.padding is Padding.END else 0

    def to_transformers(self) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.width,
            intermediate_size=self.mlp_width,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            max_position_embeddings=self.context_length,
            hidden_act=self.activation.value,
            projection_dim=self.width,
            layer_norm_eps=1e-5,
            bos_token_id=self.vocab_size - 2,
            eos_token_id=self.vocab_size - 1,
            pad_token_id=self.pad_id,
        )

    @classmethod
    def from_transformers(cls, config: CLIPTextConfig, *, padding: Padding) -> TextEncoderConfig:
        if config.hidden_act not in {a.value for a in Activation}:
            raise ValueError(f"text encoder activation {config.hidden_act!r} is not supported")
        return cls(
            width=config.hidden_size,
            layers=config.num_hidden_layers,
            heads=config.num_attention_heads,
            mlp_width=config.intermediate_size,
            activation=Activation(config.hidden_act),
            context_length=config.max_position_embeddings,
            vocab_size=config.vocab_size,
            padding=padding,
        )


@dataclass
class TextEncoding:
    hidden_states: torch.Tensor  # (B, L, D): what the UNet cross-attends to
    pooled: torch.Tensor  # (B, D): the state at the end token


class TextEncoder(nn.Module):
    """Token ids → :class:`TextEncoding`. ``self.model`` is the transformers module that gets saved."""

    def __init__(self, config: TextEncoderConfig, model: CLIPTextModel | None = None):
        super().__init__()
        self.config = config
        self.model = model if model is not None else CLIPTextModel(config.to_transformers())

    def forward(
        self, input_ids: torch.Tensor, *, clip_skip: int = 1, vectors: torch.Tensor | None = None
    ) -> TextEncoding:  # (B, L)
        """``clip_skip`` N > 1 (A1111's "Clip skip"): the hidden states of the N-th layer from the end, through the
        final layer norm, as A1111 and diffusers take them; the pooled state stays the last layer's.

        ``vectors`` (M, D): textual-inversion vectors (:mod:`ldm.models.embeddings`); a negative id −1 − j in
        ``input_ids`` stands for row j, which takes that token's place in the token embedding (before the position
        embedding is added), with gradients flowing into ``vectors``."""
        if not 1 <= clip_skip <= self.config.layers:
            raise ValueError(f"clip_skip must be from 1 to the text encoder's {self.config.layers} layers, got {clip_skip}")
        input_ids = input_ids.to(self.model.device)
        with _inserted(self.model, input_ids, vectors) as ids:
            if clip_skip == 1:
                out = self.model(ids)
                return TextEncoding(hidden_states=out.last_hidden_state, pooled=out.pooler_output)
            out = self.model(ids, output_hidden_states=True)
        inner = getattr(self.model, "text_model", self.model)  # transformers 4 nests the layers one level deeper
        hidden = inner.final_layer_norm(out.hidden_states[-clip_skip])
        return TextEncoding(hidden_states=hidden, pooled=out.pooler_output)


@contextlib.contextmanager
def _inserted(model: CLIPTextModel, input_ids: torch.Tensor, vectors: torch.Tensor | None):
    """The ids to call ``model`` with while ``vectors`` stand in for the negative ids: those become 0 (a valid id
    that is no end token, so the pooled state still finds the end) and, for the one call, a hook on the token
    embedding puts the rows of ``vectors`` in their places. transformers' CLIPTextModel takes no input embeddings,
    so its first lookup is where they go in."""
    inserted = input_ids < 0  # (B, L)
    if vectors is None or not bool(inserted.any()):
        if bool(inserted.any()):
            raise ValueError("negative token ids stand for embedding vectors; pass vectors=")
        yield input_ids
        return
    rows = (-1 - input_ids).clamp(min=0)  # (B, L) rows of vectors; 0 where a real token is

    def put(module, args, output):  # output (B, L, D): the token embeddings
        return torch.where(inserted[..., None], vectors.to(output.device, output.dtype)[rows], output)

    handle = model.get_input_embeddings().register_forward_hook(put)
    try:
        yield input_ids.clamp(min=0)
    finally:
        handle.remove()


def build_text_encoder(config: TextEncoderConfig) -> TextEncoder:
    """A randomly initialised text encoder of the given shape."""
    return TextEncoder(config)


def state_dict_from_open_clip(model: nn.Module) -> dict[str, torch.Tensor]:
    """The text tower of an open_clip ``CLIP`` model as a ``CLIPTextModel`` state dict.

    open_clip keeps q, k and v in one ``in_proj`` matrix; transformers keeps three. The projection into the joint
    image-text space is not part of the SD text encoder and is dropped.
    """
    prefix = ""
    out = {
        prefix + "embeddings.token_embedding.weight": model.token_embedding.weight,
        prefix + "embeddings.position_embedding.weight": model.positional_embedding,
        prefix + "final_layer_norm.weight": model.ln_final.weight,
        prefix + "final_layer_norm.bias": model.ln_final.bias,
    }
    for i, block in enumerate(model.transformer.resblocks):
        p = f"{prefix}encoder.layers.{i}."
        q, k, v = block.attn.in_proj_weight.chunk(3)
        qb, kb, vb = block.attn.in_proj_bias.chunk(3)
        out |= {
            p + "self_attn.q_proj.weight": q, p + "self_attn.q_proj.bias": qb,
            p + "self_attn.k_proj.weight": k, p + "self_attn.k_proj.bias": kb,
            p + "self_attn.v_proj.weight": v, p + "self_attn.v_proj.bias": vb,
            p + "self_attn.out_proj.weight": block.attn.out_proj.weight,
            p + "self_attn.out_proj.bias": block.attn.out_proj.bias,
            p + "layer_norm1.weight": block.ln_1.weight, p + "layer_norm1.bias": block.ln_1.bias,
            p + "layer_norm2.weight": block.ln_2.weight, p + "layer_norm2.bias": block.ln_2.bias,
            p + "mlp.fc1.weight": block.mlp.c_fc.weight, p + "mlp.fc1.bias": block.mlp.c_fc.bias,
            p + "mlp.fc2.weight": block.mlp.c_proj.weight, p + "mlp.fc2.bias": block.mlp.c_proj.bias,
        }  # fmt: skip
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def fit_state_dict(model: CLIPTextModel, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with keys as this transformers version names them.

    transformers 4 writes ``text_model.``-prefixed keys and a ``position_ids`` buffer; transformers 5 neither.
    """
    expected = model.state_dict().keys()
    wants_prefix = any(k.startswith("text_model.") for k in expected)
    out = {}
    for key, value in state.items():
        bare = key.removeprefix("text_model.")
        key = "text_model." + bare if wants_prefix else bare
        if key.endswith("position_ids") and key not in expected:
            continue
        out[key] = value
    return out

