"""Generation speed: ldm.pipeline.generate (fp32, and the fast path) against diffusers' StableDiffusionPipeline.

Each contender runs in its own subprocess (so its memory peak is its own) on the same bundle: ours reads the bundle,
diffusers the bundle's export (ldm.bundle.export_diffusers). All run the same request: the prompt "red apple" ×B
with an empty negative prompt, seeds 0…B-1, DPM++ 2M, guidance 7.5. In each worker one warm-up run of 2 steps (same
batch and size) comes first, then ``--repeats`` timed runs; emoji-tiny's contenders take turns for ``--rounds``
rounds. Seconds per image = median wall time over all timed runs / B. ``--compile`` adds the fast path with
torch.compile (emoji-tiny). The fast path (and with ``--compile`` the compiled one) with ``--deep-cache N``
(``--deep-cache`` here, default 2 and 3) runs as further contenders: an approximation, so its rows come with the
change in the images (mean |Δ|, PSNR against diffusers' exact output) beside the speed.

    python bench/generation.py --threads 2 [--skip-sd] [--repeats 3] [--sd-repeats 1]   # prints a Markdown section
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    ROOT,
    Timer,
    bench_bundle,
    exported,
    peak_rss_mib,
    run_worker,
    script_main,
    script_parser,
    set_threads,
    table,
)

CONTENDERS = {
    "diffusers": "diffusers StableDiffusionPipeline, fp32",
    "ours": "ldm generate, fp32",
    "fast": "ldm generate, fast path (`--fast`)",
    "fast-compile": "ldm generate, fast path + torch.compile (`--fast --compile`)",
}
PROMPT, SAMPLER, GUIDANCE = "red apple", "dpmpp_2m", 7.5
COLUMNS = ["batch", "contender", "s / image (wall)", "CPU s / image", "speed-up", "peak RSS MiB", "load s", "warm-up s",
           "UNet precision", "attention"]  # fmt: skip
CHECK_COLUMNS = ["batch", "contender", "max abs Δ", "max abs Δ × 255", "max uint8 Δ", "mean abs Δ × 255", "PSNR dB"]
DEEP_CACHE = "-dc"  # fast or fast-compile + "-dcN": with --deep-cache N, an approximation (ldm.deepcache)


def split_contender(text: str) -> tuple[str, int]:
    """A contender name → (its exact base, the deep-cache interval or 0): "fast-compile-dc2" → ("fast-compile", 2)."""
    base, _, n = text.partition(DEEP_CACHE)
    if base not in CONTENDERS or (n and not (base.startswith("fast") and n.isdigit())):
        raise ValueError(text)
    return base, int(n or 0)


def contender_name(text: str) -> str:
    try:
        split_contender(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is none of {', '.join(CONTENDERS)}, nor fast{DEEP_CACHE}N or fast-compile{DEEP_CACHE}N"
        ) from None
    return text


def label(contender: str) -> str:
    base, deep_cache = split_contender(contender)
    return f"{CONTENDERS[base]} + `--deep-cache {deep_cache}` (approximate)" if deep_cache else CONTENDERS[base]


# --- worker: one contender, one batch size ------------------------------------------------------------------------


def make_runner(contender: str, model: Path, export: Path):
    """Load the contender's model; returns run(batch, steps, size) → (B, 3, H, W) float32 in [0, 1]."""
    import torch

    from ldm.schedule import get_sampler

    sampler = get_sampler(SAMPLER)
    if contender == "diffusers":
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            export,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            local_files_only=True,
            torch_dtype=torch.float32,
        )
        pipe.scheduler = sampler.scheduler.from_config(pipe.scheduler.config, **dict(sampler.options))
        pipe.set_progress_bar_config(disable=True)

        def run(batch: int, steps: int, size: int) -> torch.Tensor:
            out = pipe(
                [PROMPT] * batch, negative_prompt=[""] * batch, num_inference_steps=steps, guidance_scale=GUIDANCE,
                generator=[torch.Generator().manual_seed(s) for s in range(batch)], height=size, width=size,
                output_type="np",
            )  # fmt: skip
            return torch.from_numpy(out.images).permute(0, 3, 1, 2)

        return run, pipe.unet

    from ldm.bundle import load_bundle
    from ldm.fast import FastConfig, speed_up
    from ldm.pipeline import Request, generate

    bundle = load_bundle(model).to(dtype=torch.float32)  # as generate.py does (a bundle may ship in fp16)
    if contender.startswith("fast"):
        base, deep_cache = split_contender(contender)
        config = FastConfig(threads=torch.get_num_threads(), compile=base == "fast-compile", deep_cache=deep_cache)
        speed_up(bundle, config)

    def run(batch: int, steps: int, size: int) -> torch.Tensor:
        request = Request(
            prompts=[PROMPT] * batch, negative_prompts=[""] * batch, seeds=list(range(batch)), steps=steps,
            guidance_scale=GUIDANCE, sampler=sampler, width=size, height=size,
        )  # fmt: skip
        return generate(bundle, request, progress=False)

    return run, bundle.unet


def worker(args) -> dict:
    import numpy as np
    import torch

    from ldm.fast import attention_processors

    set_threads(args.threads)
    torch.set_grad_enabled(False)
    with Timer() as load:
        run, unet = make_runner(args.contender, Path(args.model), Path(args.export))
    with Timer() as warmup:
        run(args.batch, 2, args.size)
    walls, cpus = [], []
    for _ in range(args.repeats):
        with Timer() as t:
            images = run(args.batch, args.steps, args.size)
        walls.append(t.wall)
        cpus.append(t.cpu)
    np.save(args.save, images.numpy())
    return {
        "contender": args.contender, "batch": args.batch, "load_s": load.wall, "warmup_s": warmup.wall,
        "wall": walls, "cpu": cpus, "s_per_image": statistics.median(walls) / args.batch,
        "cpu_s_per_image": statistics.median(cpus) / args.batch, "peak_rss_mib": peak_rss_mib(),
        "attention": sorted(attention_processors(unet)), "unet_dtype": precision(unet),
    }  # fmt: skip


def precision(unet) -> str:
    """What the UNet computes in: "fp32", or for the fast path's mixed-precision UNet "bf16, fp32 at t ≥ 850"."""
    name = lambda dtype: {"torch.float32": "fp32", "torch.bfloat16": "bf16"}.get(str(dtype), str(dtype))
    low = getattr(unet, "low_noise", None)
    if low is None:
        return name(unet.dtype)
    return name(low.dtype) + (f", fp32 at t ≥ {unet.fp32_from:.0f}" if unet.high_noise is not None else "")


# --- the section ------------------------------------------------------------------------------------------------------


def pool(earlier: dict | None, new: dict, batch: int) -> dict:
    """One contender's results over several worker processes: all timed runs, the highest memory peak."""
    if earlier is None:
        return new
    walls, cpus = earlier["wall"] + new["wall"], earlier["cpu"] + new["cpu"]
    return new | {
        "wall": walls, "cpu": cpus, "s_per_image": statistics.median(walls) / batch,
        "cpu_s_per_image": statistics.median(cpus) / batch,
        "peak_rss_mib": max(earlier["peak_rss_mib"], new["peak_rss_mib"]),
        "load_s": max(earlier["load_s"], new["load_s"]), "warmup_s": max(earlier["warmup_s"], new["warmup_s"]),
    }  # fmt: skip


def compare(a: Path, b: Path) -> tuple[float, int, float, float]:
    """Two saved image batches in [0, 1]: max |Δ|, max |Δ| of their uint8 renderings, mean |Δ|, and PSNR in dB
    (inf when equal)."""
    import numpy as np

    x, y = np.load(a).astype(np.float64), np.load(b).astype(np.float64)
    as_uint8 = lambda v: np.round(v * 255)  # as ldm.pipeline.to_uint8 and diffusers' numpy_to_pil round
    mse = float(np.mean((x - y) ** 2))
    psnr = float("inf") if mse == 0 else 10 * np.log10(1 / mse)
    return float(np.abs(x - y).max()), int(np.abs(as_uint8(x) - as_uint8(y)).max()), float(np.abs(x - y).mean()), psnr


def section(args, workdir: Path) -> tuple[str, dict]:
    script = Path(__file__).resolve()
    models = [("emoji-tiny", args.emoji_size, args.batches, args.repeats, args.rounds, args.emoji_model)]
    if not args.skip_sd:
        models.append(("sd-v1", args.sd_size, args.sd_batches, args.sd_repeats, 1, None))
    results, lines = {}, []
    for preset, size, batches, repeats, rounds, model_dir in models:
        # Compiling sd-v1's two UNets (fp32 and bf16) takes many minutes on a few cores: emoji-tiny only.
        fast = ["fast"] + (["fast-compile"] if args.compile and preset != "sd-v1" else [])
        contenders = ["diffusers", "ours", *fast] + [f"{base}{DEEP_CACHE}{n}" for base in fast for n in args.deep_cache]
        bundle_dir, origin = bench_bundle(preset, workdir, model_dir=model_dir)
        export = exported(bundle_dir, workdir)
        rows, checks = [], []
        for batch in batches:
            base = {}
            # Rounds take turns (diffusers, ours, fast, diffusers, ...), so a slow spell of a shared machine hits
            # every contender alike; the medians pool all rounds' runs.
            for _ in range(rounds):
                for contender in contenders:
                    save = workdir / "images" / f"{preset}-{size}-b{batch}-{contender}.npy"
                    save.parent.mkdir(parents=True, exist_ok=True)
                    r = run_worker(script, ["--contender", contender, "--model", bundle_dir, "--export", export,
                                            "--batch", batch, "--size", size, "--steps", args.steps, "--repeats", repeats,
                                            "--save", save], threads=args.threads, log=workdir / "generation.log")  # fmt: skip
                    r["save"] = str(save)
                    base[contender] = pool(base.get(contender), r, batch)
            for contender in contenders:
                results[f"{preset}/b{batch}/{contender}"] = base[contender]
            ref = base["diffusers"]
            for contender in contenders:
                r = base[contender]
                speedup = ref["s_per_image"] / r["s_per_image"]
                rows.append([f"{batch}", label(contender), f"{r['s_per_image']:.3f}", f"{r['cpu_s_per_image']:.3f}",
                             f"{speedup:.2f}×", f"{r['peak_rss_mib']:.0f}", f"{r['load_s']:.1f}", f"{r['warmup_s']:.1f}",
                             r["unet_dtype"], ", ".join(r["attention"])])  # fmt: skip
                if contender != "diffusers":
                    diff, diff8, mean, psnr = compare(Path(r["save"]), Path(ref["save"]))
                    r |= {"max_abs_diff": diff, "max_uint8_diff": diff8, "mean_abs_diff": mean, "psnr_db": psnr}
                    psnr_text = "identical" if psnr == float("inf") else f"{psnr:.1f}"
                    checks.append([f"{batch}", label(contender), f"{diff:.2e}", f"{diff * 255:.3f}", f"{diff8}",
                                   f"{mean * 255:.3f}", psnr_text])  # fmt: skip
        lines += [
            f"### {preset} at {size}×{size}: {origin}",
            "",
            (
                f"{args.steps} steps DPM++ 2M, guidance {GUIDANCE}; {rounds} round(s) of one process per contender, "
                f"each {repeats} timed run(s) after a 2-step warm-up; s / image = median run / batch; speed-up = "
                "diffusers' seconds per image / this row's."
            ),
            "",
            table(COLUMNS, rows),
            "",
            (
                "Output against diffusers' fp32 output (same seeds): max |Δ| over all pixels in [0, 1], the same in "
                "1/255 steps, max |Δ| of the uint8 images, mean |Δ| in 1/255 steps, and PSNR."
            ),
            "",
            table(CHECK_COLUMNS, checks),
            "",
        ]
    return "\n".join(lines), results


def add_section_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="emoji-tiny batch sizes")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per emoji-tiny worker process")
    p.add_argument("--rounds", type=int, default=3, help="emoji-tiny worker processes per contender, taking turns")
    p.add_argument("--emoji-size", type=int, default=64)
    p.add_argument(
        "--emoji-model",
        type=Path,
        default=ROOT / "models" / "emoji-tiny",
        help="trained emoji-tiny bundle, used when it exists (else random weights)",
    )
    p.add_argument("--skip-sd", action="store_true", help="skip the sd-v1 architecture (slow: ~1B parameters)")
    p.add_argument("--sd-size", type=int, default=256)
    p.add_argument("--sd-batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--sd-repeats", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="also time the fast path with torch.compile (emoji-tiny)")
    p.add_argument("--deep-cache", type=int, nargs="*", default=[2, 3], metavar="N",
                   help="also time the fast path with --deep-cache N, an approximation, on both models (default: 2 "
                        "3; none: --deep-cache with no N)")  # fmt: skip


def main() -> None:
    p = script_parser(__doc__)
    p.add_argument("--contender", type=contender_name,
                   help=f"one of {', '.join(CONTENDERS)}, or fast{DEEP_CACHE}N, fast-compile{DEEP_CACHE}N")  # fmt: skip
    p.add_argument("--model")
    p.add_argument("--export")
    p.add_argument("--batch", type=int)
    p.add_argument("--size", type=int)
    p.add_argument("--save")
    add_section_arguments(p)
    script_main(p.parse_args(), worker, section)


if __name__ == "__main__":
    main()
