"""Generate images from text prompts with a model bundle.

    python generate.py "red apple"
    python generate.py "red apple" "cat face" -n 4 --batch-size 4 --sampler euler_a --seed 7 --grid
    python generate.py --from-png outputs/00000-7.png       # the same image again, from its own metadata
    python generate.py "red apple" --fast                   # faster on CPUs; see ldm/accel/fast.py
    python generate.py "red apple" --deep-cache 2           # faster still, approximate: see ldm/accel/deepcache.py
    python generate.py "a castle" --model M --token-merging 0.5   # approximate, for large images: see ldm/accel/tome.py

Each PNG carries an A1111-style ``parameters`` text chunk. Prompts longer than the text encoder's context
(77 tokens with the start and end tokens) are truncated, with a warning.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging
from PIL import Image

import ldm
from ldm.accel.deepcache import DeepCacheUNet, check_interval
from ldm.accel.tome import apply_token_merging, check_ratio
from ldm.cli.common import DEFAULT_MODEL, ArgumentParser, exit_now, run_cli
from ldm.errors import LdmError
from ldm.formats.bundle import Bundle, load_bundle
from ldm.formats.pngmeta import format_parameters, parse_parameters, read_png_parameters, save_png
from ldm.models.tokenizer import token_count
from ldm.pipeline import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, Request, check_settings, generate, to_uint8
from ldm.pipeline.schedule import SAMPLERS, get_sampler
from ldm.runtime import DTYPES, resolve_device, resolve_dtype

DEFAULTS = dict(
    negative_prompt="", steps=DEFAULT_STEPS, guidance_scale=DEFAULT_GUIDANCE, sampler=DEFAULT_SAMPLER, dtype="fp32",
    fast=False, deep_cache=0, token_merging=0.0,
)


@dataclass(frozen=True)
class Job:
    """One image to make: its prompts and its seed."""

    prompt: str
    negative_prompt: str
    seed: int


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="generate.py", description="Text-to-image generation with an ldm model bundle.")
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="one or more prompts")
    p.add_argument("--model", type=Path, default=None, help=f"bundle folder (default: {DEFAULT_MODEL})")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (default: nothing)")
    p.add_argument("--steps", type=int, default=None, help=f"sampling steps (default {DEFAULTS['steps']})")
    p.add_argument("--guidance-scale", "--cfg", type=float, default=None,
                   help=f"classifier-free guidance scale; ≤ 1 turns it off (default {DEFAULTS['guidance_scale']})")
    p.add_argument("--sampler", default=None, metavar="NAME",
                   help=f"one of {', '.join(SAMPLERS)} (default {DEFAULTS['sampler']})")
    p.add_argument("--seed", type=int, default=None, help="seed of the first image; image i uses seed+i (default: random)")
    p.add_argument("-n", "--num-images", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--batch-size", type=int, default=1, help="images per UNet batch (default 1)")
    p.add_argument("--width", type=int, default=None, help="multiple of 8 (default: the model's training size)")
    p.add_argument("--height", type=int, default=None, help="multiple of 8 (default: the model's training size)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help=f"weights and activations (default {DEFAULTS['dtype']})")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                   help="fast path: a small UNet runs as traced graphs on long jobs, a big one in bf16 after the "
                        "high-noise steps where the hardware computes bf16 natively; prepacked weights, one thread "
                        "per core (see ldm/accel/fast.py, BENCHMARKS.md)")
    p.add_argument("--compile", action="store_true",
                   help="with --fast: compile the UNet's traced graphs with inductor, torch.compile's compiler (the "
                        "UNet itself, through torch.compile, where it has none); "
                        "up to a minute per batch shape to start (less once cached on disk), then faster steps, so "
                        "for long runs")
    p.add_argument("--deep-cache", type=int, default=None, metavar="N",
                   help="approximate: the whole UNet on every N-th step only, the steps between reuse its deep "
                        "features (DeepCache); faster, and the images change (see BENCHMARKS.md); N ≥ 2")
    p.add_argument("--token-merging", type=float, default=None, metavar="R",
                   help="approximate: merge a fraction R of the tokens in the finest levels' self-attention, 0 ≤ R < 1 "
                        "(ToMe; e.g. 0.5); faster at large sizes, and the images change (see BENCHMARKS.md)")
    p.add_argument("--out", type=Path, default=Path("outputs"), help="output folder (default outputs/)")
    p.add_argument("--grid", action="store_true", help="also write all images as one grid PNG")
    p.add_argument("--from-png", type=Path, metavar="FILE",
                   help="take prompt and settings from a PNG's parameters; flags given here override them")
    p.add_argument("--lora", type=Path, metavar="FILE", help="LoRA file (train_unet.py --lora-rank) merged into the model")
    p.add_argument("--lora-scale", type=float, default=None, help="strength of --lora (default 1; 0 = the base model)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def settings_from_png(path: Path) -> dict:
    """generate.py arguments recorded in a PNG's parameters chunk."""
    prompt, negative, s = parse_parameters(read_png_parameters(path))
    try:
        width, height = (int(v) for v in s["Size"].split("x"))
        recorded = dict(
            prompts=[prompt], negative_prompt=negative, steps=int(s["Steps"]), guidance_scale=float(s["CFG scale"]),
            sampler=get_sampler(s["Sampler"]).name, seed=int(s["Seed"]), width=width, height=height,
            batch_size=int(s.get("Batch size", 1)), batch_pos=int(s.get("Batch pos", 0)),
            dtype=s.get("Dtype", "fp32"), model_hash=s.get("Model hash"),
            lora=s.get("Lora"), lora_scale=float(s.get("Lora scale", 1.0)), fast=s.get("Fast") == "on",
            deep_cache=int(s.get("Deep cache", 0)), token_merging=float(s.get("Token merging ratio", 0)),
        )  # fmt: skip
    except (KeyError, ValueError) as exc:
        raise LdmError(f"{path}: the parameters chunk lacks or garbles {exc}; it cannot be regenerated") from None
    return recorded


def plan_jobs(prompts: list[str], negative: str, *, seed: int, per_prompt: int) -> list[Job]:
    """Every prompt ``per_prompt`` times; seeds count up from ``seed`` across all images."""
    return [
        Job(prompt, negative, seed + i * len(prompts) + k)
        for i in range(per_prompt)
        for k, prompt in enumerate(prompts)
    ]


def next_index(folder: Path) -> int:
    """First free file number in ``folder``: earlier outputs are never overwritten."""
    taken = [int(p.name[:5]) for p in folder.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")]
    return max(taken, default=-1) + 1


def make_grid(images: list[Image.Image]) -> Image.Image:
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid


def warn_long_prompts(bundle: Bundle, prompts: list[str]) -> None:
    limit = bundle.config.text_encoder.context_length
    for prompt in set(prompts):
        if (n := token_count(bundle.tokenizer, prompt)) > limit:
            print(
                f"warning: prompt has {n - 2} tokens; only the first {limit - 2} are used, the rest is dropped: {prompt[:60]!r}",
                file=sys.stderr,
            )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    recorded = settings_from_png(args.from_png) if args.from_png else {}

    def pick(name):  # an explicit flag beats the PNG's value, which beats the default
        value = getattr(args, name, None)
        return value if value not in (None, []) else recorded.get(name, DEFAULTS.get(name))

    prompts = pick("prompts")
    if not prompts:
        raise LdmError('no prompt given; try: python generate.py "red apple"')
    sampler = get_sampler(pick("sampler"))
    if args.num_images < 1 or args.batch_size < 1:
        raise LdmError("--num-images and --batch-size must be at least 1")

    model_path = args.model or DEFAULT_MODEL
    if args.model is None and not DEFAULT_MODEL.exists():
        raise LdmError(
            f"no default model at {DEFAULT_MODEL}; pass --model PATH, or make one with `python -m ldm bundle create micro models/micro`"
        )
    steps, guidance = pick("steps"), pick("guidance_scale")
    # Fail fast on what the flags alone decide, before the (slow) bundle load; sizes are checked again below.
    check_settings(steps=steps, width=args.width or 8, height=args.height or 8, guidance_scale=guidance)
    fast = pick("fast")
    if args.compile and not fast:
        raise LdmError("--compile speeds up the fast path; add --fast")
    deep_cache = pick("deep_cache")
    check_interval(deep_cache)
    token_merging = pick("token_merging")
    check_ratio(token_merging)
    if token_merging and deep_cache:
        raise LdmError("--token-merging and --deep-cache do not combine (the reuse's shallow steps bypass the merging); "
                       "pick one")  # fmt: skip
    if fast and pick("dtype") != "fp32":
        raise LdmError(f"--fast sets the UNet's precision itself and needs fp32 weights, not --dtype {pick('dtype')}")
    bundle = load_bundle(model_path)
    lora_scale = pick("lora_scale") if pick("lora_scale") is not None else 1.0
    if args.lora:
        from ldm.train.lora import apply_lora

        apply_lora(bundle, args.lora, scale=lora_scale)
    elif recorded.get("lora"):
        print(f"warning: {args.from_png} was made with LoRA {recorded['lora']}; pass --lora FILE to reproduce it", file=sys.stderr)
    width, height = pick("width") or bundle.config.default_size, pick("height") or bundle.config.default_size
    check_settings(steps=steps, width=width, height=height, guidance_scale=guidance)
    device = resolve_device(args.device)
    dtype_name = pick("dtype")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if args.quiet else "default")
        dtype = resolve_dtype(dtype_name, device)
    bundle.to(device, dtype)
    if recorded.get("model_hash") and recorded["model_hash"] != bundle.short_hash:
        print(f"warning: {args.from_png} was made with model hash {recorded['model_hash']}, this is {bundle.short_hash}", file=sys.stderr)

    if args.from_png and not (args.prompts or args.seed is not None):
        # Rebuild the batch the image came from: same size and position, so the numbers are the same.
        first_seed = recorded["seed"] - recorded["batch_pos"]
        batch_size = recorded["batch_size"]
        jobs = [Job(prompts[0], pick("negative_prompt"), first_seed + k) for k in range(batch_size)]
        keep = {recorded["batch_pos"]}
    else:
        seed = args.seed if args.seed is not None else random.randrange(2**31)
        jobs = plan_jobs(prompts, pick("negative_prompt"), seed=seed, per_prompt=args.num_images)
        batch_size, keep = args.batch_size, set(range(len(jobs)))
    warn_long_prompts(bundle, [j.prompt for j in jobs] + [j.negative_prompt for j in jobs])
    if fast:
        from ldm.accel.fast import GRAPH_MIN_CALLS, FastConfig, speed_up

        unet_calls = steps * -(-len(jobs) // batch_size)  # tracing the UNet's graphs pays on long jobs only
        graph = None if unet_calls >= GRAPH_MIN_CALLS or args.compile else False  # --compile: the graphs are asked for
        speed_up(bundle, FastConfig(compile=args.compile, graph=graph, deep_cache=deep_cache))
    elif deep_cache:
        bundle.unet = DeepCacheUNet(bundle.unet, interval=deep_cache)
    apply_token_merging(bundle.unet, token_merging)

    args.out.mkdir(parents=True, exist_ok=True)
    index, written = next_index(args.out), []
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        request = Request(
            prompts=[j.prompt for j in batch], negative_prompts=[j.negative_prompt for j in batch],
            seeds=[j.seed for j in batch], steps=steps, guidance_scale=guidance, sampler=sampler,
            width=width, height=height,
        )  # fmt: skip
        pixels = to_uint8(generate(bundle, request, progress=not args.quiet)).numpy()  # (B, H, W, 3)
        for pos, (job, array) in enumerate(zip(batch, pixels)):
            if start + pos not in keep:
                continue
            settings = {
                "Steps": steps, "Sampler": sampler.label, "CFG scale": guidance, "Seed": job.seed,
                "Size": f"{width}x{height}", "Model hash": bundle.short_hash, "Model": bundle.name,
            }  # fmt: skip
            if len(batch) > 1:
                settings |= {"Batch size": len(batch), "Batch pos": pos}
            if args.lora:
                settings |= {"Lora": args.lora.name, "Lora scale": lora_scale}
            settings |= {"Dtype": dtype_name} | ({"Fast": "on"} if fast else {})
            settings |= {"Deep cache": deep_cache} if deep_cache else {}
            settings |= {"Token merging ratio": token_merging} if token_merging else {}
            settings |= {"Version": f"ldm {ldm.__version__}"}
            path = args.out / f"{index:05d}-{job.seed}.png"
            image = Image.fromarray(array)
            save_png(image, path, format_parameters(job.prompt, job.negative_prompt, settings))
            written.append(image)
            index += 1
            print(path)
    if args.grid and written:
        grid_path = args.out / f"grid-{index - 1:05d}.png"
        make_grid(written).save(grid_path)
        print(grid_path)
    return 0


def entry() -> None:
    """The installed command and the root script: run with argv, exit with the status."""
    torch.set_grad_enabled(False)
    diffusers_logging.set_verbosity_error()  # its dtype-cast notices are noise here
    exit_now(run_cli(main))


if __name__ == "__main__":
    entry()
