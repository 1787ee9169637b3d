"""generate.py end to end on the micro bundle: files, metadata, --from-png, bad input."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.cli import generate
from ldm.cli.common import run_cli
from ldm.formats.pngmeta import parse_parameters, read_png_parameters

ROOT = Path(__file__).resolve().parents[2]


def run(argv):
    return run_cli(generate.main, [str(a) for a in argv])


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_writes_pngs_with_parameters_and_grid(micro_bundle_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["red apple", "pizza", "-n", "2", "--batch-size", "3", "--seed", "40", "--steps", "3", "--sampler", "euler_a",
            "--negative-prompt", "blurry", "--model", micro_bundle_dir, "--out", out, "--grid", "--quiet"]  # fmt: skip
    assert run(argv) == 0
    files = sorted(out.glob("0*.png"))
    assert [f.name for f in files] == ["00000-40.png", "00001-41.png", "00002-42.png", "00003-43.png"]
    assert (out / "grid-00003.png").is_file() and Image.open(out / "grid-00003.png").size == (128, 128)
    prompt, negative, settings = parse_parameters(read_png_parameters(files[1]))
    assert (prompt, negative) == ("pizza", "blurry")
    assert settings["Steps"] == "3" and settings["Sampler"] == "Euler a" and settings["Seed"] == "41"
    assert settings["Size"] == "64x64" and settings["CFG scale"] == "7.5" and len(settings["Model hash"]) == 10
    assert settings["Batch size"] == "3" and settings["Batch pos"] == "1"
    # A second run never overwrites the first.
    assert run(argv) == 0
    assert len(list(out.glob("0*.png"))) == 8


@pytest.mark.parametrize("which", [1, 3])  # inside a full batch, and alone in the last one
def test_from_png_reproduces_pixels_exactly(micro_bundle_dir, tmp_path, which):
    first = tmp_path / "first"
    argv = ["cat face", "-n", "4", "--batch-size", "3", "--seed", "7", "--steps", "3", "--sampler", "dpmpp_2m",
            "--model", micro_bundle_dir, "--out", first, "--quiet", "--cfg", "6"]  # fmt: skip
    assert run(argv) == 0
    original = sorted(first.glob("0*.png"))[which]
    again = tmp_path / "again"
    assert run(["--from-png", original, "--model", micro_bundle_dir, "--out", again, "--quiet"]) == 0
    (copy,) = again.glob("0*.png")
    assert copy.name.endswith(f"-{7 + which}.png")
    assert np.array_equal(pixels(copy), pixels(original))
    assert parse_parameters(read_png_parameters(copy))[0] == "cat face"


def test_from_png_with_overrides(micro_bundle_dir, tmp_path):
    assert run(["x", "--seed", "1", "--steps", "2", "--model", micro_bundle_dir, "--out", tmp_path, "--quiet"]) == 0
    (png,) = tmp_path.glob("0*.png")
    assert run(["--from-png", png, "--steps", "3", "--model", micro_bundle_dir, "--out", tmp_path / "b", "--quiet"]) == 0
    (png2,) = (tmp_path / "b").glob("0*.png")
    _, _, settings = parse_parameters(read_png_parameters(png2))
    assert settings["Steps"] == "3" and settings["Seed"] == "1"


def test_sizes_follow_the_models_vae(micro_f4_bundle_dir, tmp_path, capsys):
    """A VAE of 4 pixels a cell: the model's own size by default, any multiple of 4, and an error that names 4."""
    common = ["x", "--seed", "1", "--steps", "1", "--model", micro_f4_bundle_dir, "--out", tmp_path, "--quiet"]
    assert run(common) == 0 and run([*common, "--width", "36"]) == 0
    first, second = sorted(tmp_path.glob("0*.png"))
    assert Image.open(first).size == (32, 32) and Image.open(second).size == (36, 32)
    assert parse_parameters(read_png_parameters(second))[2]["Size"] == "36x32"
    capsys.readouterr()
    assert run([*common, "--width", "34"]) == 2
    err = capsys.readouterr().err
    assert err == "error: width must be a positive multiple of 4 (the VAE's downsampling factor), got 34; try 32\n"


def test_long_prompt_is_encoded_in_chunks_not_truncated(micro_bundle_dir, tmp_path, capsys):
    long_prompt = "red apple " * 50  # 100 tokens: two chunks
    first_75 = "red apple " * 37 + "red"  # what truncation kept
    common = ["--seed", "1", "--steps", "1", "--model", micro_bundle_dir, "--quiet"]
    assert run([long_prompt, *common, "--out", tmp_path / "long"]) == 0
    assert run([first_75, *common, "--out", tmp_path / "cut"]) == 0
    assert "warning" not in capsys.readouterr().err
    (long,), (cut,) = (tmp_path / "long").glob("0*.png"), (tmp_path / "cut").glob("0*.png")
    assert not np.array_equal(pixels(long), pixels(cut))  # the last 25 tokens count


@pytest.mark.parametrize(
    "argv, message",
    [
        (["x", "--width", "65"], "width must be a positive multiple of 8"),
        (["x", "--height", "100"], "height must be a positive multiple of 8 .* got 100; try 96"),
        (["x", "--sampler", "euler_b"], "unknown sampler 'euler_b'; choose one of"),
        (["x", "--steps", "0"], "steps must be a positive number, got 0; try --steps 20"),
        (["x", "--steps", "-3"], "steps must be a positive number"),
        (["x", "--device", "cuda:7"] if not __import__("torch").cuda.is_available() else ["x", "--device", "tpu"], "device"),
        ([], "no prompt given"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(micro_bundle_dir, tmp_path, capsys, argv, message):
    assert run([*argv, "--model", micro_bundle_dir, "--out", tmp_path, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    import re

    assert re.search(message, err), err
    assert not list(tmp_path.glob("*.png"))


def test_missing_and_malformed_bundles(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "models" / "emoji-tiny"
    monkeypatch.setattr(generate, "DEFAULT_MODEL", missing)  # a copy of the package without the shipped model
    assert run(["x"]) == 2
    assert f"no default model at {missing}; pass --model PATH" in capsys.readouterr().err
    assert run(["x", "--model", tmp_path / "nowhere"]) == 2
    assert "no model bundle at" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("[1, 2")
    assert run(["x", "--model", tmp_path / "bad"]) == 2
    assert "manifest.json is not valid JSON" in capsys.readouterr().err


def test_bad_from_png(micro_bundle_dir, tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert run(["--from-png", tmp_path / "plain.png", "--model", micro_bundle_dir]) == 2
    assert "has no 'parameters' text chunk" in capsys.readouterr().err


def test_subprocess_exit_status_and_no_traceback(micro_bundle_dir, tmp_path):
    """The real entry point: exit status 2, one line on stderr, no traceback."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), "x", "--width", "65", "--model", str(micro_bundle_dir)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: width must be a positive multiple of 8 (the VAE's downsampling factor), got 65; try 64"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), "x", "--num-imgs", "2"], capture_output=True, text=True, timeout=300,
        check=False,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("generate.py: error: unrecognized arguments")


def test_subprocess_success_prints_the_paths(micro_bundle_dir, tmp_path):
    """generate.py ends with exit_now: what it printed to a pipe still arrives, and the PNG is whole."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), "a", "b", "--steps", "2", "--seed", "3", "--quiet",
         "--model", str(micro_bundle_dir), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    paths = [Path(line) for line in result.stdout.splitlines()]
    assert [p.name for p in paths] == ["00000-3.png", "00001-4.png"]
    for path, prompt in zip(paths, ["a", "b"]):
        assert read_png_parameters(path).splitlines()[0] == prompt
