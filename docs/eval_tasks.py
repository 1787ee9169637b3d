"""Measure the shipped inpainting and upscaling models on the held-out emoji, and draw their before/after grids.

    python docs/eval_tasks.py            # → docs/emoji-tasks-eval.json, docs/emoji-inpaint-grid.png, docs/emoji-upscale-grid.png

Inpainting: the centre square (half the side) of each held-out 64-px emoji is masked and repainted from its caption,
by emoji-tiny itself (a text-to-image UNet, the known region re-imposed every step) and by emoji-tiny-inpaint;
PSNR of the repainted region against the original. Upscaling: each held-out 128-px render is shrunk to 64 px as in
training (bicubic, antialiased) and brought back to 128 px by bicubic interpolation and by emoji-tiny-upscale; PSNR
and SSIM of the whole image against the render. Every model runs generate.py's defaults (20 steps DPM++ 2M, CFG
7.5; the upscaler with its caption, no guidance, noise level 20), one seed per image.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.utils import logging as diffusers_logging
from PIL import Image

from ldm.data import DataConfig, list_dataset
from ldm.eval.metrics import psnr, ssim
from ldm.formats.bundle import load_bundle
from ldm.images import read_rgb, to_uint8, uint8_to_pil, uint8_to_unit
from ldm.pipeline import Request, generate
from ldm.pipeline.schedule import get_sampler
from ldm.pipeline.upscale import upscale

DOCS = Path(__file__).resolve().parent
SHOWN = 8  # emoji per grid
CELL = 96  # pixels per grid cell


def held_out(folder: Path, limit: int) -> tuple[torch.Tensor, list[str]]:
    listing = list_dataset(DataConfig(path=str(folder)))
    pairs = listing.pairs[:limit]
    return torch.stack([uint8_to_unit(read_rgb(p.image)) for p in pairs]), [p.caption for p in pairs]


def batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def inpaint_all(bundle, images: torch.Tensor, captions: list[str], mask: torch.Tensor, batch: int) -> torch.Tensor:
    out = []
    for s in batches(len(images), batch):
        n = s.stop - s.start
        request = Request(prompts=captions[s], negative_prompts=[""] * n, seeds=list(range(s.start, s.stop)), steps=20,
                          guidance_scale=7.5, sampler=get_sampler("dpmpp_2m"), width=64, height=64, image=images[s],
                          mask=mask.expand(n, -1, -1, -1))  # fmt: skip
        out.append(generate(bundle, request, progress=False))
    return torch.cat(out)


def grid(columns: list[torch.Tensor], cell: int = CELL) -> Image.Image:
    """The images side by side, one column per entry of ``columns`` (each (N, 3, H, W) in [0, 1]), at ``cell`` px."""
    sheet = Image.new("RGB", (cell * len(columns), cell * len(columns[0])), "white")
    for c, column in enumerate(columns):
        for r, image in enumerate(to_uint8(column)):
            sheet.paste(uint8_to_pil(image).resize((cell, cell), Image.Resampling.NEAREST), (c * cell, r * cell))
    return sheet


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, default=Path("models"))
    p.add_argument("--data", type=Path, default=Path("data"))
    p.add_argument("--limit", type=int, default=88, help="held-out emoji at most")
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    diffusers_logging.set_verbosity_error()
    torch.set_grad_enabled(False)
    report = {}

    images, captions = held_out(args.data / "emoji-base" / "test", args.limit)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    inside = mask.bool().expand(len(images), 3, -1, -1)
    results = {}
    for name in ("emoji-tiny", "emoji-tiny-inpaint"):
        bundle = load_bundle(args.models / name).to("cpu", torch.float32)
        results[name] = inpaint_all(bundle, images, captions, mask, args.batch)
        region = [(results[name][i][inside[i]], images[i][inside[i]]) for i in range(len(images))]
        scores = torch.stack([psnr(a.reshape(1, 3, 32, 32), b.reshape(1, 3, 32, 32))[0] for a, b in region])
        report[f"inpaint_psnr_{name}"] = round(float(scores.mean()), 2)
    masked = images * (1 - mask) + 0.5 * mask
    grid([images[:SHOWN], masked[:SHOWN], *(r[:SHOWN] for r in results.values())]).save(DOCS / "emoji-inpaint-grid.png")
    report["inpaint_images"] = len(images)

    high, captions = held_out(args.data / "emoji-base-128" / "test", args.limit)
    low = F.interpolate(high * 2 - 1, size=(64, 64), mode="bicubic", antialias=True).clamp(-1, 1) / 2 + 0.5
    low = uint8_to_unit(to_uint8(low))  # an 8-bit image, as a user's file would be
    bicubic = F.interpolate(low, size=(128, 128), mode="bicubic").clamp(0, 1)
    upscaler = load_bundle(args.models / "emoji-tiny-upscale").to("cpu", torch.float32)
    ours = torch.cat([
        upscale(upscaler, low[s], prompts=captions[s], negative_prompts=[""] * (s.stop - s.start),
                seeds=list(range(s.start, s.stop)), steps=20, guidance_scale=1.0, sampler=get_sampler("dpmpp_2m"),
                noise_level=20)
        for s in batches(len(low), args.batch)
    ])  # fmt: skip
    for name, result in (("bicubic", bicubic), ("emoji-tiny-upscale", ours)):
        report[f"upscale_psnr_{name}"] = round(float(psnr(result, high).mean()), 2)
        report[f"upscale_ssim_{name}"] = round(float(ssim(result, high).mean()), 4)
    nearest = F.interpolate(low, size=(128, 128), mode="nearest")
    grid([nearest[:SHOWN], bicubic[:SHOWN], ours[:SHOWN], high[:SHOWN]], cell=128).save(DOCS / "emoji-upscale-grid.png")
    report["upscale_images"] = len(high)
    (DOCS / "emoji-tasks-eval.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
