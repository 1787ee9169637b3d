"""The shipped LCM-LoRA beside its teacher: docs/emoji-lcm-grid.png and docs/emoji-lcm-eval.json.

The grid: one row per prompt; columns the teacher at 20 steps (DPM++ 2M, CFG 7.5, generate.py's defaults), the
teacher at 4 steps with the same sampler (what 4 steps give without distillation), and the LCM-LoRA at 4, 2 and 1
steps (LCM sampler, CFG 1). The JSON: for each few-step setting, the PSNR of its images against the teacher's 20-step
images of the same prompts and seeds (the first ``--prompts`` of docs/eval-prompts.txt), and the UNet calls per image.

    python docs/eval_lcm.py [--lora models/lora/emoji-tiny-lcm.safetensors] [--prompts 32]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging
from PIL import Image, ImageDraw, ImageFont

from ldm.formats.bundle import load_bundle
from ldm.pipeline import Request, generate, to_uint8
from ldm.pipeline.schedule import get_sampler
from ldm.train.lora import apply_lora

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
GRID_PROMPTS = ["red apple", "cat face", "rocket", "grinning face", "red heart", "snowman", "pizza", "banana"]
CELL, LABEL = 96, 150


def settings() -> dict[str, tuple[str, int, float, str]]:
    """column → (which model, steps, CFG, sampler)."""
    return {"teacher 20": ("teacher", 20, 7.5, "dpmpp_2m"), "teacher 4": ("teacher", 4, 7.5, "dpmpp_2m"),
            "LCM-LoRA 4": ("student", 4, 1.0, "lcm"), "LCM-LoRA 2": ("student", 2, 1.0, "lcm"),
            "LCM-LoRA 1": ("student", 1, 1.0, "lcm")}  # fmt: skip


def images(models: dict, column: str, prompts: list[str], seed: int = 0) -> torch.Tensor:
    which, steps, cfg, sampler = settings()[column]
    model = models[which]
    size = model.config.vae.sample_size
    out = []
    for start in range(0, len(prompts), 16):
        chunk = prompts[start : start + 16]
        request = Request(prompts=chunk, negative_prompts=[""] * len(chunk), seeds=[seed + start + i for i in range(len(chunk))],
                          steps=steps, guidance_scale=cfg, sampler=get_sampler(sampler), width=size, height=size)  # fmt: skip
        out.append(generate(model, request, progress=False))
    return torch.cat(out)  # (N, 3, H, W) in [0, 1]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (to_uint8(a).float() - to_uint8(b).float()).pow(2).mean().item()
    return 10 * math.log10(255**2 / mse) if mse > 0 else float("inf")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "models" / "emoji-tiny")
    p.add_argument("--lora", type=Path, default=ROOT / "models" / "lora" / "emoji-tiny-lcm.safetensors")
    p.add_argument("--prompts", type=int, default=32)
    args = p.parse_args()
    diffusers_logging.set_verbosity_error()
    teacher = load_bundle(args.model).to("cpu", torch.float32)
    models = {"teacher": teacher, "student": apply_lora(copy.deepcopy(teacher), args.lora, scale=1.0)}

    columns = list(settings())
    sheet = Image.new("RGB", (LABEL + CELL * len(columns), 24 + CELL * len(GRID_PROMPTS)), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default(size=14)
    for col, column in enumerate(columns):
        draw.text((LABEL + col * CELL + 4, 4), column, fill="black", font=font)
        for row, pixels in enumerate(to_uint8(images(models, column, GRID_PROMPTS)).numpy()):
            cell = Image.fromarray(pixels.transpose(1, 2, 0)).resize((CELL, CELL), Image.NEAREST)
            sheet.paste(cell, (LABEL + col * CELL, 24 + row * CELL))
    for row, prompt in enumerate(GRID_PROMPTS):
        draw.text((6, 24 + row * CELL + CELL // 2 - 8), prompt, fill="black", font=font)
    sheet.save(DOCS / "emoji-lcm-grid.png")

    prompts = (DOCS / "eval-prompts.txt").read_text().splitlines()[: args.prompts]
    reference = images(models, "teacher 20", prompts)
    report = {"prompts": len(prompts), "against": "teacher 20 (DPM++ 2M, CFG 7.5), same prompts and seeds",
              "psnr_db": {}, "unet_calls_per_image": {}}  # fmt: skip
    for column in columns[1:]:
        _, steps, cfg, _ = settings()[column]
        report["psnr_db"][column] = round(psnr(images(models, column, prompts), reference), 2)
        report["unet_calls_per_image"][column] = steps * (2 if cfg > 1 else 1)
    report["unet_calls_per_image"]["teacher 20"] = 40
    (DOCS / "emoji-lcm-eval.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
