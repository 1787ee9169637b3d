"""generate.py --tiny-vae: the final decode by the bundle's tiny autoencoder, recorded in A1111's "VAE Decoder" key,
repeated by --from-png, and refused before any work where the bundle has none."""

import numpy as np
import pytest
from PIL import Image

from ldm.cli import generate
from ldm.cli.common import run_cli
from ldm.formats.pngmeta import ImageParameters, read_png_parameters

COMMON = ["red apple", "--seed", "3", "--steps", "2", "--quiet"]


def run(argv):
    return run_cli(generate.main, [str(a) for a in argv])


def pixels(folder):
    (png,) = folder.glob("0*.png")
    return png, np.asarray(Image.open(png).convert("RGB"))


def test_tiny_vae_decodes_and_is_recorded_and_repeated(micro_tiny_bundle_dir, tmp_path, capsys):
    assert run([*COMMON, "--model", micro_tiny_bundle_dir, "--tiny-vae", "--out", tmp_path / "tiny"]) == 0
    assert run([*COMMON, "--model", micro_tiny_bundle_dir, "--out", tmp_path / "full"]) == 0
    png, tiny = pixels(tmp_path / "tiny")
    full_png, full = pixels(tmp_path / "full")
    assert not np.array_equal(tiny, full)
    assert "VAE Decoder: TAESD" in read_png_parameters(png)
    assert ImageParameters.from_text(read_png_parameters(png)).tiny_vae
    assert "VAE Decoder" not in read_png_parameters(full_png)

    assert run(["--from-png", png, "--model", micro_tiny_bundle_dir, "--out", tmp_path / "again", "--quiet"]) == 0
    assert np.array_equal(pixels(tmp_path / "again")[1], tiny)
    assert run(["--from-png", png, "--model", micro_tiny_bundle_dir, "--no-tiny-vae", "--out", tmp_path / "undone",
                "--quiet"]) == 0  # fmt: skip
    assert np.array_equal(pixels(tmp_path / "undone")[1], full)
    capsys.readouterr()


def test_a_bundle_without_one_is_refused_before_any_work(micro_bundle_dir, micro_tiny_bundle_dir, tmp_path, capsys):
    assert run([*COMMON, "--model", micro_bundle_dir, "--tiny-vae", "--out", tmp_path / "no"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no tiny autoencoder; distil one into it with `python train_tiny_vae.py " \
        f"--bundle {micro_bundle_dir} --data IMAGES" in err and "drop --tiny-vae" in err  # fmt: skip
    assert not (tmp_path / "no").exists()

    assert run([*COMMON, "--model", micro_tiny_bundle_dir, "--tiny-vae", "--out", tmp_path / "tiny"]) == 0
    png, _ = pixels(tmp_path / "tiny")
    capsys.readouterr()
    assert run(["--from-png", png, "--model", micro_bundle_dir, "--out", tmp_path / "again", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{png} was decoded by a tiny autoencoder (VAE Decoder: TAESD), but the model" in err
    assert "pass --no-tiny-vae" in err

    assert run([*COMMON, "--model", micro_tiny_bundle_dir, "--tiny-vae", "--vae", micro_bundle_dir,
                "--out", tmp_path / "both"]) == 2  # fmt: skip
    assert "--vae swaps in another autoencoder; pass one of the two" in capsys.readouterr().err


@pytest.mark.parametrize("value, tiny", [("TAESD", True), ("Full", False)])
def test_a1111s_vae_decoder_key_is_read(value, tiny):
    text = f"x\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, VAE Decoder: {value}"
    parameters = ImageParameters.from_text(text)
    assert parameters.tiny_vae is tiny and parameters.extra == ()
    assert ImageParameters.from_text(parameters.text()) == parameters
