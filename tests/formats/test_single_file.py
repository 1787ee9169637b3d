"""Single-file CompVis checkpoints: detection from real SD shapes, bit-exact round trips, diffusers' own
``from_single_file`` as the reference, the bad files a user meets, and the cache that generate.py converts into."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_bundle import assert_same_weights

from ldm.cli.bundle import main as bundle_main
from ldm.cli.common import run_cli
from ldm.errors import BundleError, LdmError
from ldm.formats.bundle import create_bundle, load_bundle, save_bundle
from ldm.formats.diffusers import export_diffusers
from ldm.formats.single_file import (
    CLIP,
    OPEN_CLIP,
    Family,
    TensorInfo,
    cached_bundle,
    detect,
    expected_shapes,
    export_single_file,
    import_single_file,
)
from ldm.models.autoencoder import AutoencoderConfig
from ldm.models.presets import PRESETS, ModelConfig, Task
from ldm.models.text_encoder import Activation, Padding, TextEncoderConfig
from ldm.models.unet import UNetConfig
from ldm.pipeline import Request, generate
from ldm.pipeline.schedule import Prediction, ScheduleConfig, get_sampler

# SD 1.5's block structure (four levels, attention on the first three, two layers per block, 8 heads, 32 norm groups,
# a four-level VAE of two layers) at a width that runs in seconds: SD's conventions read it back exactly.
SD15_MINI = ModelConfig(
    vae=AutoencoderConfig(block_out_channels=(32, 32, 64, 64), scaling_factor=0.18215),
    text_encoder=TextEncoderConfig(width=64, layers=2, heads=1, mlp_width=256),
    unet=UNetConfig(block_out_channels=(32, 64, 64, 64), cross_attention_dim=64),
)
# SD 2.x's: linear projections, 64 channels a head, the OpenCLIP tower, v-prediction at 768.
SD21_MINI = ModelConfig(
    vae=AutoencoderConfig(block_out_channels=(32, 32, 64, 64), scaling_factor=0.18215, sample_size=768),
    text_encoder=TextEncoderConfig(width=64, layers=2, heads=1, mlp_width=256, activation=Activation.GELU,
                                   padding=Padding.ZERO),  # fmt: skip
    unet=UNetConfig(sample_size=96, block_out_channels=(64, 64, 64, 64), attention_heads=(1, 1, 1, 1),
                    cross_attention_dim=64, use_linear_projection=True),  # fmt: skip
    schedule=ScheduleConfig(prediction=Prediction.V),
)
MICRO_SD2 = replace(
    PRESETS["micro"],
    text_encoder=replace(PRESETS["micro"].text_encoder, activation=Activation.GELU, padding=Padding.ZERO),
    schedule=ScheduleConfig(prediction=Prediction.V),
)


def shapes_of(config):
    return {k: TensorInfo("F32", v) for k, v in expected_shapes(config).items()}


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """The SD-1.5-shaped bundle and its single file, shared by the module (read-only)."""
    folder = tmp_path_factory.mktemp("sd15")
    bundle = create_bundle(SD15_MINI, seed=0, name="sd15-mini")
    path, notes = export_single_file(bundle, folder / "sd15-mini.safetensors")
    assert notes == []  # it follows SD's conventions: any reader builds the same model
    return bundle, path


@pytest.fixture(scope="module")
def micro_file(micro_bundle_dir, tmp_path_factory):
    path, _ = export_single_file(load_bundle(micro_bundle_dir), tmp_path_factory.mktemp("micro") / "micro.safetensors")
    return path


def without_metadata(path: Path, target: Path, edit=None) -> Path:
    """A copy of a single file without ldm's metadata (as other tools write them), optionally edited."""
    state = load_file(str(path))
    if edit:
        edit(state)
    save_file(state, str(target))
    return target


@pytest.mark.parametrize("name", ["sd-v1", "sd-v2"])
@pytest.mark.parametrize("task", [Task.TEXT_TO_IMAGE, Task.INPAINT])
def test_the_full_size_layouts_are_recognised(name, task):
    """SD 1.5 / 2.1 (and their inpainting models) from the keys and shapes a real file has, on meta tensors."""
    config = PRESETS[name] if task is Task.TEXT_TO_IMAGE else PRESETS[name].for_task(task)
    shapes = shapes_of(config)
    # the keys diffusers itself tells the layouts by
    assert "model.diffusion_model.input_blocks.0.0.weight" in shapes
    assert shapes["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == (9 if task is Task.INPAINT else 4)
    if name == "sd-v1":
        assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in shapes
        assert CLIP + "embeddings.position_embedding.weight" in shapes
    else:
        assert "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight" in shapes
        assert shapes[OPEN_CLIP + "token_embedding.weight"].shape == (49408, 1024)
        assert OPEN_CLIP + "transformer.resblocks.23.mlp.c_proj.weight" in shapes  # 24 blocks, as SD 2.x ships
    found = detect(shapes, {}, prediction=None, path=Path("x.safetensors"))
    assert found.family is (Family.SD1 if name == "sd-v1" else Family.SD2)
    expected = config
    if name == "sd-v2" and task is Task.INPAINT:  # SD 2 inpainting is an ε model at 512
        expected = replace(config, schedule=ScheduleConfig(), unet=replace(config.unet, sample_size=64),
                           vae=replace(config.vae, sample_size=512))  # fmt: skip
    assert found.config == expected
    assert any("assumed" in note for note in found.notes)


def test_sd2_prediction_is_assumed_and_can_be_stated():
    shapes = shapes_of(PRESETS["sd-v2"])
    assumed = detect(shapes, {}, prediction=None, path=Path("x"))
    assert assumed.config.schedule.prediction is Prediction.V and assumed.config.default_size == 768
    assert any("assumed v-prediction" in note and "--prediction epsilon" in note for note in assumed.notes)
    base = detect(shapes, {}, prediction=Prediction.EPSILON, path=Path("x"))
    assert base.config.schedule.prediction is Prediction.EPSILON and base.config.default_size == 512
    assert not any("v-prediction" in note for note in base.notes)


@pytest.mark.parametrize("config", [PRESETS["micro"], MICRO_SD2, PRESETS["micro"].for_task(Task.INPAINT)],
                         ids=["sd1", "sd2-v", "inpaint"])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bundle_to_file_to_bundle_is_bit_identical(tmp_path, config, dtype):
    bundle = create_bundle(config, seed=2, name="round").to(dtype=dtype)
    path, notes = export_single_file(bundle, tmp_path / "m.safetensors")
    assert notes and "metadata" in notes[0]  # micro's 4 norm groups are not SD's: said, and kept in the metadata
    back, found = import_single_file(path)
    assert found.from_metadata and back.config == bundle.config and back.name == "round"
    assert_same_weights(bundle, back)
    assert not list(tmp_path.glob(".*"))  # written atomically: no temp file left


def test_a_conventional_file_needs_no_metadata(sd15, tmp_path):
    bundle, path = sd15
    bare = without_metadata(path, tmp_path / "bare.safetensors")
    back, found = import_single_file(bare)
    assert not found.from_metadata and back.config == SD15_MINI and back.name == "bare"
    assert_same_weights(bundle, back)
    assert "SD 1.x, ε-prediction: UNet 32-64-64-64" in found.describe()


def test_an_sd2_file_drops_its_last_text_block(tmp_path):
    """An SD 2.x file has one text block more than the encoder uses; ours is an identity, and any last block is
    dropped on import, whatever it holds."""
    bundle = create_bundle(MICRO_SD2, seed=1)
    path, _ = export_single_file(bundle, tmp_path / "m.safetensors")
    state = load_file(str(path))
    last = f"{OPEN_CLIP}transformer.resblocks.{MICRO_SD2.text_encoder.layers}."
    assert torch.equal(state[last + "mlp.c_proj.weight"], torch.zeros_like(state[last + "mlp.c_proj.weight"]))
    state[last + "mlp.c_proj.weight"] += 1  # a real file's 24th block is not an identity
    save_file(state, str(tmp_path / "edited.safetensors"), metadata={"ldm": load_meta(path)})
    assert_same_weights(bundle, import_single_file(tmp_path / "edited.safetensors")[0])


def load_meta(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()["ldm"]


def reference_images(single_file, config_folder, *, steps, sampler_name, seeds):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(str(single_file), config=str(config_folder), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    sampler = get_sampler(sampler_name)
    pipe.scheduler = sampler.scheduler.from_config(pipe.scheduler.config, **dict(sampler.options))
    out = pipe(["red apple", "cat face"], negative_prompt=["blurry", ""], num_inference_steps=steps,
               guidance_scale=7.5, generator=[torch.Generator().manual_seed(s) for s in seeds], height=64, width=64,
               output_type="np")  # fmt: skip
    return torch.from_numpy(out.images).permute(0, 3, 1, 2)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["sd15", "sd21"])
def test_generate_matches_diffusers_from_single_file(sd15, tmp_path, which):
    """The same file through diffusers' own single-file loader and through ours: the same pixels. The config folder
    it is given holds configs only, so every weight comes from the file."""
    if which == "sd15":
        path = sd15[1]
        source = sd15[0]
    else:
        source = create_bundle(SD21_MINI, seed=0, name="sd21-mini")
        path, notes = export_single_file(source, tmp_path / "sd21-mini.safetensors")
        assert notes == []
    export_diffusers(source, tmp_path / "configs")
    for weights in (tmp_path / "configs").rglob("*.safetensors"):
        weights.unlink()
    bundle, _ = import_single_file(path)
    request = Request(prompts=["red apple", "cat face"], negative_prompts=["blurry", ""], seeds=[5, 6], steps=3,
                      guidance_scale=7.5, sampler=get_sampler("euler"), width=64, height=64)  # fmt: skip
    ours = generate(bundle, request, progress=False)
    theirs = reference_images(path, tmp_path / "configs", steps=3, sampler_name="euler", seeds=[5, 6])
    assert ours.shape == theirs.shape == (2, 3, 64, 64) and ours.std() > 0.01
    assert (ours - theirs).abs().max().item() <= 1e-4


def edited(micro_file, tmp_path, edit, name="edited.safetensors"):
    """The micro file with its metadata and ``edit`` applied to its tensors."""
    state = load_file(str(micro_file))
    edit(state)
    save_file(state, str(tmp_path / name), metadata={"ldm": load_meta(micro_file)})
    return tmp_path / name


def test_a_missing_misshapen_or_foreign_key_is_named(micro_file, tmp_path):
    key = "first_stage_model.decoder.up.1.block.0.norm1.weight"
    with pytest.raises(BundleError, match=f"lacks {key}, which a model of its shape has"):
        import_single_file(edited(micro_file, tmp_path, lambda s: s.pop(key)))
    key = "model.diffusion_model.output_blocks.2.0.skip_connection.weight"

    def misshape(state):
        state[key] = torch.zeros(3, 3)

    with pytest.raises(BundleError, match=rf"{key} has shape \[3, 3\], a model of its shape needs \[32, 96, 1, 1\]"):
        import_single_file(edited(micro_file, tmp_path, misshape))

    def add(state):
        state["model.diffusion_model.input_blocks.9.0.in_layers.0.weight"] = torch.zeros(2)

    with pytest.raises(BundleError, match="holds model.diffusion_model.input_blocks.9.0.in_layers.0.weight, which no part"):
        import_single_file(edited(micro_file, tmp_path, add))

    def extras(state):  # what real files carry beside the parts: the schedule's buffers, position ids, EMA
        state["alphas_cumprod"] = torch.ones(1000)
        state[CLIP + "embeddings.position_ids"] = torch.arange(77)[None]
        state["model_ema.decay"] = torch.tensor(0.9999)

    assert_same_weights(load_bundle_from(micro_file), import_single_file(edited(micro_file, tmp_path, extras))[0])


def load_bundle_from(micro_file):
    return import_single_file(micro_file)[0]


def test_files_that_are_not_sd_checkpoints(micro_file, tmp_path):
    data = micro_file.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match=r"is truncated: its header describes [\d,]+ bytes, the file has [\d,]+; download it again"):
        import_single_file(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"hello, world")
    with pytest.raises(BundleError, match="is not a safetensors file"):
        import_single_file(tmp_path / "junk.safetensors")
    save_file({"conditioner.embedders.0.transformer.x": torch.zeros(1), "model.diffusion_model.x": torch.zeros(1)},
              str(tmp_path / "xl.safetensors"))  # fmt: skip
    with pytest.raises(BundleError, match="is an SDXL checkpoint; ldm imports Stable Diffusion 1.x/2.x"):
        import_single_file(tmp_path / "xl.safetensors")
    save_file({"encoder.down.0.block.0.conv1.weight": torch.zeros(1)}, str(tmp_path / "vae.safetensors"))
    with pytest.raises(BundleError, match=r"is a VAE on its own \(pass it to generate.py --vae\)"):
        import_single_file(tmp_path / "vae.safetensors")
    save_file({"double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(1)}, str(tmp_path / "flux.safetensors"))
    with pytest.raises(BundleError, match="of an architecture ldm does not know"):
        import_single_file(tmp_path / "flux.safetensors")


def test_pickles_need_allow_pickle_and_load_weights_only(sd15, tmp_path):
    bundle, path = sd15
    ckpt = tmp_path / "sd15-mini.ckpt"
    torch.save({"state_dict": load_file(str(path)), "global_step": 10}, ckpt)
    with pytest.raises(BundleError, match=r"is a pickle \(.ckpt\), which can run code when loaded; pass --allow-pickle"):
        import_single_file(ckpt)
    back, _ = import_single_file(ckpt, allow_pickle=True)
    assert back.config == SD15_MINI
    assert_same_weights(bundle, back)
    torch.save({"state_dict": {"x": torch.zeros(1)}, "callback": Path("x")}, tmp_path / "objects.ckpt")
    with pytest.raises(BundleError, match="does not load as weights only"):
        import_single_file(tmp_path / "objects.ckpt", allow_pickle=True)


def test_the_command_line_both_ways(micro_bundle_dir, tmp_path, capsys):
    file = tmp_path / "micro.safetensors"
    assert run_cli(bundle_main, ["export", str(micro_bundle_dir), "--single-file", str(file)]) == 0
    assert f"exported {micro_bundle_dir} to single file {file}" in capsys.readouterr().out
    assert run_cli(bundle_main, ["import", str(file), str(tmp_path / "back")]) == 0
    out = capsys.readouterr().out
    assert "found SD 1.x, ε-prediction: UNet 32-64" in out and "config from its ldm metadata" in out
    original, back = load_bundle(micro_bundle_dir), load_bundle(tmp_path / "back")
    assert back.config == original.config and back.name == original.name
    assert_same_weights(original, back)
    assert run_cli(bundle_main, ["export", str(micro_bundle_dir), "--single-file", str(file)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_bundle_import_errors_are_one_line_and_write_nothing(sd15, micro_file, tmp_path, capsys):
    _, path = sd15
    torch.save(load_file(str(micro_file)), tmp_path / "m.ckpt")
    data = micro_file.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:1000])
    sd2 = without_metadata(path, tmp_path / "sd2.safetensors")
    cases = [
        ([tmp_path / "m.ckpt"], "pass --allow-pickle"),
        ([tmp_path / "cut.safetensors"], "is truncated"),
        ([tmp_path / "m.ckpt", "--allow-pickle"], "do not fit SD's conventions"),  # micro's widths, no metadata
        ([sd2, "--variant", "fp16"], "--variant picks among a diffusers folder's weights"),
    ]
    for argv, message in cases:
        out = tmp_path / "out"
        assert run_cli(bundle_main, ["import", str(argv[0]), str(out), *map(str, argv[1:])]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failed_save_leaves_no_folder(sd15, tmp_path, monkeypatch):
    import ldm.formats.bundle as bundle_module

    def failing(bundle, folder):
        save_bundle(bundle, folder)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bundle_module, "save_bundle", failing)
    with pytest.raises(OSError):
        cached_bundle(sd15[1], root=tmp_path)
    assert [p.name for p in (tmp_path / "single-file").iterdir()] == ["hashes.json"]


def test_the_cache_converts_once(sd15, tmp_path, monkeypatch):
    import ldm.formats.single_file as single_file

    bundle, path = sd15
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    folder, found = cached_bundle(path)
    digest = single_file.sha256_file(path)
    assert folder == tmp_path / "cache" / "single-file" / digest[:16] and found is not None
    assert_same_weights(bundle, load_bundle(folder))
    hashed = []
    monkeypatch.setattr(single_file, "sha256_file", lambda p: hashed.append(p) or digest)
    assert cached_bundle(path) == (folder, None)  # reused, and not even hashed again
    assert hashed == []
    index = json.loads((tmp_path / "cache" / "single-file" / "hashes.json").read_text())
    assert index[str(path.resolve())]["sha256"] == digest


@pytest.mark.slow
def test_generate_takes_a_single_file(sd15, tmp_path, monkeypatch, capsys):
    from ldm.cli import generate

    bundle, path = sd15
    copy = tmp_path / "my-model.safetensors"
    shutil.copyfile(path, copy)
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    argv = ["red apple", "--model", str(copy), "--steps", "2", "--seed", "1", "--width", "64", "--height", "64",
            "--quiet"]  # fmt: skip
    assert run_cli(generate.main, [*argv, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert f"{copy}: SD 1.x, ε-prediction" in err and "converted once into" in err
    assert run_cli(generate.main, [*argv, "--out", str(tmp_path / "b")]) == 0
    assert "converted" not in capsys.readouterr().err  # the cached bundle, reused
    from ldm.formats.pngmeta import ImageParameters, read_png_parameters

    (first,), (second,) = (list((tmp_path / d).glob("0*.png")) for d in "ab")
    assert first.read_bytes() == second.read_bytes()
    assert ImageParameters.from_text(read_png_parameters(first)).model == "sd15-mini"  # the name it was exported as


def test_generate_refuses_a_pickle_with_the_fix(tmp_path, capsys, micro_file):
    from ldm.cli import generate

    torch.save({}, tmp_path / "m.ckpt")
    assert run_cli(generate.main, ["x", "--model", str(tmp_path / "m.ckpt"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "ldm bundle import" in err and "--allow-pickle" in err and err.count("\n") == 1


def test_export_refuses_what_no_single_file_describes(tmp_path):
    odd = replace(PRESETS["micro"], text_encoder=replace(PRESETS["micro"].text_encoder, activation=Activation.GELU))
    with pytest.raises(LdmError, match="no single-file layout describes it"):
        export_single_file(create_bundle(odd), tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())
