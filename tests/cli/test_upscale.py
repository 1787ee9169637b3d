"""python -m ldm upscale: sizes, records, tiling of large inputs, and its errors."""

import re

import numpy as np
import pytest
from PIL import Image

from ldm.cli import upscale
from ldm.cli.common import run_cli
from ldm.formats.bundle import create_bundle, save_bundle
from ldm.formats.pngmeta import parse_parameters, read_png_parameters
from ldm.models.presets import PRESETS, Task


def run(argv):
    return run_cli(upscale.main, [str(a) for a in argv])


@pytest.fixture(scope="module")
def upscaler_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundles") / "up"
    save_bundle(create_bundle(PRESETS["micro"].for_task(Task.UPSCALE), seed=5, name="micro-up"), folder)
    return folder


def test_upscales_each_image_and_records_it(upscaler_dir, tmp_path):
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((44, 100, 3), 30, np.uint8)).save(tmp_path / "b.png")  # cropped to 96×40, tiled
    assert run([tmp_path / "a.png", tmp_path / "b.png", "--model", upscaler_dir, "-o", tmp_path / "out", "--steps",
                "2", "--seed", "3", "--quiet"]) == 0  # fmt: skip
    assert Image.open(tmp_path / "out" / "a-x2.png").size == (128, 128)
    assert Image.open(tmp_path / "out" / "b-x2.png").size == (192, 80)
    s = parse_parameters(read_png_parameters(tmp_path / "out" / "b-x2.png"))[2]
    assert s["Seed"] == "4" and s["Noise level"] == "20" and s["Model"] == "micro-up" and len(s["Init image hash"]) == 64


def test_errors_are_one_line(upscaler_dir, micro_bundle_dir, tmp_path, capsys):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "a.png")
    cases = [
        ([tmp_path / "a.png", "--model", micro_bundle_dir], "is a text_to_image model, not an upscaler"),
        ([tmp_path / "none.png", "--model", upscaler_dir], r"none\.png does not exist"),
        ([tmp_path / "a.png", "--model", upscaler_dir, "--noise-level", "1000"], "--noise-level must be from 0 to 999"),
    ]
    for argv, message in cases:
        assert run([*argv, "-o", tmp_path / "out"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and re.search(message, err), err
    assert not (tmp_path / "out").exists()
