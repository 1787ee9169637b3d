"""Train a small CLIP from scratch on a captioned image folder and put its text tower into a bundle.

    python train_clip.py --bundle runs/vae-emoji/bundle --data data/emoji/train --eval-data data/emoji/test \\
        --out runs/clip-emoji --max-steps 2000 --max-minutes 55 --set train.warmup_steps=100
    python train_clip.py --config configs/runs/emoji-tiny-clip.yaml --bundle runs/vae-emoji/bundle --out runs/clip
    python train_clip.py --out runs/clip-emoji --resume latest           # continue exactly where it stopped
    python train_clip.py --preset emoji-tiny --data data/emoji/train --out runs/clip-emoji   # no bundle yet

The run itself (the model, the loss, OUT/bundle, OUT/clip.safetensors, OUT/eval.json) is ``ldm.train.clip``; this
module turns argv into its :class:`~ldm.train.clip.CLIPRunConfig`: a ``--config`` file or the flags, then the flags
that override, then ``--set``.
"""

from __future__ import annotations

from dataclasses import replace

from ldm.cli.common import ArgumentParser, run_cli
from ldm.cli.options import (
    add_run_arguments,
    resolve_run_config,
    train_main,
)
from ldm.data import DataConfig
from ldm.errors import LdmError
from ldm.train.clip import CLIPRunConfig, check_config, run, source_model, with_model

__all__ = ["build_parser", "main", "resolve_config"]


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="train_clip.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", help="bundle whose text encoder to train (its VAE and UNet are carried over)")
    p.add_argument("--preset", help="take the text config from a preset when there is no bundle yet")
    add_run_arguments(p, eval_help="held-out image folder for retrieval accuracy",
                      out_help="output folder: checkpoints/, logs/, bundle/, clip.safetensors, eval.json")  # fmt: skip
    return p


def resolve_config(args) -> CLIPRunConfig:
    """Config file, else flags; a resumed run reads the config its checkpoints were written with. The flags given
    and then ``--set`` override it."""
    return resolve_run_config(CLIPRunConfig, args, from_flags=config_from_flags, with_source=with_source_flags,
                              with_model=with_model, check=check_config)  # fmt: skip


def with_source_flags(cfg: CLIPRunConfig, args) -> CLIPRunConfig:
    """What the run starts from, as the flags say: --bundle or --preset (either replaces the other)."""
    if args.bundle and args.preset:
        raise LdmError("pass --bundle BUNDLE or --preset NAME, not both (a bundle already fixes the text config)")
    if args.bundle:
        cfg = replace(cfg, bundle=args.bundle, preset="")
    if args.preset:
        cfg = replace(cfg, preset=args.preset, bundle="")
    return cfg


def config_from_flags(args) -> CLIPRunConfig:
    """The run config of a new run given by flags alone: the text tower of the bundle's (or preset's) text encoder,
    at the model's size unless --resolution."""
    if not args.data:
        raise LdmError("no training data; pass --data FOLDER (see `python -m ldm data check FOLDER`)")
    cfg = with_source_flags(CLIPRunConfig(data=DataConfig(path=args.data), eval_data=args.eval_data or ""), args)
    resolution = args.resolution or source_model(cfg).default_size
    return replace(cfg, data=DataConfig(path=args.data, resolution=resolution, center_crop=True))


def main(argv=None) -> int:
    return train_main(argv, parser=build_parser(), resolve=resolve_config, run=run)


def entry() -> None:
    """The installed command and the root script: run with argv, exit with the status."""
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    entry()
