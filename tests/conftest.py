import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the test suite may reach a model hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from dataclasses import replace

import pytest

from ldm.formats.bundle import create_bundle, save_bundle
from ldm.formats.diffusers import export_diffusers
from ldm.models.presets import PRESETS


@pytest.fixture(scope="session")
def micro_bundle_dir(tmp_path_factory):
    """A randomly initialised ``micro`` bundle on disk, shared by the session (treat as read-only)."""
    folder = tmp_path_factory.mktemp("bundles") / "micro"
    save_bundle(create_bundle(PRESETS["micro"], seed=0, name="micro"), folder)
    return folder


@pytest.fixture(scope="session")
def micro_tiny_bundle_dir(micro_bundle_dir, tmp_path_factory):
    """The ``micro`` bundle with a randomly initialised tiny autoencoder (the ``micro`` tiny preset) added (read-only)."""
    import shutil

    import torch

    from ldm.formats.bundle import add_tiny_vae
    from ldm.models.presets import get_tiny_preset
    from ldm.models.tiny_autoencoder import build_tiny_autoencoder

    folder = tmp_path_factory.mktemp("bundles") / "micro-tiny"
    shutil.copytree(micro_bundle_dir, folder)
    torch.manual_seed(0)
    add_tiny_vae(folder, build_tiny_autoencoder(get_tiny_preset("micro", latent_channels=4)))
    return folder


@pytest.fixture(scope="session")
def micro_f4_bundle_dir(tmp_path_factory):
    """The ``micro`` bundle with a three-level VAE: 4 pixels per latent cell, where every preset has 8 (read-only)."""
    micro = PRESETS["micro"]
    config = replace(micro, vae=replace(micro.vae, block_out_channels=(8, 16, 16)))
    folder = tmp_path_factory.mktemp("bundles") / "micro-f4"
    save_bundle(create_bundle(config, seed=0, name="micro-f4"), folder)
    return folder


@pytest.fixture(scope="session")
def micro_diffusers_dir(micro_bundle_dir, tmp_path_factory):
    from ldm.formats.bundle import load_bundle

    folder = tmp_path_factory.mktemp("exports") / "micro-diffusers"
    export_diffusers(load_bundle(micro_bundle_dir), folder)
    return folder


@pytest.fixture
def cxx_compiler():
    """Skips the test where torch.compile cannot build CPU kernels (no C++ compiler on the PATH)."""
    import shutil

    if not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        pytest.skip("torch.compile on CPU needs a C++ compiler")
