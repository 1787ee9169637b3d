#!/usr/bin/env bash
# A full latent consistency student of models/emoji-tiny (configs/runs/emoji-tiny-student-lcm.yaml): every weight of
# the teacher's UNet distilled, with the guidance scale as an input; then its CLIP score, FID and KID beside the
# 20-step teacher with the same prompts, seeds and judging CLIP as the LCM-LoRA's (recipes/emoji-lcm-clip.sh with
# --student: docs/emoji-lcm-student-clip.json), and its grid and PSNR (docs/eval_lcm.py --student).
#
#     bash recipes/emoji-lcm-student.sh
#     CLIP=path/clip.safetensors bash recipes/emoji-lcm-student.sh   # score with a judging CLIP already trained
#
# A run that was killed continues with: python train_lcm.py --out runs/emoji-lcm/student --resume latest
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=${BASE:-data/emoji-base}
OUT=${OUT:-runs/emoji-lcm}

# 1. Data: the default-tone emoji at 64 px, as emoji-tiny was trained on.
[ -f "$BASE/train/metadata.jsonl" ] || python -m ldm emoji "$BASE" --size 64 --no-skin-tones

# 2. Distil (the run stops on its train.budget_minutes clock).
python train_lcm.py --config configs/runs/emoji-tiny-student-lcm.yaml --data "$BASE/train" --out "$OUT/student" \
    --cache-dir "$OUT/cache"

# 3. Measure: the teacher at 20 and 4 steps, the student at 4, 2 and 1 steps (LCM, its guidance input at 7.5).
OUT="$OUT" BASE="$BASE" bash recipes/emoji-lcm-clip.sh --student "$OUT/student/bundle" --out "$OUT/eval-student" \
    --json docs/emoji-lcm-student-clip.json
python docs/eval_lcm.py --student "$OUT/student/bundle" --grid docs/emoji-lcm-student-grid.png \
    --json docs/emoji-lcm-student-eval.json
