"""How close one UNet forward comes to the machine's peak: FLOPs (torch.utils.flop_counter) / seconds.

The peak is measured, not taken from a data sheet: the best of several large square matmuls (fp32, and bf16) at the
same thread count. A UNet forward here is one sampling step of one image with guidance: batch 2 (uncond + cond).

    python bench/efficiency.py --threads 2 [--skip-sd]   # prints a Markdown section
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    ROOT,
    Timer,
    bench_bundle,
    run_worker,
    script_main,
    script_parser,
    set_threads,
    table,
)

PEAK_KEY = {"float32": "fp32", "bfloat16": "bf16"}  # torch dtype names → the peak table's keys
MATMUL_SIZE = 2048


def best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN primitive creation, allocations
    best = float("inf")
    for _ in range(repeats):
        with Timer() as t:
            fn()
        best = min(best, t.wall)
    return best


def peak_worker(args) -> dict:
    import torch

    set_threads(args.threads)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = (torch.randn(MATMUL_SIZE, MATMUL_SIZE, dtype=dtype) for _ in range(2))
        seconds = best_seconds(lambda a=a, b=b: a @ b, args.repeats)
        out[name] = 2 * MATMUL_SIZE**3 / seconds / 1e9
    return out


def unet_worker(args) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ldm.bundle import load_bundle
    from ldm.fast import FastConfig, speed_up

    set_threads(args.threads)
    torch.set_grad_enabled(False)
    bundle = load_bundle(args.bundle).to(dtype=torch.float32)
    unet = bundle.unet
    latent = args.size // bundle.config.vae.downsampling_factor
    x = torch.randn(2, unet.config.in_channels, latent, latent)  # (2, C, h, w): uncond + cond of one image
    context = torch.randn(2, bundle.config.text_encoder.context_length, unet.config.cross_attention_dim)
    t = torch.tensor(500)
    with FlopCounterMode(display=False) as counter:
        unet(x, t, encoder_hidden_states=context)
    flops = counter.get_total_flops()
    fp32 = best_seconds(lambda: unet(x, t, encoder_hidden_states=context), args.repeats)
    speed_up(bundle, FastConfig(threads=args.threads))
    unet = bundle.unet
    fast = best_seconds(lambda: unet(x.to(unet.dtype), t, encoder_hidden_states=context.to(unet.dtype)), args.repeats)
    dtype = getattr(unet, "low_noise", unet).dtype  # at t = 500 a mixed-precision UNet runs its bf16 copy
    return {"gflop": flops / 1e9, "fp32_s": fp32, "fast_s": fast, "fast_dtype": str(dtype).removeprefix("torch.")}


def section(args, workdir: Path) -> tuple[str, dict]:
    script = Path(__file__).resolve()
    peak = run_worker(script, ["--what", "peak", "--repeats", 5], threads=args.threads, log=workdir / "efficiency.log")
    models = [("emoji-tiny", args.emoji_size, args.emoji_model)]
    if not args.skip_sd:
        models.append(("sd-v1", args.sd_size, None))
    rows, results = [], {"peak_gflops": peak}
    for preset, size, model_dir in models:
        bundle_dir, _ = bench_bundle(preset, workdir, model_dir=model_dir)
        repeats = 20 if preset == "emoji-tiny" else 3
        r = run_worker(script, ["--what", "unet", "--bundle", bundle_dir, "--size", size, "--repeats", repeats],
                       threads=args.threads, log=workdir / "efficiency.log")  # fmt: skip
        results[preset] = r
        fast_label = f"fast path ({PEAK_KEY.get(r['fast_dtype'], r['fast_dtype'])} UNet)"
        for label, seconds, dtype in (("fp32", r["fp32_s"], "fp32"), (fast_label, r["fast_s"], r["fast_dtype"])):
            achieved = r["gflop"] / seconds
            rows.append([f"{preset} @ {size}×{size}", label, f"{r['gflop']:.2f}", f"{seconds * 1e3:.1f}",
                         f"{achieved:.1f}", f"{100 * achieved / peak[PEAK_KEY.get(dtype, dtype)]:.1f} % of {PEAK_KEY.get(dtype, dtype)} peak"])  # fmt: skip
    text = "\n".join(
        [
            "### UNet efficiency",
            "",
            (
                f"Peak, measured as the best of 5 {MATMUL_SIZE}×{MATMUL_SIZE} matmuls at {args.threads} thread(s): "
                f"fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s. One UNet forward = one guided "
                "sampling step of one image (batch 2); FLOPs from torch.utils.flop_counter.FlopCounterMode (matmuls, "
                "convolutions and attention; elementwise ops are not counted); time = best of several forwards."
            ),
            "",
            table(["model", "path", "GFLOP / forward", "ms / forward", "GFLOP/s", "efficiency"], rows),
            "",
        ]
    )
    return text, results


def add_section_arguments(p: argparse.ArgumentParser) -> None:
    for flag, kwargs in (
        ("--emoji-size", {"type": int, "default": 64}),
        ("--sd-size", {"type": int, "default": 256}),
        ("--skip-sd", {"action": "store_true"}),
        ("--emoji-model", {"type": Path, "default": ROOT / "models" / "emoji-tiny"}),
    ):
        if not any(flag in a.option_strings for a in p._actions):
            p.add_argument(flag, **kwargs)


def main() -> None:
    p = script_parser(__doc__)
    p.add_argument("--what", choices=["peak", "unet"])
    p.add_argument("--bundle")
    p.add_argument("--size", type=int)
    p.add_argument("--repeats", type=int, default=5)
    add_section_arguments(p)
    script_main(p.parse_args(), lambda args: peak_worker(args) if args.what == "peak" else unet_worker(args), section)


if __name__ == "__main__":
    main()
