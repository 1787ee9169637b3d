"""A small CLIP (Radford et al. 2021) trained from scratch with open_clip, and what train_clip.py needs around it.

The model is open_clip's own ``CLIP``, built from a typed config with random weights (nothing is downloaded): a
ViT image tower and a text tower shaped exactly like the bundle's :class:`~ldm.models.text_encoder.TextEncoderConfig`, so
the trained text tower converts into the bundle's text encoder with
:func:`~ldm.models.text_encoder.state_dict_from_open_clip`. Images go in as the data pipeline gives them (and as the VAE
decodes them): (B, 3, S, S) in [-1, 1], S = ``vision.image_size``; text goes in as :func:`ldm.models.tokenizer.tokenize`
ids with the text config's pad id.

``clip.safetensors`` (:func:`save_clip` / :func:`load_clip`) holds the whole model, image tower included, with its
config in the metadata: enough to compute a CLIP score later without this run's files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

from ldm.config import from_dict, to_dict
from ldm.errors import ConfigError, LdmError
from ldm.io import save_tensors
from ldm.models.text_encoder import (
    Activation,
    TextEncoder,
    TextEncoderConfig,
    fit_state_dict,
    state_dict_from_open_clip,
)

CLIP_FORMAT = "ldm-clip"
CLIP_FORMAT_VERSION = 1
IMAGE_RANGE = (-1.0, 1.0)  # what the image tower expects: the data pipeline's and the VAE decoder's range


@dataclass(frozen=True, kw_only=True)
class VisionTowerConfig:
    """A ViT image tower (Dosovitskiy et al. 2021) with a class token; ``image_size`` is the data resolution."""

    image_size: int = 64
    patch_size: int = 8
    width: int = 256
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0

    def __post_init__(self):
        if min(self.image_size, self.patch_size, self.width, self.layers, self.heads) < 1:
            raise ValueError("vision image_size, patch_size, width, layers and heads must be positive")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"vision width {self.width} is not divisible by heads {self.heads}")


@dataclass(frozen=True, kw_only=True)
class CLIPModelConfig:
    """Everything that fixes the CLIP model's shape (what a checkpoint must match to resume)."""

    text: TextEncoderConfig
    vision: VisionTowerConfig = VisionTowerConfig()
    embed_dim: int = 256  # the joint image-text space

    def __post_init__(self):
        if self.embed_dim < 1:
            raise ValueError("embed_dim must be positive")
        # open_clip builds int(width * mlp_ratio) hidden units
        if int(self.text.width * (self.text.mlp_width / self.text.width)) != self.text.mlp_width:
            raise ValueError(
                f"text mlp_width {self.text.mlp_width} is not expressible as an open_clip mlp_ratio of width {self.text.width}"
            )


def open_clip_kwargs(config: CLIPModelConfig) -> dict:
    """Keyword arguments of ``open_clip.CLIP`` for ``config``: the text cfg mirrors the bundle's text encoder."""
    text, vision = config.text, config.vision
    return {
        "embed_dim": config.embed_dim,
        "vision_cfg": open_clip.CLIPVisionCfg(
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            width=vision.width,
            layers=vision.layers,
            head_width=vision.width // vision.heads,
            mlp_ratio=vision.mlp_ratio,
        ),
        "text_cfg": open_clip.CLIPTextCfg(
            context_length=text.context_length,
            vocab_size=text.vocab_size,
            width=text.width,
            heads=text.heads,
            layers=text.layers,
            mlp_ratio=text.mlp_width / text.width,
            pad_id=text.pad_id,
            pool_type="argmax",  # the end token has the highest id: transformers' pooling at the first end token
        ),
        "quick_gelu": text.activation is Activation.QUICK_GELU,
    }


def build_clip(config: CLIPModelConfig) -> open_clip.CLIP:
    """A randomly initialised open_clip ``CLIP`` (open_clip's own init, from the global torch RNG)."""
    return open_clip.CLIP(**open_clip_kwargs(config))


def encode_text(model: open_clip.CLIP, ids: torch.Tensor, *, normalize: bool = False) -> torch.Tensor:
    """``model.encode_text(ids)`` computed on the first ``n`` positions only, ``n`` = 1 + the last end-token position.

    The text tower is causal and pools at the end token, so padding after it cannot change the result; skipping
    it makes short captions several times cheaper than running all 77 positions. (B, L) → (B, embed_dim).
    """
    n = int(ids.argmax(dim=-1).max()) + 1
    ids = ids[:, :n]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(ids).to(cast_dtype) + model.positional_embedding[:n].to(cast_dtype)  # (B, n, D)
    mask = model.attn_mask[:n, :n] if model.attn_mask is not None else None
    x = model.ln_final(model.transformer(x, attn_mask=mask))
    x = text_global_pool(x, ids, model.text_pool_type)  # (B, D)
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection
    return F.normalize(x, dim=-1) if normalize else x


class ContrastivePair(nn.Module):
    """(images, ids) → (normalised image features, normalised text features, logit scale) in one forward.

    The trained module (what accelerate prepares, what a checkpoint holds under ``clip.``): one forward that uses
    every parameter, as DDP wants.
    """

    def __init__(self, clip: open_clip.CLIP):
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor, ids: torch.Tensor):  # (B, 3, S, S) in [-1, 1], (B, L)
        image_features = self.clip.encode_image(images, normalize=True)  # (B, E)
        text_features = encode_text(self.clip, ids, normalize=True)  # (B, E)
        return image_features, text_features, self.clip.logit_scale.exp()


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's split: no weight decay on gains, biases, the logit scale and other 1-d parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def text_encoder_from_clip(model: open_clip.CLIP, config: TextEncoderConfig) -> TextEncoder:
    """The CLIP's text tower as the bundle's :class:`TextEncoder` (the joint-space projection is not part of it)."""
    encoder = TextEncoder(config)
    encoder.model.load_state_dict(fit_state_dict(encoder.model, state_dict_from_open_clip(model)), strict=True)
    return encoder.eval()


# --- retrieval -----------------------------------------------------------------------------------------------------


def retrieval_metrics(
    image_features: torch.Tensor, text_features: torch.Tensor, *, captions: list[str] | None = None, ks=(1, 5)
) -> dict[str, float]:
    """Top-k retrieval accuracy both ways by cosine similarity: image i's positive is text i, and vice versa.

    ``image_features`` (N, E) and ``text_features`` (N, E) need not be normalised. With ``captions``, every text
    whose caption equals image i's counts as a positive too (duplicate captions embed identically, so neither can
    be told apart). A query scores a hit at k when fewer than k negatives score at least as high as its best
    positive: ties count against it, so features that are all alike get no credit.

    Returns ``image_to_text_top{k}``, ``text_to_image_top{k}`` (fractions in [0, 1]), the mean 1-based rank of the
    best positive each way, ``n`` and ``duplicate_captions`` (items whose caption another item shares).
    """
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            f"need two (N, E) feature matrices, got {tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    n = image_features.shape[0]
    sim = F.normalize(image_features.double(), dim=-1) @ F.normalize(text_features.double(), dim=-1).T  # (N, N)
    if captions is None:
        positive = torch.eye(n, dtype=torch.bool)
    else:
        if len(captions) != n:
            raise ValueError(f"{len(captions)} captions for {n} items")
        ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
        groups = torch.tensor([ids[c] for c in captions])
        positive = groups[:, None] == groups[None, :]
    positive = positive.to(sim.device)

    def ranks(scores: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # (Q, C) → (Q,) negatives at or above
        best = scores.masked_fill(~pos, -math.inf).max(dim=1).values
        return ((scores >= best[:, None]) & ~pos).sum(dim=1)

    out: dict[str, float] = {}
    for name, r in (("image_to_text", ranks(sim, positive)), ("text_to_image", ranks(sim.T, positive.T))):
        for k in ks:
            out[f"{name}_top{k}"] = (r < k).double().mean().item()
        out[f"{name}_mean_rank"] = (r + 1).double().mean().item()
    out["n"] = n
    out["duplicate_captions"] = int((positive.sum(dim=1) > 1).sum()) if captions is not None else 0
    return out


# --- files ---------------------------------------------------------------------------------------------------------


def save_clip(model: open_clip.CLIP, config: CLIPModelConfig, path: str | Path, *, extra: dict | None = None) -> Path:
    """The whole model as safetensors; the metadata holds the config, the image range and open_clip's arguments."""
    kwargs = open_clip_kwargs(config)
    meta = {
        "format": CLIP_FORMAT,
        "format_version": CLIP_FORMAT_VERSION,
        "config": to_dict(config),
        "image_range": list(IMAGE_RANGE),
        "pad_id": config.text.pad_id,
        "open_clip": {
            "embed_dim": kwargs["embed_dim"],
            "vision_cfg": _plain(kwargs["vision_cfg"]),
            "text_cfg": _plain(kwargs["text_cfg"]),
            "quick_gelu": kwargs["quick_gelu"],
        },
        **(extra or {}),
    }
    # One metadata key (as in bundles): safetensors does not keep the order of several.
    return save_tensors(path, model.state_dict(), metadata={"ldm": json.dumps(meta)})


def _plain(cfg) -> dict:
    from dataclasses import asdict

    return {k: v for k, v in asdict(cfg).items() if v is not None}


def read_clip_metadata(path: str | Path) -> dict:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LdmError(f"no CLIP model at {path}; pass the clip.safetensors that train_clip.py wrote")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("ldm", "{}"))
    except Exception as exc:  # safetensors raises its own error types
        raise LdmError(f"cannot read {path} ({exc}); the file is damaged") from None
    if meta.get("format") != CLIP_FORMAT:
        raise LdmError(f"{path} is not an {CLIP_FORMAT} file; pass the clip.safetensors that train_clip.py wrote")
    return meta


def load_clip(path: str | Path) -> tuple[open_clip.CLIP, CLIPModelConfig]:
    """The model saved by :func:`save_clip` (eval mode, CPU, float32) and its config."""
    from ldm.io import load_tensors

    meta = read_clip_metadata(path)
    try:
        config = from_dict(CLIPModelConfig, meta["config"])
    except (ConfigError, KeyError) as exc:
        raise LdmError(f"{path}: the CLIP config in its metadata does not load ({exc})") from None
    model = build_clip(config)
    model.load_state_dict(load_tensors(path), strict=True)
    return model.eval(), config
