"""Model bundles: one folder with the three parts, their config, the tokenizer and a manifest.

Layout::

    model.yaml                 ModelConfig (vae, text_encoder, unet, schedule)
    vae.safetensors            AutoencoderKL weights
    text_encoder.safetensors   CLIPTextModel weights
    unet.safetensors           UNet2DConditionModel weights
    labels.safetensors         class-conditional and unconditional models only: the learned label tokens
    tiny_vae/                  optional: config.yaml and model.safetensors of a tiny autoencoder distilled from the
                               VAE (ldm.models.tiny_autoencoder), for previews and generate.py --tiny-vae
    tokenizer/                 vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
    clip.safetensors           optional: the whole CLIP of train_clip.py, the default scorer of ``ldm.eval.evaluate``
    manifest.json              format version, package versions, sha256 of every file above

Optional files (:data:`EXTRAS`) are listed under the manifest's ``extras`` with their sha256 and checked on load
like the rest, but they are not part of the bundle hash: that names the weights that make the pictures. Nor is the
tiny autoencoder, which makes them only when asked (and the PNG says so): adding one to a bundle keeps its hash.

Every file is written atomically and the manifest last, so a folder with a manifest is complete. Loading checks
each file's sha256 against the manifest. ``ldm.formats.diffusers`` exports a bundle to a diffusers Stable Diffusion
folder and imports one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, AutoencoderTiny
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from ldm.config import dump_yaml, from_dict, parse_yaml
from ldm.errors import BundleError, ConfigError
from ldm.io import atomic_write, load_tensors, save_tensors, sha256_file, umask, write_json, write_text
from ldm.models.autoencoder import build_autoencoder
from ldm.models.labels import Conditioning, LabelEncoder, build_label_encoder
from ldm.models.presets import ModelConfig
from ldm.models.text_encoder import TextEncoder, build_text_encoder, fit_state_dict
from ldm.models.tiny_autoencoder import TRAIN_COMMAND, TinyAutoencoderConfig, build_tiny_autoencoder, tiny_config
from ldm.models.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer
from ldm.models.unet import build_unet
from ldm.pipeline.denoiser import Denoiser
from ldm.runtime import check_memory

FORMAT = "ldm-bundle"
FORMAT_VERSION = 1
CLIP_FILE = "clip.safetensors"
EXTRAS = (CLIP_FILE,)  # optional files a bundle may carry beside its parts
PACKAGES = ("ldm", "torch", "diffusers", "transformers", "safetensors", "open_clip_torch")
TINY_VAE_CONFIG = "tiny_vae/config.yaml"  # the optional tiny autoencoder's TinyAutoencoderConfig
TINY_VAE_WEIGHTS = "tiny_vae/model.safetensors"


@dataclass
class Bundle:
    """The loaded parts. Plain data: sampling and training are functions that take what they need."""

    config: ModelConfig
    vae: AutoencoderKL
    text_encoder: TextEncoder
    unet: Denoiser  # a UNet2DConditionModel as loaded; the sampling wrappers of ldm.accel keep its call
    tokenizer: CLIPTokenizer
    name: str = "model"
    manifest: dict = field(default_factory=dict)
    extras: dict[str, Path] = field(default_factory=dict)  # optional file name (EXTRAS) → where it is now
    labels: LabelEncoder | None = None  # config.conditioning class or none: what the UNet cross-attends to
    tiny_vae: AutoencoderTiny | None = None  # optional: distilled from ``vae`` (train_tiny_vae.py); previews

    def modules(self) -> dict[str, nn.Module]:
        modules = {"vae": self.vae, "text_encoder": self.text_encoder.model, "unet": self.unet}
        if self.labels is not None:
            modules["labels"] = self.labels.model
        if self.tiny_vae is not None:
            modules["tiny_vae"] = self.tiny_vae
        return modules

    @property
    def short_hash(self) -> str:
        """First 10 hex digits of the bundle's hash (of all its files): what PNGs of older versions record as "Model
        hash", which is now :attr:`model_hash`."""
        return self.manifest.get("hash", "")[:10]

    @property
    def model_hash(self) -> str:
        """A1111's "Model hash" (AutoV2): the first 10 hex digits of the sha256 of the UNet's file,
        ``unet.safetensors``, as the manifest lists it; the bundle's own hash where there is no such entry."""
        return self.manifest.get("files", {}).get("unet.safetensors", "")[:10] or self.short_hash

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Bundle:
        for module in self.modules().values():
            module.to(device=device, dtype=dtype)
        return self


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def parameter_count(config: ModelConfig) -> int:
    """The number of weights of the three parts, counted on modules built without memory (meta tensors)."""
    with torch.device("meta"):  # every tensor on meta from the start: nothing of the size is ever allocated
        parts = (build_autoencoder(config.vae), build_text_encoder(config.text_encoder).model, build_unet(config.unet))
    return sum(p.numel() for part in parts for p in part.parameters())


def create_bundle(config: ModelConfig, *, seed: int = 0, name: str = "model") -> Bundle:
    """A randomly initialised bundle (the starting point for training); one whose fp32 weights would not fit the
    memory limit (:func:`ldm.runtime.check_memory`) is refused before anything is allocated."""
    count = parameter_count(config)
    check_memory(4 * count, what=f"a model of {count / 1e6:,.0f}M parameters in fp32", fix="make it smaller")
    torch.manual_seed(seed)
    return Bundle(
        config=config,
        vae=build_autoencoder(config.vae),
        text_encoder=build_text_encoder(config.text_encoder),
        unet=build_unet(config.unet),
        tokenizer=build_tokenizer(context_length=config.text_encoder.context_length),
        name=name,
        labels=label_encoder(config),
    )


def label_encoder(config: ModelConfig) -> LabelEncoder | None:
    """A fresh label encoder for a class-conditional or unconditional config; None for text."""
    if config.conditioning is Conditioning.TEXT:
        return None
    return build_label_encoder(config.classes, config.unet.cross_attention_dim)


def _combined_hash(files: dict[str, str]) -> str:
    """The bundle hash: over every listed file but the tiny autoencoder's (module docstring)."""
    named = sorted(k for k in files if not k.startswith("tiny_vae/"))
    return hashlib.sha256("".join(f"{k}={files[k]}\n" for k in named).encode()).hexdigest()


def part_file(part: str) -> str:
    """Where a part's weights are in a bundle folder."""
    return TINY_VAE_WEIGHTS if part == "tiny_vae" else f"{part}.safetensors"


def check_tiny_vae(tiny: TinyAutoencoderConfig, config: ModelConfig, *, what: str) -> None:
    """A tiny autoencoder must take and give the VAE's latents: its latent channels and downsampling factor."""
    vae = config.vae
    if (tiny.latent_channels, tiny.downsampling_factor) != (vae.latent_channels, vae.downsampling_factor):
        raise BundleError(f"{what} has {tiny.latent_channels} latent channels and factor {tiny.downsampling_factor}, "
                          f"the VAE {vae.latent_channels} and {vae.downsampling_factor}; distil one from this VAE: "
                          f"{TRAIN_COMMAND}")  # fmt: skip


def _copy_extra(name: str, source: Path, folder: Path) -> Path:
    """Copy one optional file into ``folder`` atomically (nothing to do when it is already there)."""
    if name not in EXTRAS:
        raise ValueError(f"unknown optional bundle file {name!r}; known: {', '.join(EXTRAS)}")
    target = folder / name
    if not source.is_file():
        raise BundleError(f"cannot put {source} into bundle {folder}: no such file")
    if not (target.exists() and target.samefile(source)):
        atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))
    return target


def save_bundle(bundle: Bundle, folder: str | Path, *, base: str | Path | None = None) -> Path:
    """Write ``bundle`` to ``folder`` (each file atomically, the manifest last) and update its manifest.

    ``bundle.extras`` (optional files such as ``clip.safetensors``) are copied in and listed under ``extras``;
    afterwards ``bundle.extras`` points at the copies.

    ``base``: another bundle this one borrows from. A part whose weights equal the base's (the VAE and text encoder
    of a fine-tuned UNet), and the tokenizer when it is the base's, are not written: the manifest lists them under
    ``borrowed`` with the base's digests, and the base's folder as a path relative to this one, so a derived model
    ships its own UNet only. The bundle hash is that of the full bundle.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base_folder, base_manifest = (Path(base), read_manifest(Path(base))) if base is not None else (None, None)
    extras = {name: _copy_extra(name, Path(source), folder) for name, source in sorted(bundle.extras.items())}
    config_yaml = dump_yaml(bundle.config)
    write_text(folder / "model.yaml", config_yaml)
    files, borrowed = {"model.yaml": sha256_file(folder / "model.yaml")}, []
    for part, module in bundle.modules().items():
        name = part_file(part)
        if part == "tiny_vae":
            tiny_yaml = dump_yaml(tiny_config(module))
            check_tiny_vae(tiny_config(module), bundle.config, what="the tiny autoencoder")
            if base_folder is not None and _same_text(tiny_yaml, base_manifest, TINY_VAE_CONFIG):
                files[TINY_VAE_CONFIG] = base_manifest["files"][TINY_VAE_CONFIG]
                borrowed.append(TINY_VAE_CONFIG)
            else:
                write_text(folder / TINY_VAE_CONFIG, tiny_yaml)
                files[TINY_VAE_CONFIG] = sha256_file(folder / TINY_VAE_CONFIG)
        if base_folder is not None and _same_weights(module, base_folder, base_manifest, name):
            files[name] = base_manifest["files"][name]
            borrowed.append(name)
            continue
        # One metadata key: safetensors does not keep the order of several, and the files should hash the same.
        part_yaml = tiny_yaml if part == "tiny_vae" else config_yaml
        meta = {"ldm": json.dumps({"part": part, "config": part_yaml, "format_version": FORMAT_VERSION})}
        save_tensors(folder / name, module.state_dict(), metadata=meta)
        files[name] = sha256_file(folder / name)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        save_tokenizer(bundle.tokenizer, Path(tmp))
        written = {f"tokenizer/{src.name}": sha256_file(src) for src in sorted(Path(tmp).iterdir())}
        theirs = {k: v for k, v in (base_manifest or {}).get("files", {}).items() if k.startswith("tokenizer/")}
        if base_folder is not None and written == theirs:
            borrowed += sorted(written)
        else:
            (folder / "tokenizer").mkdir(exist_ok=True)
            for src in sorted(Path(tmp).iterdir()):
                os.replace(src, folder / "tokenizer" / src.name)
        files |= written
    files = dict(sorted(files.items()))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": bundle.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "packages": package_versions(),
        "files": files,
        "hash": _combined_hash(files),
    }
    if borrowed:
        manifest |= {"base": os.path.relpath(base_folder.resolve(), folder.resolve()), "borrowed": sorted(borrowed)}
    if extras:
        manifest["extras"] = {name: sha256_file(path) for name, path in extras.items()}
    write_json(folder / "manifest.json", manifest)
    bundle.manifest, bundle.extras = manifest, extras
    return folder


def _same_text(text: str, manifest: dict, name: str) -> bool:
    """Whether ``text`` is the base bundle's file ``name``, by its sha256 in the base's manifest."""
    return manifest["files"].get(name) == hashlib.sha256(text.encode("utf-8")).hexdigest()


def _same_weights(module: nn.Module, base: Path, manifest: dict, name: str) -> bool:
    """Whether ``module``'s weights are the base bundle's ``name``, tensor for tensor (names, dtypes, values)."""
    if name not in manifest["files"] or not (base / name).is_file():
        return False
    theirs, ours = load_tensors(base / name), module.state_dict()
    return set(theirs) == set(ours) and all(
        theirs[k].dtype == v.dtype and theirs[k].shape == v.shape and torch.equal(theirs[k], v.cpu()) for k, v in ours.items()
    )


def file_path(folder: Path, manifest: dict, rel: str) -> Path:
    """Where a bundle's file is: in its folder, or in its base's for a borrowed one (the base must be there)."""
    if rel not in manifest.get("borrowed", ()):
        return folder / rel
    base = folder / str(manifest.get("base", ""))
    if not (base / "manifest.json").is_file():
        raise BundleError(f"bundle {folder} borrows {rel} from its base bundle {base}, which is not there; keep the two "
                          "folders side by side, or write a self-contained copy with `python -m ldm bundle convert` "
                          "where both are")  # fmt: skip
    return base / rel


def save_new_bundle(bundle: Bundle, folder: Path) -> Path:
    """:func:`save_bundle` into a temp folder beside ``folder``, renamed into place at the end: ``folder`` appears
    whole or not at all. Where another process got there first (a cache), its bundle is kept."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        save_bundle(bundle, tmp)
        os.chmod(tmp, 0o777 & ~umask())
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        os.replace(tmp, folder)
    except OSError:
        if not (folder / "manifest.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    bundle.manifest = json.loads((folder / "manifest.json").read_text())
    bundle.extras = {name: folder / name for name in bundle.extras}
    return folder


def read_manifest(folder: Path) -> dict:
    if not folder.is_dir():
        raise BundleError(
            f"no model bundle at {folder}; check the path, or create one with `python -m ldm bundle create micro {folder}`"
        )
    path = folder / "manifest.json"
    if not path.is_file():
        raise BundleError(f"{folder} is not a model bundle (no manifest.json); pass a bundle folder, as the training scripts and `python -m ldm bundle` write them")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BundleError(f"{path} is not valid JSON; the bundle is damaged, save or copy it again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{path} is not an {FORMAT} manifest; pass a bundle folder, as the training scripts and `python -m ldm bundle` write them")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise BundleError(f"{folder} was written by a newer ldm (format {manifest['format_version']}); upgrade ldm")
    if not isinstance(manifest.get("extras", {}), dict):
        raise BundleError(f"{path} has a damaged 'extras' entry; the bundle is damaged, save or copy it again")
    return manifest


def verify_files(folder: Path, manifest: dict) -> None:
    """Check every listed file, optional ones included, against its sha256 in the manifest."""
    borrowed = manifest.get("borrowed", [])
    if not isinstance(borrowed, list) or not set(borrowed) <= set(manifest["files"]):
        raise BundleError(f"bundle {folder}'s manifest has a damaged 'borrowed' entry; the bundle is damaged")
    for rel, digest in {**manifest["files"], **manifest.get("extras", {})}.items():
        path = file_path(folder, manifest, rel)
        root = (folder / manifest["base"]).resolve() if rel in borrowed else folder.resolve()
        if ".." in Path(rel).parts or not path.resolve().is_relative_to(root):
            raise BundleError(f"bundle {folder}'s manifest lists {rel!r}, outside the bundle; the bundle is damaged")
        if not path.is_file():
            raise BundleError(f"bundle {folder} is missing {rel}; copy the whole folder again")
        if sha256_file(path) != digest:
            raise BundleError(f"bundle file {path} does not match its sha256 in manifest.json (damaged or edited)")


def instantiate(build, config, state: dict[str, torch.Tensor], what: str) -> nn.Module:
    """Build ``build(config)`` without allocating weights, then take ``state``'s tensors as they are (bit-exact)."""
    with init_empty_weights():
        module = build(config)
    target = module.model if isinstance(module, (TextEncoder, LabelEncoder)) else module
    if isinstance(target, CLIPTextModel):
        state = fit_state_dict(target, state)
    expected = set(target.state_dict())
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise BundleError(
            f"{what} weights do not fit its config (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "the weights and model.yaml come from different models"
        )
    target.load_state_dict(state, strict=True, assign=True)
    return module.eval()


def _parse_config(folder: Path) -> ModelConfig:
    """A bundle's ``model.yaml`` as its typed config; a missing or damaged one is a :class:`BundleError`."""
    path = folder / "model.yaml"
    try:
        return from_dict(ModelConfig, parse_yaml(path.read_text(encoding="utf-8"), what="the file") or {})
    except ConfigError as exc:
        raise BundleError(f"{path}: {exc}") from None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise BundleError(f"cannot read {path} ({exc.__class__.__name__}); the bundle is damaged") from None


def read_tiny_config(folder: Path, manifest: dict, config: ModelConfig) -> TinyAutoencoderConfig:
    """The bundle's tiny autoencoder config (``tiny_vae/config.yaml``), checked against its VAE."""
    path = file_path(folder, manifest, TINY_VAE_CONFIG)
    try:
        tiny = from_dict(TinyAutoencoderConfig, parse_yaml(path.read_text(encoding="utf-8"), what="the file") or {})
    except ConfigError as exc:
        raise BundleError(f"{path}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read {path} ({exc.__class__.__name__}); the bundle is damaged") from None
    check_tiny_vae(tiny, config, what=f"the tiny autoencoder of {folder}")
    return tiny


def has_tiny_vae(folder: str | Path) -> bool:
    """Whether a bundle carries a tiny autoencoder, from its manifest (no weights read)."""
    return TINY_VAE_WEIGHTS in read_manifest(Path(folder))["files"]


def add_tiny_vae(folder: str | Path, tiny: AutoencoderTiny) -> Path:
    """Put ``tiny`` into the bundle at ``folder`` in place, in the dtype of the bundle's VAE, replacing the one it
    had: ``tiny_vae/`` is written (each file atomically), then the manifest. The other files are not touched, so a
    bundle that others borrow from keeps its digests, and the bundle hash stays (module docstring)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    config = _parse_config(folder)
    tiny_cfg = tiny_config(tiny)
    check_tiny_vae(tiny_cfg, config, what="the tiny autoencoder")
    vae_file = file_path(folder, manifest, "vae.safetensors")
    dtype = next(iter(load_tensors(vae_file).values())).dtype
    tiny_yaml = dump_yaml(tiny_cfg)
    write_text(folder / TINY_VAE_CONFIG, tiny_yaml)
    meta = {"ldm": json.dumps({"part": "tiny_vae", "config": tiny_yaml, "format_version": FORMAT_VERSION})}
    state = {k: v.detach().to(dtype) for k, v in tiny.state_dict().items()}
    save_tensors(folder / TINY_VAE_WEIGHTS, state, metadata=meta)
    files = manifest["files"] | {name: sha256_file(folder / name) for name in (TINY_VAE_CONFIG, TINY_VAE_WEIGHTS)}
    borrowed = [name for name in manifest.get("borrowed", []) if not name.startswith("tiny_vae/")]  # now its own
    updated = {k: v for k, v in manifest.items() if k not in ("borrowed", "base")}
    updated |= {"files": dict(sorted(files.items())), "hash": _combined_hash(files)}
    if borrowed:
        updated |= {"base": manifest["base"], "borrowed": borrowed}
    write_json(folder / "manifest.json", updated)
    return folder


def read_config(folder: str | Path) -> ModelConfig:
    """A bundle's ModelConfig without its weights: what a command checks its flags against before the load.

    The manifest and ``model.yaml`` (against its sha256) are checked as :func:`load_bundle` checks them.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    verify_files(folder, {"files": {k: v for k, v in manifest["files"].items() if k == "model.yaml"}})
    return _parse_config(folder)


def load_bundle(folder: str | Path, *, verify: bool = True) -> Bundle:
    """Read a bundle saved by :func:`save_bundle`; weights keep their stored dtype, on the CPU."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if verify:
        verify_files(folder, manifest)
    config = _parse_config(folder)
    parts = {}
    builders = [("vae", build_autoencoder, config.vae), ("text_encoder", build_text_encoder, config.text_encoder),
                ("unet", build_unet, config.unet)]  # fmt: skip
    if config.conditioning is not Conditioning.TEXT:
        builders.append(("labels", lambda c: build_label_encoder(*c), (config.classes, config.unet.cross_attention_dim)))
    if TINY_VAE_WEIGHTS in manifest["files"]:
        builders.append(("tiny_vae", build_tiny_autoencoder, read_tiny_config(folder, manifest, config)))
    for part, build, cfg in builders:
        path = file_path(folder, manifest, part_file(part))
        try:
            state = load_tensors(path)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError, and more
            raise BundleError(f"cannot read {path} ({exc}); the bundle is damaged, save or copy it again") from None
        parts[part] = instantiate(build, cfg, state, part)
    try:
        tokenizer_folder = file_path(folder, manifest, "tokenizer/tokenizer.json").parent
        tokenizer = load_tokenizer(tokenizer_folder)
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot load the tokenizer in {folder / 'tokenizer'} ({exc})") from None
    extras = {name: folder / name for name in manifest.get("extras", {}) if name in EXTRAS}
    return Bundle(
        config=config, tokenizer=tokenizer, name=manifest.get("name", folder.name), manifest=manifest, extras=extras,
        **parts,
    )  # fmt: skip
