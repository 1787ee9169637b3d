"""The progress previews decode with the model's tiny autoencoder where it has one, else with its VAE."""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.formats.bundle import load_bundle
from ldm.images import signed_to_unit, to_uint8
from ldm.pipeline import decode
from ldm.serve.worker import Worker


@pytest.mark.parametrize("tiny", [True, False], ids=["tiny", "vae"])
def test_previews_decode_with_the_tiny_autoencoder_where_there_is_one(tiny, micro_bundle_dir, micro_tiny_bundle_dir):
    bundle = load_bundle(micro_tiny_bundle_dir if tiny else micro_bundle_dir)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    worker = Worker(out=None)
    worker._preview(bundle, latents)
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(worker._progress["preview"]))).convert("RGB"))
    with torch.no_grad():
        expected = to_uint8(signed_to_unit(decode(bundle, latents[:1], tiny=tiny)))[0].permute(1, 2, 0).numpy()
        other = to_uint8(signed_to_unit(decode(load_bundle(micro_tiny_bundle_dir), latents[:1], tiny=not tiny)))
    assert np.array_equal(shown, expected)
    assert not np.array_equal(shown, other[0].permute(1, 2, 0).numpy())
