"""The whole chain on the micro preset: train_vae → train_clip → train_unet → generate.py."""

import json

import numpy as np
import pytest
from PIL import Image

from ldm.cli import generate, train_clip, train_unet, train_vae
from ldm.cli.common import run_cli
from ldm.formats.bundle import load_bundle


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """16 captioned 64×64 pictures: a coloured square on white."""
    root = tmp_path_factory.mktemp("pictures")
    rows, rng = [], np.random.default_rng(1)
    for i in range(16):
        image = np.full((64, 64, 3), 255, np.uint8)
        y, x = rng.integers(8, 40, 2)
        colour = ("red", "blue")[i % 2]
        image[y : y + 16, x : x + 16] = (220, 30, 30) if colour == "red" else (30, 30, 220)
        Image.fromarray(image).save(root / f"{i:02d}.png")
        rows.append(json.dumps({"file_name": f"{i:02d}.png", "text": f"{colour} square"}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.slow
def test_train_every_part_then_generate(pictures, tmp_path):
    common = ["--data", str(pictures), "--max-steps", "2", "--set", "train.batch_size=4"]
    assert run_cli(train_vae.main, ["--preset", "micro", "--out", str(tmp_path / "vae"), *common]) == 0
    clip_args = ["--bundle", str(tmp_path / "vae" / "bundle"), "--out", str(tmp_path / "clip"), "--resolution", "32",
                 "--set", "model.vision.width=32", "--set", "model.vision.layers=1", "--set", "model.vision.heads=2",
                 "--set", "model.embed_dim=32", *common]  # fmt: skip
    assert run_cli(train_clip.main, clip_args) == 0
    unet_args = ["--bundle", str(tmp_path / "clip" / "bundle"), "--out", str(tmp_path / "unet"),
                 "--set", "validation.steps=2", *common]  # fmt: skip
    assert run_cli(train_unet.main, unet_args) == 0

    vae_bundle, clip_bundle, final = (load_bundle(tmp_path / p / "bundle") for p in ("vae", "clip", "unet"))
    assert vae_bundle.name == clip_bundle.name == final.name == "micro"  # the preset's name, kept by each stage
    # Each stage replaced its own part and carried the others over.
    assert final.config.vae.scaling_factor == vae_bundle.config.vae.scaling_factor != 1.0
    for part, source in (("vae", vae_bundle), ("text_encoder", clip_bundle)):
        a, b = final.modules()[part].state_dict(), source.modules()[part].state_dict()
        assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a), part
    unet_before, unet_after = clip_bundle.unet.state_dict(), final.unet.state_dict()
    assert any(not np.array_equal(unet_before[k].numpy(), unet_after[k].numpy()) for k in unet_before)

    out = tmp_path / "images"
    argv = ["red square", "--model", str(tmp_path / "unet" / "bundle"), "--steps", "2", "--seed", "0", "--out", str(out), "--quiet"]
    assert run_cli(generate.main, argv) == 0
    (png,) = out.glob("0*.png")
    assert Image.open(png).size == (64, 64)
