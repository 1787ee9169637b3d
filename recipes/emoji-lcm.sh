#!/usr/bin/env bash
# The recipe of the shipped LCM-LoRA, models/lora/emoji-tiny-lcm.safetensors: latent consistency distillation of
# models/emoji-tiny into rank-16 LoRA adapters (train_lcm.py, ldm/train/lcm.py), then its images beside the 20-step
# teacher's (docs/eval_lcm.py: same prompts and seeds), the grid docs/emoji-lcm-grid.png, and the CLIP scores, FID
# and KID of the same settings (recipes/emoji-lcm-clip.sh).
#
#     bash recipes/emoji-lcm.sh
#
# The run's settings are configs/runs/emoji-tiny-lcm.yaml; it stops on its train.budget_minutes clock, its
# cosine schedule annealing within it. A run that was killed continues with:
#     python train_lcm.py --out runs/emoji-lcm/lora --resume latest
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=${BASE:-data/emoji-base}
OUT=${OUT:-runs/emoji-lcm}

# 1. Data: the default-tone emoji at 64 px, as emoji-tiny was trained on.
[ -f "$BASE/train/metadata.jsonl" ] || python -m ldm emoji "$BASE" --size 64 --no-skin-tones

# 2. Distil.
python train_lcm.py --config configs/runs/emoji-tiny-lcm.yaml --data "$BASE/train" --out "$OUT/lora" \
    --cache-dir "$OUT/cache"

# 3. Ship the diffusers-format adapters (kohya's twin stays in the run folder).
mkdir -p models/lora
cp "$OUT/lora/lora.safetensors" models/lora/emoji-tiny-lcm.safetensors

# 4. Measure on the eval prompts: PSNR of each few-step setting against the teacher's 20-step images and the grid
#    (docs/emoji-lcm-eval.json, docs/emoji-lcm-grid.png); then CLIP score, FID and KID of the same settings with a
#    CLIP trained for the purpose (recipes/emoji-lcm-clip.sh: the CLIP, then docs/eval_lcm_clip.py;
#    docs/emoji-lcm-clip.json).
python docs/eval_lcm.py
OUT="$OUT" BASE="$BASE" bash recipes/emoji-lcm-clip.sh
