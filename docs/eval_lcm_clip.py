"""CLIP score, FID and KID of the shipped LCM-LoRA beside its 20-step teacher: docs/emoji-lcm-clip.json.

Each setting of docs/eval_lcm.py (the teacher at 20 and at 4 steps, DPM++ 2M, CFG 7.5; the teacher with the LCM-LoRA
at 4, 2 and 1 steps, LCM sampler, CFG 1) is scored by ``python -m ldm eval`` on the same prompts and seeds (image j of
every prompt starts from seed j) with one CLIP, given by ``--clip``: CLIP score on the prompts, and FID and KID against
``--reference`` on that CLIP's image embeddings. The CLIP is one that ``train_clip.py`` trained apart from the
generator (recipes/emoji-lcm-clip.sh: emoji-tiny's CLIP recipe with another seed), so that the judge is not the text
encoder the images were conditioned on. Beside each setting: the PSNR of its images against the teacher's 20-step
images, pooled over all images as in docs/eval_lcm.py, and the CLIP score of the reference images with their own
captions (what real emoji get from this CLIP).

A full student bundle (``--student``, train_lcm.py's OUT/bundle) takes the LCM-LoRA's place: its columns are
"student 4/2/1", its guidance input at ``--student-cfg`` (7.5, the teacher's scale), one UNet call a step.

    python docs/eval_lcm_clip.py --clip runs/emoji-lcm/clip/clip.safetensors [--reference data/emoji-base/test]
        [--images-per-prompt 2] [--out runs/emoji-lcm/eval] [--lora models/lora/emoji-tiny-lcm.safetensors]
        [--student runs/emoji-lcm/student/bundle [--student-cfg 7.5]] [--json docs/emoji-lcm-clip.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from eval_lcm import Setting, settings
from PIL import Image

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
GAP = 3.0  # the acceptance bound: the 4-step student's CLIP score within this many points of the teacher's


def rel(path: Path) -> str:
    """``path`` relative to the repository root where it lies inside it (as the commands are run from there)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def machine() -> dict:
    """The CPU (model and the vector flags of note), the threads and the load at the start."""
    import torch

    from ldm.accel.fast import cpu_flags

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())  # fmt: skip
    flags = sorted({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"} & cpu_flags())
    return {"cpu": model, "cpu_flags": " ".join(flags), "logical_cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg())}  # fmt: skip


def folder(out: Path, column: str) -> Path:
    """Where one setting's evaluation goes: OUT/teacher-20, OUT/lcm-lora-4, ..."""
    return out / column.lower().replace(" ", "-")


def eval_command(args, setting: Setting, out: Path) -> list[str]:
    """The ``python -m ldm eval`` line of one setting."""
    which, steps, cfg, sampler, _ = setting
    model = args.student if which == "student" and args.student else args.model
    cmd = ["python", "-m", "ldm", "eval", "--model", rel(model)]
    if which == "student" and not args.student:
        cmd += ["--lora", f"{rel(args.lora)}:{args.lora_scale:g}" if args.lora_scale != 1 else rel(args.lora)]
    cmd += ["--sampler", sampler, "--steps", str(steps), "--cfg", f"{cfg:g}", "--prompts", rel(args.prompts),
            "-n", str(args.images_per_prompt), "--clip", rel(args.clip), "--reference", rel(args.reference),
            "--out", rel(out), "--quiet"]  # fmt: skip
    return cmd


def run(cmd: list[str]) -> dict:
    """Run one evaluation from the repository root; its eval.json."""
    print("$ " + shlex.join(cmd), flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, env=env, check=True)
    out = ROOT / cmd[cmd.index("--out") + 1]
    return json.loads((out / "eval.json").read_text())


def read_images(folder: Path) -> dict[str, np.ndarray]:
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    return {row["file_name"]: np.asarray(Image.open(folder / row["file_name"]).convert("RGB"), dtype=np.float64)
            for row in rows}  # fmt: skip


def pooled_psnr(images: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """PSNR in dB of one MSE over every pixel of every image (the same prompt and seed paired by file name)."""
    if images.keys() != reference.keys():
        raise SystemExit("the two settings' images differ in prompts or seeds; rerun both with the same flags")
    mse = float(np.mean([np.mean((images[k] - reference[k]) ** 2) for k in reference]))
    return 10 * math.log10(255**2 / mse) if mse > 0 else float("inf")


def rounded(value, digits: int):
    return None if value is None else round(value, digits)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clip", type=Path, required=True, help="train_clip.py's clip.safetensors (the judge)")
    p.add_argument("--model", type=Path, default=ROOT / "models" / "emoji-tiny")
    p.add_argument("--lora", type=Path, default=ROOT / "models" / "lora" / "emoji-tiny-lcm.safetensors")
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--student", type=Path, help="a full student bundle (train_lcm.py's OUT/bundle) instead of --lora")
    p.add_argument("--student-cfg", type=float, default=7.5, help="the full student's guidance input (default 7.5)")
    p.add_argument("--prompts", type=Path, default=DOCS / "eval-prompts.txt")
    p.add_argument("--reference", type=Path, default=ROOT / "data" / "emoji-base" / "test")
    p.add_argument("--images-per-prompt", "-n", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "emoji-lcm" / "eval")
    p.add_argument("--json", type=Path, default=DOCS / "emoji-lcm-clip.json", help="the report (default: docs/)")
    args = p.parse_args()
    if args.student and not args.student.is_dir():
        raise SystemExit(f"no student bundle at {args.student}; pass train_lcm.py's OUT/bundle")
    if not args.clip.is_file():
        raise SystemExit(f"no CLIP at {args.clip}; train one with recipes/emoji-lcm-clip.sh, or pass --clip FILE")

    info = machine()
    real = run(["python", "-m", "ldm", "eval", "--images", rel(args.reference), "--clip", rel(args.clip),
                "--out", rel(args.out / "reference"), "--quiet"])  # fmt: skip
    table = settings(args.student_cfg if args.student else None)
    student_name = f"student ({rel(args.student)})" if args.student else "teacher + LCM-LoRA"
    rows, commands = {}, {}
    for column, setting in table.items():
        commands[column] = eval_command(args, setting, folder(args.out, column))
        report = run(commands[column])
        rows[column] = {"model": "teacher" if setting.which == "teacher" else student_name, "sampler": setting.sampler,
                        "steps": setting.steps, "cfg": setting.cfg, "unet_calls_per_image": setting.unet_calls,
                        "clip_score": rounded(report["clip_score"], 2), "clip_score_std": rounded(report["clip_score_std"], 2),
                        "fid": rounded(report["fid"], 4), "kid": rounded(report["kid"], 5),
                        "kid_std": rounded(report["kid_std"], 5), "images": report["source"]["images"],
                        "command": shlex.join(commands[column])}  # fmt: skip
    teacher = read_images(folder(args.out, "teacher 20") / "images")
    for column in rows:
        if column != "teacher 20":
            images = read_images(folder(args.out, column) / "images")
            rows[column]["psnr_vs_teacher_20_db"] = round(pooled_psnr(images, teacher), 2)
    four = next(column for column, setting in table.items() if setting.which == "student" and setting.steps == 4)
    gap = rows["teacher 20"]["clip_score"] - rows[four]["clip_score"]
    result = {
        "prompts": rel(args.prompts), "images_per_prompt": args.images_per_prompt,
        "seeds": "image j of every prompt starts from seed j, in every setting",
        "clip": rel(args.clip), "features": "FID and KID on the same CLIP's image embeddings",
        "reference": {"folder": rel(args.reference), "images": real["source"]["images"],
                      "clip_score_with_own_captions": rounded(real["clip_score"], 2)},
        "lora_scale": None if args.student else args.lora_scale, "machine": info, "settings": rows,
        "clip_gap_teacher_20_minus_lcm_4": round(gap, 2), "lcm_4_within_3_points": bool(gap <= GAP),
        "command": "python docs/eval_lcm_clip.py " + shlex.join(sys.argv[1:]),
    }  # fmt: skip
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
