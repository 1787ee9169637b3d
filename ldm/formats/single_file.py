"""Single-file Stable Diffusion checkpoints in the original CompVis layout: import into a bundle, export from one.

The layout A1111, ComfyUI and most model sites share: one safetensors file whose keys are those of CompVis'
``LatentDiffusion`` module::

    model.diffusion_model.*         the UNet (input_blocks / middle_block / output_blocks)
    first_stage_model.*             the KL autoencoder (encoder.down.*, decoder.up.*, quant_conv, post_quant_conv)
    cond_stage_model.transformer.*  SD 1.x: OpenAI CLIP ViT-L/14's text tower, as transformers names it
    cond_stage_model.model.*        SD 2.x: OpenCLIP ViT-H/14's text tower (q, k, v in one in_proj matrix)

Import reads the header first: the architecture (SD 1.x or 2.x by the text tower's keys, inpainting by the UNet's
2·C+1 input channels) and the config (widths, levels, layers) come from the shapes, so reduced-width files work too.
What weights cannot tell is taken from SD's conventions and said (:attr:`Detection.notes`): 8 attention heads per
level (SD 1.x) or 64 channels a head (SD 2.x), 32 norm groups, the scaling factor 0.18215, and for SD 2.x the
prediction (v, the 768-v models, as A1111's SD 2.x default config; ε for inpainting). Every key and shape is then
checked against that config before a tensor is read; the key mapping into diffusers' layout is diffusers' own
(``diffusers.loaders.single_file_utils``).

Export is the inverse mapping, written here since diffusers has none. An SD 2.x text tower gets one more block than
the bundle holds, an exact identity (its output projections are zero), because SD 2.x files carry 24 blocks and
every reader conditions on the 23rd; import drops the last block again. The bundle's config and name travel in the
file's metadata (key ``ldm``), so that bundle → file → bundle is bit-identical, heads and schedule included; other
readers ignore it and apply SD's conventions.

Pickled ``.ckpt`` files can run code when unpickled: they are read only when asked (``allow_pickle``), and then with
``torch.load(weights_only=True)``, which unpickles tensors and plain containers only.
"""

from __future__ import annotations

import enum
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ldm.config import dump_yaml, from_dict, parse_yaml
from ldm.errors import BundleError, ConfigError, LdmError
from ldm.formats.bundle import Bundle, instantiate, save_new_bundle
from ldm.io import save_tensors, sha256_file, write_json
from ldm.models.autoencoder import AutoencoderConfig, build_autoencoder
from ldm.models.labels import Conditioning
from ldm.models.presets import ModelConfig, Task, task_input_channels
from ldm.models.text_encoder import Activation, Padding, TextEncoderConfig, build_text_encoder
from ldm.models.tokenizer import VOCAB_SIZE, build_tokenizer
from ldm.models.unet import UNetConfig, build_unet
from ldm.pipeline.schedule import Prediction, ScheduleConfig

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer.text_model."  # SD 1.x
OPEN_CLIP = "cond_stage_model.model."  # SD 2.x
METADATA_KEY = "ldm"
METADATA_VERSION = 1
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SD_SCALING_FACTOR = 0.18215  # the KL-f8 VAE's 1/std, which every SD 1.x/2.x checkpoint uses
HEADER_LIMIT = 100 << 20  # bytes of a safetensors header: a few MB for the largest models
# Keys a CompVis file may carry inside the parts' prefixes that no part needs.
IGNORED = (CLIP + "embeddings.position_ids", OPEN_CLIP + "text_projection", OPEN_CLIP + "logit_scale", VAE + "loss.")


class Family(enum.Enum):
    """Which Stable Diffusion the file is, told by its text tower."""

    SD1 = "SD 1.x"  # OpenAI CLIP text tower, quick-GELU, the end token pads, conditioning on the last layer
    SD2 = "SD 2.x"  # OpenCLIP text tower, GELU, id 0 pads, conditioning on the penultimate layer


@dataclass(frozen=True, kw_only=True)
class Detection:
    """What a single file holds, read from its keys and shapes (and its ldm metadata, where it has some)."""

    family: Family
    config: ModelConfig
    notes: tuple[str, ...] = ()  # what was assumed rather than read, and what was left out
    from_metadata: bool = False  # the config came from the file's own ldm metadata

    def describe(self) -> str:
        """One line: the architecture and its sizes, for a command to print."""
        c = self.config
        kind = f"{self.family.value}{' inpainting' if c.task is Task.INPAINT else ''}"
        tower = "CLIP" if self.family is Family.SD1 else "OpenCLIP"
        prediction = "v-prediction" if c.schedule.prediction is Prediction.V else "ε-prediction"
        source = "; config from its ldm metadata" if self.from_metadata else ""
        return (f"{kind}, {prediction}: UNet {'-'.join(map(str, c.unet.block_out_channels))} with "
                f"{c.unet.in_channels} input channels, {tower} text encoder {c.text_encoder.width} wide × "
                f"{c.text_encoder.layers} layers, VAE of {c.vae.latent_channels} latent channels{source}")  # fmt: skip


def parse_prediction(name: str) -> Prediction:
    """``epsilon`` or ``v`` (as the command line spells them) as a :class:`Prediction`."""
    return {"epsilon": Prediction.EPSILON, "v": Prediction.V}[name]


# ---- the header: keys, shapes and metadata without reading a tensor


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors' name: F32, F16, BF16, ...
    shape: tuple[int, ...]


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors a safetensors file holds and its metadata, read from its header; a file shorter than its header
    says (an interrupted download) or one that is no safetensors file is a :class:`BundleError`."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= min(size - 8, HEADER_LIMIT):
            raise BundleError(f"{path} is not a safetensors file (or is truncated: {size:,} bytes); download it again, "
                              "or pass a .safetensors checkpoint")  # fmt: skip
        try:
            header = json.loads(f.read(length))
            metadata = header.pop("__metadata__", None) or {}
            tensors = {k: TensorInfo(v["dtype"], tuple(v["shape"])) for k, v in header.items()}
            end = max((v["data_offsets"][1] for v in header.values()), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise BundleError(f"{path} has a damaged safetensors header; download it again") from None
    if 8 + length + end > size:
        raise BundleError(f"{path} is truncated: its header describes {8 + length + end:,} bytes, the file has "
                          f"{size:,}; download it again")  # fmt: skip
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def is_pickle(path: Path) -> bool:
    """A torch pickle by its name, or by its first bytes where they are no safetensors header (whose JSON starts at
    byte 8): a zip archive (torch.save) or a pickle's protocol opcode (the legacy format)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":
        return False
    return path.suffix.lower() in PICKLE_SUFFIXES or head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"


def load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A ``.ckpt``'s state dict through ``torch.load(weights_only=True)``: tensors and plain containers only."""
    import pickle

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:160]
        raise BundleError(f"{path} does not load as weights only ({reason}); it holds more than tensors, or is "
                          "damaged: convert it with the tool that made it, or download it again") from None  # fmt: skip
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise BundleError(f"{path} holds no state dict of named tensors; pass a Stable Diffusion checkpoint")
    return state


# ---- bundle (diffusers names) → CompVis names


_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}  # fmt: skip
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip


def unet_key(key: str, unet: UNetConfig) -> str:
    """The CompVis name of a diffusers UNet weight. CompVis numbers the blocks in one row per side: the input row is
    conv_in, then per level ``layers_per_block`` (resnet, attention) pairs and a downsampler; the output row has one
    pair more per level, the last with the upsampler."""
    per = unet.layers_per_block + 1
    head, _, rest = key.partition(".")
    for prefix, name in _UNET_FIXED.items():
        if key.startswith(prefix + "."):
            return name + key[len(prefix) :]
    parts = rest.split(".")
    if head == "mid_block":  # resnet, attention, resnet
        kind, j, tail = parts[0], int(parts[1]), parts[2:]
        return f"middle_block.{2 * j if kind == 'resnets' else 1}." + _inner(kind, tail)
    if head not in ("down_blocks", "up_blocks"):
        raise KeyError(key)
    level, kind, j, tail = int(parts[0]), parts[1], int(parts[2]), parts[3:]
    if head == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{(level + 1) * per}.0.op.{tail[-1]}"
        return f"input_blocks.{1 + level * per + j}.{0 if kind == 'resnets' else 1}." + _inner(kind, tail)
    if kind == "upsamplers":  # after the resnet, and the attention where the level has one
        attends = unet.attention_levels[len(unet.block_out_channels) - 1 - level]
        return f"output_blocks.{level * per + per - 1}.{2 if attends else 1}.conv.{tail[-1]}"
    return f"output_blocks.{level * per + j}.{0 if kind == 'resnets' else 1}." + _inner(kind, tail)


def _inner(kind: str, tail: list[str]) -> str:
    if kind == "resnets":
        tail = [_RESNET.get(tail[0], tail[0]), *tail[1:]]
    return ".".join(tail)


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key(key: str, vae: AutoencoderConfig) -> str:
    """The CompVis name of a diffusers AutoencoderKL weight; the decoder's levels count from the deepest."""
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv
    parts = rest.split(".")
    if parts[0] == "conv_norm_out":
        return f"{side}.norm_out.{parts[-1]}"
    if parts[0] in ("conv_in", "conv_out"):
        return key
    if parts[0] == "mid_block":
        kind, j, tail = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "resnets":
            return f"{side}.mid.block_{j + 1}." + tail.replace("conv_shortcut", "nin_shortcut")
        name, _, param = tail.rpartition(".")
        return f"{side}.mid.attn_1.{_VAE_ATTENTION[name]}.{param}"
    level, kind, tail = int(parts[1]), parts[2], ".".join(parts[4:])
    if side == "decoder":
        level = len(vae.block_out_channels) - 1 - level
    row = "down" if side == "encoder" else "up"
    if kind in ("downsamplers", "upsamplers"):
        return f"{side}.{row}.{level}.{kind.removesuffix('rs')}.{tail}"  # …downsample.conv.weight
    return f"{side}.{row}.{level}.block.{parts[3]}." + tail.replace("conv_shortcut", "nin_shortcut")


def _is_vae_attention_weight(key: str) -> bool:
    return ".mid_block.attentions." in key and key.endswith(".weight") and ".group_norm." not in key


def clip_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An OpenAI-CLIP text tower (SD 1.x) under its CompVis prefix: transformers' own names."""
    return {CLIP + k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}


_OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}  # fmt: skip


def open_clip_state(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """A text tower in OpenCLIP's names (SD 2.x), plus one identity block after the last: zero output projections
    make both of its residual branches add nothing, so the penultimate block's output, which SD 2.x readers condition
    on, is the bundle's last layer exactly."""
    s = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {
        OPEN_CLIP + "token_embedding.weight": s["embeddings.token_embedding.weight"],
        OPEN_CLIP + "positional_embedding": s["embeddings.position_embedding.weight"],
        OPEN_CLIP + "ln_final.weight": s["final_layer_norm.weight"],
        OPEN_CLIP + "ln_final.bias": s["final_layer_norm.bias"],
    }
    for i in range(layers):
        ours, theirs = f"encoder.layers.{i}.", f"{OPEN_CLIP}transformer.resblocks.{i}."
        for param in ("weight", "bias"):
            qkv = [s[f"{ours}self_attn.{x}_proj.{param}"] for x in "qkv"]
            out[f"{theirs}attn.in_proj_{param}"] = torch.cat(qkv)  # (3·D, D): open_clip's one input projection
            for name, theirs_name in _OPEN_CLIP_LAYER.items():
                out[f"{theirs}{theirs_name}.{param}"] = s[f"{ours}{name}.{param}"]
    last, pad = f"{OPEN_CLIP}transformer.resblocks.{layers - 1}.", f"{OPEN_CLIP}transformer.resblocks.{layers}."
    for name in [k.removeprefix(last) for k in out if k.startswith(last)]:
        zero = torch.zeros_like(out[last + name])
        out[pad + name] = zero + 1 if name.startswith(("ln_1.weight", "ln_2.weight")) else zero
    return out


def compvis_state(config: ModelConfig, parts: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The three parts' state dicts (diffusers / transformers names) as one CompVis state dict. Works on meta
    tensors too: :func:`expected_shapes` maps an empty model to learn the keys and shapes a file must have."""
    family = family_of(config)
    out = {UNET + unet_key(k, config.unet): v for k, v in parts["unet"].items()}
    for key, value in parts["vae"].items():
        out[VAE + vae_key(key, config.vae)] = value[:, :, None, None] if _is_vae_attention_weight(key) else value
    if family is Family.SD1:
        out |= clip_state(parts["text_encoder"])
    else:
        out |= open_clip_state(parts["text_encoder"], config.text_encoder.layers)
    return out


def family_of(config: ModelConfig) -> Family:
    """The CompVis layout a config's text encoder has, or a :class:`LdmError` where it fits none (a GELU tower
    padded with the end token, say): a reader would build another model from the file."""
    te = config.text_encoder
    if te.activation is Activation.QUICK_GELU and te.padding is Padding.END:
        return Family.SD1
    if te.activation is Activation.GELU and te.padding is Padding.ZERO:
        return Family.SD2
    raise LdmError(f"a text encoder of {te.activation.value} padded with {te.padding.value} is neither SD 1.x's "
                   "(quick_gelu, end) nor SD 2.x's (gelu, zero), so no single-file layout describes it; export a "
                   "diffusers folder or keep the bundle")  # fmt: skip


def _meta_parts(config: ModelConfig) -> dict[str, dict[str, torch.Tensor]]:
    with torch.device("meta"):
        modules = {"vae": build_autoencoder(config.vae), "text_encoder": build_text_encoder(config.text_encoder).model,
                   "unet": build_unet(config.unet)}  # fmt: skip
    return {name: module.state_dict() for name, module in modules.items()}


def vae_expected_shapes(config: AutoencoderConfig, prefix: str = VAE) -> dict[str, tuple[int, ...]]:
    """Every CompVis key of a VAE of ``config`` under ``prefix``, with its shape (meta tensors: free)."""
    with torch.device("meta"):
        vae = build_autoencoder(config)
    return {prefix + vae_key(k, config): (*v.shape, 1, 1) if _is_vae_attention_weight(k) else tuple(v.shape)
            for k, v in vae.state_dict().items()}  # fmt: skip


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every CompVis key a single file of ``config`` has, with its shape; built on meta tensors, so free."""
    return {k: tuple(v.shape) for k, v in compvis_state(config, _meta_parts(config)).items()}


# ---- export


def _check_exportable(config: ModelConfig) -> Family:
    if config.task not in (Task.TEXT_TO_IMAGE, Task.INPAINT):
        raise LdmError(f"a {config.task.value} model has no CompVis single-file layout that other tools read; keep it "
                       "as an ldm bundle")  # fmt: skip
    if config.conditioning is not Conditioning.TEXT:
        raise LdmError(f"a {config.conditioning.value}-conditioned model has no CompVis single-file layout (its "
                       "cross-attention reads learned label tokens, not text); keep it as an ldm bundle")  # fmt: skip
    return family_of(config)


def export_single_file(bundle: Bundle, path: str | Path) -> tuple[Path, list[str]]:
    """Write ``bundle`` as one CompVis-layout safetensors file (atomically), weights in their stored dtype. Returns
    the path and notes: where SD's conventions would read the file as another config than the bundle's (heads, norm
    groups, schedule), which other tools then do; ldm reads the exact config from the metadata."""
    path = Path(path)
    _check_exportable(bundle.config)
    tensors = compvis_state(bundle.config, {name: m.state_dict() for name, m in bundle.modules().items()})
    meta = {METADATA_KEY: json.dumps({"format_version": METADATA_VERSION, "name": bundle.name,
                                      "config": dump_yaml(bundle.config)})}  # fmt: skip
    try:
        seen = detect({k: TensorInfo("", tuple(v.shape)) for k, v in tensors.items()}, {},
                      prediction=bundle.config.schedule.prediction, path=path).config  # fmt: skip
    except LdmError:
        seen = None
    notes = []
    if seen is None or _without_sizes(seen) != _without_sizes(bundle.config):
        notes.append("this model does not follow SD's conventions for what weights do not show (attention heads, "
                     "32 norm groups, the schedule): other tools will read it as another model, ldm reads its exact "
                     "config from the file's metadata")  # fmt: skip
    save_tensors(path, tensors, metadata=meta)
    return path, notes


def _without_sizes(config: ModelConfig) -> ModelConfig:
    """The config with the training sizes blanked, which no reader takes from a file's weights."""
    return replace(config, unet=replace(config.unet, sample_size=1), vae=replace(config.vae, sample_size=1))


# ---- detection: the config from the keys and shapes


def _count(keys, prefix: str) -> int:
    """How many numbered children ``prefix`` has, e.g. ``…resblocks.`` → 24."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in keys if (m := pattern.match(k))})


def _shape(shapes: dict[str, TensorInfo], key: str, path: Path) -> tuple[int, ...]:
    if key not in shapes:
        raise BundleError(f"{path} lacks {key}, which every Stable Diffusion checkpoint of this layout has; the file "
                          "is incomplete or of another architecture")  # fmt: skip
    return shapes[key].shape


def _architecture_error(path: Path, shapes: dict[str, TensorInfo]) -> BundleError:
    keys = list(shapes)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        what = "an SDXL checkpoint"
    elif any(k.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.", "unet.")) for k in keys):
        what = "a single part in diffusers' names, not a CompVis checkpoint"
    elif keys and all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")) for k in keys):
        what = "a VAE on its own (pass it to generate.py --vae)"
    elif any("lora" in k for k in keys):
        what = "a LoRA (pass it to generate.py --lora)"
    else:
        what = "of an architecture ldm does not know"
    return BundleError(f"{path} is {what}; ldm imports Stable Diffusion 1.x/2.x checkpoints (keys "
                       "model.diffusion_model.*, first_stage_model.*, cond_stage_model.*) and diffusers "
                       "folders")  # fmt: skip


def _config_from_metadata(metadata: dict[str, str], path: Path) -> tuple[ModelConfig, str | None] | None:
    if METADATA_KEY not in metadata:
        return None
    try:
        record = json.loads(metadata[METADATA_KEY])
        config = from_dict(ModelConfig, parse_yaml(record["config"], what="the config in its metadata") or {})
        return config, record.get("name")
    except (ValueError, KeyError, TypeError, ConfigError) as exc:
        raise BundleError(f"{path}: its ldm metadata is damaged ({exc}); export it again") from None


def _heads(family: Family, channels: tuple[int, ...], path: Path) -> tuple[int, ...]:
    """SD 1.x: 8 heads at every level; SD 2.x: 64 channels per head."""
    if family is Family.SD1:
        if any(c % 8 for c in channels):
            raise BundleError(f"{path}: UNet channels {channels} do not split into SD 1.x's 8 attention heads; ldm "
                              "cannot tell this file's heads")  # fmt: skip
        return (8,) * len(channels)
    if any(c % 64 for c in channels):
        raise BundleError(f"{path}: UNet channels {channels} do not split into SD 2.x's 64-channel attention heads; "
                          "ldm cannot tell this file's heads")  # fmt: skip
    return tuple(c // 64 for c in channels)


def _unet_from_shapes(shapes, family: Family, path: Path) -> UNetConfig:
    keys = [k.removeprefix(UNET) for k in shapes if k.startswith(UNET)]
    s = {k.removeprefix(UNET): v for k, v in shapes.items() if k.startswith(UNET)}
    if "label_emb.weight" in s or "label_emb.0.0.weight" in s:
        raise BundleError(f"{path} is an SD upscaler or a class-conditioned UNet, which ldm does not import; keep "
                          "using the tool it came with")  # fmt: skip
    rows = _count(keys, "input_blocks.")
    downs = sorted(i for i in range(rows) if f"input_blocks.{i}.0.op.weight" in s)
    per = downs[0] if downs else rows  # (layers_per_block + 1) rows per level
    levels = len(downs) + 1
    if per < 2 or rows != levels * per or downs != [per * (i + 1) for i in range(levels - 1)]:
        raise BundleError(f"{path}: its UNet's {rows} input blocks (downsampling at {downs}) are not SD's layout of "
                          "levels of equal depth")  # fmt: skip
    channels = tuple(_shape(s, f"input_blocks.{1 + i * per}.0.out_layers.3.weight", path)[0] for i in range(levels))
    attends = tuple(f"input_blocks.{1 + i * per}.1.proj_in.weight" in s for i in range(levels))
    block = next((f"input_blocks.{1 + i * per}.1." for i in range(levels) if attends[i]), "middle_block.1.")
    proj_in = _shape(s, block + "proj_in.weight", path)
    return UNetConfig(
        in_channels=_shape(s, "input_blocks.0.0.weight", path)[1], out_channels=_shape(s, "out.2.weight", path)[0],
        block_out_channels=channels, attention_levels=attends, layers_per_block=per - 1,
        attention_heads=_heads(family, channels, path),
        cross_attention_dim=_shape(s, block + "transformer_blocks.0.attn2.to_k.weight", path)[1],
        transformer_layers_per_block=_count(keys, block + "transformer_blocks."),
        use_linear_projection=len(proj_in) == 2,
    )  # fmt: skip


def vae_from_shapes(shapes, prefix: str, path: Path) -> AutoencoderConfig:
    """A CompVis VAE's config from the shapes of its keys under ``prefix``; SD's 32 norm groups and scaling factor."""
    s = {k.removeprefix(prefix): v for k, v in shapes.items() if k.startswith(prefix)}
    levels = _count(s, "encoder.down.")
    channels = tuple(_shape(s, f"encoder.down.{i}.block.0.conv2.weight", path)[0] for i in range(levels))
    return AutoencoderConfig(
        in_channels=_shape(s, "encoder.conv_in.weight", path)[1],
        latent_channels=_shape(s, "post_quant_conv.weight", path)[0],
        block_out_channels=channels, layers_per_block=_count(s, "encoder.down.0.block."),
        norm_num_groups=32, scaling_factor=SD_SCALING_FACTOR,
    )  # fmt: skip


def _text_from_shapes(shapes, family: Family, path: Path) -> TextEncoderConfig:
    if family is Family.SD1:
        token = _shape(shapes, CLIP + "embeddings.token_embedding.weight", path)
        context = _shape(shapes, CLIP + "embeddings.position_embedding.weight", path)[0]
        layers = _count(shapes, CLIP + "encoder.layers.")
        mlp = _shape(shapes, CLIP + "encoder.layers.0.mlp.fc1.weight", path)[0]
        activation, padding = Activation.QUICK_GELU, Padding.END
    else:
        token = _shape(shapes, OPEN_CLIP + "token_embedding.weight", path)
        context = _shape(shapes, OPEN_CLIP + "positional_embedding", path)[0]
        layers = _count(shapes, OPEN_CLIP + "transformer.resblocks.") - 1  # SD 2.x conditions on the penultimate
        mlp = _shape(shapes, OPEN_CLIP + "transformer.resblocks.0.mlp.c_fc.weight", path)[0]
        activation, padding = Activation.GELU, Padding.ZERO
    vocab, width = token
    if vocab != VOCAB_SIZE:
        raise BundleError(f"{path}: its text encoder has {vocab:,} tokens, not CLIP's {VOCAB_SIZE:,}; ldm has no "
                          "tokenizer for it")  # fmt: skip
    if layers < 1:
        raise BundleError(f"{path}: its text encoder has no layers to condition on; the file is damaged")
    if width % 64:
        raise BundleError(f"{path}: a text encoder {width} wide does not split into CLIP's 64-channel heads; ldm "
                          "cannot tell this file's heads")  # fmt: skip
    return TextEncoderConfig(width=width, layers=layers, heads=width // 64, mlp_width=mlp, activation=activation,
                             context_length=context, padding=padding)  # fmt: skip


def detect(shapes: dict[str, TensorInfo], metadata: dict[str, str], *, prediction: Prediction | None,
           path: Path) -> Detection:  # fmt: skip
    """The architecture and config of a CompVis state dict from its keys and shapes (``metadata``'s ldm config where
    the file has one). ``prediction`` overrides what the file says or SD's convention assumes."""
    keys = list(shapes)
    has_clip = any(k.startswith("cond_stage_model.transformer.") for k in keys)
    has_open_clip = any(k.startswith(OPEN_CLIP) for k in keys)
    if not any(k.startswith(UNET) for k in keys) or has_clip == has_open_clip:
        raise _architecture_error(path, shapes)
    family = Family.SD1 if has_clip else Family.SD2
    notes = []
    recorded = _config_from_metadata(metadata, path)
    if recorded is not None:
        config = recorded[0]
        if family_of(config) is not family:
            raise BundleError(f"{path}: its ldm metadata describes a {family_of(config).value} model, its keys a "
                              f"{family.value} one; the file was edited, export it again")  # fmt: skip
        if prediction is not None and prediction is not config.schedule.prediction:
            config = replace(config, schedule=replace(config.schedule, prediction=prediction))
            notes.append(f"prediction {prediction.value} as asked, where the file records "
                         f"{recorded[0].schedule.prediction.value}")  # fmt: skip
        return Detection(family=family, config=config, notes=tuple(notes), from_metadata=True)
    try:
        unet = _unet_from_shapes(shapes, family, path)
        vae = vae_from_shapes(shapes, VAE, path)
        text = _text_from_shapes(shapes, family, path)
    except ValueError as exc:  # a config's own check: channels that SD's 32 norm groups do not divide, say
        raise BundleError(f"{path}: its shapes do not fit SD's conventions ({exc}); ldm cannot tell its "
                          "config") from None
    tasks = {task_input_channels(t, vae.latent_channels): t for t in (Task.TEXT_TO_IMAGE, Task.INPAINT)}
    task = tasks.get(unet.in_channels)
    if task is None or unet.out_channels != vae.latent_channels:
        raise BundleError(f"{path}: a UNet of {unet.in_channels} input and {unet.out_channels} output channels fits "
                          f"neither a text-to-image ({vae.latent_channels}) nor an inpainting "
                          f"({2 * vae.latent_channels + 1}) model of its VAE (instruct-pix2pix?); ldm cannot import "
                          "it")  # fmt: skip
    if unet.cross_attention_dim != text.width:
        raise BundleError(f"{path}: its UNet attends to {unet.cross_attention_dim}-wide text states, its text encoder "
                          f"is {text.width} wide; the parts come from different models")  # fmt: skip
    if prediction is None:
        if family is Family.SD2 and task is Task.TEXT_TO_IMAGE:
            prediction = Prediction.V
            notes.append("assumed v-prediction at 768 px, as A1111's SD 2.x default config does (the 768-v models); "
                         "pass --prediction epsilon for a 512-base model")  # fmt: skip
        else:
            prediction = Prediction.EPSILON
            base = "SD 2.x inpainting models are" if family is Family.SD2 else "SD 1.x models are"
            notes.append(f"assumed ε-prediction at 512 px, as {base}; pass --prediction v for a v-prediction model")
    side = 768 if family is Family.SD2 and prediction is Prediction.V else 512
    factor = 2 ** (len(vae.block_out_channels) - 1)
    heads = "8 attention heads per level" if family is Family.SD1 else "64 channels per attention head"
    notes.append(f"assumed SD's conventions for what weights do not show: {heads}, 32 norm groups, scaling factor "
                 f"{SD_SCALING_FACTOR}")  # fmt: skip
    config = ModelConfig(
        task=task, vae=replace(vae, sample_size=side), text_encoder=text,
        unet=replace(unet, sample_size=side // factor), schedule=ScheduleConfig(prediction=prediction),
    )  # fmt: skip
    return Detection(family=family, config=config, notes=tuple(notes))


def check_keys(shapes: dict[str, TensorInfo], config: ModelConfig, path: Path) -> list[str]:
    """Every key ``config`` needs present with its shape, and no key of the parts left over (bar :data:`IGNORED`);
    returns the keys outside the parts, which are not read (the schedule's buffers, an EMA copy)."""
    expected = expected_shapes(config)
    missing = [k for k in expected if k not in shapes]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise BundleError(f"{path} lacks {missing[0]}{more}, which a model of its shape has; the file is incomplete or "
                          "damaged, download it again")  # fmt: skip
    for key, shape in expected.items():
        if shapes[key].shape != shape:
            raise BundleError(f"{path}: {key} has shape {list(shapes[key].shape)}, a model of its shape needs "
                              f"{list(shape)}; the file is damaged or mixes models")  # fmt: skip
    parts = (UNET, VAE, "cond_stage_model.")
    unexpected = [k for k in shapes if k.startswith(parts) and k not in expected and not k.startswith(IGNORED)]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise BundleError(f"{path} holds {unexpected[0]}{more}, which no part of an SD 1.x/2.x model of its shape has; "
                          "ldm would drop it and change the model")  # fmt: skip
    return [k for k in shapes if not k.startswith(parts)]


# ---- import


def _open_clip_last_block(config: ModelConfig) -> str:
    return f"{OPEN_CLIP}transformer.resblocks.{config.text_encoder.layers}."


def convert_parts(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, dict[str, torch.Tensor]]:
    """A CompVis state dict as the three parts' state dicts, by diffusers' own conversion functions."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    unet = convert_ldm_unet_checkpoint(state, config.unet.diffusers_kwargs())
    vae = convert_ldm_vae_checkpoint(state, config.vae.diffusers_kwargs())
    if family_of(config) is Family.SD1:
        text = convert_ldm_clip_checkpoint(state)
    else:
        last = _open_clip_last_block(config)  # SD 2.x conditions on the block before it
        kept = {k: v for k, v in state.items() if not k.startswith(last)}
        with torch.device("meta"):
            tower = build_text_encoder(config.text_encoder).model  # the conversion reads the width from its config
        text = convert_open_clip_checkpoint(tower, kept, prefix=OPEN_CLIP)
        text.pop("text_projection.weight", None)  # the joint-embedding projection: not part of the SD text encoder
    return {"unet": unet, "vae": vae, "text_encoder": text}


def _stored_names(keys) -> dict[str, str]:
    """Each key's canonical CompVis name → its name in the file: older SD 1.x files name the CLIP tower's weights
    without transformers' ``text_model.``."""
    bare = "cond_stage_model.transformer."
    return {CLIP + k[len(bare) :] if k.startswith(bare) and not k.startswith(CLIP) else k: k for k in keys}


def read_tensors(path: Path, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors ``names`` lists (canonical name → stored name), read one by one: nothing else is loaded."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(name) for key, name in names.items()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError, and more
        raise BundleError(f"cannot read {path} ({' '.join(str(exc).split())[:160]}); download it again") from None


def import_single_file(path: str | Path, *, prediction: Prediction | None = None, allow_pickle: bool = False,
                       name: str | None = None) -> tuple[Bundle, Detection]:  # fmt: skip
    """Read a CompVis-layout checkpoint into a bundle; every key and shape is checked before a tensor is read."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"no checkpoint file at {path}; check the path")
    if is_pickle(path):
        if not allow_pickle:
            raise BundleError(f"{path} is a pickle (.ckpt), which can run code when loaded; pass --allow-pickle to "
                              "read it as weights only (torch.load(weights_only=True)), or use a .safetensors "
                              "file")  # fmt: skip
        state = load_pickle(path)
        shapes, metadata = {k: TensorInfo(str(v.dtype), tuple(v.shape)) for k, v in state.items()}, {}
    else:
        state = None
        shapes, metadata = read_header(path)
    stored = _stored_names(shapes)
    shapes = {key: shapes[name] for key, name in stored.items()}
    found = detect(shapes, metadata, prediction=prediction, path=path)
    outside = check_keys(shapes, found.config, path)
    if sum(k.startswith("model_ema.") for k in outside) > 100:
        found = replace(found, notes=(*found.notes, "the file also holds EMA weights (model_ema.*): the non-EMA "
                                      "ones were used, as A1111 and diffusers use them"))  # fmt: skip
    needed = {key: stored[key] for key in expected_shapes(found.config)}
    if state is not None:
        state = {key: state[name] for key, name in needed.items()}
    else:
        state = read_tensors(path, needed)
    parts = convert_parts(state, found.config)
    config = found.config
    recorded = _config_from_metadata(metadata, path)
    bundle = Bundle(
        config=config,
        vae=instantiate(build_autoencoder, config.vae, parts["vae"], "vae"),
        text_encoder=instantiate(build_text_encoder, config.text_encoder, parts["text_encoder"], "text_encoder"),
        unet=instantiate(build_unet, config.unet, parts["unet"], "unet"),
        tokenizer=build_tokenizer(context_length=config.text_encoder.context_length),
        name=name or (recorded[1] if recorded and recorded[1] else path.stem),
    )
    return bundle, found


# ---- the cache that lets generate.py take a single file


CACHE_ENV = "LDM_CACHE_DIR"


def cache_dir() -> Path:
    """``$LDM_CACHE_DIR``, else ``$XDG_CACHE_HOME/ldm``, else ``~/.cache/ldm``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ldm"


def file_sha256(path: Path, index: Path) -> str:
    """``path``'s sha256, remembered in ``index`` by resolved path, size and mtime so that a multi-gigabyte file is
    hashed once, not on every run (as A1111 remembers its model hashes)."""
    stat, key = path.stat(), str(path.resolve())
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(key) if isinstance(known, dict) else None
    if isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return str(entry["sha256"])
    digest = sha256_file(path)
    known = known if isinstance(known, dict) else {}
    known[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    try:
        write_json(index, known)
    except OSError:
        pass  # a read-only cache only costs the hash next time
    return digest


def cached_bundle(path: str | Path, *, root: Path | None = None) -> tuple[Path, Detection | None]:
    """The bundle a single file converts to, in ``<cache>/single-file/<sha256[:16]>/``: converted on first use
    (returning what was detected), reused while the file's sha256 matches (returning None)."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"no model file at {path}; check the path")
    if is_pickle(path):
        raise BundleError(f"{path} is a pickle (.ckpt), which can run code when loaded; convert it once with "
                          f"`python -m ldm bundle import {path} OUT --allow-pickle`, then pass OUT")  # fmt: skip
    root = (root or cache_dir()) / "single-file"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LdmError(f"cannot write the single-file cache {root} ({exc.strerror or type(exc).__name__}); set "
                       f"{CACHE_ENV} to a folder you can write to, or convert with `python -m ldm bundle "
                       "import`") from None
    folder = root / file_sha256(path, root / "hashes.json")[:16]
    if (folder / "manifest.json").is_file():
        return folder, None
    bundle, found = import_single_file(path)
    return save_new_bundle(bundle, folder), found

