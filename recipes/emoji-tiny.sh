#!/usr/bin/env bash
# The recipe of the shipped default model, models/emoji-tiny: VAE, CLIP text encoder and UNet trained from
# scratch on the emoji dataset with the project's own scripts, then written as an fp16 bundle.
#
#     bash recipes/emoji-tiny.sh                 # about 3 hours on 2 CPU cores
#     OUT=runs/mine bash recipes/emoji-tiny.sh   # somewhere else
#
# Each stage stops on its own clock as well as its step count. The VAE and CLIP commands are the ones that made
# the shipped model; on its 2 cores (AVX-512 BF16 / AMX) the clock stopped the VAE at step 6,169 of 7,400 with the
# cosine learning rate at 7 % of its peak, since --max-minutes does not shape the schedule. The UNet stage runs on
# --budget-minutes instead: its cosine schedule anneals within the hour on any machine (12,935 steps here).
# To do the same for the VAE, replace train.max_minutes by train.budget_minutes in its run config and raise
# train.max_steps out of the way (or pass --budget-minutes M --max-minutes 0 --max-steps N).
# Each stage's settings are a run config in configs/runs/ (emoji-tiny-vae.yaml, -clip.yaml, -unet.yaml, -tiny_vae.yaml); the command
# lines below add the folders, which depend on $OUT, $DATA and $BASE. Flags and --set override the file.
# README.md (Training the autoencoder) gives newer VAE settings: 26.3 dB held-out in the same 29 minutes, against
# this stage's 24.7 dB; the shipped model predates them, and a rerun of this recipe with them followed its prompts
# less often (README.md, "The default model"), so it was not shipped.
# A stage that was killed continues exactly where it stopped: python train_X.py --out OUT/X --resume latest,
# then run the later stages by hand.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/emoji-tiny}
DATA=${DATA:-data/emoji}
BASE=${BASE:-data/emoji-base}
SHIP=${SHIP:-models/emoji-tiny}

# 1. Data: 64×64 renders of Noto Color Emoji with CLDR names; a fixed ~5 % held-out split. The VAE and CLIP see
#    every emoji; the UNet sees the default-tone ones only: skin-tone variants are half of the data but near copies
#    of each other, and leaving them out doubles how often the UNet sees each distinct emoji in its hour.
[ -f "$DATA/train/metadata.jsonl" ] || python -m ldm emoji "$DATA" --size 64
[ -f "$BASE/train/metadata.jsonl" ] || python -m ldm emoji "$BASE" --size 64 --no-skin-tones

# 2. VAE (~30 min): L1 + KL 1e-6, bf16 autocast, EMA; measures the latent scaling factor at the end. Batches of 8:
#    as many images per second as batches of 16 here, twice the updates, +1.3 dB in a side-by-side run.
python train_vae.py --config configs/runs/emoji-tiny-vae.yaml --data "$DATA/train" --eval-data "$DATA/test" \
    --out "$OUT/vae"

# 3. CLIP (~14 min): contrastive text + image towers; the text tower goes into the bundle.
python train_clip.py --config configs/runs/emoji-tiny-clip.yaml --bundle "$OUT/vae/bundle" --data "$DATA/train" \
    --eval-data "$DATA/test" --out "$OUT/clip"

# 4. UNet (~60 min): ε-prediction, Min-SNR-5, 10 % caption dropout, cached latents and text embeddings. fp32
#    trains this small UNet 1.31× faster than bf16 autocast on this CPU (BENCHMARKS.md), and batches of 32 pass as
#    many images per second as batches of 64: twice the updates in the hour. The learning rate anneals on the clock.
python train_unet.py --config configs/runs/emoji-tiny-unet.yaml --bundle "$OUT/clip/bundle" --data "$BASE/train" \
    --eval-data "$BASE/test" --out "$OUT/unet" --cache-dir "$OUT/cache"

# 5. Ship: fp16 weights, under 32 MB with the tokenizer. The full CLIP (image tower too) stays in $OUT/clip for
#    python -m ldm eval --clip $OUT/clip/clip.safetensors.
python -m ldm bundle convert "$OUT/unet/bundle" "$SHIP" --dtype fp16 --no-extras --name emoji-tiny --force

# 6. Tiny autoencoder (~40 min, after ~20 min caching the VAE's outputs): distilled from the shipped VAE on the
#    default-tone emoji and written into $SHIP in place (tiny_vae/, fp16): the server's previews and
#    generate.py --tiny-vae decode with it. The other files and the bundle hash stay as they are. The shipped one
#    ran with OMP_NUM_THREADS=1 on a machine shared with other jobs, where two threads spin at their barriers.
python train_tiny_vae.py --config configs/runs/emoji-tiny-tiny_vae.yaml --bundle "$SHIP" --data "$BASE/train" \
    --eval-data "$BASE/test" --out "$OUT/tiny-vae"
python -m ldm bundle info "$SHIP"
