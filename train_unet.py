"""``python train_unet.py --help``: train or fine-tune the UNet, or a LoRA of it. The command lives in ``ldm/cli/train_unet.py``."""

from ldm.cli.train_unet import entry

if __name__ == "__main__":
    entry()
