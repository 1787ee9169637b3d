"""Generation speed: ldm.pipeline.generate (fp32, and the fast path) against diffusers' StableDiffusionPipeline.

All contenders run the same bundle: ours reads the bundle, diffusers the bundle's export
(ldm.formats.diffusers.export_diffusers), with the same request: the prompt "red apple" ×B with an empty negative prompt, seeds
0…B-1, DPM++ 2M, guidance 7.5. Each contender first runs in a subprocess of its own (so its memory peak is its own):
a warm-up run of 2 steps (same batch and size; tracing and compiling happen here), then ``--repeats`` timed runs,
whose images the output check compares. emoji-tiny's times come from one more process in which all its
contenders, each warmed up, take ``--turns`` turns (one run each per turn, the order rotated every turn), so a slow
spell of a shared machine hits them alike: s / image = median over the turns / B, speed-up = median over the turns
of diffusers' time in that turn / the contender's. sd-v1's times are the medians of its own processes' runs, except
for diffusers and the fast path, which take ``--sd-turns`` turns in one process (the other contenders would not fit
beside them in memory). ``--compile`` adds the fast path with the graphs compiled (emoji-tiny). The fast path (and
with ``--compile`` the compiled one) with ``--deep-cache N`` (``--deep-cache`` here, default 2 and 3) runs as further
contenders: an approximation, so its rows come with the change in the images (mean |Δ|, PSNR against diffusers'
exact output) beside the speed.

    python bench/generation.py --threads 2 [--skip-sd | --skip-emoji] [--turns 10] [--sd-repeats 1] [--sd-turns 2]
    # prints a Markdown section
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
    image_change,
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
DEEP_CACHE = "-dc"  # fast or fast-compile + "-dcN": with --deep-cache N, an approximation (ldm.accel.deepcache)


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

    from ldm.pipeline.schedule import get_sampler

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

    from ldm.accel.fast import FastConfig, speed_up
    from ldm.formats.bundle import load_bundle
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
    if args.contenders:
        return turns_worker(args)
    import numpy as np
    import torch

    from ldm.accel.fast import attention_processors

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


def turns_worker(args) -> dict:
    """All ``args.contenders`` in this process, each warmed up, then ``args.turns`` turns of one run each."""
    import torch

    set_threads(args.threads)
    torch.set_grad_enabled(False)
    runners = {}
    for contender in args.contenders:
        runners[contender], _ = make_runner(contender, Path(args.model), Path(args.export))
        runners[contender](args.batch, 2, args.size)  # warm-up: traces and compiles for this shape
    names = list(runners)
    walls: dict[str, list[float]] = {name: [] for name in names}
    cpus: dict[str, list[float]] = {name: [] for name in names}
    for turn in range(args.turns):
        for name in names[turn % len(names) :] + names[: turn % len(names)]:
            with Timer() as t:
                runners[name](args.batch, args.steps, args.size)
            walls[name].append(t.wall)
            cpus[name].append(t.cpu)
    return {"turns": args.turns, "wall": walls, "cpu": cpus}


def paired(turns: dict, contender: str, batch: int) -> dict:
    """A contender's timing from the turns process: medians over the turns, and the speed-up over diffusers as the
    median of per-turn ratios (with its quartiles)."""
    walls, ref = turns["wall"][contender], turns["wall"]["diffusers"]
    ratios = [r / w for r, w in zip(ref, walls, strict=True)]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {
        "wall": walls, "cpu": turns["cpu"][contender], "s_per_image": statistics.median(walls) / batch,
        "cpu_s_per_image": statistics.median(turns["cpu"][contender]) / batch, "speedup": statistics.median(ratios),
        "speedup_quartiles": [quartiles[0], quartiles[2]], "turns": turns["turns"],
    }  # fmt: skip


def precision(unet) -> str:
    """What the UNet computes in: "fp32", or for the fast path's mixed-precision UNet "bf16, fp32 at t ≥ 850"."""

    def name(dtype) -> str:
        return {"torch.float32": "fp32", "torch.bfloat16": "bf16"}.get(str(dtype), str(dtype))

    low = getattr(unet, "low_noise", None)
    if low is None:
        return name(unet.dtype)
    return name(low.dtype) + (f", fp32 at t ≥ {unet.fp32_from:.0f}" if unet.high_noise is not None else "")


# --- the section ------------------------------------------------------------------------------------------------------


def compare(a: Path, b: Path) -> tuple[float, int, float, float]:
    """Two saved image batches in [0, 1]: :func:`common.image_change` of them."""
    import numpy as np

    return image_change(np.load(a), np.load(b))


def section(args, workdir: Path) -> tuple[str, dict]:
    script = Path(__file__).resolve()
    models = [] if args.skip_emoji else [
        ("emoji-tiny", args.emoji_size, args.batches, args.repeats, args.turns, args.emoji_model)
    ]  # fmt: skip
    if not args.skip_sd:
        models.append(("sd-v1", args.sd_size, args.sd_batches, args.sd_repeats, args.sd_turns, None))
    results, lines = {}, []
    for preset, size, batches, repeats, turns, model_dir in models:
        # Compiling sd-v1's two UNets (fp32 and bf16) takes many minutes on a few cores: emoji-tiny only.
        fast = ["fast"] + (["fast-compile"] if args.compile and preset != "sd-v1" else [])
        contenders = ["diffusers", "ours", *fast] + [f"{base}{DEEP_CACHE}{n}" for base in fast for n in args.deep_cache]
        # sd-v1's fast path holds two UNets: with diffusers' that is all one process's memory can take here
        paired_ones = contenders if preset != "sd-v1" else ["diffusers", "fast"]
        bundle_dir, origin = bench_bundle(preset, workdir, model_dir=model_dir)
        export = exported(bundle_dir, workdir)
        rows, checks = [], []
        for batch in batches:
            common = ["--model", bundle_dir, "--export", export, "--batch", batch, "--size", size,
                      "--steps", args.steps]  # fmt: skip
            base = {}
            for contender in contenders:  # a process of its own: memory peak, load and warm-up, the images
                save = workdir / "images" / f"{preset}-{size}-b{batch}-{contender}.npy"
                save.parent.mkdir(parents=True, exist_ok=True)
                base[contender] = run_worker(script, ["--contender", contender, *common, "--repeats", repeats,
                                                      "--save", save], threads=args.threads,
                                             log=workdir / "generation.log") | {"save": str(save)}  # fmt: skip
            own_ref = base["diffusers"]["s_per_image"]  # for the contenders that take no turns
            if turns:  # the times: the contenders in one process, taking turns
                timed = run_worker(script, ["--contenders", *paired_ones, *common, "--turns", turns],
                                   threads=args.threads, log=workdir / "generation.log")  # fmt: skip
                for contender in paired_ones:
                    base[contender] |= paired(timed, contender, batch)
            ref = base["diffusers"]
            for contender in contenders:
                r = base[contender]
                results[f"{preset}/b{batch}/{contender}"] = r
                speedup = r.get("speedup", own_ref / r["s_per_image"])
                spread = "" if "speedup_quartiles" not in r or contender == "diffusers" else (
                    " ({:.2f}–{:.2f})".format(*r["speedup_quartiles"])
                )  # fmt: skip
                rows.append([f"{batch}", label(contender), f"{r['s_per_image']:.3f}", f"{r['cpu_s_per_image']:.3f}",
                             f"{speedup:.2f}×{spread}", f"{r['peak_rss_mib']:.0f}", f"{r['load_s']:.1f}",
                             f"{r['warmup_s']:.1f}", r["unet_dtype"], ", ".join(r["attention"])])  # fmt: skip
                if contender != "diffusers":
                    diff, diff8, mean, psnr = compare(Path(r["save"]), Path(ref["save"]))
                    r |= {"max_abs_diff": diff, "max_uint8_diff": diff8, "mean_abs_diff": mean, "psnr_db": psnr}
                    psnr_text = "identical" if psnr == float("inf") else f"{psnr:.1f}"
                    checks.append([f"{batch}", label(contender), f"{diff:.2e}", f"{diff * 255:.3f}", f"{diff8}",
                                   f"{mean * 255:.3f}", psnr_text])  # fmt: skip
        if turns:
            others = [label(c) for c in contenders if c not in paired_ones]
            timing = (
                f"times from one process in which {' and '.join(map(label, paired_ones)) if others else 'the contenders'}"
                f", each warmed up, took {turns} turns (one run each per turn, the order rotated every turn): s / image"
                " = median over the turns / batch; speed-up = median over the turns of diffusers' time in that turn / "
                "this row's (quartiles in brackets). Memory, load and warm-up from a process of each contender's own "
                f"({repeats} run(s) after the warm-up)"
            ) + ("" if not others else (
                f"; {', '.join(others)}: times from that process of its own, speed-up against diffusers' in its own"
            ))  # fmt: skip
        else:
            timing = (
                f"one process per contender, {repeats} timed run(s) after a 2-step warm-up; s / image = median run "
                "/ batch; speed-up = diffusers' seconds per image / this row's"
            )
        lines += [
            f"### {preset} at {size}×{size}: {origin}",
            "",
            f"{args.steps} steps DPM++ 2M, guidance {GUIDANCE}; {timing}.",
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
    p.add_argument("--repeats", type=int, default=1, help="runs in each emoji-tiny contender's own process")
    p.add_argument("--turns", type=int, default=10, help="turns of the emoji-tiny contenders in one process (timing)")
    p.add_argument("--emoji-size", type=int, default=64)
    p.add_argument(
        "--emoji-model",
        type=Path,
        default=ROOT / "models" / "emoji-tiny",
        help="trained emoji-tiny bundle, used when it exists (else random weights)",
    )
    p.add_argument("--skip-sd", action="store_true", help="skip the sd-v1 architecture (slow: ~1B parameters)")
    p.add_argument("--skip-emoji", action="store_true", help="skip emoji-tiny")
    p.add_argument("--sd-size", type=int, default=256)
    p.add_argument("--sd-batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--sd-repeats", type=int, default=1)
    p.add_argument("--sd-turns", type=int, default=2, help="turns of diffusers and the fast path on sd-v1 (0: none)")
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
    p.add_argument("--contenders", type=contender_name, nargs="+", help="all in one process, taking turns")
    add_section_arguments(p)
    script_main(p.parse_args(), worker, section)


if __name__ == "__main__":
    main()
