"""Model bundles: one folder with the three parts, their config, the tokenizer and a manifest.

Layout::

    model.yaml                 ModelConfig (vae, text_encoder, unet, schedule)
    vae.safetensors            AutoencoderKL weights
    text_encoder.safetensors   CLIPTextModel weights
    unet.safetensors           UNet2DConditionModel weights
    tokenizer/                 vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
    clip.safetensors           optional: the whole CLIP of train_clip.py, the default scorer of ``ldm.evaluate``
    manifest.json              format version, package versions, sha256 of every file above

Optional files (:data:`EXTRAS`) are listed under the manifest's ``extras`` with their sha256 and checked on load
like the rest, but they are not part of the bundle hash: that names the weights that make the pictures.

Every file is written atomically and the manifest last, so a folder with a manifest is complete. Loading checks
each file's sha256 against the manifest. A bundle exports to a diffusers Stable Diffusion folder and imports from
one (safetensors only: pickled weights are refused).
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
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.autoencoder import AutoencoderConfig, build_autoencoder
from ldm.config import dump_yaml, from_dict
from ldm.errors import BundleError, ConfigError, LdmError
from ldm.io import atomic_write, load_tensors, save_tensors, sha256_file, umask, write_json, write_text
from ldm.presets import ModelConfig
from ldm.runtime import DTYPES
from ldm.schedule import ScheduleConfig
from ldm.text_encoder import Padding, TextEncoder, TextEncoderConfig, build_text_encoder, fit_state_dict
from ldm.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer
from ldm.unet import UNetConfig, build_unet

FORMAT = "ldm-bundle"
FORMAT_VERSION = 1
PARTS = ("vae", "text_encoder", "unet")
CLIP_FILE = "clip.safetensors"
EXTRAS = (CLIP_FILE,)  # optional files a bundle may carry beside its parts
PACKAGES = ("ldm", "torch", "diffusers", "transformers", "safetensors", "open_clip_torch")


@dataclass
class Bundle:
    """The loaded parts. Plain data: sampling and training are functions that take what they need."""

    config: ModelConfig
    vae: AutoencoderKL
    text_encoder: TextEncoder
    unet: UNet2DConditionModel
    tokenizer: CLIPTokenizer
    name: str = "model"
    manifest: dict = field(default_factory=dict)
    extras: dict[str, Path] = field(default_factory=dict)  # optional file name (EXTRAS) → where it is now


    def modules(self) -> dict[str, nn.Module]:
        return {"vae": self.vae, "text_encoder": self.text_encoder.model, "unet": self.unet}

    @property
    def short_hash(self) -> str:
        """First 10 hex digits of the bundle's hash: the A1111 "Model hash"."""
        return self.manifest.get("hash", "")[:10]

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


def create_bundle(config: ModelConfig, *, seed: int = 0, name: str = "model") -> Bundle:
    """A randomly initialised bundle (the starting point for training)."""
    torch.manual_seed(seed)
    return Bundle(
        config=config,
        vae=build_autoencoder(config.vae),
        text_encoder=build_text_encoder(config.text_encoder),
        unet=build_unet(config.unet),
        tokenizer=build_tokenizer(context_length=config.text_encoder.context_length),
        name=name,
    )


def _combined_hash(files: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{k}={files[k]}\n" for k in sorted(files)).encode()).hexdigest()


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


def save_bundle(bundle: Bundle, folder: str | Path) -> Path:
    """Write ``bundle`` to ``folder`` (each file atomically, the manifest last) and update its manifest.

    ``bundle.extras`` (optional files such as ``clip.safetensors``) are copied in and listed under ``extras``;
    afterwards ``bundle.extras`` points at the copies.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    extras = {name: _copy_extra(name, Path(source), folder) for name, source in sorted(bundle.extras.items())}
    config_yaml = dump_yaml(bundle.config)
    write_text(folder / "model.yaml", config_yaml)
    for part, module in bundle.modules().items():
        # One metadata key: safetensors does not keep the order of several, and the files should hash the same.
        meta = {"ldm": json.dumps({"part": part, "config": config_yaml, "format_version": FORMAT_VERSION})}
        save_tensors(folder / f"{part}.safetensors", module.state_dict(), metadata=meta)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        save_tokenizer(bundle.tokenizer, Path(tmp))
        (folder / "tokenizer").mkdir(exist_ok=True)
        for src in sorted(Path(tmp).iterdir()):
            os.replace(src, folder / "tokenizer" / src.name)
    files = {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted([folder / "model.yaml", *(folder / f"{part}.safetensors" for part in PARTS)])
        + sorted((folder / "tokenizer").iterdir())
    }
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": bundle.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "packages": package_versions(),
        "files": files,
        "hash": _combined_hash(files),
    }
    if extras:
        manifest["extras"] = {name: sha256_file(path) for name, path in extras.items()}
    write_json(folder / "manifest.json", manifest)
    bundle.manifest, bundle.extras = manifest, extras
    return folder


def read_manifest(folder: Path) -> dict:
    if not folder.is_dir():
        raise BundleError(
            f"no model bundle at {folder}; check the path, or create one with `python -m ldm.bundle create micro {folder}`"
        )
    path = folder / "manifest.json"
    if not path.is_file():
        raise BundleError(f"{folder} is not a model bundle (no manifest.json); pass a bundle folder, as the training scripts and `python -m ldm.bundle` write them")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BundleError(f"{path} is not valid JSON; the bundle is damaged, save or copy it again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{path} is not an {FORMAT} manifest; pass a bundle folder, as the training scripts and `python -m ldm.bundle` write them")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise BundleError(f"{folder} was written by a newer ldm (format {manifest['format_version']}); upgrade ldm")
    if not isinstance(manifest.get("extras", {}), dict):
        raise BundleError(f"{path} has a damaged 'extras' entry; the bundle is damaged, save or copy it again")
    return manifest


def verify_files(folder: Path, manifest: dict) -> None:
    """Check every listed file, optional ones included, against its sha256 in the manifest."""
    for rel, digest in {**manifest["files"], **manifest.get("extras", {})}.items():
        path = folder / rel
        if not path.is_file():
            raise BundleError(f"bundle {folder} is missing {rel}; copy the whole folder again")
        if sha256_file(path) != digest:
            raise BundleError(f"bundle file {path} does not match its sha256 in manifest.json (damaged or edited)")


def _instantiate(build, config, state: dict[str, torch.Tensor], what: str) -> nn.Module:
    """Build ``build(config)`` without allocating weights, then take ``state``'s tensors as they are (bit-exact)."""
    with init_empty_weights():
        module = build(config)
    target = module.model if isinstance(module, TextEncoder) else module
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


def load_bundle(folder: str | Path, *, verify: bool = True) -> Bundle:
    """Read a bundle saved by :func:`save_bundle`; weights keep their stored dtype, on the CPU."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if verify:
        verify_files(folder, manifest)
    try:
        import yaml

        config = from_dict(ModelConfig, yaml.safe_load((folder / "model.yaml").read_text()) or {})
    except ConfigError as exc:
        raise BundleError(f"{folder / 'model.yaml'}: {exc}") from None
    except (OSError, ValueError) as exc:  # yaml.YAMLError is a ValueError subclass
        raise BundleError(f"cannot read {folder / 'model.yaml'} ({exc.__class__.__name__}); the bundle is damaged") from None
    parts = {}
    for part, build, cfg in (
        ("vae", build_autoencoder, config.vae),
        ("text_encoder", build_text_encoder, config.text_encoder),
        ("unet", build_unet, config.unet),
    ):
        path = folder / f"{part}.safetensors"
        try:
            state = load_tensors(path)
        except (OSError, Exception) as exc:  # safetensors raises its own SafetensorError
            raise BundleError(f"cannot read {path} ({exc}); the bundle is damaged, save or copy it again") from None
        parts[part] = _instantiate(build, cfg, state, part)
    try:
        tokenizer = load_tokenizer(folder / "tokenizer")
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot load the tokenizer in {folder / 'tokenizer'} ({exc})") from None
    extras = {name: folder / name for name in manifest.get("extras", {}) if name in EXTRAS}
    return Bundle(
        config=config, tokenizer=tokenizer, name=manifest.get("name", folder.name), manifest=manifest, extras=extras,
        **parts,
    )  # fmt: skip


# --- diffusers folders -------------------------------------------------------------------------------------------


def _fresh_folder(folder: Path) -> Path:
    if folder.exists() and any(folder.iterdir()):
        raise LdmError(f"{folder} already exists and is not empty; choose another path or delete it first")
    return folder


def export_diffusers(bundle: Bundle, folder: str | Path) -> Path:
    """Write a diffusers Stable Diffusion folder that ``StableDiffusionPipeline.from_pretrained`` loads offline."""
    from diffusers import StableDiffusionPipeline

    folder = _fresh_folder(Path(folder))
    tokenizer = bundle.tokenizer
    if bundle.config.text_encoder.padding is Padding.ZERO:  # SD 2.x tokenizers pad with "!" (id 0)
        tokenizer = _with_pad(tokenizer, "!")
    pipe = StableDiffusionPipeline(
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


def _read_weights(folder: Path, stem: str) -> dict[str, torch.Tensor]:
    """safetensors weights of one diffusers component, single-file or sharded; pickles are refused."""
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return load_tensors(single)
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_tensors(folder / shard).items()}
    if any(folder.glob("*.bin")):
        raise BundleError(
            f"{folder} holds only pickled .bin weights, which can run code when loaded; convert them to safetensors first"
        )
    raise BundleError(f"no {stem}.safetensors in {folder}; is this a diffusers Stable Diffusion folder?")


def _normalise(key: str, value):
    if isinstance(value, list):
        value = tuple(_normalise(key, v) for v in value)
    if key in ("attention_head_dim", "transformer_layers_per_block") and isinstance(value, tuple) and len(set(value)) == 1:
        value = value[0]
    return value


def _check_config(what: str, ours: dict, theirs: dict) -> None:
    """Refuse a diffusers config with settings our config cannot express: importing would change the model."""
    differ = [
        f"{k}={theirs[k]!r}"
        for k in sorted(theirs)
        if not k.startswith("_") and _normalise(k, theirs[k]) != _normalise(k, ours.get(k))
    ]
    if differ:
        raise BundleError(f"{what} settings not supported by ldm: {', '.join(differ[:4])}")


def import_diffusers(folder: str | Path, *, name: str | None = None) -> Bundle:
    """Read a local diffusers Stable Diffusion folder (as written by ``save_pretrained``)."""
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
        config = ModelConfig(
            vae=AutoencoderConfig.from_diffusers(vae_raw),
            text_encoder=TextEncoderConfig.from_transformers(text_raw, padding=padding),
            unet=UNetConfig.from_diffusers(unet_raw),
            schedule=ScheduleConfig.from_diffusers(sched_raw),
        )
    except (KeyError, ValueError, TypeError, OSError) as exc:
        raise BundleError(f"cannot import {folder}: {exc}") from None
    with init_empty_weights():
        _check_config("UNet", dict(build_unet(config.unet).config), dict(unet_raw))
        _check_config("VAE", dict(build_autoencoder(config.vae).config), dict(vae_raw))
    if text_raw.layer_norm_eps != 1e-5:
        raise BundleError(f"text encoder layer_norm_eps={text_raw.layer_norm_eps} is not supported")
    if tokenizer.pad_token_id != config.text_encoder.pad_id:  # carry the padding in the config, not the tokenizer
        tokenizer = _with_pad(tokenizer, tokenizer.eos_token)
    return Bundle(
        config=config,
        vae=_instantiate(build_autoencoder, config.vae, _read_weights(folder / "vae", "diffusion_pytorch_model"), "vae"),
        text_encoder=_instantiate(build_text_encoder, config.text_encoder, _read_weights(folder / "text_encoder", "model"), "text_encoder"),
        unet=_instantiate(build_unet, config.unet, _read_weights(folder / "unet", "diffusion_pytorch_model"), "unet"),
        tokenizer=tokenizer,
        name=name or folder.name,
    )


# --- command line ------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    from ldm.config import apply_overrides
    from ldm.errors import ArgumentParser
    from ldm.presets import PRESETS, get_preset

    parser = ArgumentParser(prog="python -m ldm.bundle", description="Create, inspect, export and import model bundles.")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="a randomly initialised bundle from a preset")
    create.add_argument("preset", choices=sorted(PRESETS))
    create.add_argument("out", type=Path)
    create.add_argument("--seed", type=int, default=0)
    create.add_argument("--name", help="model name written into image metadata (default: the folder name)")
    create.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set unet.layers_per_block=1 (repeatable)")
    create.add_argument("--force", action="store_true", help="overwrite an existing bundle")
    info = sub.add_parser("info", help="print a bundle's config and manifest")
    info.add_argument("bundle", type=Path)
    export = sub.add_parser("export", help="write a diffusers Stable Diffusion folder")
    export.add_argument("bundle", type=Path)
    export.add_argument("out", type=Path)
    convert = sub.add_parser("convert", help="write a copy with its weights in another precision (fp16 to ship)")
    convert.add_argument("bundle", type=Path)
    convert.add_argument("out", type=Path)
    convert.add_argument("--dtype", required=True, choices=sorted(DTYPES), help="precision of the stored weights")
    convert.add_argument("--no-extras", action="store_true", help="leave optional files (the CLIP) behind")
    convert.add_argument("--force", action="store_true", help="overwrite an existing bundle")
    imp = sub.add_parser("import", help="read a local diffusers Stable Diffusion folder into a bundle")
    imp.add_argument("diffusers_folder", type=Path)
    imp.add_argument("out", type=Path)
    args = parser.parse_args(argv)

    if args.command == "create":
        if (args.out / "manifest.json").exists() and not args.force:
            raise LdmError(f"{args.out} already holds a bundle; pass --force to overwrite it or choose another path")
        config = apply_overrides(get_preset(args.preset), args.overrides)
        bundle = create_bundle(config, seed=args.seed, name=args.name or args.out.name)
        save_bundle(bundle, args.out)
        params = sum(p.numel() for m in bundle.modules().values() for p in m.parameters())
        print(f"created {args.preset} bundle at {args.out} ({params / 1e6:.2f}M parameters, hash {bundle.short_hash})")
    elif args.command == "info":
        bundle_manifest = read_manifest(args.bundle)
        print((args.bundle / "model.yaml").read_text(), end="")
        print(json.dumps({k: v for k, v in bundle_manifest.items() if k not in ("files", "extras")}, indent=2))
        if bundle_manifest.get("extras"):
            print(f"optional files: {', '.join(sorted(bundle_manifest['extras']))}")
    elif args.command == "export":
        export_diffusers(load_bundle(args.bundle), args.out)
        print(f"exported {args.bundle} to diffusers folder {args.out}")
    elif args.command == "convert":
        if (args.out / "manifest.json").exists() and not args.force:
            raise LdmError(f"{args.out} already holds a bundle; pass --force to overwrite it or choose another path")
        if args.out.resolve() == args.bundle.resolve():
            raise LdmError("convert writes a new bundle; choose an output folder other than the input")
        bundle = load_bundle(args.bundle).to(dtype=DTYPES[args.dtype])
        if args.no_extras:
            bundle.extras = {}
        save_bundle(bundle, args.out)
        size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
        print(f"wrote {args.dtype} bundle {args.out} ({size / 1e6:.1f} MB, hash {bundle.short_hash})")
    elif args.command == "import":
        if (args.out / "manifest.json").exists():
            raise LdmError(f"{args.out} already holds a bundle; choose another path")
        bundle = save_bundle(import_diffusers(args.diffusers_folder), args.out)
        print(f"imported {args.diffusers_folder} into bundle {bundle}")
    return 0


if __name__ == "__main__":
    from ldm.errors import run_cli

    raise SystemExit(run_cli(main))
