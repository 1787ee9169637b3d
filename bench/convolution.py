"""3×3 convolutions: oneDNN's prepacked direct convolution against Winograd F(2×2, 3×3) (``ldm.accel.winograd``).

The shapes are sd-v1's at 256×256: its UNet's at batch 8 (four guided images) and its VAE decoder's at batch 4, with
random weights. Both forms of each convolution take turns in one process (the median over the turns of the best of
a few calls); the error of each is its largest difference from the float64 convolution, over the largest |output|.
The narrow VAE shapes, which the fast path leaves direct (``WINOGRAD_MIN_CHANNELS``), are timed to show why.

    python bench/convolution.py --threads 2 [--conv-turns 3]   # prints a Markdown section
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import script_main, script_parser, set_threads, table

# (where, batch, channels in, grid side, channels out)
SHAPES = [
    ("UNet down, 32×32", 8, 320, 32, 320),
    ("UNet down, 16×16", 8, 640, 16, 640),
    ("UNet down, 8×8", 8, 1280, 8, 1280),
    ("UNet down and mid, 4×4", 8, 1280, 4, 1280),
    ("UNet up, 8×8 (skip concatenated)", 8, 2560, 8, 1280),
    ("UNet up, 16×16 (skip concatenated)", 8, 1920, 16, 640),
    ("UNet up, 32×32 (skip concatenated)", 8, 640, 32, 320),
    ("VAE decoder, 32×32", 4, 512, 32, 512),
    ("VAE decoder, 64×64", 4, 512, 64, 512),
    ("VAE decoder, 128×128", 4, 512, 128, 512),
    ("VAE decoder, 128×128 (512→256)", 4, 512, 128, 256),
    ("VAE decoder, 128×128, 256", 4, 256, 128, 256),
    ("VAE decoder, 256×256, 256", 4, 256, 256, 256),
    ("VAE decoder, 256×256 (256→128)", 4, 256, 256, 128),
    ("VAE decoder, 256×256, 128", 4, 128, 256, 128),
]
BF16_SHAPES = 7  # the UNet's shapes again in bf16 (its low-noise steps), for the error


def best_seconds(fn, calls: int) -> float:
    import time

    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def worker(args) -> dict:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from ldm import winograd
    from ldm.accel.packed import PackedConv2d

    set_threads(args.threads)
    torch.set_grad_enabled(False)
    winograd.WINOGRAD_MIN_CHANNELS = 1  # the narrow shapes too, to time them
    rows = []
    cases = [(*shape, torch.float32) for shape in SHAPES] + [(*shape, torch.bfloat16) for shape in SHAPES[:BF16_SHAPES]]
    for where, batch, c_in, side, c_out, dtype in cases:
        torch.manual_seed(0)
        conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        x = torch.randn(batch, c_in, side, side)
        exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
        conv = conv.to(dtype)
        x = x.to(dtype).contiguous(memory_format=torch.channels_last)
        forms = {"direct": PackedConv2d(conv), "winograd": winograd.WinogradConv2d(conv)}
        errors = {
            name: ((form(x).double() - exact).abs().max() / exact.abs().max()).item() for name, form in forms.items()
        }  # also the warm-up
        times = {name: [] for name in forms}
        for _ in range(args.conv_turns):
            for name, form in forms.items():
                times[name].append(best_seconds(lambda f=form, x=x: f(x), args.conv_calls))
        rows.append({
            "where": where, "shape": [batch, c_in, side, c_out], "dtype": str(dtype).removeprefix("torch."),
            "direct_ms": 1e3 * statistics.median(times["direct"]), "winograd_ms": 1e3 * statistics.median(times["winograd"]),
            "direct_error": errors["direct"], "winograd_error": errors["winograd"],
        })  # fmt: skip
    return {"rows": rows, "turns": args.conv_turns, "calls": args.conv_calls}


def section(args, workdir: Path) -> tuple[str, dict]:
    from common import run_worker

    script = Path(__file__).resolve()
    r = run_worker(script, ["--conv-turns", args.conv_turns, "--conv-calls", args.conv_calls], threads=args.threads,
                   log=workdir / "convolution.log")  # fmt: skip
    from ldm.accel.winograd import WINOGRAD_MIN_CHANNELS

    rows = []
    for row in r["rows"]:
        batch, c_in, side, c_out = row["shape"]
        used = row["dtype"] == "float32" and min(c_in, c_out) >= WINOGRAD_MIN_CHANNELS
        rows.append([
            row["where"], f"{batch}×{c_in}×{side}×{side} → {c_out}", row["dtype"], f"{row['direct_ms']:.1f}",
            f"{row['winograd_ms']:.1f}", f"{row['direct_ms'] / row['winograd_ms']:.2f}×",
            f"{row['direct_error']:.1e}", f"{row['winograd_error']:.1e}", "yes" if used else "no",
        ])  # fmt: skip
    header = ["where", "input → channels out", "dtype", "direct ms", "Winograd ms", "speed-up", "error direct",
              "error Winograd", "fast path"]  # fmt: skip
    lines = [
        "### 3×3 convolutions: direct (oneDNN, prepacked) against Winograd F(2×2, 3×3)",
        "",
        (
            f"sd-v1's shapes at 256×256, random weights; the two forms took {r['turns']} turns in one process (ms = "
            f"median over the turns of the best of {r['calls']} calls). Error: max |Δ| from the float64 convolution "
            "over its max |output|. Last column: whether the fast path uses Winograd for it (fp32, at least "
            f"{WINOGRAD_MIN_CHANNELS} channels in and out)."
        ),
        "",
        table(header, rows),
        "",
    ]
    return "\n".join(lines), r


def add_section_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--conv-turns", type=int, default=3, help="turns of the two forms of each convolution")
    p.add_argument("--conv-calls", type=int, default=2, help="calls per turn, the best of which counts")


def main() -> None:
    p = script_parser(__doc__)
    add_section_arguments(p)
    script_main(p.parse_args(), worker, section)


if __name__ == "__main__":
    main()
