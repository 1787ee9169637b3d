"""generate.py's img2img, inpainting, outpainting and upscaling flags: what they write, what the PNG records, and
--from-png making the same pixels again from the recorded files."""

import re

import numpy as np
import pytest
from PIL import Image

from ldm.cli import generate
from ldm.cli.common import run_cli
from ldm.formats.bundle import create_bundle, save_bundle
from ldm.formats.pngmeta import parse_parameters, read_png_parameters
from ldm.models.presets import PRESETS, Task


def run(argv):
    return run_cli(generate.main, [str(a) for a in argv])


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An input picture (not a multiple of 8 wide), a mask of its size and a mask of another size."""
    folder = tmp_path_factory.mktemp("inputs")
    y, x = np.mgrid[0:64, 0:70]
    picture = np.stack([x * 3, y * 4, (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    Image.fromarray(picture).save(folder / "in.png")
    mask = np.zeros((64, 70), np.uint8)
    mask[20:40, 24:48] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    Image.fromarray(mask[::2, ::2].copy()).save(folder / "half-mask.png")
    Image.new("L", (70, 64), 0).save(folder / "black.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


@pytest.fixture(scope="module")
def upscaler_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundles") / "micro-upscale"
    save_bundle(create_bundle(PRESETS["micro"].for_task(Task.UPSCALE), seed=3, name="micro-upscale"), folder)
    return folder


def settings_of(path):
    return parse_parameters(read_png_parameters(path))[2]


MODES = {
    "img2img": ["--strength", "0.6"],
    "inpaint": ["--mask", "{mask}", "--mask-blur", "2", "--masked-content", "latent-noise"],
    "only-masked": ["--mask", "{mask}", "--only-masked", "--masked-padding", "8", "--width", "64", "--height", "64"],
    "outpaint": ["--outpaint", "8,0,13,4"],
}


@pytest.mark.parametrize("mode", list(MODES))
def test_each_mode_records_its_settings_and_from_png_repeats_it(micro_bundle_dir, files, tmp_path, mode):
    flags = [f.format(mask=files / "mask.png") for f in MODES[mode]]
    argv = ["red apple", "--init-image", files / "in.png", *flags, "--seed", "5", "--steps", "3", "--model",
            micro_bundle_dir, "--quiet"]  # fmt: skip
    assert run([*argv, "--out", tmp_path / "a"]) == 0
    (first,) = (tmp_path / "a").glob("0*.png")
    s = settings_of(first)
    assert s["Init image"] == str(files / "in.png") and len(s["Init image hash"]) == 64
    assert s.get("Resize mode") == ("Crop and resize" if mode == "img2img" else None)
    expected = {
        "img2img": ({"Denoising strength": "0.6"}, (64, 64)),
        "inpaint": ({"Mask blur": "2", "Masked content": "latent noise", "Inpaint area": "Whole picture",
                     "Denoising strength": "0.75"}, (70, 64)),  # fmt: skip
        "only-masked": ({"Inpaint area": "Only masked", "Masked area padding": "8"}, (70, 64)),
        "outpaint": ({"Outpaint": "8,0,13,4", "Denoising strength": "1.0"}, (91, 68)),  # the picture's own size
    }[mode]
    assert expected[0].items() <= s.items(), s
    assert Image.open(first).size == expected[1]
    assert run(["--from-png", first, "--model", micro_bundle_dir, "--out", tmp_path / "b", "--quiet"]) == 0
    (again,) = (tmp_path / "b").glob("0*.png")
    assert np.array_equal(pixels(again), pixels(first))
    original, out = pixels(files / "in.png"), pixels(first)
    if mode == "outpaint":  # the picture itself sits inside the new border, untouched (no mask but the border)
        out, keep = out[0:64, 8:78], np.ones((64, 70), bool)
        keep[:, :12] = keep[:, -12:] = keep[-12:] = False  # the border's blur (radius 4) reaches into it
    else:  # far from the mask (beyond the blur), the input's pixels exactly
        keep = np.ones((64, 70), bool)
        keep[14:46, 18:54] = False
    if mode != "img2img":
        assert np.array_equal(out[keep], original[keep])
    if mode in ("inpaint", "only-masked"):
        assert np.abs(out[~keep].astype(int) - original[~keep]).mean() > 1


def test_from_png_refuses_a_changed_input_file(micro_bundle_dir, files, tmp_path, capsys):
    picture = tmp_path / "in.png"
    picture.write_bytes((files / "in.png").read_bytes())
    argv = ["red apple", "--init-image", picture, "--steps", "2", "--model", micro_bundle_dir, "--quiet"]
    assert run([*argv, "--out", tmp_path / "a"]) == 0
    (first,) = (tmp_path / "a").glob("0*.png")
    Image.fromarray(255 - pixels(picture)).save(picture)
    capsys.readouterr()
    assert run(["--from-png", first, "--model", micro_bundle_dir, "--out", tmp_path / "b", "--quiet"]) == 2
    assert re.search(r"init image .*in\.png changed since .* was made \(sha256", capsys.readouterr().err)
    assert not (tmp_path / "b").exists() or not list((tmp_path / "b").glob("*.png"))
    # passing the file again explicitly is a new image, not a repeat: allowed
    assert run(["--from-png", first, "--init-image", picture, "--model", micro_bundle_dir, "--out", tmp_path / "c",
                "--quiet"]) == 0  # fmt: skip


def test_a_mask_of_another_size_is_resized_with_a_warning(micro_bundle_dir, files, tmp_path, capsys):
    argv = ["x", "--init-image", files / "in.png", "--mask", files / "half-mask.png", "--steps", "2", "--model",
            micro_bundle_dir, "--out", tmp_path, "--quiet"]  # fmt: skip
    assert run(argv) == 0
    assert "warning: the mask is 35×32, the image 70×64; the mask is resized to the image" in capsys.readouterr().err


def test_upscale_flag_writes_the_upscaled_image(micro_bundle_dir, upscaler_dir, tmp_path):
    argv = ["red apple", "--upscale", upscaler_dir, "--upscale-steps", "2", "--noise-level", "30", "--steps", "2",
            "--seed", "1", "--model", micro_bundle_dir, "--quiet"]  # fmt: skip
    assert run([*argv, "--out", tmp_path / "a"]) == 0
    (first,) = (tmp_path / "a").glob("0*.png")
    assert Image.open(first).size == (128, 128)
    s = settings_of(first)
    assert s["Upscaler"] == str(upscaler_dir) and s["Noise level"] == "30" and s["Upscale steps"] == "2"
    assert run(["--from-png", first, "--model", micro_bundle_dir, "--out", tmp_path / "b", "--quiet"]) == 0
    (again,) = (tmp_path / "b").glob("0*.png")
    assert np.array_equal(pixels(again), pixels(first))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--init-image", "{d}/nowhere.png"], r"the init image .*nowhere\.png does not exist"),
        (["--init-image", "{d}/broken.png"], r"the init image .*broken\.png is (not a readable image|truncated)"),
        (["--init-image", "{d}/in.png", "--strength", "1.5"], r"--strength must be in \[0, 1\]"),
        (["--init-image", "{d}/in.png", "--strength", "-0.5"], r"--strength must be in \[0, 1\]"),
        (["--init-image", "{d}/in.png", "--mask", "{d}/black.png"], "has no white pixel"),
        (["--mask", "{d}/mask.png"], "--mask needs an image to work on; pass --init-image"),
        (["--strength", "0.5"], "--strength needs an image"),
        (["--init-image", "{d}/in.png", "--outpaint", "1,2,3"], "--outpaint takes four whole numbers"),
        (["--init-image", "{d}/in.png", "--only-masked"], "--only-masked needs a mask"),
        (["--init-image", "{d}/in.png", "--mask-blur", "-1", "--mask", "{d}/mask.png"], "--mask-blur must be"),
        (["--upscale", "{model}"], "is a text_to_image model, not an upscaler"),
        (["--noise-level", "3"], "--noise-level needs an upscaler"),
        (["--upscale", "{upscaler}", "--noise-level", "5000"], "--noise-level must be from 0 to 999"),
    ],
)
def test_bad_image_inputs_are_one_line_and_exit_2(micro_bundle_dir, upscaler_dir, files, tmp_path, capsys, argv,
                                                  message):  # fmt: skip
    argv = [a.format(d=files, model=micro_bundle_dir, upscaler=upscaler_dir) for a in argv]
    assert run(["x", *argv, "--model", micro_bundle_dir, "--out", tmp_path, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert re.search(message, err), err
    assert not list(tmp_path.glob("*.png"))


def test_an_upscaler_or_inpainting_model_as_the_main_model(upscaler_dir, files, tmp_path, capsys):
    assert run(["x", "--model", upscaler_dir, "--out", tmp_path, "--quiet"]) == 2
    assert "is an upscaler; pass it as --upscale" in capsys.readouterr().err
    inpaint = tmp_path / "inpaint"
    save_bundle(create_bundle(PRESETS["micro"].for_task(Task.INPAINT), seed=4, name="inpaint"), inpaint)
    assert run(["x", "--model", inpaint, "--out", tmp_path, "--quiet"]) == 2
    assert "is an inpainting model: pass --init-image FILE with --mask FILE" in capsys.readouterr().err
    argv = ["x", "--model", inpaint, "--init-image", files / "in.png", "--mask", files / "mask.png", "--steps", "2",
            "--out", tmp_path / "ok", "--quiet"]  # fmt: skip
    assert run(argv) == 0 and len(list((tmp_path / "ok").glob("*.png"))) == 1


def test_clip_skip_is_recorded_and_repeated(micro_bundle_dir, tmp_path, capsys):
    argv = ["red apple", "--clip-skip", "2", "--steps", "2", "--seed", "3", "--model", micro_bundle_dir, "--quiet"]
    assert run([*argv, "--out", tmp_path / "a"]) == 0
    (first,) = (tmp_path / "a").glob("0*.png")
    assert settings_of(first)["Clip skip"] == "2"
    assert run(["--from-png", first, "--model", micro_bundle_dir, "--out", tmp_path / "b", "--quiet"]) == 0
    (again,) = (tmp_path / "b").glob("0*.png")
    assert np.array_equal(pixels(again), pixels(first))
    assert run(["x", "--clip-skip", "3", "--model", micro_bundle_dir, "--out", tmp_path / "c", "--quiet"]) == 2
    assert "--clip-skip must be from 1 to the text encoder's 2 layers" in capsys.readouterr().err
