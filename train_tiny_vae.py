"""``python train_tiny_vae.py --help``: distil a tiny autoencoder from a bundle's VAE. The command lives in
``ldm/cli/train_tiny_vae.py``."""

from ldm.cli.train_tiny_vae import entry

if __name__ == "__main__":
    entry()
