"""LoRA adapters (Hu et al. 2021): W' = W + scale·(α/r)·B·A on the UNet's attention projections, through peft.

Training adds them with :func:`add_lora` (A Gaussian, B zero, so training starts from the base model exactly);
:func:`save_lora` writes the diffusers LoRA format, one small safetensors file that
``StableDiffusionPipeline.load_lora_weights(file)`` loads (keys ``unet.…`` and, with a trained text encoder,
``text_encoder.…``, plus peft's adapter config in the header). :func:`apply_lora` merges such a file into a bundle
through diffusers' own loader, at any scale: ``generate.py --lora FILE --lora-scale S``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ldm.errors import LdmError

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # self- and cross-attention projections
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP self-attention projections
WEIGHT_NAME = "lora.safetensors"


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


def apply_lora(bundle, path: str | Path, *, scale: float = 1.0):
    """Merge the LoRA file ``path`` into ``bundle``'s UNet (and text encoder, when the file has text-encoder layers)
    in place, W ← W + scale·(α/r)·B·A, and return the bundle. Scale 0 leaves every weight as it was.

    Any file ``StableDiffusionPipeline.load_lora_weights`` reads works (diffusers, peft and kohya/A1111 formats).
    The merged modules are plain again (no adapter layers), so the bundle samples and saves as before.
    """
    _peft()
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    path = Path(path)
    if not path.is_file():
        raise LdmError(f"LoRA file {path} not found; pass the lora.safetensors that train_unet.py --lora-rank wrote")
    _check_safetensors(path)
    pipe = StableDiffusionPipeline(
        vae=bundle.vae, text_encoder=bundle.text_encoder.model, tokenizer=bundle.tokenizer, unet=bundle.unet,
        scheduler=DDIMScheduler.from_config(bundle.config.schedule.diffusers_config()), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    try:
        with torch.no_grad():
            pipe.load_lora_weights(str(path), adapter_name="ldm_lora")
            pipe.fuse_lora(lora_scale=scale, adapter_names=["ldm_lora"])
            pipe.unload_lora_weights()
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        message = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise LdmError(
            f"cannot apply LoRA {path} to bundle {bundle.name} ({message}); was it trained on this base model?"
        ) from None
    return bundle
