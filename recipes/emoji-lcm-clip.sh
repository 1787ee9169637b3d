#!/usr/bin/env bash
# CLIP score, FID and KID of the shipped LCM-LoRA (models/lora/emoji-tiny-lcm.safetensors) beside its 20-step
# teacher, models/emoji-tiny: docs/emoji-lcm-clip.json (docs/eval_lcm_clip.py: `python -m ldm eval` per setting,
# same prompts, seeds and CLIP).
#
#     bash recipes/emoji-lcm-clip.sh                     # CLIP 42 min, eval ~60 min on 2 busy cores
#     CLIP=path/clip.safetensors bash recipes/emoji-lcm-clip.sh   # score with a CLIP already trained
#     bash recipes/emoji-lcm-clip.sh --student runs/emoji-lcm/student/bundle --out ... --json ...   # flags pass on
#
# The judge is a CLIP trained apart from the generator: emoji-tiny's own CLIP recipe (configs/runs/emoji-tiny-clip.yaml,
# stage 3 of recipes/emoji-tiny.sh) with another seed, so its text tower is not the text encoder the images were
# conditioned on; it runs its 1,000 steps whatever the clock (--max-minutes 0). models/emoji-tiny serves only for its
# text-encoder shape and tokenizer (the CLIP starts from random weights). It is not shipped: the recipe trains it.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-data/emoji}
BASE=${BASE:-data/emoji-base}
OUT=${OUT:-runs/emoji-lcm}
CLIP=${CLIP:-$OUT/clip/clip.safetensors}

# 1. Data: every emoji for the CLIP (as emoji-tiny's CLIP saw them); the default-tone held-out ones as the reference.
[ -f "$DATA/train/metadata.jsonl" ] || python -m ldm emoji "$DATA" --size 64
[ -f "$BASE/train/metadata.jsonl" ] || python -m ldm emoji "$BASE" --size 64 --no-skin-tones

# 2. The judging CLIP.
if [ ! -f "$CLIP" ]; then
    python train_clip.py --config configs/runs/emoji-tiny-clip.yaml --bundle models/emoji-tiny --data "$DATA/train" \
        --eval-data "$DATA/test" --out "$(dirname "$CLIP")" --max-minutes 0 --set train.seed=1
fi

# 3. The teacher at 20 and 4 steps (DPM++ 2M, CFG 7.5) and the LCM-LoRA at 4, 2 and 1 steps (LCM, CFG 1): 100 eval
#    prompts × 2 seeds each, FID/KID against the 88 held-out default-tone emoji on the CLIP's image embeddings.
python docs/eval_lcm_clip.py --clip "$CLIP" --reference "$BASE/test" --out "$OUT/eval" "$@"
