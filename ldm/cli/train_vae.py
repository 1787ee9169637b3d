"""Train the KL autoencoder of a preset, or fine-tune a bundle's VAE, and write the result into a bundle.

    python train_vae.py --preset emoji-tiny --data data/emoji/train --eval-data data/emoji/test \\
        --out runs/vae-emoji --max-minutes 30
    python train_vae.py --config configs/runs/emoji-tiny-vae.yaml --out runs/vae-emoji
    python train_vae.py --out runs/vae-emoji --resume latest            # continue exactly where it stopped
    python train_vae.py --init-from models/emoji-tiny --decoder-only --data my/images --out runs/ft

The run itself (the loss, the scaling factor, what is written) is ``ldm.train.vae``; this module turns argv into its
:class:`~ldm.train.vae.VAERunConfig`: a ``--config`` file or the flags, then the flags that override, then ``--set``.
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
from ldm.models.presets import PRESETS
from ldm.train.vae import VAERunConfig, check_config, run, with_model


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="train_vae.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), help="model preset to train from scratch")
    p.add_argument("--init-from", help="bundle whose VAE to fine-tune")
    p.add_argument("--decoder-only", action="store_true", help="with --init-from: train the decoder only")
    add_run_arguments(p, eval_help="held-out image folder for PSNR/SSIM at the end",
                      out_help="output folder: checkpoints/, samples/, logs/, bundle/")  # fmt: skip
    return p


def resolve_config(args) -> VAERunConfig:
    """Config file, else flags; a resumed run reads the config its checkpoints were written with. The flags given
    and then ``--set`` override it."""
    return resolve_run_config(VAERunConfig, args, from_flags=config_from_flags, with_source=with_source_flags,
                              with_model=with_model, check=check_config)  # fmt: skip


def with_source_flags(cfg: VAERunConfig, args) -> VAERunConfig:
    """What the run starts from, as the flags say: --preset or --init-from (either replaces the other), and
    --decoder-only."""
    if args.preset and args.init_from:
        raise LdmError("pass --preset NAME (a new autoencoder) or --init-from BUNDLE (fine-tune its VAE), not both")
    if args.preset:
        cfg = replace(cfg, preset=args.preset, init_from="")
    if args.init_from:
        cfg = replace(cfg, init_from=args.init_from, preset="")
    return replace(cfg, decoder_only=True) if args.decoder_only else cfg


def config_from_flags(args) -> VAERunConfig:
    """The run config of a new run given by flags alone: the preset's or bundle's model, at its size unless
    --resolution, with random flips."""
    if not args.data:
        raise LdmError("no training data; pass --data FOLDER (see `python -m ldm data check FOLDER`)")
    cfg = with_model(with_source_flags(VAERunConfig(data=DataConfig(path=args.data), eval_data=args.eval_data or ""),
                                       args))  # fmt: skip
    resolution = args.resolution or cfg.model.default_size
    return replace(cfg, data=DataConfig(path=args.data, resolution=resolution, center_crop=True, random_flip=0.5))


def main(argv=None) -> int:
    return train_main(argv, parser=build_parser(), resolve=resolve_config, run=run)


def entry() -> None:
    """The installed command and the root script: run with argv, exit with the status."""
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    entry()
