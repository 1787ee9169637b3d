"""An autoencoder on its own, to swap into a model at generation time (``generate.py --vae``).

Four layouts are read: an ldm bundle (its VAE), a diffusers VAE folder (``config.json`` and weights, plain or a
variant; a whole pipeline folder's ``vae/``), and single safetensors files with CompVis keys (``encoder.down.*``,
``quant_conv``, …, bare as the community ships VAEs or under ``first_stage_model.`` in a whole checkpoint) or
diffusers keys (``encoder.down_blocks.*``). :func:`read_vae` reads configs and headers only, so a VAE that does not
fit the model is refused before any weights load.

The scaling factor lives in the VAE's config. A single file has none: a CompVis one takes SD's 0.18215 when it has
SD's 4 latent channels (said in a note), anything else needs it stated (``scaling_factor``). A stated factor wins
over a config's.
"""

from __future__ import annotations

import enum
import hashlib
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL

from ldm.errors import BundleError, LdmError
from ldm.formats.bundle import Bundle, instantiate, read_config, read_manifest, verify_files
from ldm.formats.diffusers import WEIGHTS, check_config, choose_weights_variant, weight_paths
from ldm.formats.single_file import (
    SD_SCALING_FACTOR,
    TensorInfo,
    is_pickle,
    read_header,
    read_tensors,
    vae_expected_shapes,
    vae_from_shapes,
)
from ldm.io import load_tensors, sha256_file
from ldm.models.autoencoder import AutoencoderConfig, build_autoencoder
from ldm.models.presets import ModelConfig

_COMPVIS_TOP = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


class VaeLayout(enum.Enum):
    BUNDLE = "ldm bundle"
    DIFFUSERS = "diffusers folder"
    COMPVIS = "CompVis single file"
    DIFFUSERS_FILE = "diffusers single file"


@dataclass(frozen=True, kw_only=True)
class VaeFile:
    """A VAE found on disk, read as far as its config: what :func:`load_vae` loads, and what a PNG records of it."""

    path: Path  # as given
    layout: VaeLayout
    config: AutoencoderConfig
    weights: tuple[Path, ...]  # the files its weights are read from
    sha256: str  # of its weights file (several: of their names and sha256s), as A1111's "VAE hash"
    prefix: str = ""  # CompVis single file: the keys' prefix ("first_stage_model." in a whole checkpoint)
    notes: tuple[str, ...] = ()  # what was assumed

    @property
    def name(self) -> str:
        """What the PNG records as ``VAE``: the file's or the folder's name."""
        return self.path.name

    @property
    def short_hash(self) -> str:
        return self.sha256[:10]


def _digest(files: tuple[Path, ...]) -> str:
    if len(files) == 1:
        return sha256_file(files[0])
    return hashlib.sha256("".join(f"{f.name}={sha256_file(f)}\n" for f in sorted(files)).encode()).hexdigest()


def _with_scaling(config: AutoencoderConfig, scaling_factor: float | None, path: Path) -> AutoencoderConfig:
    if scaling_factor is None:
        return config
    if not math.isfinite(scaling_factor) or scaling_factor <= 0:
        raise LdmError(f"--vae-scaling-factor must be a positive number, got {scaling_factor}; SD's VAE uses "
                       f"{SD_SCALING_FACTOR}")  # fmt: skip
    return replace(config, scaling_factor=scaling_factor)


def _read_bundle_vae(path: Path, scaling_factor: float | None) -> VaeFile:
    manifest = read_manifest(path)
    verify_files(path, {"files": {k: v for k, v in manifest["files"].items() if k == "vae.safetensors"}})
    weights = path / "vae.safetensors"
    config = _with_scaling(read_config(path).vae, scaling_factor, path)
    return VaeFile(path=path, layout=VaeLayout.BUNDLE, config=config, weights=(weights,),
                   sha256=manifest["files"]["vae.safetensors"])  # fmt: skip


def _diffusers_config(folder: Path, scaling_factor: float | None) -> AutoencoderConfig:
    """A diffusers VAE folder's ``config.json`` as our config, with ``scaling_factor`` stated over its own."""
    try:
        raw = dict(AutoencoderKL.load_config(folder))
        if scaling_factor is None and "scaling_factor" not in raw:
            raise BundleError(f"{folder / 'config.json'} states no scaling_factor; pass --vae-scaling-factor")
        raw["scaling_factor"] = raw["scaling_factor"] if scaling_factor is None else scaling_factor
        config = AutoencoderConfig.from_diffusers(raw)
    except (KeyError, ValueError, TypeError, OSError) as exc:
        raise BundleError(f"cannot read the VAE config in {folder} ({exc}); pass a diffusers AutoencoderKL "
                          "folder") from None
    with init_empty_weights():
        check_config("VAE", dict(build_autoencoder(config).config), raw)
    return _with_scaling(config, scaling_factor, folder)


def _read_diffusers_vae(path: Path, folder: Path, scaling_factor: float | None) -> VaeFile:
    config = _diffusers_config(folder, scaling_factor)
    variant = choose_weights_variant(folder, WEIGHTS["vae"])
    files = weight_paths(folder, WEIGHTS["vae"], variant)
    notes = (f"read the {variant} weights of {folder}",) if variant else ()
    return VaeFile(path=path, layout=VaeLayout.DIFFUSERS, config=config, weights=files, sha256=_digest(files),
                   notes=notes)  # fmt: skip


def _diffusers_vae_from_shapes(shapes: dict[str, TensorInfo], path: Path) -> AutoencoderConfig:
    def shape(key):
        if key not in shapes:
            raise BundleError(f"{path} lacks {key}, which a diffusers AutoencoderKL has; pass a whole VAE file")
        return shapes[key].shape

    levels = len({k.split(".")[2] for k in shapes if k.startswith("encoder.down_blocks.")})
    return AutoencoderConfig(
        in_channels=shape("encoder.conv_in.weight")[1], latent_channels=shape("post_quant_conv.weight")[0],
        block_out_channels=tuple(shape(f"encoder.down_blocks.{i}.resnets.0.conv2.weight")[0] for i in range(levels)),
        layers_per_block=len({k.split(".")[4] for k in shapes if k.startswith("encoder.down_blocks.0.resnets.")}),
        norm_num_groups=32, scaling_factor=SD_SCALING_FACTOR,
    )  # fmt: skip


def _read_single_vae(path: Path, scaling_factor: float | None) -> VaeFile:
    if is_pickle(path):
        raise BundleError(f"{path} is a pickle, which can run code when loaded; pass the VAE as a .safetensors file")
    shapes, _ = read_header(path)
    keys = list(shapes)
    whole = any(k.startswith("first_stage_model.") for k in keys)
    if whole or any(k.startswith("encoder.down.") for k in keys):
        layout, prefix = VaeLayout.COMPVIS, "first_stage_model." if whole else ""
    elif any(k.startswith("encoder.down_blocks.") for k in keys):
        layout, prefix = VaeLayout.DIFFUSERS_FILE, ""
    else:
        raise BundleError(f"{path} holds no autoencoder (no encoder.down.* or encoder.down_blocks.* keys, nor "
                          "first_stage_model.*); pass a VAE file, a diffusers VAE folder or a bundle")  # fmt: skip
    try:
        if layout is VaeLayout.COMPVIS:
            config = vae_from_shapes(shapes, prefix, path)
            expected = vae_expected_shapes(config, prefix)
        else:
            beside = path.parent / "config.json"  # a file inside a diffusers VAE folder: the folder's config
            config = _diffusers_config(path.parent, scaling_factor) if beside.is_file() else None
            if config is not None:
                scaling_factor = config.scaling_factor
            config = config or _diffusers_vae_from_shapes(shapes, path)
            with torch.device("meta"):
                expected = {k: tuple(v.shape) for k, v in build_autoencoder(config).state_dict().items()}
    except ValueError as exc:
        raise BundleError(f"{path}: its shapes do not fit SD's VAE conventions ({exc}); ldm cannot tell its "
                          "config") from None
    _check_vae_keys(shapes, expected, prefix, path)
    notes = []
    if scaling_factor is None:
        if layout is not VaeLayout.COMPVIS or config.latent_channels != 4:
            raise BundleError(f"{path} does not say its scaling factor (a {layout.value} of {config.latent_channels} "
                              "latent channels); pass --vae-scaling-factor, or its diffusers folder")  # fmt: skip
        notes.append(f"assumed the scaling factor {SD_SCALING_FACTOR}, SD's convention for a 4-channel CompVis VAE; "
                     "pass --vae-scaling-factor for another")  # fmt: skip
    config = _with_scaling(config, scaling_factor, path)
    return VaeFile(path=path, layout=layout, config=config, weights=(path,), sha256=sha256_file(path), prefix=prefix,
                   notes=tuple(notes))  # fmt: skip


def _check_vae_keys(shapes: dict[str, TensorInfo], expected: dict[str, tuple[int, ...]], prefix: str,
                    path: Path) -> None:  # fmt: skip
    """Every key of the VAE present with its shape, and none of SD's autoencoder left over (bar its training loss)."""
    missing = [k for k in expected if k not in shapes]
    if missing:
        raise BundleError(f"{path} lacks {missing[0]}, which a VAE of its shape has; the file is incomplete or damaged")
    for key, shape in expected.items():
        if shapes[key].shape != shape:
            raise BundleError(f"{path}: {key} has shape {list(shapes[key].shape)}, a VAE of its shape needs "
                              f"{list(shape)}; the file is damaged")  # fmt: skip
    top = tuple(prefix + t for t in _COMPVIS_TOP)
    unexpected = [k for k in shapes if k.startswith(top) and k not in expected and not k.startswith(prefix + "loss.")]
    if unexpected:
        raise BundleError(f"{path} holds {unexpected[0]}, which SD's autoencoder has not; ldm would drop it and change "
                          "the VAE")  # fmt: skip


def read_vae(path: str | Path, *, scaling_factor: float | None = None) -> VaeFile:
    """The VAE at ``path`` (a bundle, a diffusers folder or pipeline folder, or a safetensors file), read as far as
    its config and hash; ``scaling_factor`` states the factor (over the config's)."""
    path = Path(path)
    if path.is_dir():
        if (path / "manifest.json").is_file():
            return _read_bundle_vae(path, scaling_factor)
        folder = path / "vae" if (path / "model_index.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise BundleError(f"{path} is neither a bundle nor a diffusers VAE folder (no config.json); pass a VAE "
                              "file or folder")  # fmt: skip
        return _read_diffusers_vae(path, folder, scaling_factor)
    if not path.is_file():
        raise BundleError(f"no VAE at {path}; check the path")
    return _read_single_vae(path, scaling_factor)


def check_vae_fits(vae: VaeFile, config: ModelConfig) -> None:
    """A VAE swapped in must speak the model's latents: the same channels and the same cells per pixel."""
    ours, theirs = config.vae, vae.config
    for what, a, b in (
        ("latent channels", ours.latent_channels, theirs.latent_channels),
        ("pixels per latent cell", ours.downsampling_factor, theirs.downsampling_factor),
        ("image channels", ours.in_channels, theirs.in_channels),
    ):
        if a != b:
            raise LdmError(f"the VAE {vae.path} has {b} {what}, the model {a}; pass a VAE made for this model's "
                           "latents")  # fmt: skip


def load_vae(vae: VaeFile) -> AutoencoderKL:
    """The weights of a :func:`read_vae` result, bit-exact in their stored dtype; CompVis keys mapped by diffusers'
    own conversion."""
    if vae.layout is VaeLayout.COMPVIS:
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        names = {k: k for k in vae_expected_shapes(vae.config, vae.prefix)}
        state = convert_ldm_vae_checkpoint(read_tensors(vae.weights[0], names), vae.config.diffusers_kwargs())
    elif vae.layout is VaeLayout.DIFFUSERS and len(vae.weights) > 1:
        state = {k: v for f in vae.weights for k, v in load_tensors(f).items()}
    else:
        try:
            state = load_tensors(vae.weights[0])
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError, and more
            raise BundleError(f"cannot read {vae.weights[0]} ({exc}); the VAE is damaged") from None
    return instantiate(build_autoencoder, vae.config, state, f"the VAE {vae.path}")


def attach_vae(bundle: Bundle, vae: VaeFile) -> Bundle:
    """``bundle`` with ``vae`` in place of its own autoencoder; its config's VAE too, so that sampling scales the
    latents by the new VAE's factor."""
    check_vae_fits(vae, bundle.config)
    bundle.vae = load_vae(vae)
    bundle.config = replace(bundle.config, vae=vae.config)
    return bundle


def describe(vae: VaeFile) -> str:
    c = vae.config
    return (f"{vae.layout.value}, {c.latent_channels} latent channels, scaling factor {c.scaling_factor}, "
            f"hash {vae.short_hash}")  # fmt: skip

