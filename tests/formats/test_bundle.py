import json
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from ldm.cli.bundle import main
from ldm.cli.common import run_cli
from ldm.errors import BundleError, LdmError
from ldm.formats.bundle import create_bundle, load_bundle, save_bundle
from ldm.formats.diffusers import export_diffusers, import_diffusers
from ldm.models.presets import PRESETS
from ldm.models.text_encoder import Padding


def assert_same_weights(a, b):
    for part, module in a.modules().items():
        sa, sb = module.state_dict(), b.modules()[part].state_dict()
        assert sa.keys() == sb.keys(), part
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), f"{part}.{key}"


def test_save_load_is_bit_identical(tmp_path):
    bundle = create_bundle(PRESETS["micro"], seed=3, name="m")
    save_bundle(bundle, tmp_path / "b")
    loaded = load_bundle(tmp_path / "b")
    assert loaded.config == bundle.config
    assert loaded.name == "m" and loaded.short_hash == bundle.short_hash and len(loaded.short_hash) == 10
    assert_same_weights(bundle, loaded)
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert set(manifest["files"]) >= {"model.yaml", "unet.safetensors", "vae.safetensors", "text_encoder.safetensors"}
    assert manifest["packages"]["torch"] == torch.__version__.split("+")[0] or manifest["packages"]["torch"]
    assert not list((tmp_path / "b").glob("*.tmp")) and not list((tmp_path / "b").glob(".*"))


def test_saving_again_gives_the_same_files(tmp_path, micro_bundle_dir):
    save_bundle(load_bundle(micro_bundle_dir), tmp_path / "again")
    first = json.loads((micro_bundle_dir / "manifest.json").read_text())
    second = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert first["files"] == second["files"] and first["hash"] == second["hash"]


@pytest.mark.parametrize("padding", [Padding.END, Padding.ZERO])
def test_export_import_is_bit_identical(tmp_path, padding):
    from dataclasses import replace

    config = PRESETS["micro"]
    config = replace(config, text_encoder=replace(config.text_encoder, padding=padding))
    bundle = create_bundle(config, seed=1)
    export_diffusers(bundle, tmp_path / "sd")
    assert (tmp_path / "sd" / "model_index.json").is_file()
    assert not list((tmp_path / "sd").rglob("*.bin"))  # safetensors only
    back = import_diffusers(tmp_path / "sd")
    assert back.config == bundle.config
    assert_same_weights(bundle, back)
    assert back.tokenizer.get_vocab() == bundle.tokenizer.get_vocab()


def test_export_loads_in_diffusers_offline(micro_diffusers_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(micro_diffusers_dir, local_files_only=True)
    assert pipe.vae.config.scaling_factor == PRESETS["micro"].vae.scaling_factor
    assert pipe.tokenizer.pad_token_id == 49407
    assert pipe.safety_checker is None


def test_export_refuses_to_overwrite(tmp_path, micro_bundle_dir):
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "keep.txt").write_text("mine")
    with pytest.raises(LdmError, match="already exists and is not empty"):
        export_diffusers(load_bundle(micro_bundle_dir), tmp_path / "sd")
    assert (tmp_path / "sd" / "keep.txt").read_text() == "mine"


def test_damaged_bundles_are_reported(tmp_path, micro_bundle_dir):
    broken = tmp_path / "broken"
    shutil.copytree(micro_bundle_dir, broken)
    data = bytearray((broken / "unet.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (broken / "unet.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="unet.safetensors does not match its sha256"):
        load_bundle(broken)
    (broken / "unet.safetensors").unlink()
    with pytest.raises(BundleError, match="missing unet.safetensors"):
        load_bundle(broken)
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(broken)
    (broken / "manifest.json").unlink()
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(broken)
    with pytest.raises(BundleError, match="no model bundle at"):
        load_bundle(tmp_path / "nowhere")


def test_weights_that_do_not_fit_the_config(tmp_path, micro_bundle_dir):
    odd = tmp_path / "odd"
    shutil.copytree(micro_bundle_dir, odd)
    save_file({"x": torch.zeros(1)}, str(odd / "vae.safetensors"))
    with pytest.raises(BundleError, match="vae weights do not fit its config"):
        load_bundle(odd, verify=False)


def test_import_refuses_pickles_and_foreign_models(tmp_path, micro_diffusers_dir):
    pickled = tmp_path / "pickled"
    shutil.copytree(micro_diffusers_dir, pickled)
    (pickled / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (pickled / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not even loaded")
    with pytest.raises(BundleError, match="only pickled .bin weights"):
        import_diffusers(pickled)

    foreign = tmp_path / "foreign"
    shutil.copytree(micro_diffusers_dir, foreign)
    cfg_path = foreign / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text()) | {"addition_embed_type": "text_time"}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="addition_embed_type='text_time'"):
        import_diffusers(foreign)

    cfg["addition_embed_type"] = None
    cfg["resnet_time_scale_shift"] = "scale_shift"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="UNet settings not supported by ldm: resnet_time_scale_shift='scale_shift'"):
        import_diffusers(foreign)


def shard(folder, part="unet", *, names=("a", "b")) -> dict:
    """Split ``part``'s single weights file into shards with an index, as large diffusers exports are."""
    from safetensors.torch import load_file

    single = folder / part / "diffusion_pytorch_model.safetensors"
    state = load_file(str(single))
    single.unlink()
    keys = sorted(state)
    halves = {f"diffusion_pytorch_model-{names[0]}.safetensors": keys[: len(keys) // 2],
              f"diffusion_pytorch_model-{names[1]}.safetensors": keys[len(keys) // 2 :]}  # fmt: skip
    for name, part_keys in halves.items():
        save_file({k: state[k] for k in part_keys}, str(folder / part / name))
    weight_map = {k: name for name, part_keys in halves.items() for k in part_keys}
    index = folder / part / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_import_reads_shards_and_nothing_outside_the_folder(tmp_path, micro_diffusers_dir, micro_bundle_dir):
    sharded = tmp_path / "sharded"
    shutil.copytree(micro_diffusers_dir, sharded)
    weight_map = shard(sharded)
    ours = load_bundle(micro_bundle_dir).unet.state_dict()
    back = import_diffusers(sharded).unet.state_dict()
    assert all(torch.equal(back[k], ours[k]) for k in ours)

    secret = tmp_path / "secret.safetensors"
    save_file({"x": torch.zeros(1)}, str(secret))
    index = sharded / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    for name in ["../../../../../etc/passwd", "../../secret.safetensors", str(secret), "/etc/hostname"]:
        key = next(iter(weight_map))
        index.write_text(json.dumps({"weight_map": {**weight_map, key: name}}))
        with pytest.raises(BundleError, match="not a .safetensors file beside it; refusing to read outside"):
            import_diffusers(sharded)
    index.write_text("{not json")
    with pytest.raises(BundleError, match="is not a readable shard index"):
        import_diffusers(sharded)


def test_a_manifest_naming_files_outside_the_bundle_is_refused(tmp_path, micro_bundle_dir):
    crafted = tmp_path / "crafted"
    shutil.copytree(micro_bundle_dir, crafted)
    manifest = json.loads((crafted / "manifest.json").read_text())
    manifest["files"]["../../../../etc/hostname"] = "0" * 64
    (crafted / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(crafted)


def test_cli_create_info_export_import(tmp_path, capsys):
    assert run_cli(main, ["create", "micro", str(tmp_path / "b"), "--set", "unet.layers_per_block=2"]) == 0
    assert load_bundle(tmp_path / "b").config.unet.layers_per_block == 2
    assert run_cli(main, ["create", "micro", str(tmp_path / "b")]) == 2
    assert "already holds a bundle; pass --force" in capsys.readouterr().err
    assert run_cli(main, ["create", "micro", str(tmp_path / "c"), "--set", "unet.layers=2"]) == 2
    assert "unknown config key 'unet.layers'" in capsys.readouterr().err
    assert run_cli(main, ["info", str(tmp_path / "b")]) == 0
    assert "layers_per_block: 2" in capsys.readouterr().out
    assert run_cli(main, ["export", str(tmp_path / "b"), str(tmp_path / "sd")]) == 0
    assert run_cli(main, ["import", str(tmp_path / "sd"), str(tmp_path / "b2")]) == 0
    assert_same_weights(load_bundle(tmp_path / "b"), load_bundle(tmp_path / "b2"))


def test_cli_convert_to_fp16(tmp_path, micro_bundle_dir, capsys):
    out = tmp_path / "half"
    assert run_cli(main, ["convert", str(micro_bundle_dir), str(out), "--dtype", "fp16"]) == 0
    assert f"wrote fp16 bundle {out}" in capsys.readouterr().out
    full, half = load_bundle(micro_bundle_dir), load_bundle(out)
    assert half.config == full.config and half.unet.dtype == torch.float16
    assert half.name == full.name == "micro"  # a copy keeps the model's name unless told otherwise
    for name, module in full.modules().items():
        ours = half.modules()[name].state_dict()
        for key, value in module.state_dict().items():
            expected = value.half() if value.is_floating_point() else value
            assert torch.equal(ours[key], expected), (name, key)
    weights = [f"{part}.safetensors" for part in ("vae", "text_encoder", "unet")]
    for name in weights:  # floating weights take half the bytes (headers aside)
        assert (out / name).stat().st_size < 0.6 * (micro_bundle_dir / name).stat().st_size
    assert run_cli(main, ["convert", str(micro_bundle_dir), str(out), "--dtype", "fp16"]) == 2
    assert "already holds a bundle; pass --force" in capsys.readouterr().err
    assert run_cli(main, ["convert", str(out), str(out), "--dtype", "fp32", "--force"]) == 2
    assert "choose an output folder other than the input" in capsys.readouterr().err


def test_cli_convert_renames(tmp_path, micro_bundle_dir):
    out = tmp_path / "renamed"
    assert run_cli(main, ["convert", str(micro_bundle_dir), str(out), "--dtype", "fp32", "--name", "shipped"]) == 0
    renamed = load_bundle(out)
    assert renamed.name == "shipped" and renamed.short_hash == load_bundle(micro_bundle_dir).short_hash


@pytest.mark.parametrize(
    "override, message",
    [
        ("unet.layers_per_block=-1", "layers_per_block must be at least 1, got -1"),
        ("unet.block_out_channels=[0, 0]", "block_out_channels and attention_heads must be positive"),
        ("text_encoder.layers=0", "layers must be at least 1, got 0"),
        ("unet.block_out_channels=[100000, 100000]", r"needs about \d+\.\d GiB, more than the .* limit; make it smaller"),
    ],
)
def test_create_refuses_shapes_that_cannot_work(tmp_path, capsys, override, message):
    """Refused before anything is built or written: no bundle that reports success and crashes later."""
    settings = [] if "100000" not in override else ["--set", "unet.attention_levels=[false,false]",
                                                    "--set", "unet.attention_heads=[8,8]"]  # fmt: skip
    assert run_cli(main, ["create", "micro", str(tmp_path / "b"), "--set", override, *settings]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "b").exists()


def test_the_memory_limit_can_be_raised_and_is_checked(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LDM_MEMORY_LIMIT_GB", "0.001")  # 1 MiB: the micro preset's 11 MB of weights are over it
    assert run_cli(main, ["create", "micro", str(tmp_path / "b")]) == 2
    assert "raise the limit with LDM_MEMORY_LIMIT_GB=N" in capsys.readouterr().err
    monkeypatch.setenv("LDM_MEMORY_LIMIT_GB", "lots")
    assert run_cli(main, ["create", "micro", str(tmp_path / "b")]) == 2
    assert "LDM_MEMORY_LIMIT_GB='lots' is not a positive number of GiB" in capsys.readouterr().err


@pytest.mark.parametrize("content", [None, b"unet: [unclosed\n", b"\xff\xfe binary", b"a: &a [1]\nb: *a\n"])
def test_info_on_a_missing_or_damaged_config(tmp_path, micro_bundle_dir, capsys, content):
    damaged = tmp_path / "damaged"
    shutil.copytree(micro_bundle_dir, damaged)
    if content is None:
        (damaged / "model.yaml").unlink()
    else:
        (damaged / "model.yaml").write_bytes(content)
    assert run_cli(main, ["info", str(damaged)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model.yaml" in err and err.count("\n") == 1, err


def test_output_paths_and_seeds_are_checked_before_any_work(tmp_path, micro_bundle_dir, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    cases = [
        (["create", "micro", str(a_file)], "is an existing file, not a folder"),
        (["create", "micro", str(a_file / "sub")], "is a file, so nothing can be written under it"),
        (["create", "micro", "/proc/ldm-test/x"], "cannot write to the output folder /proc/ldm-test/x"),
        (["convert", str(micro_bundle_dir), "/proc/ldm-test", "--dtype", "fp16"], "cannot write to the output folder"),
        (["export", str(micro_bundle_dir), str(a_file / "sd")], "is an existing file, not a folder"),
        (["import", str(micro_bundle_dir), str(a_file)], "is an existing file, not a folder"),
        (["create", "micro", str(tmp_path / "b"), "--seed", str(2**70)], "out of range: seeds run from 0 to 2^63 - 1"),
        (["create", "micro", str(tmp_path / "b"), "--seed", "-1"], "out of range"),
    ]
    for argv, message in cases:
        try:
            code = run_cli(main, argv)
        except SystemExit as exit:  # argparse's own refusal of a flag's value
            code = exit.code
        assert code == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
    assert a_file.read_text() == "not a folder" and not (tmp_path / "b").exists()


def test_a_derived_bundle_borrows_the_parts_it_shares_with_its_base(tmp_path):
    base = create_bundle(PRESETS["micro"], seed=0, name="base")
    save_bundle(base, tmp_path / "models" / "base")
    tuned = load_bundle(tmp_path / "models" / "base")
    with torch.no_grad():
        tuned.unet.conv_in.bias.add_(1.0)  # a fine-tuned UNet, the rest the base's
    full = save_bundle(tuned, tmp_path / "full")
    full_hash = tuned.manifest["hash"]
    save_bundle(tuned, tmp_path / "models" / "tuned", base=tmp_path / "models" / "base")
    manifest = tuned.manifest
    assert manifest["base"] == "../base" and manifest["hash"] == full_hash  # the hash of the full bundle
    assert set(manifest["borrowed"]) == {"vae.safetensors", "text_encoder.safetensors", "tokenizer/tokenizer.json",
                                         "tokenizer/tokenizer_config.json"}  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "models" / "tuned").iterdir()) == ["manifest.json", "model.yaml",
                                                                                  "unet.safetensors"]  # fmt: skip
    again = load_bundle(tmp_path / "models" / "tuned")
    for name, module in load_bundle(full).modules().items():
        theirs = again.modules()[name].state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in module.state_dict().items())
    shutil.move(tmp_path / "models" / "tuned", tmp_path / "alone")
    with pytest.raises(BundleError, match="borrows .* from its base bundle .*, which is not there; keep the two folders"):
        load_bundle(tmp_path / "alone")
