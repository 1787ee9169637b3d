"""How close one UNet forward comes to the machine's peak: FLOPs (torch.utils.flop_counter) / seconds.

The peak is measured, not taken from a data sheet: the best of several square matmuls of a few sizes (fp32, and
bf16) at the same thread count; no single size gives the best everywhere (on a 2-core AMD EPYC 1024² beat 2048² by
a third). A UNet forward is one guided sampling step: batch 2 (uncond + cond of one image), and for emoji-tiny
also batch 8 (four images). The paths of one model are timed in one process, taking turns (median of the turns),
so that a change of the machine's speed moves them alike.

    python bench/efficiency.py --threads 2 [--skip-sd] [--compile]   # prints a Markdown section
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
    run_worker,
    script_main,
    script_parser,
    set_threads,
    table,
)

PEAK_KEY = {"float32": "fp32", "bfloat16": "bf16"}  # torch dtype names → the peak table's keys
MATMUL_SIZES = (512, 1024, 2048)
MATMUL_FLOP = 2 * 2048**3  # each timing multiplies this many FLOPs' worth (several calls of the smaller sizes)
TURNS = 7  # turns per path in the UNet worker


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
        for size in MATMUL_SIZES:
            a, b = (torch.randn(size, size, dtype=dtype) for _ in range(2))
            calls = MATMUL_FLOP // (2 * size**3)

            def matmuls(a=a, b=b, calls=calls):
                for _ in range(calls):
                    a @ b

            gflops = MATMUL_FLOP / best_seconds(matmuls, args.repeats) / 1e9
            if gflops > out.get(name, 0.0):
                out[name], out[f"{name}_size"] = gflops, size
    return out


def attention_flop(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """torch's CPU attention kernel has no FLOP formula in FlopCounterMode: Q·Kᵀ and P·V, as for the CUDA ones."""
    *batch, length, depth = query_shape
    count = 1
    for n in batch:
        count *= n
    return 2 * count * length * key_shape[-2] * (depth + value_shape[-1])


def count_flops(unet, *inputs) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    cpu_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    with FlopCounterMode(display=False, custom_mapping={cpu_attention: attention_flop}) as counter:
        unet(*inputs)
    return counter.get_total_flops()


def unet_worker(args) -> dict:
    import torch

    from ldm.accel.fast import FastConfig, speed_up
    from ldm.formats.bundle import load_bundle

    set_threads(args.threads)
    torch.set_grad_enabled(False)
    bundle = load_bundle(args.bundle).to(dtype=torch.float32)
    unet = bundle.unet
    latent = args.size // bundle.config.vae.downsampling_factor
    x = torch.randn(args.batch, unet.config.in_channels, latent, latent)  # uncond + cond halves
    context = torch.randn(args.batch, bundle.config.text_encoder.context_length, unet.config.cross_attention_dim)
    t = torch.tensor(500)
    flops = count_flops(unet, x, t, context)
    paths = {"fp32": unet}
    # each path on its own copy of the weights: speed_up may prepare a UNet in place (packed weights)
    fast = speed_up(load_bundle(args.bundle).to(dtype=torch.float32), FastConfig(threads=args.threads)).unet
    paths["fast"] = fast
    dtype = getattr(fast, "low_noise", fast).dtype  # at t = 500 a mixed-precision UNet runs in bf16
    if args.compile:
        compiled = load_bundle(args.bundle).to(dtype=torch.float32)
        paths["fast --compile"] = speed_up(compiled, FastConfig(threads=args.threads, compile=True)).unet
    turns = {name: [] for name in paths}
    for turn in range(TURNS):
        for name, model in paths.items():
            inputs = (x.to(model.dtype), t, context.to(model.dtype))
            if turn == 0:
                model(*inputs)  # traces (and compiles) the graph for this shape
            turns[name].append(best_seconds(lambda m=model, i=inputs: m(*i), args.repeats))
    out = {"gflop": flops / 1e9, "fast_dtype": str(dtype).removeprefix("torch."), "turns": TURNS}
    out.update({f"{name}_s": statistics.median(ts) for name, ts in turns.items()})
    return out


def section(args, workdir: Path) -> tuple[str, dict]:
    script = Path(__file__).resolve()
    peak = run_worker(script, ["--what", "peak", "--repeats", 5], threads=args.threads, log=workdir / "efficiency.log")
    models = [("emoji-tiny", args.emoji_size, args.emoji_model, (2, 8))]
    if not args.skip_sd:
        models.append(("sd-v1", args.sd_size, None, (2,)))
    rows, results = [], {"peak_gflops": peak}
    for preset, size, model_dir, batches in models:
        bundle_dir, _ = bench_bundle(preset, workdir, model_dir=model_dir)
        repeats = 20 if preset == "emoji-tiny" else 3
        compile = args.compile and preset == "emoji-tiny"  # a big UNet has no traced graphs to compile
        for batch in batches:
            argv = ["--what", "unet", "--bundle", bundle_dir, "--size", size, "--batch", batch, "--repeats", repeats]
            r = run_worker(script, argv + (["--compile"] if compile else []), threads=args.threads,
                           log=workdir / "efficiency.log")  # fmt: skip
            results[f"{preset}-b{batch}"] = r
            fast_dtype = PEAK_KEY.get(r["fast_dtype"], r["fast_dtype"])
            labels = {"fp32": ("fp32", "fp32"), "fast": (f"fast path ({fast_dtype} UNet)", fast_dtype),
                      "fast --compile": ("fast path, `--compile`", fast_dtype)}  # fmt: skip
            for name, (label, dtype) in labels.items():
                if f"{name}_s" not in r:
                    continue
                seconds = r[f"{name}_s"]
                achieved = r["gflop"] / seconds
                rows.append([f"{preset} @ {size}×{size}", batch, label, f"{r['gflop']:.2f}", f"{seconds * 1e3:.1f}",
                             f"{achieved:.1f}", f"{100 * achieved / peak[dtype]:.1f} % of {dtype} peak"])  # fmt: skip
    text = "\n".join(
        [
            "### UNet efficiency",
            "",
            (
                f"Peak, measured as the best of 5 timings of square matmuls ({', '.join(f'{n}²' for n in MATMUL_SIZES)}) "
                f"at {args.threads} thread(s): fp32 {peak['fp32']:.0f} GFLOP/s ({peak['fp32_size']}²), "
                f"bf16 {peak['bf16']:.0f} GFLOP/s ({peak['bf16_size']}²). One UNet forward = one guided sampling step "
                "(batch 2: one image; batch 8: four); FLOPs from torch.utils.flop_counter.FlopCounterMode (matrix "
                "products, convolutions and attention; elementwise ops are not counted); time = the median over "
                f"{TURNS} turns, the paths taking turns in one process, of the best of several forwards."
            ),
            "",
            table(["model", "batch", "path", "GFLOP / forward", "ms / forward", "GFLOP/s", "efficiency"], rows),
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
        ("--compile", {"action": "store_true", "help": "also time the fast path with --compile (emoji-tiny)"}),
    ):
        if not any(flag in a.option_strings for a in p._actions):
            p.add_argument(flag, **kwargs)


def main() -> None:
    p = script_parser(__doc__)
    p.add_argument("--what", choices=["peak", "unet"])
    p.add_argument("--bundle")
    p.add_argument("--size", type=int)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    add_section_arguments(p)
    script_main(p.parse_args(), lambda args: peak_worker(args) if args.what == "peak" else unet_worker(args), section)


if __name__ == "__main__":
    main()
