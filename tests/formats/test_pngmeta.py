import pytest
from PIL import Image

from ldm.errors import LdmError
from ldm.formats.pngmeta import (
    ImageParameters,
    LoraRecord,
    format_parameters,
    parse_parameters,
    read_png_parameters,
    save_png,
)


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



# What generate.py and `python -m ldm eval` wrote before the one builder (ImageParameters) took over: the same text.
GENERATE_TEXT = (
    "pizza\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a, CFG scale: 7.5, Seed: 41, Size: 64x64, "
    "Model hash: 3e3b90092c, Model: micro, Batch size: 3, Batch pos: 1, Lora: style.safetensors, Lora scale: 0.8, "
    "Dtype: fp32, Fast: on, Deep cache: 2, Version: ldm 0.1.0"
)
EVALUATE_TEXT = (
    "a\nSteps: 3, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 1, Size: 96x64, Model hash: 3e3b90092c, Model: micro, "
    "Token merging ratio: 0.5"
)


def test_the_builder_writes_what_the_commands_wrote():
    made_by_generate = ImageParameters(
        prompt="pizza", negative_prompt="blurry", steps=3, sampler="Euler a", guidance_scale=7.5, seed=41, width=64,
        height=64, model_hash="3e3b90092c", model="micro", batch_size=3, batch_pos=1,
        loras=(LoraRecord(name="style.safetensors", scale=0.8),), dtype="fp32", fast=True, deep_cache=2,
        version="ldm 0.1.0",
    )  # fmt: skip
    assert made_by_generate.text() == GENERATE_TEXT
    made_by_evaluate = ImageParameters(
        prompt="a", steps=3, sampler="DPM++ 2M", guidance_scale=7.5, seed=1, width=96, height=64,
        model_hash="3e3b90092c", model="micro", token_merging=0.5,
    )  # fmt: skip
    assert made_by_evaluate.text() == EVALUATE_TEXT
    # nothing optional: no batch, LoRA, dtype, fast path, approximation or version entry
    plain = ImageParameters(prompt="x", steps=1, sampler="DDIM", guidance_scale=1.0, seed=0, width=8, height=8)
    assert plain.text() == "x\nSteps: 1, Sampler: DDIM, CFG scale: 1.0, Seed: 0, Size: 8x8"


@pytest.mark.parametrize("text", [GENERATE_TEXT, EVALUATE_TEXT])
def test_the_builder_reads_back_what_it_wrote(text):
    assert ImageParameters.from_text(text).text() == text


def test_reading_a1111_text_and_garbled_entries():
    a1111 = ImageParameters.from_text(
        "a cat\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: 6ce0161689, "
        "Model: v1-5, Version: v1.6.0"
    )
    assert (a1111.width, a1111.height, a1111.guidance_scale, a1111.sampler) == (512, 768, 7.0, "DPM++ 2M Karras")
    assert a1111.dtype is None and not a1111.fast and a1111.batch_size == 1 and a1111.lora is None
    with pytest.raises(KeyError, match="Seed"):
        ImageParameters.from_text("x\nSteps: 1, Sampler: DDIM, CFG scale: 1, Size: 8x8")
    with pytest.raises(ValueError):
        ImageParameters.from_text("x\nSteps: 1, Sampler: DDIM, CFG scale: 1, Seed: 0, Size: 8by8")


def test_a_swapped_vae_is_recorded_in_a1111s_keys():
    params = ImageParameters(prompt="x", steps=2, sampler="Euler", guidance_scale=7.0, seed=1, width=64, height=64,
                             model_hash="0123456789", model="m", vae="vae-ft-mse.safetensors", vae_hash="735e4c3a44")  # fmt: skip
    assert "Model hash: 0123456789, Model: m, VAE hash: 735e4c3a44, VAE: vae-ft-mse.safetensors" in params.text()
    assert ImageParameters.from_text(params.text()) == params
    a1111 = "x\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, VAE hash: 735e4c3a44, VAE: v.pt"
    recorded = ImageParameters.from_text(a1111)
    assert (recorded.vae, recorded.vae_hash) == ("v.pt", "735e4c3a44")
    assert "VAE" not in ImageParameters.from_text("x\nSteps: 1, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 8x8").text()


def test_the_schedule_type_is_written_apart_and_read_in_both_forms():
    karras = ImageParameters(prompt="x", steps=2, sampler="DPM++ 2M Karras", guidance_scale=7.0, seed=1, width=8,
                             height=8)  # fmt: skip
    assert "Steps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0" in karras.text()
    assert ImageParameters.from_text(karras.text()).sampler == "DPM++ 2M Karras"
    old = "x\nSteps: 2, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 8x8"
    assert ImageParameters.from_text(old).sampler == "DPM++ 2M Karras"
    automatic = "x\nSteps: 2, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 8x8"
    assert ImageParameters.from_text(automatic).sampler == "Euler a"
    plain = ImageParameters.from_text("x\nSteps: 2, Sampler: DPM++ 2M, CFG scale: 7, Seed: 1, Size: 8x8")
    assert plain.sampler == "DPM++ 2M" and "Schedule type" not in plain.text()


def test_several_loras_and_their_hashes_round_trip():
    loras = (LoraRecord(name="a.safetensors", scale=0.8, hash="0123456789"),
             LoraRecord(name="b.kohya.safetensors", scale=0.5, hash="abcdef0123"))  # fmt: skip
    params = ImageParameters(prompt="x", steps=2, sampler="Euler", guidance_scale=7.0, seed=1, width=8, height=8,
                             loras=loras)  # fmt: skip
    assert ('Lora: "a.safetensors, b.kohya.safetensors", Lora scale: "0.8, 0.5", '
            'Lora hashes: "a: 0123456789, b.kohya: abcdef0123"') in params.text()  # fmt: skip
    assert ImageParameters.from_text(params.text()) == params
    old = "x\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 8x8, Lora: s.safetensors, Lora scale: 0.7"
    assert ImageParameters.from_text(old).loras == (LoraRecord(name="s.safetensors", scale=0.7),)


def test_unknown_entries_are_kept_and_written_back():
    text = ("x\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 8x8, Clip skip: 2, "
            'ADetailer model: "face_yolov8n.pt", Version: v1.10.1')  # fmt: skip
    params = ImageParameters.from_text(text)
    assert params.extra == (("ADetailer model", "face_yolov8n.pt"),) and params.clip_skip == 2  # Clip skip is read
    assert params.text().endswith("Version: v1.10.1, ADetailer model: face_yolov8n.pt") and "Clip skip: 2" in params.text()
    assert ImageParameters.from_text(params.text()) == params
