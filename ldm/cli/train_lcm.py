"""Distil a bundle's UNet into a latent consistency model that samples in 1–8 steps, or into an LCM-LoRA.

    python train_lcm.py --teacher models/emoji-tiny --data data/emoji/train --out runs/lcm --max-steps 4000
    python train_lcm.py --teacher models/emoji-tiny --data data/emoji/train --out runs/lcm-lora --lora-rank 16
    python train_lcm.py --config configs/runs/emoji-tiny-lcm.yaml --teacher models/emoji-tiny --out runs/lcm
    python train_lcm.py --out runs/lcm --resume latest                  # continue exactly where it stopped

The student samples with ``generate.py --model runs/lcm/bundle --sampler lcm --steps 4``; the LCM-LoRA with
``generate.py --model TEACHER --lora runs/lcm-lora/lora.safetensors --sampler lcm --steps 4 --cfg 1``. The run
itself is ``ldm.train.lcm``; this module turns argv into its :class:`~ldm.train.lcm.LCMRunConfig`.
"""

from __future__ import annotations

from dataclasses import replace

from ldm.cli.common import ArgumentParser, run_cli
from ldm.cli.options import add_run_arguments, load_run_config, train_main, with_data_flags, with_run_flags
from ldm.config import apply_overrides
from ldm.data import DataConfig
from ldm.errors import LdmError
from ldm.train.lcm import LCMRunConfig, run
from ldm.train.unet import bundle_config, with_model


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="train_lcm.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", help="the bundle whose UNet is distilled (the student starts as it)")
    add_run_arguments(p, eval_help="held-out image folder (unused by distillation; accepted for symmetry)",
                      out_help="output folder: checkpoints/, samples/, logs/, cache/, bundle/ or lora.safetensors")  # fmt: skip
    p.add_argument("--lora-rank", type=int, help="distil into rank-R LoRA adapters on the teacher (an LCM-LoRA)")
    p.add_argument("--no-cache", action="store_true", default=None, help="encode images and captions every step")
    p.add_argument("--cache-dir", help="feature cache folder, shareable with train_unet.py runs (default OUT/cache)")
    p.add_argument("--validation-prompt", action="append", dest="validation_prompts", metavar="PROMPT",
                   help="prompt of the sample grids (repeatable; default: captions from the data)")  # fmt: skip
    return p


def resolve_config(args) -> LCMRunConfig:
    """Config file, else flags; a resumed run reads the config its checkpoints were written with. The flags given
    and then ``--set`` override it."""
    cfg = load_run_config(LCMRunConfig, args)
    if cfg is None:
        if not args.data:
            raise LdmError("no training data; pass --data FOLDER (see `python -m ldm data check FOLDER`)")
        if not args.teacher:
            raise LdmError("pass --teacher BUNDLE: the bundle whose UNet to distil (e.g. models/emoji-tiny)")
        model = bundle_config(args.teacher)
        cfg = LCMRunConfig(model=model, data=DataConfig(path=args.data, center_crop=True,
                           resolution=args.resolution or model.default_size), bundle=str(args.teacher))  # fmt: skip
        if args.lora_rank:  # an LCM-LoRA has no guidance input: its grids sample unguided, as it is used
            cfg = replace(cfg, validation=replace(cfg.validation, guidance_scale=1.0))
    elif args.config:
        cfg = with_data_flags(cfg, args)
        cfg = replace(cfg, bundle=args.teacher) if args.teacher else cfg
    cfg = with_run_flags(with_model(cfg), args)
    if args.lora_rank is not None:
        if args.lora_rank < 0:
            raise LdmError(f"--lora-rank must be ≥ 0 (0 = a full student), got {args.lora_rank}; try --lora-rank 16")
        cfg = replace(cfg, lora=replace(cfg.lora, rank=args.lora_rank))
    if args.no_cache:
        cfg = replace(cfg, cache=replace(cfg.cache, enabled=False))
    if args.cache_dir:
        cfg = replace(cfg, cache=replace(cfg.cache, dir=args.cache_dir))
    if args.validation_prompts:
        cfg = replace(cfg, validation=replace(cfg.validation, prompts=tuple(args.validation_prompts)))
    return apply_overrides(cfg, args.overrides)


def main(argv=None) -> int:
    return train_main(argv, parser=build_parser(), resolve=resolve_config, run=run)


def entry() -> None:
    """The installed command and the root script: run with argv, exit with the status."""
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    entry()
