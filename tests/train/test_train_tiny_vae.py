"""train_tiny_vae.py on the micro bundle: it resumes exactly, learns, writes the tiny autoencoder into the bundle and
refuses bad runs before training."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from ldm.cli import train_tiny_vae
from ldm.cli.common import run_cli
from ldm.data import DataConfig
from ldm.formats.bundle import TINY_VAE_WEIGHTS, load_bundle, read_manifest
from ldm.io import sha256_file
from ldm.models.presets import get_tiny_preset
from ldm.models.tiny_autoencoder import build_tiny_autoencoder
from ldm.train.losses import PerceptualLoss
from ldm.train.tiny_vae import compare_decoders


@pytest.fixture(scope="module")
def discs(tmp_path_factory):
    """12 captioned 64×64 coloured discs on white."""
    root = tmp_path_factory.mktemp("discs")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    rows = []
    for i in range(12):
        image = np.full((64, 64, 3), 255, np.uint8)
        cy, cx, r = rng.integers(20, 44), rng.integers(20, 44), rng.integers(8, 18)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = rng.integers(0, 256, 3)
        Image.fromarray(image).save(root / f"{i:02d}.png")
        rows.append(json.dumps({"file_name": f"{i:02d}.png", "text": "disc"}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def bundle(micro_bundle_dir, tmp_path):
    """A copy of the micro bundle: the run writes into it."""
    return shutil.copytree(micro_bundle_dir, tmp_path / "micro")


def args(bundle, data, out, *extra):
    return ["--bundle", str(bundle), "--preset", "micro", "--data", str(data), "--out", str(out),
            "--set", "train.batch_size=4", "--set", "train.log_every=1", *extra]  # fmt: skip


def checkpoint_tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable


def test_resume_is_exact(discs, micro_bundle_dir, tmp_path):
    common = ["--set", "train.ema_decay=0.9", "--set", "train.checkpoint_every=100", "--cache-dir", tmp_path / "cache"]
    for name in ("straight", "split"):
        shutil.copytree(micro_bundle_dir, tmp_path / name / "bundle")
    straight, split = tmp_path / "straight", tmp_path / "split"

    def train(folder, *extra):
        return run_cli(train_tiny_vae.main, [str(a) for a in args(folder / "bundle", discs, folder / "run", *extra)])

    assert train(straight, "--max-steps", "4", *common) == 0
    assert train(split, "--max-steps", "2", *common) == 0
    assert train(split, "--max-steps", "4", "--resume", "latest", *common) == 0
    a = checkpoint_tensors(straight / "run" / "checkpoints" / "step-00000004.safetensors")
    b = checkpoint_tensors(split / "run" / "checkpoints" / "step-00000004.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("s.optimizers.tiny_vae.state.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert sha256_file(straight / "bundle" / TINY_VAE_WEIGHTS) == sha256_file(split / "bundle" / TINY_VAE_WEIGHTS)


def test_it_learns_and_goes_into_the_bundle(discs, bundle, micro_bundle_dir, tmp_path):
    out = tmp_path / "run"
    assert run_cli(train_tiny_vae.main, args(bundle, discs, out, "--max-steps", "30", "--eval-data", str(discs),
                                             "--set", "train.lr=3e-3")) == 0  # fmt: skip
    after = json.loads((out / "eval.json").read_text())
    teacher = load_bundle(micro_bundle_dir)
    torch.manual_seed(0)  # as the run starts: the tiny autoencoder before training
    before = compare_decoders(teacher, build_tiny_autoencoder(get_tiny_preset("micro", latent_channels=4)),
                              DataConfig(path=str(discs), resolution=64))  # fmt: skip
    assert after["count"] == 12 and after["decoder_psnr"] > before["decoder_psnr"] + 3  # dB
    assert after["encoder_rmse"] < before["encoder_rmse"]
    written = load_bundle(bundle)
    assert written.tiny_vae is not None and read_manifest(bundle)["hash"] == read_manifest(micro_bundle_dir)["hash"]
    assert list((out / "samples").glob("tiny-vae-*.png"))


def test_the_perceptual_term_is_used_when_given(discs, bundle, tmp_path, capsys):
    weights = PerceptualLoss().save(tmp_path / "vgg.safetensors")
    out = tmp_path / "run"
    assert run_cli(train_tiny_vae.main, args(bundle, discs, out, "--max-steps", "1", "--set", "train.batch_size=2",
                                             "--set", f"loss.perceptual_weights={weights}")) == 0  # fmt: skip
    assert "loss/perceptual" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--name", "x"], "this one writes into --bundle, which keeps its name"),
        (["--set", "data.center_crop=false"], "trains on the VAE's cached centre crops"),
        (["--set", "model.latent_channels=8"], "has 8 latent channels and factor 8, the VAE 4 and 8"),
        (["--resolution", "60"], "the resolution must be a positive multiple of 8, got 60"),
    ],
)
def test_bad_runs_fail_before_training(discs, bundle, tmp_path, capsys, extra, message):
    assert run_cli(train_tiny_vae.main, args(bundle, discs, tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists() and not (bundle / "tiny_vae").exists()


def test_training_the_vae_again_leaves_the_tiny_autoencoder_out(discs, micro_tiny_bundle_dir, tmp_path, capsys):
    from ldm.cli import train_vae

    argv = ["--init-from", str(micro_tiny_bundle_dir), "--data", str(discs), "--out", str(tmp_path / "vae"),
            "--max-steps", "1", "--set", "train.batch_size=4", "--set", "scale_samples=4"]  # fmt: skip
    assert run_cli(train_vae.main, argv) == 0
    assert "the bundle's tiny autoencoder is left out of the new bundle, which it no longer fits" in capsys.readouterr().out
    assert load_bundle(tmp_path / "vae" / "bundle").tiny_vae is None
