"""diffusers Stable Diffusion folders: export a bundle to one, import one into a bundle.

An export loads with ``StableDiffusionPipeline.from_pretrained(folder)`` offline and has no safety checker; an import
accepts local SD 1.x/2.x folders with safetensors weights (single-file or sharded, plain or a variant such as
``fp16``). Pickled ``.bin`` weights are refused, since unpickling can run code. Single-file CompVis checkpoints are
``ldm.formats.single_file``.

A bundle's tiny autoencoder goes into the folder as ``tiny_vae/``, an ``AutoencoderTiny`` folder beside the
pipeline's parts (``model_index.json`` does not list it, so the pipeline loads as before):
``AutoencoderTiny.from_pretrained(folder, subfolder="tiny_vae")`` takes the latents the UNet makes, as
``pipe.vae = ...`` does. An import reads it back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, AutoencoderTiny, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTokenizer

from ldm.errors import BundleError, LdmError
from ldm.formats.bundle import Bundle, check_tiny_vae, instantiate
from ldm.io import load_tensors, umask
from ldm.models.autoencoder import AutoencoderConfig, build_autoencoder
from ldm.models.presets import ModelConfig, Task, task_input_channels
from ldm.models.text_encoder import Padding, TextEncoderConfig, build_text_encoder
from ldm.models.tiny_autoencoder import TinyAutoencoderConfig, build_tiny_autoencoder
from ldm.models.tokenizer import load_tokenizer, save_tokenizer
from ldm.models.unet import UNetConfig, build_unet
from ldm.pipeline.schedule import ScheduleConfig


def _fresh_folder(folder: Path) -> Path:
    if folder.exists() and any(folder.iterdir()):
        raise LdmError(f"{folder} already exists and is not empty; choose another path or delete it first")
    return folder


def export_diffusers(bundle: Bundle, folder: str | Path) -> Path:
    """Write a diffusers Stable Diffusion folder that ``StableDiffusionPipeline.from_pretrained`` loads offline (an
    inpainting bundle: ``StableDiffusionInpaintPipeline``, which its model_index.json names). An upscaler has no
    diffusers pipeline of its layout and is refused."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    task = bundle.config.task
    if bundle.labels is not None:
        raise LdmError(f"a {bundle.config.conditioning.value}-conditioned model has no diffusers pipeline (diffusers' "
                       "Stable Diffusion pipelines read text); keep it as an ldm bundle")  # fmt: skip
    if task is Task.UPSCALE:
        raise LdmError("a latent upscaler has no diffusers pipeline of its layout (diffusers' upscaler concatenates "
                       "pixels, not latents); keep it as an ldm bundle")  # fmt: skip
    pipeline_class = StableDiffusionInpaintPipeline if task is Task.INPAINT else StableDiffusionPipeline
    folder = _fresh_folder(Path(folder))
    tokenizer = bundle.tokenizer
    if bundle.config.text_encoder.padding is Padding.ZERO:  # SD 2.x tokenizers pad with "!" (id 0)
        tokenizer = _with_pad(tokenizer, "!")
    pipe = pipeline_class(
        vae=bundle.vae,
        text_encoder=bundle.text_encoder.model,
        tokenizer=tokenizer,
        unet=bundle.unet,
        scheduler=DDIMScheduler.from_config(bundle.config.schedule.diffusers_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # Write beside the target, then rename: an interrupted export leaves nothing half-written.
    tmp = Path(tempfile.mkdtemp(dir=folder.parent if folder.parent.exists() else None, prefix=f".{folder.name}."))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if bundle.tiny_vae is not None:
            bundle.tiny_vae.save_pretrained(tmp / TINY_VAE, safe_serialization=True)
        os.chmod(tmp, 0o777 & ~umask())
        if folder.exists():
            folder.rmdir()
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _with_pad(tokenizer: CLIPTokenizer, pad: str) -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        save_tokenizer(tokenizer, Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp, pad_token=pad)


WEIGHTS = {"vae": "diffusion_pytorch_model", "text_encoder": "model", "unet": "diffusion_pytorch_model"}
TINY_VAE = "tiny_vae"  # the bundle's tiny autoencoder, an AutoencoderTiny folder beside the pipeline's parts
VARIANT_NAME = r"[A-Za-z0-9_]+"  # what save_pretrained(variant=...) puts between the stem and .safetensors


def _weight_files(folder: Path, stem: str, variant: str | None) -> tuple[Path, Path]:
    """The single file and the shard index of one component's weights in ``variant`` (None: the plain ones), as
    diffusers names them: ``model.fp16.safetensors``, ``model.safetensors.index.fp16.json``."""
    if variant and not re.fullmatch(VARIANT_NAME, variant):
        raise BundleError(f"{variant!r} is not a weight variant's name (letters, digits and _, e.g. fp16)")
    tag = f".{variant}" if variant else ""
    return folder / f"{stem}{tag}.safetensors", folder / f"{stem}.safetensors.index{tag}.json"


def weight_variants(folder: Path, stem: str) -> set[str | None]:
    """The variants one component folder has safetensors weights of; None stands for the plain weights."""
    pattern = re.compile(rf"^{re.escape(stem)}(?:\.({VARIANT_NAME}))?\.safetensors$|^{re.escape(stem)}\.safetensors"
                         rf"\.index(?:\.({VARIANT_NAME}))?\.json$")  # fmt: skip
    found = set()
    for path in folder.iterdir() if folder.is_dir() else ():
        if m := pattern.match(path.name):
            found.add(m.group(1) or m.group(2))
    return found


def choose_variant(folder: str | Path, variant: str | None = None) -> str | None:
    """The weight variant to import from a diffusers pipeline folder: ``variant`` where every part has it; else the
    plain weights where every part has them, else the one variant all parts share. Several, or none: a
    :class:`BundleError` that lists what there is."""
    folder = Path(folder)
    found = {part: weight_variants(folder / part, stem) for part, stem in WEIGHTS.items()}
    shared = set.intersection(*found.values())
    named = sorted(str(v) for v in set.union(*found.values()) if v)
    if variant is not None:
        lacking = [part for part, variants in found.items() if variant not in variants]
        if lacking:
            have = f"variants in the folder: {', '.join(named)}" if named else "the folder has no variants"
            raise BundleError(f"{folder}'s {', '.join(lacking)} {'has' if len(lacking) == 1 else 'have'} no {variant} "
                              f"weights ({have}); drop --variant or pass another")  # fmt: skip
        return variant
    if None in shared:
        return None
    if len(shared) == 1:
        return shared.pop()
    if shared:
        raise BundleError(f"{folder} has the weight variants {', '.join(sorted(map(str, shared)))} and no plain "
                          "weights; pass --variant NAME")  # fmt: skip
    return None  # no weights in common: reading them says what is missing


def choose_weights_variant(folder: Path, stem: str) -> str | None:
    """The variant of one component folder's weights to read: the plain ones where there are some, else the one
    variant there is; several variants and no plain weights are a :class:`BundleError`."""
    found = weight_variants(folder, stem)
    if None in found or len(found) < 2:
        return next(iter(found), None)
    raise BundleError(f"{folder} has the weight variants {', '.join(sorted(map(str, found)))} and no plain weights; "
                      f"pass the one you mean as a file ({folder / stem}.VARIANT.safetensors)")  # fmt: skip


def weight_paths(folder: Path, stem: str, variant: str | None = None) -> tuple[Path, ...]:
    """The safetensors files of one diffusers component, single-file or sharded, plain or of a ``variant`` (fp16,
    say); pickles are refused."""
    single, index = _weight_files(folder, stem, variant)
    if single.is_file():
        return (single,)
    if index.is_file():
        return tuple(_shards(index))
    if any(folder.glob("*.bin")):
        raise BundleError(
            f"{folder} holds only pickled .bin weights, which can run code when loaded; convert them to safetensors first"
        )
    others = sorted(str(v) for v in weight_variants(folder, stem) if v != variant)
    if variant is None and others:
        raise BundleError(f"{folder} has only {', '.join(others)} weights; pass --variant {others[0]}")
    raise BundleError(f"no {single.name} in {folder}; is this a diffusers Stable Diffusion folder?")


def _read_weights(folder: Path, stem: str, variant: str | None = None) -> dict[str, torch.Tensor]:
    return {k: v for path in weight_paths(folder, stem, variant) for k, v in load_tensors(path).items()}


def _shards(index: Path) -> list[Path]:
    """The shard files a ``*.safetensors.index.json`` names; each must be a file in the index's own folder."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise BundleError(f"{index} is not a readable shard index ({type(exc).__name__}); export the model again") from None
    folder = index.parent.resolve()
    shards = []
    for name in names:
        path = (index.parent / str(name)).resolve()
        if path.parent != folder or path.suffix != ".safetensors":
            raise BundleError(
                f"{index} names the shard {name!r}, which is not a .safetensors file beside it; refusing to read outside "
                "the model folder, fix or remove the index"
            )
        shards.append(path)
    return shards


def _normalise(key: str, value):
    if isinstance(value, list):
        value = tuple(_normalise(key, v) for v in value)
    if key in ("attention_head_dim", "transformer_layers_per_block") and isinstance(value, tuple) and len(set(value)) == 1:
        value = value[0]
    return value


def check_config(what: str, ours: dict, theirs: dict) -> None:
    """Refuse a diffusers config with settings our config cannot express: importing would change the model."""
    differ = [
        f"{k}={theirs[k]!r}"
        for k in sorted(theirs)
        if not k.startswith("_") and _normalise(k, theirs[k]) != _normalise(k, ours.get(k))
    ]
    if differ:
        raise BundleError(f"{what} settings not supported by ldm: {', '.join(differ[:4])}")


def import_diffusers(folder: str | Path, *, name: str | None = None, variant: str | None = None) -> Bundle:
    """Read a local diffusers Stable Diffusion folder (as written by ``save_pretrained``); ``variant`` picks weights
    saved with ``variant=`` (``fp16``: ``model.fp16.safetensors``), see :func:`choose_variant`."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise BundleError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    for part in ("vae", "text_encoder", "unet", "tokenizer", "scheduler"):
        if not (folder / part).is_dir():
            raise BundleError(f"{folder} has no {part}/ folder; only Stable Diffusion 1.x/2.x pipelines can be imported")
    try:
        unet_raw = UNet2DConditionModel.load_config(folder / "unet")
        vae_raw = AutoencoderKL.load_config(folder / "vae")
        text_raw = CLIPTextConfig.from_pretrained(folder / "text_encoder")
        sched_raw = DDIMScheduler.load_config(folder / "scheduler")
        tokenizer = load_tokenizer(folder / "tokenizer")
        padding = Padding.ZERO if tokenizer.pad_token_id == 0 else Padding.END
        latent = vae_raw.get("latent_channels", 4)
        tasks = {task_input_channels(t, latent): t for t in (Task.TEXT_TO_IMAGE, Task.INPAINT)}
        task = tasks.get(unet_raw.get("in_channels"))
        if task is None:
            raise ValueError(f"a UNet of {unet_raw.get('in_channels')} input channels fits neither a text-to-image "
                             f"({latent}) nor an inpainting ({2 * latent + 1}) model of this VAE")  # fmt: skip
        config = ModelConfig(
            task=task,
            vae=AutoencoderConfig.from_diffusers(vae_raw),
            text_encoder=TextEncoderConfig.from_transformers(text_raw, padding=padding),
            unet=UNetConfig.from_diffusers(unet_raw),
            schedule=ScheduleConfig.from_diffusers(sched_raw),
        )
    except (KeyError, ValueError, TypeError, OSError) as exc:
        raise BundleError(f"cannot import {folder}: {exc}") from None
    with init_empty_weights():
        check_config("UNet", dict(build_unet(config.unet).config), dict(unet_raw))
        check_config("VAE", dict(build_autoencoder(config.vae).config), dict(vae_raw))
    if text_raw.layer_norm_eps != 1e-5:
        raise BundleError(f"text encoder layer_norm_eps={text_raw.layer_norm_eps} is not supported")
    if tokenizer.pad_token_id != config.text_encoder.pad_id:  # carry the padding in the config, not the tokenizer
        tokenizer = _with_pad(tokenizer, tokenizer.eos_token)
    weights = {part: _read_weights(folder / part, stem, variant) for part, stem in WEIGHTS.items()}
    tiny = _import_tiny_vae(folder / TINY_VAE, config, variant)
    return Bundle(
        tiny_vae=tiny,
        config=config,
        vae=instantiate(build_autoencoder, config.vae, weights["vae"], "vae"),
        text_encoder=instantiate(build_text_encoder, config.text_encoder, weights["text_encoder"], "text_encoder"),
        unet=instantiate(build_unet, config.unet, weights["unet"], "unet"),
        tokenizer=tokenizer,
        name=name or folder.name,
    )


def _import_tiny_vae(folder: Path, config: ModelConfig, variant: str | None) -> AutoencoderTiny | None:
    """The ``tiny_vae/`` AutoencoderTiny folder of an export, checked against the VAE; None where there is none. Its
    weights are the ``variant``'s where it has them, else its plain ones."""
    if not (folder / "config.json").is_file():
        return None
    try:
        tiny = TinyAutoencoderConfig.from_diffusers(AutoencoderTiny.load_config(folder))
    except (KeyError, ValueError, TypeError, OSError) as exc:
        raise BundleError(f"cannot import {folder}: {exc}") from None
    check_tiny_vae(tiny, config, what=str(folder))
    stem = "diffusion_pytorch_model"
    chosen = variant if variant in weight_variants(folder, stem) else None
    return instantiate(build_tiny_autoencoder, tiny, _read_weights(folder, stem, chosen), "tiny_vae")
