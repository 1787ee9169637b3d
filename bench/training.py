"""UNet training speed: train_unet.py with its feature cache against the reference loop that encodes every step.

Both run ``ldm.train.unet.run`` on the same bundle, data and batch; the reference is ``--no-cache``, which VAE-encodes the
batch's images and text-encodes its captions at every step, as diffusers' ``train_text_to_image.py`` does. Each
runs in its own subprocess. A step's time is the interval between the starts of consecutive steps (so the next
batch's loading counts); the first ``--warmup`` steps and the last one (its interval holds the final checkpoint) are
left out. A third row runs the cached loop under bf16 autocast, to show what that precision costs or saves here.
The data: 64 rendered 64×64 shapes with captions, written once to an imagefolder in the work folder. A last worker
times one part of every step on its own: the EMA update of the UNet's weights, diffusers' ``EMAModel.step`` against
``ldm.train.loop.make_ema``'s, taking turns in one process.

    python bench/training.py --threads 2 [--train-steps 30] [--batch-size 16]   # prints a Markdown section
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    ROOT,
    Timer,
    bench_bundle,
    peak_rss_mib,
    run_worker,
    script_main,
    script_parser,
    set_threads,
    table,
)

MODES = {
    "no-cache": "reference: VAE + text encoder every step (`--no-cache`)",
    "cache": "train_unet.py with the latent/text cache (default)",
    "cache-bf16": "the same with bf16 autocast (`--set train.mixed_precision=bf16`)",
}
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 200, 30)}
SHAPES = ("circle", "square", "triangle", "ring")
EMA_ROUNDS, EMA_STEPS = 5, 20  # EMA worker: rounds of turns, timed updates per turn (after 3 untimed)


def write_data(folder: Path, *, count: int = 64, size: int = 64) -> Path:
    """``count`` pictures of coloured shapes on white, with captions ("big red ring"), as an imagefolder."""
    from PIL import Image, ImageDraw

    if (folder / "metadata.jsonl").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        colour, shape = list(COLOURS)[i % 4], SHAPES[(i // 4) % 4]
        big = (i // 16) % 2 == 0
        r = size * (0.4 if big else 0.25)
        c = size / 2 + (i // 32) * size / 10
        image = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(image)
        box = (c - r, c - r, c + r, c + r)
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        elif shape == "triangle":
            draw.polygon([(c, c - r), (c - r, c + r), (c + r, c + r)], fill=fill)
        else:
            draw.ellipse(box, outline=fill, width=max(2, size // 12))
        name = f"{i:03d}.png"
        image.save(folder / name)
        rows.append({"file_name": name, "text": f"{'big' if big else 'small'} {colour} {shape}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


# --- worker: one mode ---------------------------------------------------------------------------------------------


def worker(args) -> dict:
    if args.mode == "ema":
        return ema_worker(args)
    from ldm.cli import train_unet
    from ldm.train import loop, unet

    set_threads(args.threads)
    starts: list[float] = []
    build = Timer()

    def timed_loop(**kwargs):  # the real loop, with a time stamp at the start of every step
        step_fn = kwargs["step_fn"]

        def timed(batch, step):
            starts.append(time.perf_counter())
            return step_fn(batch, step)

        return loop.train_loop(**kwargs | {"step_fn": timed})

    def timed_cache(*a, **kw):
        with build:
            return real_cache(*a, **kw)

    real_cache = unet.load_or_build_cache
    unet.train_loop, unet.load_or_build_cache = timed_loop, timed_cache
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    argv = [
        "--bundle", args.bundle, "--data", args.data, "--out", out, "--max-steps", args.steps,
        "--set", f"train.batch_size={args.batch_size}", "--set", "train.checkpoint_every=1000000",
        "--set", "train.sample_every=1000000", "--set", "validation.steps=1", "--set", "validation.num_prompts=1",
    ]  # fmt: skip
    if args.mode == "no-cache":
        argv.append("--no-cache")
    if args.mode == "cache-bf16":
        argv += ["--set", "train.mixed_precision=bf16"]
    cfg = train_unet.resolve_config(train_unet.build_parser().parse_args([str(a) for a in argv]))  # fmt: skip
    unet.run(cfg)
    intervals = [b - a for a, b in itertools.pairwise(starts)][args.warmup :]
    step_s = sum(intervals) / len(intervals)
    return {
        "mode": args.mode, "steps_timed": len(intervals), "s_per_step": step_s,
        "images_per_s": args.batch_size / step_s, "cache_build_s": build.wall if args.mode != "no-cache" else 0.0,
        "peak_rss_mib": peak_rss_mib(),
    }  # fmt: skip


def ema_worker(args) -> dict:
    from diffusers.training_utils import EMAModel

    from ldm.formats.bundle import load_bundle
    from ldm.train.loop import TrainConfig, make_ema

    set_threads(args.threads)
    unet = load_bundle(args.bundle).unet.float()
    params = list(unet.parameters())
    updates = {"diffusers": EMAModel(params, decay=0.9999, foreach=True),
               "ours": make_ema(unet, TrainConfig(ema_decay=0.9999))}  # fmt: skip
    ms: dict[str, list[float]] = {name: [] for name in updates}
    for _ in range(EMA_ROUNDS):
        for name, ema in updates.items():
            for _ in range(3):
                ema.step(params)
            with Timer() as t:
                for _ in range(EMA_STEPS):
                    ema.step(params)
            ms[name].append(t.wall / EMA_STEPS * 1e3)
    return {"parameters": sum(p.numel() for p in params), "tensors": len(params)} | {
        f"{name}_ms": statistics.median(v) for name, v in ms.items()
    }


# --- the section ------------------------------------------------------------------------------------------------------


def section(args, workdir: Path) -> tuple[str, dict]:
    script = Path(__file__).resolve()
    bundle_dir, origin = bench_bundle("emoji-tiny", workdir, model_dir=args.emoji_model)
    data = write_data(workdir / "train-shapes")
    results = {}
    for mode in MODES:
        results[mode] = run_worker(script, ["--mode", mode, "--bundle", bundle_dir, "--data", data, "--steps",
                                            args.train_steps, "--warmup", args.train_warmup, "--batch-size",
                                            args.batch_size, "--out", workdir / f"train-{mode}"],
                                   threads=args.threads, log=workdir / "training.log")  # fmt: skip
    ema = run_worker(script, ["--mode", "ema", "--bundle", bundle_dir], threads=args.threads,
                     log=workdir / "training.log")  # fmt: skip
    results["ema"] = ema
    ref = results["no-cache"]
    rows = [
        [MODES[m], f"{r['s_per_step']:.3f}", f"{r['images_per_s']:.1f}", f"{ref['s_per_step'] / r['s_per_step']:.2f}×",
         f"{r['cache_build_s']:.1f}" if m != "no-cache" else "–", f"{r['peak_rss_mib']:.0f}"]
        for m, r in results.items()
        if m in MODES
    ]  # fmt: skip
    ema_rows = [
        ["diffusers `EMAModel.step` (foreach)", f"{ema['diffusers_ms']:.1f}", "1.00×"],
        ["`ldm.train.loop.make_ema` (one lerp per tensor)", f"{ema['ours_ms']:.1f}",
         f"{ema['diffusers_ms'] / ema['ours_ms']:.2f}×"],
    ]  # fmt: skip
    text = "\n".join(
        [
            f"### UNet training, emoji-tiny ({origin})",
            "",
            (
                f"64 rendered 64×64 images with captions, batch {args.batch_size}, fp32 unless the row says bf16, "
                f"AdamW; {args.train_steps} steps, the first {args.train_warmup} and the last left out of the timing."
            ),
            "",
            table(["loop", "s / step", "images / s", "speed-up", "cache build s (once)", "peak RSS MiB"], rows),
            "",
            (
                f"One part of every step on its own: the EMA update of the UNet's {ema['parameters'] / 1e6:.1f}M "
                f"weights ({ema['tensors']} tensors), the two taking turns in one process, median of {EMA_ROUNDS} "
                f"turns of {EMA_STEPS} updates each."
            ),
            "",
            table(["EMA update", "ms / step", "speed-up"], ema_rows),
            "",
        ]
    )
    return text, results


def add_section_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--train-warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    if not any(a.dest == "emoji_model" for a in p._actions):
        p.add_argument("--emoji-model", type=Path, default=ROOT / "models" / "emoji-tiny")


def main() -> None:
    p = script_parser(__doc__)
    p.add_argument("--mode", choices=[*MODES, "ema"])
    p.add_argument("--bundle")
    p.add_argument("--data")
    p.add_argument("--out")
    p.add_argument("--steps", type=int)
    p.add_argument("--warmup", type=int, default=5)
    add_section_arguments(p)
    script_main(p.parse_args(), worker, section)


if __name__ == "__main__":
    main()
