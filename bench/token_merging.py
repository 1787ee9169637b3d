"""Token merging (``--token-merging R``, ``ldm.accel.tome``): the fast path with and without it, its speed and its change.

For each model and size, one process loads the bundle, prepares it as ``generate.py --fast`` does and applies token
merging; the merging ratio is then set per run, 0 (exact) or each R asked for, and the runs take ``--tome-turns`` turns
(order rotated every turn) after a warm-up each. s / image = median over the turns / B; speed-up = median over the
turns of the exact run's time in that turn / this ratio's. The images of each ratio are compared with the exact
ones of the same process (same seeds): max and mean |Δ| in 1/255 steps and PSNR.

    python bench/token_merging.py --threads 2 [--tome-ratios 0.3 0.5] [--tome-sizes 256 512] [--tome-turns 2]
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
    image_change,
    quartiles,
    run_worker,
    script_main,
    script_parser,
    set_threads,
    table,
)

PROMPT, GUIDANCE = "red apple", 7.5


def worker(args) -> dict:
    import numpy as np
    import torch

    from ldm.accel.fast import FastConfig, speed_up
    from ldm.accel.graph import GraphUNet
    from ldm.accel.tome import TokenMergingProcessor, apply_token_merging
    from ldm.formats.bundle import load_bundle
    from ldm.pipeline import Request, generate
    from ldm.pipeline.schedule import get_sampler

    set_threads(args.threads)
    ratios = [0.0, *args.tome_ratios]

    def prepared(ratio: float):
        bundle = speed_up(load_bundle(args.model).to(dtype=torch.float32), FastConfig(threads=args.threads))
        apply_token_merging(bundle.unet, ratio)
        return bundle

    # A small UNet's fast path traces it into graphs on its first call, which fixes the ratio: one bundle per ratio.
    # A big one's (sd-v1: too big for two in memory) runs its modules: one bundle, the ratio set before each run.
    shared = prepared(ratios[-1])  # the processors are there for any ratio above 0
    traced = isinstance(shared.unet, GraphUNet)
    bundles = {r: prepared(r) for r in ratios[:-1]} | {ratios[-1]: shared} if traced else dict.fromkeys(ratios, shared)
    processors = [getattr(m, "processor", None) for m in shared.unet.modules()]
    processors = [p for p in processors if isinstance(p, TokenMergingProcessor)]
    batch = args.tome_batch
    request = Request(
        prompts=[PROMPT] * batch, negative_prompts=[""] * batch, seeds=list(range(batch)), steps=args.tome_steps,
        guidance_scale=GUIDANCE, sampler=get_sampler("dpmpp_2m"), width=args.size, height=args.size,
    )  # fmt: skip

    def run(ratio: float, steps: int | None = None) -> tuple[float, np.ndarray]:
        if not traced:
            for p in processors:
                p.ratio = ratio
        req = request if steps is None else Request(**{**request.__dict__, "steps": steps})
        with Timer() as t:
            images = generate(bundles[ratio], req, progress=False)
        return t.wall, images.numpy()

    for r in ratios:
        run(r, steps=2)  # warm-up
    times, images = {r: [] for r in ratios}, {}
    for turn in range(args.tome_turns):
        for r in ratios[turn % len(ratios) :] + ratios[: turn % len(ratios)]:
            seconds, out = run(r)
            times[r].append(seconds)
            images.setdefault(r, out)
    rows = []
    for r in ratios:
        max_diff, _, mean_diff, psnr = image_change(images[r], images[0.0])
        rows.append({
            "ratio": r, "times": times[r], "speedups": [e / t for e, t in zip(times[0.0], times[r])],
            "max_diff": max_diff, "mean_diff": mean_diff, "psnr": None if psnr == float("inf") else psnr,
        })  # fmt: skip
    return {"rows": rows, "merged_attentions": len(processors), "traced": traced}


def section(args, workdir: Path) -> tuple[str, dict]:
    cases = [("sd-v1", size) for size in args.tome_sizes] + ([("emoji-tiny", 64)] if args.tome_emoji else [])
    results, lines = [], []
    for preset, size in cases:
        model_dir = ROOT / "models" / "emoji-tiny" if preset == "emoji-tiny" else None
        folder, how = bench_bundle(preset, workdir, model_dir=model_dir)
        r = run_worker(Path(__file__).resolve(), [
            "--model", folder, "--size", size, "--tome-batch", args.tome_batch, "--tome-steps", args.tome_steps,
            "--tome-turns", args.tome_turns, "--tome-ratios", *args.tome_ratios,
        ], threads=args.threads, log=workdir / "token_merging.log")  # fmt: skip
        results.append({"model": preset, "size": size, "weights": how, **r})
        for row in r["rows"]:
            wall = statistics.median(row["times"]) / args.tome_batch
            speedup = statistics.median(row["speedups"])
            psnr = "identical" if row["psnr"] is None else f"{row['psnr']:.1f}"
            lines.append([
                f"{preset} @ {size} ({how.split(' (')[0]})", f"{row['ratio']:g}" if row["ratio"] else "0 (exact)",
                f"{wall:.2f}", f"{speedup:.2f}×{quartiles(row['speedups'])}", f"{row['max_diff'] * 255:.1f}",
                f"{row['mean_diff'] * 255:.2f}", psnr,
            ])  # fmt: skip
    text = "\n".join([
        "### Token merging (`--fast --token-merging R`): an approximation",
        "",
        (f"{args.tome_steps} steps DPM++ 2M, guidance 7.5, batch {args.tome_batch}, the fast path; each model in one "
         f"process, the ratios taking {args.tome_turns} turns. Δ and PSNR against the same process's exact (R = 0) "
         "images, same seeds."),
        "",
        table(["model", "R", "s / image", "speed-up (quartiles)", "max \\|Δ\\| /255", "mean \\|Δ\\| /255",
               "PSNR dB"], lines),
        "",
    ])  # fmt: skip
    return text, {"token_merging": results}


def add_section_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tome-ratios", type=float, nargs="+", default=[0.5], help="merging ratios above 0 to time besides 0"
    )
    p.add_argument("--tome-sizes", type=int, nargs="+", default=[256, 512], help="sd-v1 image sizes")
    p.add_argument("--tome-emoji", action=argparse.BooleanOptionalAction, default=True, help="emoji-tiny at 64×64 too")
    p.add_argument("--tome-batch", type=int, default=1)
    p.add_argument("--tome-steps", type=int, default=20)
    p.add_argument("--tome-turns", type=int, default=2)


def main() -> None:
    p = script_parser(__doc__)
    add_section_arguments(p)
    p.add_argument("--model", type=Path)
    p.add_argument("--size", type=int)
    script_main(p.parse_args(), worker, section)


if __name__ == "__main__":
    main()
