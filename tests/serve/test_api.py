import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_images import b64_png, decode

from ldm.cli.generate import main as generate_main
from ldm.formats.bundle import load_bundle
from ldm.formats.pngmeta import parse_parameters, read_png_parameters
from ldm.train.lora import lora_hash

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from test_lora_formats import locon_file  # noqa: E402


def test_txt2img_pixels_equal_generate_py(serve, micro_bundle_dir, tmp_path):
    s = serve()
    body = {"prompt": "red apple", "negative_prompt": "blur", "steps": 3, "sampler_name": "DPM++ 2M", "cfg_scale": 5,
            "seed": 11, "width": 64, "height": 64, "batch_size": 2, "n_iter": 2}
    r = s.client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    info = json.loads(answer["info"])
    assert info["all_seeds"] == [11, 12, 13, 14] and info["seed"] == 11 and len(info["infotexts"]) == 4
    assert answer["parameters"]["prompt"] == "red apple"
    cli_out = tmp_path / "cli"
    generate_main(["red apple", "--negative-prompt", "blur", "--steps", "3", "--sampler", "dpmpp_2m", "--cfg", "5",
                   "--seed", "11", "--width", "64", "--height", "64", "-n", "4", "--batch-size", "2",
                   "--model", str(micro_bundle_dir), "--out", str(cli_out), "--device", "cpu", "--quiet"])
    cli = sorted(cli_out.glob("*.png"))
    saved = sorted((tmp_path / "out").glob("*.png"))
    assert [p.name for p in saved] == [p.name for p in cli] == ["00000-11.png", "00001-12.png", "00002-13.png",
                                                                 "00003-14.png"]
    for data, ours, theirs, text in zip(answer["images"], saved, cli, info["infotexts"]):
        image = decode(data)
        assert image.info["parameters"] == text == read_png_parameters(ours)
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(theirs)))
        assert np.array_equal(np.asarray(Image.open(ours)), np.asarray(Image.open(theirs)))
        # the same record but for the model's path, which the CLI gave as the bundle's own
        assert read_png_parameters(theirs) == text


def test_img2img_with_mask_pixels_equal_generate_py(serve, micro_bundle_dir, tmp_path):
    s = serve(out=None)
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 40))
    body = {"prompt": "cat face", "steps": 4, "sampler_name": "euler_a", "seed": 5, "init_images": [b64_png(init)],
            "mask": b64_png(mask), "denoising_strength": 0.6, "mask_blur": 2, "inpainting_fill": 2}
    r = s.client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    init.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    generate_main(["cat face", "--steps", "4", "--sampler", "euler_a", "--seed", "5", "--init-image",
                   str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"), "--strength", "0.6",
                   "--mask-blur", "2", "--masked-content", "latent-noise", "--model", str(micro_bundle_dir),
                   "--out", str(tmp_path / "cli"), "--device", "cpu", "--quiet"])
    (cli,) = (tmp_path / "cli").glob("*.png")
    (data,) = r.json()["images"]
    assert np.array_equal(np.asarray(decode(data)), np.asarray(Image.open(cli)))
    assert "Masked content: latent noise" in json.loads(r.json()["info"])["infotexts"][0]
    assert not (tmp_path / "out").exists()  # out=None: nothing saved


def test_several_lora_tags_in_one_request_as_generate_py(serve, micro_bundle_dir, tmp_path):
    pytest.importorskip("peft")
    loras = tmp_path / "loras"
    loras.mkdir()
    locon_file(load_bundle(micro_bundle_dir), loras / "a.safetensors", alpha=8.0)
    locon_file(load_bundle(micro_bundle_dir), loras / "b.safetensors", alpha=4.0, rank=2)
    s = serve(lora_dir=loras, out=None)
    base = {"steps": 2, "seed": 3, "width": 32, "height": 32}
    images, texts = {}, {}
    for key, prompt in [("ab", "red <lora:a:0.8> disc <lora:b:0.5>"), ("a", "red <lora:a:0.8> disc")]:
        r = s.client.post("/sdapi/v1/txt2img", json=base | {"prompt": prompt})
        assert r.status_code == 200, r.text
        (data,) = r.json()["images"]
        images[key], texts[key] = np.asarray(decode(data)), json.loads(r.json()["info"])["infotexts"][0]
    generate_main(["red <lora:a:0.8> disc <lora:b:0.5>", "--lora-dir", str(loras), "--steps", "2", "--seed", "3",
                   "--width", "32", "--height", "32", "--model", str(micro_bundle_dir), "--out", str(tmp_path / "cli"),
                   "--device", "cpu", "--quiet"])  # fmt: skip
    (cli,) = (tmp_path / "cli").glob("*.png")
    assert np.array_equal(images["ab"], np.asarray(Image.open(cli)))
    assert not np.array_equal(images["ab"], images["a"])  # b's weight counts, and the model was merged anew
    prompt, _, settings = parse_parameters(texts["ab"])
    assert prompt == "red <lora:a:0.8> disc <lora:b:0.5>"
    hashes = {name: lora_hash(loras / f"{name}.safetensors") for name in "ab"}
    assert settings["Lora hashes"] == f"a: {hashes['a']}, b: {hashes['b']}"
    for bad, words in [("x <lora:a:1> <lora:../b:1>", "no LoRA '../b'"), ("x <lora:b:inf>", "must be a number")]:
        r = s.client.post("/sdapi/v1/txt2img", json=base | {"prompt": bad})
        assert r.status_code == 422 and words in r.json()["detail"], r.text
