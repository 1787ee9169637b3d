"""``python train_lcm.py --help``: distil a UNet into a few-step latent consistency model or an LCM-LoRA. The command lives in ``ldm/cli/train_lcm.py``."""

from ldm.cli.train_lcm import entry

if __name__ == "__main__":
    entry()
