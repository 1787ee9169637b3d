"""A consistency-distilled student beside its teacher: docs/emoji-lcm-grid.png and docs/emoji-lcm-eval.json.

The grid: one row per prompt; columns the teacher at 20 steps (DPM++ 2M, CFG 7.5, generate.py's defaults), the
teacher at 4 steps with the same sampler (what 4 steps give without distillation), and the student at 4, 2 and 1
steps (LCM sampler): the shipped LCM-LoRA (``--lora``, CFG 1), or a full student bundle (``--student``, its guidance
input at ``--student-cfg``, 7.5 as the teacher's). The JSON: for each few-step setting, the PSNR of its images
against the teacher's 20-step images of the same prompts and seeds (the first ``--prompts`` of
docs/eval-prompts.txt), and the UNet calls per image.

    python docs/eval_lcm.py [--lora models/lora/emoji-tiny-lcm.safetensors | --student runs/emoji-lcm/student/bundle]
        [--prompts 32] [--grid docs/emoji-lcm-grid.png] [--json docs/emoji-lcm-eval.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path
from typing import NamedTuple

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


class Setting(NamedTuple):
    which: str  # "teacher" or "student"
    steps: int
    cfg: float
    sampler: str
    unet_calls: int  # per image


def settings(student_cfg: float | None = None) -> dict[str, Setting]:
    """column → setting. ``student_cfg`` None: the LCM-LoRA columns (CFG 1, one call a step); a number: a full
    student's, its guidance input at that scale (still one call a step)."""
    rows = {
        "teacher 20": Setting("teacher", 20, 7.5, "dpmpp_2m", 40),
        "teacher 4": Setting("teacher", 4, 7.5, "dpmpp_2m", 8),
    }
    for steps in (4, 2, 1):
        if student_cfg is None:
            rows[f"LCM-LoRA {steps}"] = Setting("student", steps, 1.0, "lcm", steps)
        else:
            rows[f"student {steps}"] = Setting("student", steps, student_cfg, "lcm", steps)
    return rows


def images(models: dict, setting: Setting, prompts: list[str], seed: int = 0) -> torch.Tensor:
    which, steps, cfg, sampler, _ = setting
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
    p.add_argument("--student", type=Path, help="a full student bundle (train_lcm.py's OUT/bundle) instead of --lora")
    p.add_argument("--student-cfg", type=float, default=7.5, help="the full student's guidance input (default 7.5)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--grid", type=Path, default=DOCS / "emoji-lcm-grid.png")
    p.add_argument("--json", type=Path, default=DOCS / "emoji-lcm-eval.json")
    args = p.parse_args()
    diffusers_logging.set_verbosity_error()
    teacher = load_bundle(args.model).to("cpu", torch.float32)
    if args.student:
        student = load_bundle(args.student).to("cpu", torch.float32)
    else:
        student = apply_lora(copy.deepcopy(teacher), args.lora, scale=1.0)
    models = {"teacher": teacher, "student": student}
    table = settings(args.student_cfg if args.student else None)

    columns = list(table)
    sheet = Image.new("RGB", (LABEL + CELL * len(columns), 24 + CELL * len(GRID_PROMPTS)), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default(size=14)
    for col, column in enumerate(columns):
        draw.text((LABEL + col * CELL + 4, 4), column, fill="black", font=font)
        for row, pixels in enumerate(to_uint8(images(models, table[column], GRID_PROMPTS)).numpy()):
            cell = Image.fromarray(pixels.transpose(1, 2, 0)).resize((CELL, CELL), Image.NEAREST)
            sheet.paste(cell, (LABEL + col * CELL, 24 + row * CELL))
    for row, prompt in enumerate(GRID_PROMPTS):
        draw.text((6, 24 + row * CELL + CELL // 2 - 8), prompt, fill="black", font=font)
    sheet.save(args.grid)

    prompts = (DOCS / "eval-prompts.txt").read_text().splitlines()[: args.prompts]
    reference = images(models, table["teacher 20"], prompts)
    report = {"prompts": len(prompts), "against": "teacher 20 (DPM++ 2M, CFG 7.5), same prompts and seeds",
              "psnr_db": {}, "unet_calls_per_image": {}}  # fmt: skip
    for column in columns[1:]:
        report["psnr_db"][column] = round(psnr(images(models, table[column], prompts), reference), 2)
    report["unet_calls_per_image"] = {column: setting.unet_calls for column, setting in table.items()}
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
