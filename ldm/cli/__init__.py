"""The commands: each module turns argv into typed arguments for the library and errors into exit codes.

``python -m ldm COMMAND ...`` (or the installed ``ldm COMMAND ...``) runs one of :data:`COMMANDS`; the root scripts
``generate.py``, ``train_vae.py``, ``train_clip.py``, ``train_unet.py``, ``train_lcm.py`` and ``train_tiny_vae.py`` run
theirs directly.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {  # command → (module, what it does)
    "generate": ("ldm.cli.generate", "text to images with a model bundle"),
    "train-vae": ("ldm.cli.train_vae", "train or fine-tune the autoencoder"),
    "train-clip": ("ldm.cli.train_clip", "train the CLIP text encoder"),
    "train-unet": ("ldm.cli.train_unet", "train or fine-tune the UNet, or a LoRA of it"),
    "train-lcm": ("ldm.cli.train_lcm", "distil a UNet into a few-step consistency model or an LCM-LoRA"),
    "train-tiny-vae": ("ldm.cli.train_tiny_vae", "distil a tiny autoencoder from a bundle's VAE, into the bundle"),
    "bundle": ("ldm.cli.bundle", "create, inspect, export, convert and import model bundles"),
    "upscale": ("ldm.cli.upscale", "upscale images with a latent upscaler bundle"),
    "vae": ("ldm.cli.vae", "encode, decode, round-trip and evaluate with a bundle's VAE"),
    "eval": ("ldm.cli.evaluate", "CLIP score, FID/KID and VAE reconstructions of a bundle or of images"),
    "data": ("ldm.cli.data", "check a captioned image folder, or write it as webdataset shards"),
    "emoji": ("ldm.cli.emoji", "render the emoji dataset"),
    "serve": ("ldm.cli.serve", "an A1111-compatible HTTP API and web page"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return "usage: python -m ldm COMMAND [ARGS ...]\n\ncommands:\n" + "\n".join(lines) + "\n"


def main() -> None:
    """Run ``sys.argv[1]``'s command with the rest of argv (only that command's module is imported)."""
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(usage(), end="")
        raise SystemExit(0 if len(sys.argv) >= 2 else 2)
    name = sys.argv[1]
    if name not in COMMANDS:
        print(f"error: no command {name!r}; choose one of {', '.join(COMMANDS)} (see python -m ldm --help)",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    module = importlib.import_module(COMMANDS[name][0])
    sys.argv = [f"ldm {name}", *sys.argv[2:]]
    module.entry()
