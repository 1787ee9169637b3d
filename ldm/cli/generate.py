"""Generate images from text prompts with a model bundle.

    python generate.py "red apple"
    python generate.py "red apple" "cat face" -n 4 --batch-size 4 --sampler euler_a --seed 7 --grid
    python generate.py --from-png outputs/00000-7.png       # the same image again, from its own metadata
    python generate.py "red apple" --fast                   # faster on CPUs; see ldm/accel/fast.py
    python generate.py "red apple" --backend openvino       # the UNet run by OpenVINO: pip install 'ldm[openvino]'
    python generate.py "red apple" --deep-cache 2           # faster still, approximate: see ldm/accel/deepcache.py
    python generate.py "a castle" --model M --token-merging 0.5   # approximate, for large images: see ldm/accel/tome.py
    python generate.py "red apple" --init-image in.png --strength 0.6              # img2img
    python generate.py "red apple" --init-image in.png --mask mask.png             # inpainting (white = repaint)
    python generate.py "red apple" --init-image in.png --outpaint 0,0,32,0         # outpainting
    python generate.py "red apple" --upscale models/emoji-tiny-upscale                  # then a latent upscaler

Prompts are read in A1111's prompt language (``ldm/pipeline/prompts.py``): ``(word)``, ``[word]`` and
``(word:1.3)`` weight words, ``BREAK`` starts a new chunk; prompts longer than the text encoder's context are encoded
in chunks of 75 tokens, none truncated; a word that names a file of ``--embeddings DIR`` (default
``models/embeddings/``) reads as that textual-inversion embedding. Each PNG carries an A1111-style ``parameters`` text
chunk.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging
from PIL import Image

import ldm
from ldm import accel
from ldm.cli.common import DEFAULT_MODEL, SEED_LIMIT, ArgumentParser, check_output, exit_now, run_cli
from ldm.cli.common import seed as seed_type
from ldm.cli.embedding_inputs import add_arguments as add_embedding_arguments
from ldm.cli.embedding_inputs import record as embedding_record
from ldm.cli.embedding_inputs import resolve as resolve_embeddings
from ldm.cli.embedding_inputs import warn_about_embeddings
from ldm.cli.image_inputs import ImageInputs, UpscaleSettings, check_task, resolve_upscale
from ldm.cli.image_inputs import add_arguments as add_image_arguments
from ldm.cli.image_inputs import resolve as resolve_image_inputs
from ldm.cli.lora_inputs import LoraChoice, strip_lora_tags, warn_about_loras
from ldm.cli.lora_inputs import add_arguments as add_lora_arguments
from ldm.cli.lora_inputs import record as lora_record
from ldm.cli.lora_inputs import resolve as resolve_loras
from ldm.cli.model_inputs import add_arguments as add_model_arguments
from ldm.cli.model_inputs import check_tiny_vae, resolve_model, resolve_vae, vae_record, warn_about_vae
from ldm.cli.options import add_backend_argument
from ldm.config import show
from ldm.errors import LdmError
from ldm.formats.bundle import Bundle, load_bundle, read_config
from ldm.formats.pngmeta import ImageParameters, read_png_parameters, save_png
from ldm.formats.vae_file import VaeFile, attach_vae
from ldm.images import to_uint8, uint8_to_pil
from ldm.io import has_undecodable
from ldm.models.embeddings import EmbeddingSet
from ldm.models.labels import Conditioning, label_ids
from ldm.pipeline import (
    DEFAULT_GUIDANCE,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    Request,
    StepHook,
    check_generation_memory,
    check_settings,
    generate,
)
from ldm.pipeline.schedule import SAMPLERS, Sampler, get_sampler
from ldm.runtime import DTYPES, resolve_device, resolve_dtype

DEFAULTS = {
    "negative_prompt": "", "steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE, "sampler": DEFAULT_SAMPLER,
    "dtype": "fp32", "fast": False, "deep_cache": 0, "token_merging": 0.0, "clip_skip": 1, "tiny_vae": False,
    "backend": "torch",
}  # fmt: skip


@dataclass(frozen=True)
class Job:
    """One image to make: its prompts and its seed."""

    prompt: str
    negative_prompt: str
    seed: int


@dataclass(frozen=True, kw_only=True)
class Settings:
    """How this run makes its images: each flag given, else what ``--from-png`` recorded, else the default; checked."""

    model: Path
    prompts: list[str]
    negative_prompt: str
    steps: int
    guidance_scale: float
    sampler: Sampler
    width: int
    height: int
    device: torch.device
    dtype: str  # a name of ldm.runtime.DTYPES
    fast: bool
    compile: bool
    backend: accel.Backend  # what runs the UNet
    deep_cache: int
    token_merging: float
    clip_skip: int
    loras: tuple[LoraChoice, ...]  # --lora and the prompts' <lora:…> tags: merged into the model, in order
    seed: int | None  # --seed; None: a random one
    num_images: int  # per prompt
    batch_size: int
    from_png: Path | None
    recorded: ImageParameters | None  # what --from-png's image recorded
    rebuild: bool  # remake --from-png's own batch: it was given without prompts or a seed
    inputs: ImageInputs | None = None  # img2img / inpainting / outpainting; None: text-to-image
    upscale: UpscaleSettings | None = None  # --upscale: every image upscaled after it is made
    vae: VaeFile | None = None  # --vae: the autoencoder swapped in; None: the model's own
    embeddings: EmbeddingSet | None = None  # the textual-inversion embeddings the prompts name (--embeddings)
    tiny_vae: bool = False  # --tiny-vae: the images decoded by the bundle's tiny autoencoder


@dataclass(frozen=True)
class Plan:
    """The images to make, in UNet batches of ``batch_size``; only the jobs at the ``keep`` positions are written."""

    jobs: list[Job]
    batch_size: int
    keep: set[int]

    @property
    def batches(self) -> int:
        return -(-len(self.jobs) // self.batch_size)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="generate.py", description="Text-to-image generation with an ldm model bundle.")
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="one or more prompts")
    p.add_argument("--class", dest="class_names", action="append", default=[], metavar="NAME",
                   help="a class-conditional model's class (train_unet.py --conditioning class); repeat for several. "
                        "An unconditional model needs neither a prompt nor a class")  # fmt: skip
    p.add_argument("--model", type=Path, default=None,
                   help=f"bundle folder, or a single-file SD checkpoint (.safetensors; converted once into a cached "
                        f"bundle) (default: {DEFAULT_MODEL})")  # fmt: skip
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (default: nothing)")
    p.add_argument("--steps", type=int, default=None, help=f"sampling steps (default {DEFAULTS['steps']})")
    p.add_argument("--guidance-scale", "--cfg", type=float, default=None,
                   help=f"classifier-free guidance scale; ≤ 1 turns it off (default {DEFAULTS['guidance_scale']})")
    p.add_argument("--sampler", default=None, metavar="NAME",
                   help=f"one of {', '.join(SAMPLERS)} (default {DEFAULTS['sampler']})")
    p.add_argument("--clip-skip", type=int, default=None, metavar="N",
                   help="condition on the text encoder's N-th layer from the end (A1111's Clip skip; default 1, the "
                        "last; 2 is what many SD 1.x fine-tunes were trained with)")  # fmt: skip
    p.add_argument("--seed", type=seed_type, default=None,
                   help="seed of the first image; image i uses seed+i (default: random)")
    p.add_argument("-n", "--num-images", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--batch-size", type=int, default=1, help="images per UNet batch (default 1)")
    p.add_argument("--width", type=int, default=None,
                   help="a multiple of the VAE's downsampling factor, 8 in every preset (default: the model's "
                        "training size)")  # fmt: skip
    p.add_argument("--height", type=int, default=None,
                   help="a multiple of the VAE's downsampling factor (default: the model's training size)")
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
    add_backend_argument(p, default=None,
                   help_text="what runs the UNet: torch, or OpenVINO's CPU runtime in fp32 (the same images up to "
                        "rounding; an optional extra, pip install 'ldm[openvino]'; converts the UNet once per size, "
                        "cached on disk; see BENCHMARKS.md for where it is faster) (default torch)")  # fmt: skip
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
    add_lora_arguments(p)
    add_embedding_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_image_arguments(p)
    add_model_arguments(p)
    return p


def settings_from_png(path: Path) -> tuple[ImageParameters, dict]:
    """A PNG's parameters chunk, and the generate.py arguments it records (by their argparse names)."""
    try:
        p = ImageParameters.from_text(read_png_parameters(path))
        sampler = get_sampler(p.sampler).name
    except (KeyError, ValueError) as exc:
        raise LdmError(f"{path}: the parameters chunk lacks or garbles {show(str(exc))}; it cannot be "
                       "regenerated") from None  # fmt: skip
    if not 0 <= p.seed < SEED_LIMIT:
        raise LdmError(f"{path}: the recorded seed {show(p.seed)} is out of range (0 to 2^63 - 1); pass --seed")
    backends = [b.value for b in accel.Backend]
    if p.backend is not None and p.backend not in backends:
        raise LdmError(f"{path}: the recorded backend {show(p.backend)} is not one of {', '.join(backends)}; pass "
                       "--backend")  # fmt: skip
    if p.extra:
        print(f"{path}: kept unknown settings: {', '.join(k for k, _ in p.extra)}", file=sys.stderr)
    return p, {
        "prompts": [p.prompt], "negative_prompt": p.negative_prompt, "steps": p.steps, "guidance_scale": p.guidance_scale,
        "sampler": sampler, "width": p.width, "height": p.height, "dtype": p.dtype or "fp32",
        "fast": p.fast, "deep_cache": p.deep_cache, "token_merging": p.token_merging, "clip_skip": p.clip_skip,
        "tiny_vae": p.tiny_vae, "backend": p.backend or "torch",
    }  # fmt: skip


def resolve_settings(args: argparse.Namespace) -> Settings:
    """The run's settings from the flags and ``--from-png``, checked against the model's config before its weights
    load (the slow part), so that a bad flag fails at once."""
    recorded, from_png = settings_from_png(args.from_png) if args.from_png else (None, {})

    def pick(name):  # an explicit flag beats the PNG's value, which beats the default
        value = getattr(args, name, None)
        return value if value not in (None, []) else from_png.get(name, DEFAULTS.get(name))

    prompts = pick("prompts")
    if args.class_names:
        if args.prompts:
            raise LdmError("give the classes with --class or as prompts, not both")
        prompts = args.class_names
    if not prompts:
        prompts = unconditional_prompts(args.model)
    check_text([*prompts, pick("negative_prompt")])
    sampler = get_sampler(pick("sampler"))
    check_counts(args, len(prompts))
    check_output(args.out, folder=True, flag="--out")
    if args.model is None and not DEFAULT_MODEL.exists():
        raise LdmError(
            f"no default model at {DEFAULT_MODEL}; pass --model PATH, or make one with `python -m ldm bundle create micro models/micro`"
        )
    fast, deep_cache, token_merging, dtype = pick("fast"), pick("deep_cache"), pick("token_merging"), pick("dtype")
    backend = accel.Backend(pick("backend"))
    device = resolve_device(args.device)
    accel.check(fast=fast, compile=args.compile, deep_cache=deep_cache, token_merging=token_merging, dtype=dtype,
                backend=backend, device=device.type)  # fmt: skip
    model = resolve_model(args.model or DEFAULT_MODEL)  # a single file: its cached bundle
    config = read_config(model)  # the training size and the VAE's downsampling factor, without the weights
    if args.class_names and config.conditioning is not Conditioning.CLASS:
        raise LdmError(f"--class is for class-conditional models; {model} is conditioned on "
                       f"{config.conditioning.value}: {'pass a prompt' if config.conditioning is Conditioning.TEXT else 'leave it out'}")  # fmt: skip
    if config.conditioning is not Conditioning.TEXT:
        label_ids(config.classes, [*prompts, pick("negative_prompt")])  # unknown classes fail before the load
    vae = resolve_vae(args, config)
    embeddings = resolve_embeddings(args, [*prompts, pick("negative_prompt")], config)
    tiny_vae = pick("tiny_vae")
    check_tiny_vae(tiny_vae, model, vae=vae, from_png=args.from_png if args.tiny_vae is None else None)
    inputs = resolve_image_inputs(args, recorded, args.from_png)
    check_task(config, model, inputs)
    default_width, default_height = inputs.default_size(config) if inputs else (config.default_size,) * 2
    width, height = pick("width") or default_width, pick("height") or default_height
    upscale = resolve_upscale(args, recorded)
    steps, guidance, clip_skip = pick("steps"), pick("guidance_scale"), pick("clip_skip")
    if not 1 <= clip_skip <= config.text_encoder.layers:
        raise LdmError(f"--clip-skip must be from 1 to the text encoder's {config.text_encoder.layers} layers, got "
                       f"{clip_skip}; 1 is the last layer, 2 the one before")  # fmt: skip
    check_settings(steps=steps, width=width, height=height, guidance_scale=guidance,
                   factor=config.vae.downsampling_factor, train_timesteps=config.schedule.num_train_timesteps)  # fmt: skip
    rebuild = bool(args.from_png) and not (args.prompts or args.seed is not None)
    batch = recorded.batch_size if rebuild else args.batch_size
    check_generation_memory(config, width=width, height=height, batch=batch)
    if upscale is not None:
        s = upscale.config.upscale_factor
        check_generation_memory(upscale.config, width=width * s, height=height * s, batch=batch)
    return Settings(
        model=model, prompts=prompts, negative_prompt=pick("negative_prompt"), steps=steps, guidance_scale=guidance,
        sampler=sampler, width=width, height=height, device=device, dtype=dtype, fast=fast, compile=args.compile,
        backend=backend, deep_cache=deep_cache, token_merging=token_merging, clip_skip=clip_skip, loras=resolve_loras(args, prompts, recorded), seed=args.seed,
        num_images=args.num_images, batch_size=args.batch_size, from_png=args.from_png, recorded=recorded,
        rebuild=rebuild, inputs=inputs, upscale=upscale, vae=vae, embeddings=embeddings, tiny_vae=tiny_vae,
    )  # fmt: skip


def unconditional_prompts(model: Path | None) -> list[str]:
    """No prompt given: an unconditional model's one "prompt" (the null label), or the error that asks for one."""
    path = model or DEFAULT_MODEL
    if path.is_dir() and (path / "manifest.json").is_file() and read_config(path).conditioning is Conditioning.NONE:
        return [""]
    raise LdmError('no prompt given; try: python generate.py "red apple"')


MAX_IMAGES = 100_000  # per run: the plan holds every image, and one folder numbers them with five digits


def check_counts(args: argparse.Namespace, prompts: int) -> None:
    """Image counts that fit one run, and seeds that stay in range for all of its images."""
    if args.num_images < 1 or args.batch_size < 1:
        raise LdmError("--num-images and --batch-size must be at least 1")
    total = args.num_images * prompts
    if total > MAX_IMAGES or args.batch_size > MAX_IMAGES:
        raise LdmError(f"{max(total, args.batch_size):,} images in one run is more than {MAX_IMAGES:,}; split the "
                       "job into several runs (each with its own --seed)")  # fmt: skip
    if args.seed is not None and args.seed + total > SEED_LIMIT:
        raise LdmError(f"--seed {args.seed} + {total} images passes 2^63 - 1; pass a smaller --seed")


def check_text(texts: list[str]) -> None:
    """Prompts must be text: bytes that are not UTF-8 reach argv as surrogates, which no tokenizer or PNG takes."""
    for text in texts:
        if has_undecodable(text):
            raise LdmError(f"the prompt {show(text)} is not valid UTF-8 text; check the terminal's encoding or the "
                           "file it came from")  # fmt: skip


def load_model(settings: Settings, *, quiet: bool = False) -> Bundle:
    """The bundle with the LoRA merged in, on the device in the dtype; warns where it differs from --from-png's."""
    bundle = load_bundle(settings.model)
    recorded = settings.recorded
    if settings.loras:
        from ldm.train.lora import apply_loras

        apply_loras(bundle, [(c.path, c.scale) for c in settings.loras])
    warn_about_loras(settings.loras, recorded, settings.from_png)
    warn_about_embeddings(settings.embeddings, recorded, settings.from_png)
    if settings.vae is not None:
        attach_vae(bundle, settings.vae)
    warn_about_vae(settings.vae, recorded, settings.from_png)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if quiet else "default")
        dtype = resolve_dtype(settings.dtype, settings.device)
    bundle.to(settings.device, dtype)
    if recorded and recorded.model_hash and recorded.model_hash not in (bundle.model_hash, bundle.short_hash):
        print(f"warning: {settings.from_png} was made with model hash {recorded.model_hash}, this is {bundle.model_hash}", file=sys.stderr)
    return bundle


def plan_batches(settings: Settings) -> Plan:
    """The jobs and their batches: ``--from-png``'s own batch again (same size and position, so the numbers are the
    same) and that one image kept, or every prompt ``--num-images`` times, all kept."""
    if settings.rebuild:
        recorded = settings.recorded
        first_seed = recorded.seed - recorded.batch_pos
        jobs = [Job(settings.prompts[0], settings.negative_prompt, first_seed + k) for k in range(recorded.batch_size)]
        return Plan(jobs, recorded.batch_size, {recorded.batch_pos})
    seed = settings.seed if settings.seed is not None else random.randrange(2**31)
    jobs = plan_jobs(settings.prompts, settings.negative_prompt, seed=seed, per_prompt=settings.num_images)
    return Plan(jobs, settings.batch_size, set(range(len(jobs))))


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


def image_parameters(settings: Settings, bundle: Bundle, job: Job, *, batch_size: int, batch_pos: int,
                     upscaler: Bundle | None = None) -> ImageParameters:  # fmt: skip
    """What one image's PNG records: enough for ``--from-png`` to make it again."""
    return ImageParameters(
        prompt=job.prompt, negative_prompt=job.negative_prompt, steps=settings.steps, sampler=settings.sampler.label,
        guidance_scale=settings.guidance_scale, seed=job.seed, width=settings.width, height=settings.height,
        model_hash=bundle.model_hash, model=bundle.name, batch_size=batch_size, batch_pos=batch_pos,
        loras=lora_record(settings.loras), extra=settings.recorded.extra if settings.recorded else (), dtype=settings.dtype,
        embeddings=embedding_record(settings.embeddings, [job.prompt, job.negative_prompt]),
        fast=settings.fast, deep_cache=settings.deep_cache, token_merging=settings.token_merging,
        backend=settings.backend.recorded, clip_skip=settings.clip_skip, tiny_vae=settings.tiny_vae, version=f"ldm {ldm.__version__}", **(settings.inputs.record() if settings.inputs else {}),
        **(upscale_record(settings.upscale, upscaler) if settings.upscale else {}), **vae_record(settings.vae),
    )  # fmt: skip


def upscale_record(upscale: UpscaleSettings, upscaler: Bundle | None) -> dict:
    return dict(upscaler=str(upscale.bundle), upscaler_hash=upscaler.model_hash if upscaler else None,
                upscale_steps=upscale.steps, noise_level=upscale.noise_level)  # fmt: skip


@dataclass(frozen=True)
class Made:
    """One kept image of a plan, and what its PNG records."""

    job: Job
    image: Image.Image
    parameters: ImageParameters


def make_images(
    bundle: Bundle, settings: Settings, plan: Plan, *, progress: bool = True, upscaler: Bundle | None = None,
    on_step: StepHook | None = None, stop: Callable[[], bool] | None = None,
) -> Iterator[Made]:  # fmt: skip
    """Run the plan batch by batch and yield its kept images, in order. Image inputs are fitted to the size once;
    outputs are pasted back into the picture (only masked) and upscaled (--upscale). ``on_step``: the sampling loop's
    hook (:func:`ldm.pipeline.generate`); ``stop``: asked before each batch, True ends the run there (an interrupt)."""
    canvas = settings.inputs.canvas(width=settings.width, height=settings.height) if settings.inputs else None
    for start in range(0, len(plan.jobs), plan.batch_size):
        if stop is not None and stop():
            return
        batch = plan.jobs[start : start + plan.batch_size]
        image_inputs = {}
        if canvas is not None:
            n, inputs = len(batch), settings.inputs
            image_inputs = dict(image=canvas.image.expand(n, -1, -1, -1), strength=inputs.strength, fill=inputs.fill,
                                mask=canvas.mask.expand(n, -1, -1, -1) if canvas.mask is not None else None)  # fmt: skip
        request = Request(
            prompts=[strip_lora_tags(j.prompt) for j in batch], negative_prompts=[j.negative_prompt for j in batch],
            seeds=[j.seed for j in batch], steps=settings.steps, guidance_scale=settings.guidance_scale,
            sampler=settings.sampler, width=settings.width, height=settings.height, clip_skip=settings.clip_skip,
            embeddings=settings.embeddings, tiny_vae=settings.tiny_vae, **image_inputs,
        )  # fmt: skip
        images = generate(bundle, request, progress=progress, on_step=on_step)  # (B, 3, H, W) in [0, 1]
        if canvas is not None:
            images = canvas.paste(images)
        if upscaler is not None:
            images = upscale_images(upscaler, settings, request, images, progress=progress)
        images = to_uint8(images)  # (B, 3, H, W) uint8
        for pos, (job, pixels) in enumerate(zip(batch, images)):
            if start + pos in plan.keep:
                parameters = image_parameters(settings, bundle, job, batch_size=len(batch), batch_pos=pos,
                                              upscaler=upscaler)  # fmt: skip
                yield Made(job, uint8_to_pil(pixels), parameters)


def image_path(out: Path, index: int, seed: int) -> Path:
    """Where image number ``index`` of seed ``seed`` is written: ``out/NNNNN-SEED.png``."""
    return out / f"{index:05d}-{seed}.png"


def write_images(
    bundle: Bundle, settings: Settings, plan: Plan, out: Path, *, progress: bool = True, upscaler: Bundle | None = None
) -> dict[Path, Image.Image]:
    """Run the plan (:func:`make_images`) and write the kept images as ``out/NNNNN-SEED.png``, printing each path;
    returns the images by path, in order."""
    out.mkdir(parents=True, exist_ok=True)
    index, written = next_index(out), {}
    for made in make_images(bundle, settings, plan, progress=progress, upscaler=upscaler):
        path = image_path(out, index, made.job.seed)
        written[path] = made.image
        save_png(made.image, path, made.parameters.text())
        index += 1
        print(path)
    return written


def upscale_images(upscaler: Bundle, settings: Settings, request: Request, images, *, progress: bool):
    """The batch's images through the upscaler, with their own prompts and seeds; a picture whose sides are not
    multiples of the VAE's factor (only masked, outpainting) is cropped to them first."""
    from ldm.pipeline.upscale import upscale

    factor = upscaler.config.vae.downsampling_factor
    h, w = (side // factor * factor for side in images.shape[-2:])
    embeddings = settings.embeddings  # where the upscaler's text encoder is of their width
    fits = embeddings is not None and embeddings.vectors.shape[-1] == upscaler.config.text_encoder.width
    return upscale(upscaler, images[..., :h, :w], prompts=request.prompts, negative_prompts=request.negative_prompts,
                   seeds=request.seeds, steps=settings.upscale.steps, guidance_scale=settings.guidance_scale,
                   sampler=settings.sampler, noise_level=settings.upscale.noise_level, progress=progress,
                   embeddings=embeddings if fits else None)  # fmt: skip


def load_upscaler(settings: Settings) -> Bundle | None:
    """The --upscale bundle on the run's device and dtype; warns where its hash differs from --from-png's."""
    if settings.upscale is None:
        return None
    upscaler = load_bundle(settings.upscale.bundle)
    upscaler.to(settings.device, resolve_dtype(settings.dtype, settings.device))
    recorded = settings.recorded
    if recorded and recorded.upscaler_hash and recorded.upscaler_hash != upscaler.model_hash:
        print(f"warning: {settings.from_png} was upscaled with hash {recorded.upscaler_hash}, this upscaler is "
              f"{upscaler.model_hash}", file=sys.stderr)  # fmt: skip
    return upscaler


def main(argv=None) -> int:
    """Settings (flags over --from-png), the model, the plan of batches, the speed-ups, then the images and the grid."""
    args = build_parser().parse_args(argv)
    settings = resolve_settings(args)
    bundle = load_model(settings, quiet=args.quiet)
    plan = plan_batches(settings)
    accel.prepare(
        bundle, fast=settings.fast, compile=settings.compile, deep_cache=settings.deep_cache,
        token_merging=settings.token_merging, unet_calls=settings.steps * plan.batches, backend=settings.backend,
    )  # fmt: skip
    written = write_images(bundle, settings, plan, args.out, progress=not args.quiet, upscaler=load_upscaler(settings))
    if args.grid and written:
        grid_path = args.out / f"grid-{list(written)[-1].name[:5]}.png"  # numbered as the last image
        make_grid(list(written.values())).save(grid_path)
        print(grid_path)
    return 0


def entry() -> None:
    """The installed command and the root script: run with argv, exit with the status."""
    torch.set_grad_enabled(False)
    diffusers_logging.set_verbosity_error()  # its dtype-cast notices are noise here
    exit_now(run_cli(main))


if __name__ == "__main__":
    entry()
