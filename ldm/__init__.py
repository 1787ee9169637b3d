"""ldm: latent text-to-image diffusion — a KL autoencoder, a CLIP text encoder and a cross-attention UNet."""

__version__ = "0.1.0"
