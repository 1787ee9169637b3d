"""``python train_vae.py --help``: train or fine-tune the autoencoder. The command lives in ``ldm/cli/train_vae.py``."""

from ldm.cli.train_vae import entry

if __name__ == "__main__":
    entry()
