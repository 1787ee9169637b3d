"""A bundle's tiny autoencoder: added in place without touching the other files or the hash, loaded, converted,
borrowed by derived bundles, refused where it does not fit, and exported as a diffusers AutoencoderTiny folder that
gives the same numbers in diffusers."""

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderTiny

from ldm.cli import bundle as bundle_cli
from ldm.cli.common import run_cli
from ldm.errors import BundleError
from ldm.formats.bundle import (
    TINY_VAE_CONFIG,
    TINY_VAE_WEIGHTS,
    add_tiny_vae,
    has_tiny_vae,
    load_bundle,
    read_manifest,
    save_bundle,
)
from ldm.formats.diffusers import export_diffusers, import_diffusers
from ldm.io import sha256_file
from ldm.models.presets import get_tiny_preset
from ldm.models.tiny_autoencoder import build_tiny_autoencoder, tiny_decode, tiny_encode


def test_adding_one_keeps_the_other_files_and_the_hash(micro_bundle_dir, micro_tiny_bundle_dir):
    before, after = read_manifest(micro_bundle_dir), read_manifest(micro_tiny_bundle_dir)
    assert after["hash"] == before["hash"]  # the bundle hash names the weights of the default pictures
    assert {k: v for k, v in after["files"].items() if not k.startswith("tiny_vae/")} == before["files"]
    assert has_tiny_vae(micro_tiny_bundle_dir) and not has_tiny_vae(micro_bundle_dir)
    for name, digest in before["files"].items():  # untouched on disk too
        assert sha256_file(micro_tiny_bundle_dir / name) == digest
    bundle = load_bundle(micro_tiny_bundle_dir)  # checks every sha256
    assert isinstance(bundle.tiny_vae, AutoencoderTiny) and "tiny_vae" in bundle.modules()
    assert load_bundle(micro_bundle_dir).tiny_vae is None


def test_it_is_stored_in_the_vaes_dtype_and_converts_with_the_rest(micro_tiny_bundle_dir, tmp_path):
    argv = ["convert", str(micro_tiny_bundle_dir), str(tmp_path / "half"), "--dtype", "fp16"]
    assert run_cli(bundle_cli.main, argv) == 0
    half = load_bundle(tmp_path / "half")
    assert {p.dtype for p in half.tiny_vae.parameters()} == {torch.float16}
    torch.manual_seed(1)
    again = build_tiny_autoencoder(get_tiny_preset("micro", latent_channels=4))
    add_tiny_vae(tmp_path / "half", again)  # replaces the one it had, in the VAE's precision
    replaced = load_bundle(tmp_path / "half").tiny_vae
    assert torch.equal(replaced.decoder.layers[0].weight, again.decoder.layers[0].weight.half())


def test_a_derived_bundle_borrows_it(micro_tiny_bundle_dir, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(micro_tiny_bundle_dir, models / "base")
    tuned = load_bundle(models / "base")
    with torch.no_grad():
        tuned.unet.conv_in.bias.add_(1.0)
    save_bundle(tuned, models / "tuned", base=models / "base")
    manifest = read_manifest(models / "tuned")
    assert {TINY_VAE_CONFIG, TINY_VAE_WEIGHTS} <= set(manifest["borrowed"])
    assert not (models / "tuned" / "tiny_vae").exists()
    assert torch.equal(load_bundle(models / "tuned").tiny_vae.encoder.layers[0].weight,
                       tuned.tiny_vae.encoder.layers[0].weight)  # fmt: skip
    add_tiny_vae(models / "tuned", tuned.tiny_vae)  # its own now: no longer borrowed, the rest still is
    manifest = read_manifest(models / "tuned")
    assert TINY_VAE_WEIGHTS not in manifest["borrowed"] and "vae.safetensors" in manifest["borrowed"]
    assert load_bundle(models / "tuned").tiny_vae is not None


def test_one_that_does_not_fit_the_vae_is_refused(micro_bundle_dir, micro_tiny_bundle_dir, tmp_path):
    with pytest.raises(BundleError, match="has 16 latent channels and factor 8, the VAE 4 and 8; distil one"):
        add_tiny_vae(micro_bundle_dir, build_tiny_autoencoder(get_tiny_preset("micro", latent_channels=16)))
    damaged = tmp_path / "damaged"
    shutil.copytree(micro_tiny_bundle_dir, damaged)
    (damaged / TINY_VAE_WEIGHTS).write_bytes(b"not weights")
    with pytest.raises(BundleError, match="does not match its sha256"):
        load_bundle(damaged)


@pytest.fixture(scope="module")
def exported(micro_tiny_bundle_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("exports") / "micro-tiny-diffusers"
    export_diffusers(load_bundle(micro_tiny_bundle_dir), folder)
    return folder


def test_export_is_an_autoencoder_tiny_with_the_same_outputs(micro_tiny_bundle_dir, exported):
    ours = load_bundle(micro_tiny_bundle_dir).tiny_vae
    theirs = AutoencoderTiny.from_pretrained(exported, subfolder="tiny_vae", local_files_only=True).eval()
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    pixels = torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1
    with torch.no_grad():
        decoded, encoded = tiny_decode(ours, latents), tiny_encode(ours, pixels)
        assert decoded.std() > 1e-3 and encoded.std() > 1e-3  # not constants
        assert (decoded - theirs.decode(latents).sample).abs().max() <= 1e-5
        assert (encoded - theirs.encode(pixels).latents).abs().max() <= 1e-5


def test_the_pipeline_export_still_loads_and_decodes_with_it_as_we_do(micro_tiny_bundle_dir, exported):
    """StableDiffusionPipeline loads the folder as before; given the tiny autoencoder as its VAE it decodes the
    UNet's latents to the pixels our pipeline's --tiny-vae gives (its latents / scaling factor 1.0 are ours)."""
    from diffusers import StableDiffusionPipeline

    from ldm.pipeline import Request, generate
    from ldm.pipeline.schedule import get_sampler

    pipe = StableDiffusionPipeline.from_pretrained(exported, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae = AutoencoderTiny.from_pretrained(exported, subfolder="tiny_vae", local_files_only=True)
    sampler = get_sampler("euler")
    pipe.scheduler = sampler.scheduler.from_config(pipe.scheduler.config, **dict(sampler.options))
    out = pipe(["red apple"], negative_prompt=[""], num_inference_steps=3, guidance_scale=5.0,
               generator=[torch.Generator().manual_seed(3)], height=64, width=64, output_type="np")  # fmt: skip
    theirs = torch.from_numpy(out.images).permute(0, 3, 1, 2)
    request = Request(prompts=["red apple"], negative_prompts=[""], seeds=[3], steps=3, guidance_scale=5.0,
                      sampler=sampler, width=64, height=64, tiny_vae=True)  # fmt: skip
    ours = generate(load_bundle(micro_tiny_bundle_dir), request, progress=False)
    assert ours.shape == theirs.shape == (1, 3, 64, 64)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_import_reads_it_back(micro_tiny_bundle_dir, exported, tmp_path):
    bundle = import_diffusers(exported)
    ours = load_bundle(micro_tiny_bundle_dir).tiny_vae.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in bundle.tiny_vae.state_dict().items())
    config = json.loads((exported / "tiny_vae" / "config.json").read_text())
    (exported.parent / "odd").mkdir()
    shutil.copytree(exported, exported.parent / "odd" / "x")
    odd = exported.parent / "odd" / "x" / "tiny_vae" / "config.json"
    odd.write_text(json.dumps(config | {"act_fn": "silu"}))
    with pytest.raises(BundleError, match="AutoencoderTiny settings not supported: act_fn='silu'"):
        import_diffusers(odd.parent.parent)
