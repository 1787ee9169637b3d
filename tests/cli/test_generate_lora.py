"""generate.py with LoRAs: several --lora FILE:SCALE, <lora:NAME:WEIGHT> prompt tags, and what the PNG records."""

import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.cli import generate
from ldm.cli.common import run_cli
from ldm.formats.bundle import load_bundle
from ldm.formats.pngmeta import parse_parameters, read_png_parameters, save_png
from ldm.train.lora import lora_hash

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from test_lora_formats import locon_file  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


def run(argv):
    return run_cli(generate.main, [str(a) for a in argv])


@pytest.fixture(scope="module")
def loras(micro_bundle_dir, tmp_path_factory):
    """Two kohya LoRAs for the micro bundle in a LoRA folder: a (LoCon, with convolutions) and b (a copy)."""
    pytest.importorskip("peft")
    folder = tmp_path_factory.mktemp("loras")
    locon_file(load_bundle(micro_bundle_dir), folder / "a.safetensors", alpha=8.0)
    shutil.copy(folder / "a.safetensors", folder / "b.safetensors")
    return folder


def make(model, out, *extra):
    assert run(["--seed", "3", "--steps", "2", "--model", model, "--out", out, "--quiet", *extra]) == 0
    (png,) = Path(out).glob("0*.png")
    return png, np.asarray(Image.open(png))


def test_several_loras_and_prompt_tags(micro_bundle_dir, loras, tmp_path):
    a, b = loras / "a.safetensors", loras / "b.safetensors"
    _, base = make(micro_bundle_dir, tmp_path / "base", "red disc")
    _, only_a = make(micro_bundle_dir, tmp_path / "a", "red disc", "--lora", f"{a}:0.8")
    png, a_and_zero_b = make(micro_bundle_dir, tmp_path / "ab0", "red disc", "--lora", f"{a}:0.8", "--lora", f"{b}:0")
    assert not np.array_equal(base, only_a) and np.array_equal(only_a, a_and_zero_b)  # scale 0 on one = without it
    settings = parse_parameters(read_png_parameters(png))[2]
    assert settings["Lora"] == "a.safetensors, b.safetensors" and settings["Lora scale"] == "0.8, 0.0"
    assert settings["Lora hashes"] == f"a: {lora_hash(a)}, b: {lora_hash(b)}"
    # the same LoRA from the prompt's tag: cut from the text, so the pixels are the same as with --lora
    tagged, by_tag = make(micro_bundle_dir, tmp_path / "tag", "red <lora:a:0.8> disc", "--lora-dir", loras)
    assert np.array_equal(by_tag, only_a)
    prompt, _, settings = parse_parameters(read_png_parameters(tagged))
    assert prompt == "red <lora:a:0.8> disc" and settings["Lora hashes"] == f"a: {lora_hash(a)}"
    # --from-png finds the tag's LoRA again
    again, remade = make(micro_bundle_dir, tmp_path / "again", "--from-png", tagged, "--lora-dir", loras)
    assert np.array_equal(remade, by_tag)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["x <lora:nope:1>"], r"<lora:nope> in the prompt: no nope\.safetensors in .*; there: a, b$"),
        (["x <lora:a:0.5>", "y"], r"the prompts ask for different LoRAs .*give these prompts in separate runs$"),
        (["x <lora:a:much>"], r"the weight must be a number, as in <lora:a:0\.8>$"),
        (["x", "--lora", "a.safetensors:inf"], r"the scale must be a finite number"),
    ],
)
def test_lora_mistakes_are_one_line(micro_bundle_dir, loras, tmp_path, capsys, argv, message):
    assert run([*argv, "--lora-dir", loras, "--model", micro_bundle_dir, "--out", tmp_path, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert re.search(message, err), err


def a1111_png(path, settings):
    text = f"red disc\nSteps: 2, Sampler: DPM++ 2M, CFG scale: 7, Seed: 3, Size: 64x64, {settings}"
    save_png(Image.new("RGB", (64, 64)), path, text)
    return path


def test_from_png_reads_the_schedule_type_and_keeps_unknown_entries(micro_bundle_dir, tmp_path, capsys):
    karras = a1111_png(tmp_path / "k.png", "Schedule type: Karras, Denoising strength x: 2, Model hash: 0123456789, Hires steps: 4")
    args = generate.build_parser().parse_args(["--from-png", str(karras), "--model", str(micro_bundle_dir)])
    assert generate.resolve_settings(args).sampler.name == "dpmpp_2m_karras"  # not plain DPM++ 2M
    capsys.readouterr()
    png, _ = make(micro_bundle_dir, tmp_path / "out", "--from-png", karras)
    err = capsys.readouterr().err
    assert err.count("kept unknown settings: Denoising strength x, Hires steps") == 1
    assert "was made with model hash 0123456789" in err  # a warning, not a failure
    text = read_png_parameters(png)
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in text and "Denoising strength x: 2" in text and "Hires steps: 4" in text
    model_hash = parse_parameters(text)[2]["Model hash"]
    assert model_hash == load_bundle(micro_bundle_dir).manifest["files"]["unet.safetensors"][:10]
    old = a1111_png(tmp_path / "old.png", f"Model hash: {load_bundle(micro_bundle_dir).short_hash}")  # older ldm PNGs
    make(micro_bundle_dir, tmp_path / "old", "--from-png", old)
    assert "model hash" not in capsys.readouterr().err


def test_lora_scale_flag_still_works(micro_bundle_dir, loras, tmp_path):
    _, base = make(micro_bundle_dir, tmp_path / "base", "red disc")
    _, zero = make(micro_bundle_dir, tmp_path / "zero", "red disc", "--lora", loras / "a.safetensors", "--lora-scale", "0")
    assert np.array_equal(base, zero)
