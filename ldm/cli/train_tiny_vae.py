"""Distil a tiny autoencoder from a bundle's VAE and put it into the bundle (previews, ``generate.py --tiny-vae``).

    python train_tiny_vae.py --bundle models/emoji-tiny --preset emoji-tiny --data data/emoji/train \\
        --eval-data data/emoji/test --out runs/tiny-vae --budget-minutes 40
    python train_tiny_vae.py --config configs/runs/emoji-tiny-tiny_vae.yaml --bundle models/emoji-tiny --out runs/t
    python train_tiny_vae.py --out runs/tiny-vae --resume latest            # continue exactly where it stopped

The run itself (the targets, the loss, what is written) is ``ldm.train.tiny_vae``; this module turns argv into its
:class:`~ldm.train.tiny_vae.TinyVAERunConfig`: a ``--config`` file or the flags, then the flags that override, then
``--set``.
"""

from __future__ import annotations

from dataclasses import replace

from ldm.cli.common import ArgumentParser, run_cli
from ldm.cli.options import add_run_arguments, resolve_run_config, train_main
from ldm.data import DataConfig
from ldm.errors import LdmError
from ldm.formats.bundle import read_config
from ldm.models.presets import TINY_AUTOENCODER_PRESETS
from ldm.train.tiny_vae import TinyVAERunConfig, check_config, run, with_model


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="train_tiny_vae.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", help="the bundle whose VAE to distil; the tiny autoencoder is written into it")
    p.add_argument("--preset", choices=sorted(TINY_AUTOENCODER_PRESETS),
                   help="the tiny autoencoder's shape (default taesd; emoji-tiny for the 64-px default model)")  # fmt: skip
    p.add_argument("--cache-dir", help="folder of the cached VAE outputs, shareable between runs (default OUT/cache)")
    add_run_arguments(p, eval_help="held-out image folder: the tiny decoder against the full one at the end",
                      out_help="output folder: checkpoints/, samples/, logs/, cache/, eval.json")  # fmt: skip
    return p


def resolve_config(args) -> TinyVAERunConfig:
    """Config file, else flags; a resumed run reads the config its checkpoints were written with. The flags given
    and then ``--set`` override it."""
    if args.name is not None:
        raise LdmError("--name names a bundle a run writes; this one writes into --bundle, which keeps its name")
    cfg = resolve_run_config(TinyVAERunConfig, args, from_flags=config_from_flags, with_source=with_source_flags,
                             with_model=with_model, check=check_config)  # fmt: skip
    return replace(cfg, cache=replace(cfg.cache, dir=args.cache_dir)) if args.cache_dir else cfg


def with_source_flags(cfg: TinyVAERunConfig, args) -> TinyVAERunConfig:
    """--bundle and --preset over a config file's (a new preset replaces the file's model)."""
    if args.bundle:
        cfg = replace(cfg, bundle=args.bundle)
    return replace(cfg, preset=args.preset, model=None) if args.preset else cfg


def config_from_flags(args) -> TinyVAERunConfig:
    """The run config of a new run given by flags alone: the preset for the bundle's VAE, at the bundle's image
    size unless --resolution, with mirror images."""
    if not args.data:
        raise LdmError("no training data; pass --data FOLDER (see `python -m ldm data check FOLDER`)")
    if not args.bundle:
        raise LdmError("pass --bundle BUNDLE: the bundle whose VAE the tiny autoencoder learns from")
    resolution = args.resolution or read_config(args.bundle).default_size
    data = DataConfig(path=args.data, resolution=resolution, center_crop=True, random_flip=0.5)
    cfg = TinyVAERunConfig(bundle=args.bundle, data=data, eval_data=args.eval_data or "")
    return with_model(with_source_flags(cfg, args))


def main(argv=None) -> int:
    return train_main(argv, parser=build_parser(), resolve=resolve_config, run=run)


def entry() -> None:
    """The installed command and the root script: run with argv, exit with the status."""
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    entry()
