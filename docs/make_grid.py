"""Draw the README's grid: prompts down the side, seeds 0–3 across, made with generate.py's defaults.

    python docs/make_grid.py                       # → docs/emoji-tiny-grid.png from models/emoji-tiny
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging
from PIL import Image, ImageDraw, ImageFont

from ldm.formats.bundle import load_bundle
from ldm.pipeline import Request, generate, to_uint8
from ldm.pipeline.schedule import get_sampler

PROMPTS = ["red apple", "cat face", "rocket", "grinning face", "red heart", "fire", "pizza", "banana"]
CELL, LABEL = 96, 150  # pixels per image (upscaled for viewing), width of the prompt column


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path("models/emoji-tiny"))
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "emoji-tiny-grid.png")
    p.add_argument("--seeds", type=int, default=4)
    args = p.parse_args()
    diffusers_logging.set_verbosity_error()  # its dtype-cast notice is noise here

    bundle = load_bundle(args.model).to("cpu", torch.float32)  # shipped in fp16, run in fp32 as generate.py does
    size = bundle.config.vae.sample_size
    sheet = Image.new("RGB", (LABEL + CELL * args.seeds, CELL * len(PROMPTS)), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default(size=16)
    for row, prompt in enumerate(PROMPTS):
        request = Request(
            prompts=[prompt] * args.seeds, negative_prompts=[""] * args.seeds, seeds=list(range(args.seeds)),
            steps=20, guidance_scale=7.5, sampler=get_sampler("dpmpp_2m"), width=size, height=size,
        )  # fmt: skip
        for col, pixels in enumerate(to_uint8(generate(bundle, request, progress=False)).numpy()):
            sheet.paste(Image.fromarray(pixels).resize((CELL, CELL), Image.LANCZOS), (LABEL + col * CELL, row * CELL))
        draw.text((8, row * CELL + CELL // 2), prompt, fill="black", font=font, anchor="lm")
    sheet.save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
