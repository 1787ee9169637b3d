"""generate.py --vae: the autoencoder swapped at generation time, recorded in A1111's keys, checked before work."""

import numpy as np
import pytest
from PIL import Image

from ldm.cli import generate
from ldm.cli.common import run_cli
from ldm.formats.bundle import create_bundle, load_bundle, save_bundle
from ldm.formats.diffusers import export_diffusers
from ldm.formats.pngmeta import ImageParameters, read_png_parameters
from ldm.io import sha256_file
from ldm.models.autoencoder import AutoencoderConfig, build_autoencoder
from ldm.models.presets import PRESETS

COMMON = ["red apple", "--seed", "3", "--steps", "2", "--quiet"]


def run(argv):
    return run_cli(generate.main, [str(a) for a in argv])


def pixels(folder):
    (png,) = folder.glob("0*.png")
    return png, np.asarray(Image.open(png).convert("RGB"))


@pytest.fixture(scope="module")
def other_vae(tmp_path_factory):
    """The VAE folder of another micro model (other weights, same latents), and a bundle of the shared micro model
    with that VAE in place of its own: what --vae should make."""
    root = tmp_path_factory.mktemp("vae")
    other = create_bundle(PRESETS["micro"], seed=5)
    export_diffusers(other, root / "other")
    return root / "other" / "vae", other.vae


@pytest.mark.slow
def test_vae_swaps_the_autoencoder_and_is_recorded(micro_bundle_dir, other_vae, tmp_path, capsys):
    folder, vae = other_vae
    swapped = load_bundle(micro_bundle_dir)
    swapped.vae = vae
    save_bundle(swapped, tmp_path / "swapped")
    assert run([*COMMON, "--model", micro_bundle_dir, "--vae", folder, "--out", tmp_path / "with"]) == 0
    assert run([*COMMON, "--model", tmp_path / "swapped", "--out", tmp_path / "expected"]) == 0
    assert run([*COMMON, "--model", micro_bundle_dir, "--out", tmp_path / "own"]) == 0
    png, ours = pixels(tmp_path / "with")
    assert np.array_equal(ours, pixels(tmp_path / "expected")[1])
    assert not np.array_equal(ours, pixels(tmp_path / "own")[1])
    recorded = ImageParameters.from_text(read_png_parameters(png))
    assert recorded.vae == "vae"
    assert recorded.vae_hash == sha256_file(folder / "diffusion_pytorch_model.safetensors")[:10]
    assert ImageParameters.from_text(read_png_parameters(pixels(tmp_path / "own")[0])).vae is None
    capsys.readouterr()

    # --from-png: the same pixels with the VAE given again; a warning where it is not
    assert run(["--from-png", png, "--model", micro_bundle_dir, "--vae", folder, "--out", tmp_path / "again", "--quiet"]) == 0
    assert np.array_equal(pixels(tmp_path / "again")[1], ours) and "warning" not in capsys.readouterr().err
    assert run(["--from-png", png, "--model", micro_bundle_dir, "--out", tmp_path / "bare", "--quiet"]) == 0
    assert f"{png} was made with VAE vae (hash {recorded.vae_hash}); pass --vae FILE" in capsys.readouterr().err
    assert run(["--from-png", png, "--model", micro_bundle_dir, "--vae", micro_bundle_dir, "--out", tmp_path / "x",
                "--quiet"]) == 0  # fmt: skip
    assert f"made with VAE hash {recorded.vae_hash}, this VAE is" in capsys.readouterr().err


def test_vae_flags_are_checked_before_any_work(micro_bundle_dir, micro_f4_bundle_dir, tmp_path, capsys):
    from safetensors.torch import save_file

    # SD's VAE shape at a reduced width (SD's 32 norm groups, which a bare file is read with): micro's latents
    config = AutoencoderConfig(block_out_channels=(32, 32, 64, 64), scaling_factor=0.18215)
    vae = build_autoencoder(config)
    vae.save_pretrained(tmp_path / "folder")
    bare = tmp_path / "bare.safetensors"
    save_file(vae.state_dict(), str(bare))
    out = tmp_path / "out"
    cases = [
        (["--vae", micro_f4_bundle_dir], "has 4 pixels per latent cell, the model 8; pass a VAE made for this model"),
        (["--vae-scaling-factor", "0.2"], "--vae-scaling-factor states the factor of a --vae; pass --vae FILE too"),
        (["--vae", tmp_path / "none.safetensors"], "no VAE at"),
        (["--vae", bare], "does not say its scaling factor"),
        (["--vae", micro_bundle_dir, "--vae-scaling-factor", "nan"], "--vae-scaling-factor must be a positive number"),
    ]
    for flags, message in cases:
        assert run([*COMMON, "--model", micro_bundle_dir, "--out", out, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
        assert not out.exists()
    # stated, the bare file's factor is taken: the same weights as its folder, so the same pixels
    assert run([*COMMON, "--model", micro_bundle_dir, "--out", tmp_path / "a", "--vae", bare,
                "--vae-scaling-factor", "0.18215"]) == 0  # fmt: skip
    assert run([*COMMON, "--model", micro_bundle_dir, "--out", tmp_path / "b", "--vae", tmp_path / "folder"]) == 0
    assert np.array_equal(pixels(tmp_path / "a")[1], pixels(tmp_path / "b")[1])
