#!/usr/bin/env bash
# The recipe of the shipped task models beside models/emoji-tiny: an inpainting model (models/emoji-tiny-inpaint)
# and a 64 → 128 px latent upscaler (models/emoji-tiny-upscale), both fine-tuned from emoji-tiny with
# train_unet.py --task, then written as fp16 bundles that borrow emoji-tiny's VAE and text encoder (each ships its
# own UNet, under 20 MB), and measured by docs/eval_tasks.py.
#
#     bash recipes/emoji-tasks.sh                  # about 40 minutes on 2 CPU cores (the two stages side by side)
#
# Each stage's settings are a run config in configs/runs/ (emoji-inpaint-unet.yaml, emoji-upscale-unet.yaml). The two ran at
# once, one thread each, on the shipped models' 2 cores; each stops on its own --budget-minutes clock, its cosine
# schedule annealing within it. A stage that was killed continues with: python train_unet.py --out OUT --resume latest
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=${BASE:-data/emoji-base}
HIGH=${HIGH:-data/emoji-base-128}

# 1. Data: the default-tone emoji at 64 px (inpainting) and at 128 px (the upscaler's high-resolution side).
[ -f "$BASE/train/metadata.jsonl" ] || python -m ldm emoji "$BASE" --size 64 --no-skin-tones
[ -f "$HIGH/train/metadata.jsonl" ] || python -m ldm emoji "$HIGH" --size 128 --no-skin-tones

# 2. Both fine-tunes, side by side.
OMP_NUM_THREADS=1 python train_unet.py --config configs/runs/emoji-inpaint-unet.yaml --data "$BASE/train" \
    --eval-data "$BASE/test" &
OMP_NUM_THREADS=1 python train_unet.py --config configs/runs/emoji-upscale-unet.yaml --data "$HIGH/train" \
    --eval-data "$HIGH/test" &
wait

# 3. Ship: fp16, only the UNet and the config; the VAE and text encoder are emoji-tiny's (the manifest says so).
python -m ldm bundle convert runs/emoji-tasks/inpaint/bundle models/emoji-tiny-inpaint --dtype fp16 --no-extras \
    --name emoji-tiny-inpaint --base models/emoji-tiny --force
python -m ldm bundle convert runs/emoji-tasks/upscale/bundle models/emoji-tiny-upscale --dtype fp16 --no-extras \
    --name emoji-tiny-upscale --base models/emoji-tiny --force

# 4. Measure on the held-out emoji: docs/emoji-tasks-eval.json and the two grids.
python docs/eval_tasks.py
