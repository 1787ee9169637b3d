"""The shipped default model, models/emoji-tiny: small, intact, and generate.py uses it with no model flag."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.cli import generate
from ldm.cli.common import run_cli
from ldm.formats.bundle import load_bundle

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "models" / "emoji-tiny"
SIZE_LIMIT = 32 * 10**6  # bytes, everything in the folder

pytestmark = pytest.mark.skipif(not (DEFAULT / "manifest.json").is_file(), reason="no shipped model in this checkout")


def test_bundle_is_small_fp16_and_intact():
    assert sum(f.stat().st_size for f in DEFAULT.rglob("*") if f.is_file()) <= SIZE_LIMIT
    bundle = load_bundle(DEFAULT)  # checks every file's sha256
    for module in bundle.modules().values():
        assert {p.dtype for p in module.parameters()} == {torch.float16}
    assert bundle.config.vae.scaling_factor != 1.0  # measured by train_vae.py, not the preset's placeholder
    assert bundle.name == "emoji-tiny"  # what every PNG it makes records as "Model"


def test_generates_with_no_model_flag(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the shipped model is found from the package, not from the working directory
    out = tmp_path / "out"
    assert run_cli(generate.main, ["red apple", "banana", "--steps", "8", "--seed", "0", "--out", str(out), "--quiet"]) == 0
    apple, banana = (np.asarray(Image.open(f).convert("RGB"), dtype=float) for f in sorted(out.glob("*.png")))
    assert apple.shape == banana.shape == (64, 64, 3)

    def ink(image):  # mean colour where the picture is not the white background
        mask = image.min(axis=-1) < 200
        assert mask.mean() > 0.1, "the image is (almost) empty"
        return image[mask].mean(axis=0)

    r, g, b = ink(apple)
    assert r > g + 40 and r > b + 40, f"red apple is not red: mean ink colour {r:.0f}, {g:.0f}, {b:.0f}"
    r, g, b = ink(banana)
    assert min(r, g) > b + 40, f"banana is not yellow: mean ink colour {r:.0f}, {g:.0f}, {b:.0f}"


@pytest.mark.slow
@pytest.mark.parametrize("command", [["generate.py"], ["-m", "ldm", "generate"]], ids=["root-script", "python-m-ldm"])
def test_the_commands_find_the_shipped_model_from_any_folder(tmp_path, command):
    """As a user runs them: from another folder, by the script's path, and as ``python -m ldm`` (installed)."""
    argv = [str(ROOT / command[0]), *command[1:]] if command[0].endswith(".py") else command
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, *argv, "red apple", "--steps", "2", "--seed", "1", "--quiet"],
                            cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["00000-1.png"]
