"""``python -m ldm eval``: score a bundle, or a folder of images with their prompts (see :mod:`ldm.eval.evaluate`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ldm.accel.checks import Backend
from ldm.cli.common import ArgumentParser, check_output, run_cli, seed
from ldm.cli.lora_inputs import parse_flag as lora_flag
from ldm.cli.options import add_backend_argument, add_layout_arguments, layout_settings
from ldm.errors import LdmError
from ldm.eval import evaluate as evaluation
from ldm.eval.evaluate import EvalConfig, GenerationSettings, evaluate, read_prompts, summary
from ldm.eval.metrics import KID_SUBSET_SIZE, KID_SUBSETS
from ldm.formats.bundle import CLIP_FILE
from ldm.pipeline.schedule import SAMPLERS
from ldm.runtime import DTYPES


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m ldm eval", description=evaluation.__doc__.split("\n\n")[0])
    what = p.add_argument_group("what to score")
    what.add_argument("--model", type=Path, help="bundle folder: generates the images, and its VAE and CLIP are used")
    what.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                      help="LoRA file merged into --model at SCALE (default 1), e.g. an LCM-LoRA; repeatable")  # fmt: skip
    what.add_argument("--prompts", type=Path, metavar="FILE",
                      help="prompts, one per line (or a captioned dataset folder: its distinct captions)")
    what.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    what.add_argument("--max-prompts", type=int, default=None, metavar="N", help="the first N prompts of --prompts")
    what.add_argument("--images", type=Path, metavar="DIR",
                      help="score these images instead of generating: a captioned folder (any ldm.data layout)")
    against = p.add_argument_group("metrics")
    against.add_argument("--clip", type=Path, metavar="FILE",
                         help=f"train_clip.py's clip.safetensors for CLIP scores (default: the bundle's {CLIP_FILE})")
    against.add_argument("--reference", type=Path, metavar="DIR", help="images for FID and KID, e.g. data/emoji/test")
    against.add_argument("--inception", type=Path, metavar="FILE",
                         help="torchvision inception_v3 state dict (safetensors) for FID/KID (default: CLIP features)")
    against.add_argument("--vae-data", type=Path, metavar="DIR", help="images for the VAE's PSNR/SSIM/MAE")
    against.add_argument("--vae-size", type=int, metavar="N",
                         help="resize and centre-crop the --vae-data images to N×N (default: as they are)")
    against.add_argument("--kid-subsets", type=int, default=KID_SUBSETS, help=f"KID subsets (default {KID_SUBSETS})")
    against.add_argument("--kid-subset-size", type=int, default=KID_SUBSET_SIZE,
                         help=f"features per side in a KID subset (default {KID_SUBSET_SIZE}, capped at the set sizes)")
    gen = p.add_argument_group("generation")
    defaults = GenerationSettings()
    gen.add_argument("-n", "--images-per-prompt", type=int, default=defaults.images_per_prompt,
                     help=f"images (seeds) per prompt (default {defaults.images_per_prompt})")
    gen.add_argument("--batch-size", type=int, default=defaults.batch_size,
                     help=f"images per UNet batch, and per feature batch (default {defaults.batch_size})")
    gen.add_argument("--steps", type=int, default=defaults.steps, help=f"sampling steps (default {defaults.steps})")
    gen.add_argument("--guidance", "--cfg", dest="guidance", type=float, default=defaults.guidance_scale,
                     help=f"classifier-free guidance scale; ≤ 1 turns it off (default {defaults.guidance_scale})")
    gen.add_argument("--sampler", default=defaults.sampler, metavar="NAME",
                     help=f"one of {', '.join(SAMPLERS)} (default {defaults.sampler})")
    gen.add_argument("--seed", type=seed, default=defaults.seed, help="image j of each prompt uses seed + j (default 0)")
    gen.add_argument("--negative-prompt", default="", help="the unconditional half of guidance (default: empty)")
    gen.add_argument("--deep-cache", type=int, default=0, metavar="N",
                     help="approximate sampling as generate.py --deep-cache N, to score what it changes (default 0: "
                          "exact)")  # fmt: skip
    gen.add_argument("--token-merging", type=float, default=0.0, metavar="R",
                     help="approximate sampling as generate.py --token-merging R, to score what it changes (default "
                          "0: exact)")  # fmt: skip
    add_backend_argument(gen, default="torch",
                     help_text="what runs the UNet, as generate.py --backend (default torch; openvino: pip install "
                          "'ldm[openvino]')")  # fmt: skip
    gen.add_argument("--width", type=int, default=None,
                     help="a multiple of the VAE's downsampling factor, 8 in every preset (default: the bundle's "
                          "training size)")  # fmt: skip
    gen.add_argument("--height", type=int, default=None,
                     help="a multiple of the VAE's downsampling factor (default: the bundle's training size)")
    add_layout_arguments(p)  # for --images and a --prompts folder
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="the bundle's dtype (default fp32)")
    p.add_argument("--out", type=Path, required=True, help="output folder: eval.json, eval.md, grid-*.png, images/")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def config_from_args(args) -> EvalConfig:
    prompts = list(args.prompt)
    if args.max_prompts is not None and args.max_prompts < 1:
        raise LdmError(f"--max-prompts must be at least 1, got {args.max_prompts}")
    layout = layout_settings(args)
    if args.prompts is not None:
        prompts += read_prompts(args.prompts, limit=args.max_prompts, layout=layout)
    if any(not p.strip() for p in args.prompt):
        raise LdmError("--prompt was given an empty prompt; pass some text")
    prompts = list(dict.fromkeys(prompts))  # a repeated prompt would only repeat its images (same seeds)
    loras = []
    for text in args.lora:
        path, scale = lora_flag(text)
        if not path.is_file():
            raise LdmError(f"--lora {text}: no file {path}; pass a LoRA .safetensors file")
        loras.append((path, 1.0 if scale is None else scale))
    return EvalConfig(
        out=args.out, model=args.model, loras=tuple(loras), prompts=tuple(prompts), images=args.images, layout=tuple(layout.items()),
        clip=args.clip,
        reference=args.reference, inception=args.inception, vae_data=args.vae_data, vae_size=args.vae_size,
        generation=GenerationSettings(
            images_per_prompt=args.images_per_prompt, batch_size=args.batch_size, steps=args.steps,
            guidance_scale=args.guidance, sampler=args.sampler, seed=args.seed, width=args.width, height=args.height,
            negative_prompt=args.negative_prompt, deep_cache=args.deep_cache, token_merging=args.token_merging,
            backend=Backend(args.backend),
        ),
        kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size, feature_batch_size=args.batch_size,
        device=args.device, dtype=args.dtype, progress=not args.quiet,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    from diffusers.utils import logging as diffusers_logging

    args = build_parser().parse_args(argv)
    check_output(args.out, folder=True, flag="--out")  # before the generation work, not after it
    cfg = config_from_args(args)
    diffusers_logging.set_verbosity_error()  # its dtype-cast notices are noise here
    with torch.no_grad():
        report = evaluate(cfg)
    for note in report["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(summary(report, cfg.out))
    return 0


def entry() -> None:
    """The installed command and the root script: run with argv, exit with the status."""
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    entry()
