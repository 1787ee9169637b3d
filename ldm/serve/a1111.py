"""A1111's web API request and response shapes, and their translation into generate.py's own arguments.

A request becomes the ``argparse.Namespace`` that ``generate.py``'s flags would give, and from there the same
:class:`ldm.cli.generate.Settings` (:func:`ldm.cli.generate.resolve_settings`) and plan: the server makes its images
through the CLI's code, so the same settings and seed give the same pixels and the same PNG metadata.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

import ldm
from ldm.cli.common import SEED_LIMIT
from ldm.cli.generate import Made, Settings, build_parser
from ldm.cli.lora_inputs import prompt_tags
from ldm.errors import LdmError

# A1111's inpainting_fill values → generate.py's --masked-content; 0 ("fill": blurred colours) has no equivalent here
# and starts from the original, as 1 does.
INPAINTING_FILL = {0: "original", 1: "original", 2: "latent-noise", 3: "latent-nothing"}
RESIZE_MODE = {0: "stretch", 1: "crop", 2: "fill"}  # A1111's resize_mode values → --resize


class BadRequest(Exception):
    """A request the server cannot read (an undecodable image, a garbled field): answered with HTTP 400."""


class Txt2ImgRequest(BaseModel):
    """``POST /sdapi/v1/txt2img``'s body, in A1111's field names. Sizes, steps, CFG and sampler left out take the
    model's and generate.py's defaults; fields A1111 has that ldm does not use are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    steps: int | None = Field(None, ge=1)
    sampler_name: str | None = None  # A1111's label ("DPM++ 2M") or ours ("dpmpp_2m")
    sampler_index: str | None = None  # older clients send the sampler here
    cfg_scale: float | None = Field(None, ge=0)
    seed: int = Field(-1, ge=-1, lt=SEED_LIMIT)  # -1: a random one
    width: int | None = Field(None, ge=1)
    height: int | None = Field(None, ge=1)
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    override_settings: dict[str, object] = Field(default_factory=dict)  # sd_model_checkpoint is read
    send_images: bool = True
    save_images: bool = True


class Img2ImgRequest(Txt2ImgRequest):
    """``POST /sdapi/v1/img2img``'s body: txt2img's and the init image, the mask and how they are used."""

    init_images: list[str] = Field(min_length=1, max_length=1)  # base64; ldm takes one
    mask: str | None = None  # base64; white = repaint
    denoising_strength: float = Field(0.75, ge=0, le=1)
    resize_mode: int | None = Field(None, ge=0, le=2)  # 0 stretch, 1 crop, 2 fill; None: crop
    mask_blur: int | None = Field(None, ge=0)
    inpainting_fill: int = Field(1, ge=0, le=3)
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int | None = Field(None, ge=0)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What one request may ask for; more is answered with 422 before any work."""

    max_side: int = 1024  # pixels of width and height
    max_steps: int = 150
    max_images: int = 16  # batch_size × n_iter
    max_body: int = 32 << 20  # bytes of a request body (base64 images)


def check_limits(body: Txt2ImgRequest, limits: Limits) -> None:
    for name, value in (("width", body.width), ("height", body.height)):
        if value is not None and value > limits.max_side:
            raise LdmError(f"{name} {value} is more than this server's {limits.max_side} pixels (--max-side)")
    if body.steps is not None and body.steps > limits.max_steps:
        raise LdmError(f"steps {body.steps} is more than this server's {limits.max_steps} (--max-steps)")
    if body.batch_size * body.n_iter > limits.max_images:
        raise LdmError(f"batch_size × n_iter = {body.batch_size * body.n_iter} images is more than this server's "
                       f"{limits.max_images} per request (--max-images)")  # fmt: skip


def decode_image(data: str, *, what: str) -> tuple[bytes, Image.Image]:
    """A base64 image (optionally a ``data:`` URL), its bytes and the image; anything else is :class:`BadRequest`."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{what} is not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise BadRequest(f"{what} is not a readable image (PNG, JPEG or WebP, base64-encoded)") from None
    return raw, image


def store_input(data: str, folder: Path, *, what: str, invert: bool = False) -> Path:
    """A base64 image written to ``folder`` under its sha256, so that the PNGs record a file that is there (and
    ``generate.py --from-png`` can make the image again); ``invert``: a mask's black and white swapped first."""
    raw, image = decode_image(data, what=what)
    if invert:
        from PIL import ImageOps

        buffer = io.BytesIO()
        ImageOps.invert(image.convert("L")).save(buffer, format="PNG")
        raw = buffer.getvalue()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(raw).hexdigest()[:16]}.png"
    if not path.exists():
        path.write_bytes(raw)
    return path


def check_loras(prompt: str, loras: dict[str, Path]) -> Path | None:
    """The folder the prompt's ``<lora:NAME:WEIGHT>`` tags are looked up in, once every NAME is one of ``loras`` (the
    server's LoRA folder, by name): never a path from the client. None when the prompt has no tag. generate.py then
    reads the tags itself (:func:`ldm.cli.lora_inputs.resolve`): each LoRA at its own weight, cut from the text that
    is encoded and kept in the PNG's prompt."""
    tags = prompt_tags(prompt)
    for name, _ in tags:
        if name not in loras:
            raise LdmError(f"no LoRA {name!r}; GET /sdapi/v1/loras lists them: {', '.join(sorted(loras)) or 'none'}")
    return loras[tags[0][0]].parent if tags else None


def to_arguments(
    body: Txt2ImgRequest, *, model: Path, loras: dict[str, Path], out: Path, inputs: Path, device: str, dtype: str,
    embeddings_dir: Path | None = None, backend: str = "torch",
) -> argparse.Namespace:  # fmt: skip
    """The generate.py arguments that ask for what ``body`` asks for (its defaults for what it leaves out); the
    prompts' embeddings come from ``embeddings_dir``, the server's, never from a client's path."""
    args = build_parser().parse_args([])
    args.embeddings = embeddings_dir
    args.lora_dir = check_loras(body.prompt, loras)
    sampler = body.sampler_name or body.sampler_index
    args.prompts, args.negative_prompt, args.model = [body.prompt], body.negative_prompt, model
    args.steps, args.guidance_scale, args.sampler = body.steps, body.cfg_scale, sampler or None
    args.seed = None if body.seed == -1 else body.seed
    args.num_images, args.batch_size = body.batch_size * body.n_iter, body.batch_size
    args.width, args.height, args.out, args.device, args.dtype = body.width, body.height, out, device, dtype
    args.backend = backend
    if isinstance(body, Img2ImgRequest):
        args.init_image = store_input(body.init_images[0], inputs, what="init_images[0]")
        args.strength = body.denoising_strength
        if body.mask is not None:
            args.mask = store_input(body.mask, inputs, what="mask", invert=bool(body.inpainting_mask_invert))
            args.mask_blur, args.masked_content = body.mask_blur, INPAINTING_FILL[body.inpainting_fill]
            args.only_masked, args.masked_padding = body.inpaint_full_res, body.inpaint_full_res_padding
        elif body.resize_mode is not None:
            args.resize = RESIZE_MODE[body.resize_mode]
    return args


def info_json(body: Txt2ImgRequest, settings: Settings, made: list[Made], *, model_name: str, model_hash: str,
              interrupted: bool) -> str:  # fmt: skip
    """The response's ``info``: A1111's JSON string of what was made, with each image's infotext."""
    seeds = [m.job.seed for m in made]
    info = {
        "prompt": made[0].job.prompt if made else body.prompt, "all_prompts": [m.job.prompt for m in made],
        "negative_prompt": body.negative_prompt, "all_negative_prompts": [m.job.negative_prompt for m in made],
        "seed": seeds[0] if seeds else body.seed, "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(made),
        "subseed_strength": 0, "width": settings.width, "height": settings.height,
        "sampler_name": settings.sampler.label, "cfg_scale": settings.guidance_scale, "steps": settings.steps,
        "batch_size": body.batch_size, "n_iter": body.n_iter, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model_name, "sd_model_hash": model_hash, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": settings.inputs.strength if settings.inputs else None, "extra_generation_params": {},
        "index_of_first_image": 0, "infotexts": [m.parameters.text() for m in made], "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
        "is_using_inpainting_conditioning": bool(settings.inputs and settings.inputs.inpaints),
        "version": f"ldm {ldm.__version__}", "interrupted": interrupted,
    }  # fmt: skip
    return json.dumps(info)


def echo_parameters(body: Txt2ImgRequest) -> dict:
    """The response's ``parameters``: the request as read, without the images it carried (megabytes of base64)."""
    echoed = body.model_dump()
    for name in ("init_images", "mask"):
        if name in echoed:
            echoed[name] = None
    return echoed
