import pytest
from PIL import Image

from ldm.errors import LdmError
from ldm.formats.pngmeta import format_parameters, parse_parameters, read_png_parameters, save_png


def test_a1111_text_parses():
    text = (
        "masterpiece, a red apple\nwith a leaf\nNegative prompt: blurry, low quality\n"
        "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: 6ce0161689, "
        'Model: v1-5, Lora hashes: "a: 1, b: 2", Version: v1.6.0'
    )
    prompt, negative, settings = parse_parameters(text)
    assert prompt == "masterpiece, a red apple\nwith a leaf"
    assert negative == "blurry, low quality"
    assert settings["Sampler"] == "DPM++ 2M Karras" and settings["Seed"] == "1234" and settings["Size"] == "512x768"
    assert settings["Lora hashes"] == "a: 1, b: 2" and settings["Version"] == "v1.6.0"


@pytest.mark.parametrize("prompt", ["red apple", 'a "quoted", comma: prompt', "two\nlines"])
def test_round_trip(prompt, tmp_path):
    settings = {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7.5, "Seed": 3, "Model": 'odd, "name"'}
    text = format_parameters(prompt, "neg, ative", settings)
    path = tmp_path / "x.png"
    save_png(Image.new("RGB", (8, 8)), path, text)
    got_prompt, got_negative, got = parse_parameters(read_png_parameters(path))
    assert (got_prompt, got_negative) == (prompt, "neg, ative")
    assert got == {k: str(v) for k, v in settings.items()}


def test_no_negative_prompt_line_when_empty():
    assert "Negative prompt" not in format_parameters("x", "", {"Steps": 1})


def test_png_without_parameters(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(LdmError, match="has no 'parameters' text chunk"):
        read_png_parameters(tmp_path / "plain.png")
    (tmp_path / "fake.png").write_text("not an image")
    with pytest.raises(LdmError, match="not a readable image"):
        read_png_parameters(tmp_path / "fake.png")
    with pytest.raises(LdmError, match="not found"):
        read_png_parameters(tmp_path / "missing.png")
