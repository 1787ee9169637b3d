"""diffusers folders saved with ``variant=`` (``model.fp16.safetensors``, sharded ones too) import, and say which."""

import shutil

import pytest
import torch

from ldm.cli.bundle import main as bundle_main
from ldm.cli.common import run_cli
from ldm.errors import BundleError
from ldm.formats.bundle import load_bundle
from ldm.formats.diffusers import choose_variant, import_diffusers


@pytest.fixture(scope="module")
def fp16_dir(micro_diffusers_dir, tmp_path_factory):
    """The micro export saved again as diffusers does with ``torch_dtype=float16, variant="fp16"``."""
    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp("variants") / "fp16"
    pipe = StableDiffusionPipeline.from_pretrained(micro_diffusers_dir, torch_dtype=torch.float16, local_files_only=True)
    pipe.save_pretrained(folder, variant="fp16", safe_serialization=True)
    return folder


def assert_half_of(bundle, reference):
    for part, module in reference.modules().items():
        theirs = bundle.modules()[part].state_dict()
        for key, value in module.state_dict().items():
            assert theirs[key].dtype == torch.float16 and torch.equal(theirs[key], value.half()), (part, key)


def test_an_fp16_variant_folder_imports(fp16_dir, micro_bundle_dir):
    assert (fp16_dir / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (fp16_dir / "text_encoder" / "model.fp16.safetensors").is_file()
    assert choose_variant(fp16_dir) == "fp16"  # the only weights there are
    with pytest.raises(BundleError, match="has only fp16 weights; pass --variant fp16"):
        import_diffusers(fp16_dir)
    bundle = import_diffusers(fp16_dir, variant="fp16")
    reference = load_bundle(micro_bundle_dir)
    assert bundle.config == reference.config
    assert_half_of(bundle, reference)


def test_plain_weights_win_unless_a_variant_is_asked_for(fp16_dir, micro_diffusers_dir, tmp_path):
    both = tmp_path / "both"
    shutil.copytree(micro_diffusers_dir, both)
    for part in ("vae", "text_encoder", "unet"):
        for file in (fp16_dir / part).glob("*.fp16.safetensors"):
            shutil.copyfile(file, both / part / file.name)
    assert choose_variant(both) is None and choose_variant(both, "fp16") == "fp16"
    assert import_diffusers(both, variant="fp16").unet.dtype == torch.float16
    assert import_diffusers(both).unet.dtype == torch.float32
    with pytest.raises(BundleError, match="vae, text_encoder, unet have no bf16 weights .variants in the folder: fp16.; drop --variant"):
        choose_variant(both, "bf16")
    (both / "unet" / "diffusion_pytorch_model.fp16.safetensors").unlink()
    with pytest.raises(BundleError, match="'s unet has no fp16 weights"):
        choose_variant(both, "fp16")


def test_several_variants_and_no_plain_weights_ask_which(fp16_dir, tmp_path):
    two = tmp_path / "two"
    shutil.copytree(fp16_dir, two)
    for file in list(two.rglob("*.fp16.safetensors")):
        shutil.copyfile(file, file.with_name(file.name.replace(".fp16.", ".ema.")))
    with pytest.raises(BundleError, match="has the weight variants ema, fp16 and no plain weights; pass --variant NAME"):
        choose_variant(two)
    assert import_diffusers(two, variant="ema").vae.dtype == torch.float16


def test_sharded_variants_import(micro_diffusers_dir, micro_bundle_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(micro_diffusers_dir, torch_dtype=torch.float16, local_files_only=True)
    pipe.unet.save_pretrained(tmp_path / "unet-shards", variant="fp16", max_shard_size="1MB")
    sharded = tmp_path / "sharded"
    shutil.copytree(micro_diffusers_dir, sharded)
    shutil.rmtree(sharded / "unet")
    shutil.copytree(tmp_path / "unet-shards", sharded / "unet")
    assert (sharded / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    assert len(list((sharded / "unet").glob("diffusion_pytorch_model.fp16-*.safetensors"))) > 1
    # the other parts hold plain weights only, so the variant must be named and then holds for the UNet only
    with pytest.raises(BundleError, match="vae, text_encoder have no fp16 weights"):
        choose_variant(sharded, "fp16")
    for part in ("vae", "text_encoder"):
        getattr(pipe, part).save_pretrained(sharded / part, variant="fp16")
    assert choose_variant(sharded) == "fp16"  # the one variant every part has
    bundle = import_diffusers(sharded, variant="fp16")
    assert_half_of(bundle, load_bundle(micro_bundle_dir))


def test_bundle_import_says_which_variant(fp16_dir, tmp_path, capsys):
    assert run_cli(bundle_main, ["import", str(fp16_dir), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert f"using the fp16 weights of {fp16_dir}" in out
    assert load_bundle(tmp_path / "b").unet.dtype == torch.float16
    assert run_cli(bundle_main, ["import", str(fp16_dir), str(tmp_path / "c"), "--variant", "int8"]) == 2
    err = capsys.readouterr().err
    assert "no int8 weights (variants in the folder: fp16)" in err and err.count("\n") == 1
    assert not (tmp_path / "c").exists()
