import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the test suite may reach a model hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Under pytest-xdist (the README runs the suite with -n auto) the workers share the CPU's cores rather than each
# starting a thread per core and fighting for them; set before torch is imported, so torch and the CLIs the tests
# start in subprocesses see it.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

from dataclasses import replace  # noqa: E402 (after the thread count is set)

import pytest  # noqa: E402

from ldm.formats.bundle import create_bundle, save_bundle  # noqa: E402
from ldm.formats.diffusers import export_diffusers  # noqa: E402
from ldm.models.presets import PRESETS  # noqa: E402


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: a worker per CPU, at most 8 (each holds its own session fixtures and a few models in memory)."""
    return max(1, min(os.cpu_count() or 1, 8))


@pytest.fixture(scope="session", autouse=True)
def private_conversion_cache(tmp_path_factory):
    """Single-file models convert into a cache (``$LDM_CACHE_DIR``, else ``~/.cache/ldm``): the tests use their own,
    so they neither read a user's nor race another worker's."""
    from ldm.formats.single_file import CACHE_ENV

    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("ldm-cache"))
    yield
    if previous is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = previous


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
