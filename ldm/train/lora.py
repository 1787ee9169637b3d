"""LoRA adapters (Hu et al. 2021): W' = W + scale·(α/r)·B·A on the UNet's attention projections, through peft.

Training adds them with :func:`add_lora` (A Gaussian, B zero, so training starts from the base model exactly);
:func:`save_lora` writes the diffusers LoRA format, one small safetensors file that
``StableDiffusionPipeline.load_lora_weights(file)`` loads (keys ``unet.…`` and, with a trained text encoder,
``text_encoder.…``, plus peft's adapter config in the header). :func:`apply_lora` merges such a file into a bundle
through diffusers' own loader, at any scale: ``generate.py --lora FILE --lora-scale S``.

The kohya format (sd-scripts; what A1111, ComfyUI and most shared LoRAs use) is written beside it
(:func:`save_kohya_lora`: ``lora_unet_<module>`` and ``lora_te_<module>`` keys, the module path with ``_`` for ``.``,
each with ``.lora_down.weight``, ``.lora_up.weight`` and a scalar ``.alpha``) and read by :func:`apply_lora`, which
tells the formats apart by their keys. A kohya file is mapped onto the bundle's own module names (exactly, not by
pattern), α/r folded into the up weights, then loaded as a diffusers one; LoCon convolution adapters (4-D down and
up weights on ``conv1``, ``conv2``, ``conv_shortcut``, …) map onto peft's Conv2d LoRA the same way.
"""

from __future__ import annotations

import enum
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ldm.errors import LdmError

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # self- and cross-attention projections
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP self-attention projections
WEIGHT_NAME = "lora.safetensors"
KOHYA_NAME = "lora.kohya.safetensors"  # written beside WEIGHT_NAME by train_unet.py --lora-rank
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder"}  # kohya's name → the bundle part it adapts
_KOHYA_KEY = re.compile(r"^(lora_unet_|lora_te_)(\w+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_DIFFUSERS_KEY = re.compile(
    r"^(unet|text_encoder)\.(.+)\.(lora\.down|lora\.up|lora_A|lora_B|lora_linear_layer\.down|lora_linear_layer\.up)"
    r"\.weight$"
)
READABLE = ("kohya keys lora_unet_…/lora_te_… with .lora_down.weight, .lora_up.weight and .alpha, or diffusers keys "
            "unet.…/text_encoder.… with .lora.down/.lora.up or .lora_A/.lora_B")  # fmt: skip


class LoraFormat(enum.Enum):
    """How a LoRA file names its tensors."""

    DIFFUSERS = "diffusers"  # unet.<module>.lora.down.weight (diffusers' save_lora_weights)
    KOHYA = "kohya"  # lora_unet_<module_with_underscores>.lora_down.weight (+ .alpha)


def _peft():
    """peft, or a one-line error: missing, or older than the installed transformers accepts."""
    try:
        import peft
    except ImportError:
        raise LdmError("LoRA needs peft; install it with `pip install -e .[lora]` (or `pip install peft`)") from None
    try:
        from transformers.integrations.peft import MIN_PEFT_VERSION
    except ImportError:  # a transformers without the constant checks nothing
        return
    from packaging.version import Version

    if Version(peft.__version__) < Version(MIN_PEFT_VERSION):
        import transformers

        raise LdmError(
            f"LoRA needs peft >= {MIN_PEFT_VERSION} with transformers {transformers.__version__}, and peft "
            f"{peft.__version__} is installed; `pip install -e .[lora]` installs a pair that fits"
        )


def add_lora(module: nn.Module, *, rank: int, alpha: float, targets: tuple[str, ...]) -> list[nn.Parameter]:
    """Freeze ``module`` and give it a trainable LoRA adapter on ``targets``; returns the adapter's parameters.

    ``module`` is a diffusers model or a transformers model (both have peft's ``add_adapter``). A is Gaussian and B
    zero, so the adapted module computes exactly what it did before the first step.
    """
    _peft()
    from peft import LoraConfig

    if rank < 1:
        raise LdmError(f"LoRA rank must be at least 1, got {rank}; try --lora-rank 4")
    module.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=list(targets))
    module.add_adapter(config)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise LdmError(f"no {', '.join(targets)} layers found for LoRA in {type(module).__name__}")
    return params


def lora_state_dict(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The adapter of ``module`` in the diffusers LoRA format, and its peft config (for the file's header)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
    config = module.peft_config["default"].to_dict()
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}, config


def save_lora(path: str | Path, *, unet: nn.Module, text_encoder: nn.Module | None = None) -> Path:
    """Write the adapters of ``unet`` (and of the transformers ``text_encoder``, if it has one) to ``path``, atomically,
    with diffusers' ``save_lora_weights``."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    unet_layers, unet_config = lora_state_dict(unet)
    text_layers, text_config = lora_state_dict(text_encoder) if text_encoder is not None else (None, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=unet_layers, text_encoder_lora_layers=text_layers, weight_name=WEIGHT_NAME,
            safe_serialization=True, unet_lora_adapter_metadata=unet_config,
            text_encoder_lora_adapter_metadata=text_config,
        )  # fmt: skip
        os.replace(tmp / WEIGHT_NAME, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def to_kohya(layers: dict[str, torch.Tensor], *, prefix: str, alpha: float) -> dict[str, torch.Tensor]:
    """The diffusers-format layers of one part (``<module>.lora.down.weight``, no part prefix) in kohya's names,
    with an ``.alpha`` per module: the adapter computes the same α/r·B·A in both."""
    kohya = {}
    for key, value in layers.items():
        module, kind = re.split(r"\.lora(?:_linear_layer)?\.", key, maxsplit=1)  # kind: "down.weight" or "up.weight"
        if prefix == "lora_te_" and not module.startswith("text_model."):
            module = "text_model." + module  # kohya names CLIP's layers as transformers 4 nests them
        name = prefix + module.replace(".", "_")
        kohya[f"{name}.lora_{kind}"] = value
        kohya[f"{name}.alpha"] = torch.tensor(float(alpha))
    return kohya


def save_kohya_lora(path: str | Path, *, unet: nn.Module, text_encoder: nn.Module | None = None) -> Path:
    """Write the adapters of ``unet`` (and ``text_encoder``) to ``path`` in the kohya format, atomically."""
    from ldm.io import save_tensors

    tensors, rank, alpha = {}, None, None
    for prefix, module in (("lora_unet_", unet), ("lora_te_", text_encoder)):
        if module is None:
            continue
        layers, config = lora_state_dict(module)
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise LdmError("the kohya format here takes one rank and alpha per part; these adapters have patterns")
        rank, alpha = config["r"], config["lora_alpha"]
        tensors |= to_kohya(layers, prefix=prefix, alpha=alpha)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha)}
    return save_tensors(Path(path), tensors, metadata=meta)


def _check_safetensors(path: Path) -> None:
    """Refuse anything but a readable safetensors file before diffusers sees it: it would unpickle the rest."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:120]
        raise LdmError(
            f"LoRA file {path} is not a safetensors file ({detail}); pickle files (.ckpt, .pt, .bin) are refused, "
            "since loading one can run code: convert it to .safetensors"
        ) from None


def lora_format(keys: list[str], path: Path) -> LoraFormat:
    """Which format a LoRA file's keys are in; a one-line error naming the first key neither format has."""
    kohya = any(k.startswith(tuple(KOHYA_PREFIXES)) for k in keys)
    pattern = _KOHYA_KEY if kohya else _DIFFUSERS_KEY
    for key in keys:
        if not pattern.match(key) and not (not kohya and key.endswith(".alpha")):
            raise LdmError(f"LoRA {path}: unknown key {key}; ldm reads {READABLE} (LoHa, LoKr and DoRA are not read): "
                           "convert the file to one of those")  # fmt: skip
    if not keys:
        raise LdmError(f"LoRA {path} has no tensors; pass the lora.safetensors that train_unet.py --lora-rank wrote")
    return LoraFormat.KOHYA if kohya else LoraFormat.DIFFUSERS


def _layers(bundle, part: str) -> dict[str, str]:
    """The bundle part's adaptable layers (Linear, Conv2d): kohya's underscored name → the module path."""
    module = bundle.unet if part == "unet" else bundle.text_encoder.model
    names = [name for name, m in module.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    layers = {name.replace(".", "_"): name for name in names}
    if part == "text_encoder":  # kohya's text_model_… names, where transformers 5 has no text_model level
        layers |= {"text_model_" + k: v for k, v in layers.items() if not k.startswith("text_model_")}
    return layers


def _unknown_layer(path: Path, key: str, part: str, bundle) -> LdmError:
    what = "UNet" if part == "unet" else "text encoder"
    return LdmError(f"LoRA {path}: key {key} names no layer of {bundle.name}'s {what}; the LoRA was made for another "
                    f"base model: use one trained on {bundle.name}")  # fmt: skip


def read_lora(bundle, path: Path) -> dict[str, torch.Tensor] | str:
    """The LoRA file ``path`` for diffusers' loader: a diffusers file as its path (checked against the bundle's layer
    names), a kohya file converted to the diffusers format on the bundle's module names, α/r folded into the up
    weights (so the adapter's own scaling is 1, as diffusers assumes for a file without alphas)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        kind = lora_format(keys, path)
        tensors = {k: f.get_tensor(k) for k in keys} if kind is LoraFormat.KOHYA else None
    layers = {part: _layers(bundle, part) for part in ("unet", "text_encoder")}
    if kind is LoraFormat.DIFFUSERS:
        for key in keys:
            if match := _DIFFUSERS_KEY.match(key):
                part, module = match.group(1), match.group(2)
                if module not in layers[part].values():
                    raise _unknown_layer(path, key, part, bundle)
        return str(path)
    converted = {}
    for key in keys:
        prefix, name, kind = _KOHYA_KEY.match(key).groups()
        if kind != "lora_down.weight":
            continue
        part = KOHYA_PREFIXES[prefix]
        if name not in layers[part]:
            raise _unknown_layer(path, key, part, bundle)
        down, up = tensors[key], tensors.get(f"{prefix}{name}.lora_up.weight")
        if up is None:
            raise LdmError(f"LoRA {path}: {key} has no {prefix}{name}.lora_up.weight beside it; the file is incomplete")
        rank = down.shape[0]
        alpha = tensors.get(f"{prefix}{name}.alpha")
        factor = float(alpha) / rank if alpha is not None else 1.0
        module = f"{part}.{layers[part][name]}"
        converted[f"{module}.lora_A.weight"] = down.float()  # peft's names, which diffusers reads for every part
        converted[f"{module}.lora_B.weight"] = up.float() * factor if factor != 1.0 else up.float()
    for key in keys:  # an up or alpha without its down
        prefix, name, _ = _KOHYA_KEY.match(key).groups()
        if f"{prefix}{name}.lora_down.weight" not in tensors:
            raise LdmError(f"LoRA {path}: {key} has no {prefix}{name}.lora_down.weight beside it; the file is "
                           "incomplete")  # fmt: skip
    return converted


def apply_lora(bundle, path: str | Path, *, scale: float = 1.0):
    """Merge the LoRA file ``path`` into ``bundle``'s UNet (and text encoder, when the file has text-encoder layers)
    in place, W ← W + scale·(α/r)·B·A, and return the bundle. Scale 0 leaves every weight as it was.

    Diffusers and kohya files are read (:func:`read_lora`; the format is told by the keys), LoCon convolution
    adapters included. The merged modules are plain again (no adapter layers), so the bundle samples and saves as
    before, and another LoRA can be merged on top (:func:`apply_loras`).
    """
    _peft()
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    path = Path(path)
    if not path.is_file():
        raise LdmError(f"LoRA file {path} not found; pass the lora.safetensors that train_unet.py --lora-rank wrote")
    _check_safetensors(path)
    source = read_lora(bundle, path)
    pipe = StableDiffusionPipeline(
        vae=bundle.vae, text_encoder=bundle.text_encoder.model, tokenizer=bundle.tokenizer, unet=bundle.unet,
        scheduler=DDIMScheduler.from_config(bundle.config.schedule.diffusers_config()), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    try:
        with torch.no_grad():
            pipe.load_lora_weights(source, adapter_name="ldm_lora")
            pipe.fuse_lora(lora_scale=scale, adapter_names=["ldm_lora"])
            pipe.unload_lora_weights()
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        message = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise LdmError(
            f"cannot apply LoRA {path} to bundle {bundle.name} ({message}); was it trained on this base model?"
        ) from None
    return bundle


def apply_loras(bundle, loras: list[tuple[Path, float]]):
    """Merge several LoRA files into ``bundle``, each at its own scale, one after the other:
    W ← W + Σ scaleᵢ·(αᵢ/rᵢ)·Bᵢ·Aᵢ. A LoRA at scale 0 changes nothing, as if it were left out."""
    for path, scale in loras:
        apply_lora(bundle, path, scale=scale)
    return bundle


def lora_hash(path: str | Path) -> str:
    """A1111's AutoV2 hash of a LoRA file: the first 10 hex digits of its sha256 (the "Lora hashes" entry)."""
    from ldm.io import sha256_file

    return sha256_file(path)[:10]
