"""A VAE on its own in each layout the community ships: read as far as its config, checked, loaded bit-exact."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm.errors import BundleError, LdmError
from ldm.formats.bundle import load_bundle
from ldm.formats.single_file import vae_key
from ldm.formats.vae_file import VaeLayout, check_vae_fits, load_vae, read_vae
from ldm.io import sha256_file
from ldm.models.autoencoder import AutoencoderConfig, build_autoencoder
from ldm.models.presets import PRESETS

SD_VAE = AutoencoderConfig(block_out_channels=(32, 32, 64, 64), scaling_factor=0.18215)  # SD's shape, narrower


def compvis(vae, config, prefix=""):
    """A diffusers AutoencoderKL's weights in CompVis names, attention as 1×1 convolutions (as SD's files hold)."""
    def attention(key):
        return ".mid_block.attentions." in key and key.endswith(".weight") and ".group_norm." not in key

    return {prefix + vae_key(k, config): v[:, :, None, None] if attention(k) else v for k, v in vae.state_dict().items()}


@pytest.fixture(scope="module")
def sd_vae():
    torch.manual_seed(0)
    return build_autoencoder(SD_VAE).eval()


def assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bundles_and_diffusers_folders(micro_bundle_dir, micro_diffusers_dir):
    reference = load_bundle(micro_bundle_dir).vae
    from_bundle = read_vae(micro_bundle_dir)
    assert from_bundle.layout is VaeLayout.BUNDLE and from_bundle.config == PRESETS["micro"].vae
    assert from_bundle.sha256 == sha256_file(micro_bundle_dir / "vae.safetensors")
    assert_same(load_vae(from_bundle), reference)
    weights = micro_diffusers_dir / "vae" / "diffusion_pytorch_model.safetensors"
    for path in (micro_diffusers_dir / "vae", micro_diffusers_dir, weights):  # a VAE folder, a pipeline, its file
        vae = read_vae(path)
        assert vae.config == PRESETS["micro"].vae and vae.sha256 == sha256_file(weights), path
        assert_same(load_vae(vae), reference)
    assert read_vae(micro_diffusers_dir / "vae").name == "vae" and read_vae(weights).layout is VaeLayout.DIFFUSERS_FILE
    assert read_vae(micro_bundle_dir, scaling_factor=0.5).config.scaling_factor == 0.5  # stated wins over the config


def test_compvis_single_files(sd_vae, tmp_path):
    save_file(compvis(sd_vae, SD_VAE), str(tmp_path / "vae-ft.safetensors"))
    vae = read_vae(tmp_path / "vae-ft.safetensors")
    assert vae.layout is VaeLayout.COMPVIS and vae.prefix == "" and vae.short_hash == sha256_file(tmp_path / "vae-ft.safetensors")[:10]
    assert replace(vae.config, sample_size=SD_VAE.sample_size) == SD_VAE
    assert any("assumed the scaling factor 0.18215" in note for note in vae.notes)
    assert_same(load_vae(vae), sd_vae)
    # inside a whole checkpoint, beside the other parts
    whole = compvis(sd_vae, SD_VAE, "first_stage_model.") | {"model.diffusion_model.x": torch.zeros(1)}
    save_file(whole, str(tmp_path / "whole.safetensors"))
    vae = read_vae(tmp_path / "whole.safetensors", scaling_factor=0.2)
    assert vae.prefix == "first_stage_model." and vae.config.scaling_factor == 0.2 and not vae.notes
    assert_same(load_vae(vae), sd_vae)


def test_a_bare_file_must_state_its_factor_unless_sd_convention_applies(sd_vae, tmp_path):
    save_file(sd_vae.state_dict(), str(tmp_path / "diffusers-keys.safetensors"))
    with pytest.raises(BundleError, match="does not say its scaling factor .a diffusers single file of 4 latent"):
        read_vae(tmp_path / "diffusers-keys.safetensors")
    vae = read_vae(tmp_path / "diffusers-keys.safetensors", scaling_factor=0.13025)
    assert vae.config.scaling_factor == 0.13025 and vae.layout is VaeLayout.DIFFUSERS_FILE
    assert_same(load_vae(vae), sd_vae)
    wide = replace(SD_VAE, latent_channels=16)
    save_file(compvis(build_autoencoder(wide), wide), str(tmp_path / "sixteen.safetensors"))
    with pytest.raises(BundleError, match="a CompVis single file of 16 latent channels.; pass --vae-scaling-factor"):
        read_vae(tmp_path / "sixteen.safetensors")
    with pytest.raises(LdmError, match="--vae-scaling-factor must be a positive number, got -1.0"):
        read_vae(tmp_path / "sixteen.safetensors", scaling_factor=-1.0)


def test_damaged_and_foreign_files(sd_vae, tmp_path, micro_bundle_dir):
    state = compvis(sd_vae, SD_VAE)
    key = "decoder.up.2.block.1.conv2.weight"
    save_file({k: v for k, v in state.items() if k != key}, str(tmp_path / "missing.safetensors"))
    with pytest.raises(BundleError, match=f"lacks {key}, which a VAE of its shape has"):
        read_vae(tmp_path / "missing.safetensors")
    save_file(state | {"decoder.extra.weight": torch.zeros(1)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(BundleError, match="holds decoder.extra.weight, which SD's autoencoder has not"):
        read_vae(tmp_path / "extra.safetensors")
    save_file({"lora_unet_x.alpha": torch.zeros(1)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(BundleError, match="holds no autoencoder"):
        read_vae(tmp_path / "lora.safetensors")
    torch.save(state, tmp_path / "vae.pt")
    with pytest.raises(BundleError, match="is a pickle"):
        read_vae(tmp_path / "vae.pt")
    with pytest.raises(BundleError, match="neither a bundle nor a diffusers VAE folder"):
        read_vae(tmp_path)
    with pytest.raises(BundleError, match="no VAE at"):
        read_vae(tmp_path / "nothing.safetensors")


def test_the_vae_must_fit_the_models_latents(micro_bundle_dir, micro_f4_bundle_dir, tmp_path):
    micro = PRESETS["micro"]
    with pytest.raises(LdmError, match="has 4 pixels per latent cell, the model 8"):
        check_vae_fits(read_vae(micro_f4_bundle_dir), micro)
    wide = replace(micro.vae, latent_channels=16)
    build_autoencoder(wide).save_pretrained(tmp_path / "wide")
    with pytest.raises(LdmError, match="has 16 latent channels, the model 4; pass a VAE made for this model"):
        check_vae_fits(read_vae(tmp_path / "wide"), micro)
    check_vae_fits(read_vae(micro_bundle_dir), micro)


def test_a_diffusers_folder_of_one_variant(micro_diffusers_dir, tmp_path):
    folder = tmp_path / "vae"
    vae = build_autoencoder(PRESETS["micro"].vae)
    vae.load_state_dict(load_file(str(micro_diffusers_dir / "vae" / "diffusion_pytorch_model.safetensors")))
    vae.half().save_pretrained(folder, variant="fp16")
    found = read_vae(folder)
    assert found.notes == (f"read the fp16 weights of {folder}",)
    assert load_vae(found).dtype == torch.float16
    config = json.loads((folder / "config.json").read_text())
    del config["scaling_factor"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="states no scaling_factor; pass --vae-scaling-factor"):
        read_vae(folder)
    assert read_vae(folder, scaling_factor=0.3).config.scaling_factor == 0.3
