"""``python -m ldm upscale``: upscale images with a latent upscaler bundle (train_unet.py --task upscale).

    python -m ldm upscale a.png b.png --model models/emoji-tiny-upscale -o upscaled/
    python -m ldm upscale outputs/ --model models/emoji-tiny-upscale --prompt "red apple" --noise-level 40

Each output is ``upscale_factor`` times its input, denoised in tiles of the upscaler's training size when larger
(:mod:`ldm.pipeline.upscale`); inputs whose sides are not multiples of the VAE's factor are cropped to them. Every PNG
records its settings (prompt, steps, sampler, seed, noise level, the upscaler and its hash, the input's sha256).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging

import ldm
from ldm.cli.common import SEED_LIMIT, ArgumentParser, check_output, exit_now, run_cli
from ldm.cli.common import seed as seed_type
from ldm.cli.generate import check_text
from ldm.cli.image_inputs import DEFAULT_UPSCALE_STEPS
from ldm.errors import LdmError
from ldm.formats.bundle import load_bundle, read_config
from ldm.formats.pngmeta import ImageParameters, save_png
from ldm.images import (
    IMAGE_SUFFIXES,
    find_images,
    pil_to_uint8,
    read_image_file,
    to_rgb,
    to_uint8,
    uint8_to_pil,
    uint8_to_unit,
)
from ldm.models.tasks import Task
from ldm.pipeline import check_generation_memory
from ldm.pipeline.modes import DEFAULT_NOISE_LEVEL
from ldm.pipeline.schedule import SAMPLERS, get_sampler
from ldm.pipeline.upscale import upscale
from ldm.runtime import DTYPES, resolve_device, resolve_dtype

DEFAULT_GUIDANCE = 1.0  # an empty prompt guides nothing; with --prompt, 4–7 sharpens towards it


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="ldm upscale", description="Upscale images with a latent upscaler bundle.")
    p.add_argument("inputs", nargs="+", type=Path, metavar="IMAGE", help="image files or folders of them")
    p.add_argument("--model", type=Path, required=True, help="the upscaler bundle (train_unet.py --task upscale)")
    p.add_argument("-o", "--out", type=Path, default=Path("upscaled"), help="output folder (default upscaled/)")
    p.add_argument("--prompt", default="", help="what the image shows (default: nothing)")
    p.add_argument("--negative-prompt", default="", help="what to steer away from")
    p.add_argument("--steps", type=int, default=DEFAULT_UPSCALE_STEPS, help=f"default {DEFAULT_UPSCALE_STEPS}")
    p.add_argument("--guidance-scale", "--cfg", type=float, default=DEFAULT_GUIDANCE,
                   help=f"classifier-free guidance towards --prompt (default {DEFAULT_GUIDANCE}: off)")
    p.add_argument("--sampler", default="dpmpp_2m", help=f"one of {', '.join(SAMPLERS)} (default dpmpp_2m)")
    p.add_argument("--noise-level", type=int, default=DEFAULT_NOISE_LEVEL,
                   help=f"noise added to the input: more hides its flaws, less keeps its detail (default "
                        f"{DEFAULT_NOISE_LEVEL})")  # fmt: skip
    p.add_argument("--seed", type=seed_type, default=None, help="seed of the first image; image i uses seed+i")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def input_files(inputs: list[Path]) -> list[Path]:
    files = []
    for path in inputs:
        if path.is_dir():
            found = find_images(path)
            if not found:
                raise LdmError(f"{path} holds no image ({', '.join(sorted(IMAGE_SUFFIXES))}); pass image files")
            files += found
        else:
            files.append(path)
    return files


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    config = read_config(args.model)
    if config.task is not Task.UPSCALE:
        raise LdmError(f"{args.model} is a {config.task.value} model, not an upscaler; pass a bundle made by "
                       "train_unet.py --task upscale")  # fmt: skip
    check_text([args.prompt, args.negative_prompt])
    sampler = get_sampler(args.sampler)
    if not 1 <= args.steps <= config.schedule.num_train_timesteps:
        raise LdmError(f"--steps must be from 1 to {config.schedule.num_train_timesteps}, got {args.steps}")
    if not 0 <= args.noise_level < config.unet.num_class_embeds:
        raise LdmError(f"--noise-level must be from 0 to {config.unet.num_class_embeds - 1}, got {args.noise_level}")
    check_output(args.out, folder=True, flag="--out")
    files = input_files(args.inputs)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    if seed + len(files) > SEED_LIMIT:
        raise LdmError(f"--seed {seed} + {len(files)} images passes 2^63 - 1; pass a smaller --seed")
    factor, s = config.vae.downsampling_factor, config.upscale_factor
    images = []
    for path in files:  # all read and checked before the model loads
        image, digest = read_image_file(path, what="image to upscale")
        pixels = pil_to_uint8(to_rgb(image))
        h, w = (side // factor * factor for side in pixels.shape[-2:])
        if min(h, w) == 0:
            raise LdmError(f"{path} is {image.width}×{image.height}, smaller than one {factor}-pixel latent cell")
        if (h, w) != tuple(pixels.shape[-2:]):
            print(f"note: {path} is cropped to {w}×{h} (multiples of {factor})", file=sys.stderr)
        images.append((path, digest, pixels[:, :h, :w]))
    largest = max(images, key=lambda item: item[2].shape[-1] * item[2].shape[-2])[2]
    tile = config.unet.sample_size * factor  # the memory of one tile, and the VAE's at the full size
    check_generation_memory(config, width=min(largest.shape[-1] * s, tile), height=min(largest.shape[-2] * s, tile),
                            batch=1)  # fmt: skip
    device = resolve_device(args.device)
    bundle = load_bundle(args.model).to(device, resolve_dtype(args.dtype, device))
    args.out.mkdir(parents=True, exist_ok=True)
    for i, (path, digest, pixels) in enumerate(images):
        out = upscale(bundle, uint8_to_unit(pixels)[None], prompts=[args.prompt], negative_prompts=[args.negative_prompt],
                      seeds=[seed + i], steps=args.steps, guidance_scale=args.guidance_scale, sampler=sampler,
                      noise_level=args.noise_level, progress=not args.quiet)  # fmt: skip
        h, w = pixels.shape[-2:]
        record = ImageParameters(
            prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, sampler=sampler.label,
            guidance_scale=args.guidance_scale, seed=seed + i, width=w * s, height=h * s, model_hash=bundle.model_hash,
            model=bundle.name, dtype=args.dtype, version=f"ldm {ldm.__version__}", init_image=str(path),
            init_image_hash=digest, strength=1.0, upscaler=str(args.model), upscaler_hash=bundle.model_hash,
            upscale_steps=args.steps, noise_level=args.noise_level,
        )  # fmt: skip
        target = args.out / f"{path.stem}-x{s}.png"
        save_png(uint8_to_pil(to_uint8(out)[0]), target, record.text())
        print(target)
    return 0


def entry() -> None:
    torch.set_grad_enabled(False)
    diffusers_logging.set_verbosity_error()
    exit_now(run_cli(main))


if __name__ == "__main__":
    entry()
