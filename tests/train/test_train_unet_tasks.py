"""train_unet.py --task inpaint / upscale on the micro bundle: exact resume, the bundle written, the grids, bad input."""

import json
import re

import pytest
from PIL import Image
from test_train_unet import COMMON, run_killed_and_resumed, write_shapes

import ldm.train.unet as unet_run
from ldm.cli import train_unet
from ldm.cli.common import run_cli
from ldm.formats.bundle import create_bundle, load_bundle, save_bundle
from ldm.models.presets import PRESETS, Task
from ldm.train.unet import check_model


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("task-data") / "shapes")


@pytest.fixture(scope="module")
def inpaint_bundle_dir(tmp_path_factory):
    """A randomly initialised micro inpainting bundle (read-only)."""
    folder = tmp_path_factory.mktemp("bundles") / "micro-inpaint"
    save_bundle(create_bundle(PRESETS["micro"].for_task(Task.INPAINT), seed=0, name="micro-inpaint"), folder)
    return folder


@pytest.fixture
def planned_sampling(monkeypatch):
    """The validation's generate, watched: the requests it was given (the real sampling runs them)."""
    requests = []
    real = unet_run.generate

    def generate(bundle, request, *, progress):
        requests.append(request)
        return real(bundle, request, progress=progress)

    monkeypatch.setattr(unet_run, "generate", generate)
    return requests


def killed_and_resumed(bundle, data, tmp_path, common):
    """4 steps straight, and the same run killed after its step-2 checkpoint and resumed: both at step 4 alike."""
    straight, killed = run_killed_and_resumed(bundle, data, tmp_path, common, steps=4, killed_at=2)
    held_out = [json.loads((out / "eval.json").read_text()) for out in (straight, killed)]
    assert held_out[0] == held_out[1] and len(held_out[0]) == 6  # fixed masks / noise levels: the same numbers
    return straight


def test_inpaint_run_resumes_exactly_and_writes_an_inpainting_bundle(micro_bundle_dir, shapes, tmp_path,
                                                                     planned_sampling):  # fmt: skip
    """Cached latents of the clean images, the masked ones encoded every step, masks from the training RNG."""
    common = [*COMMON, "--task", "inpaint", "--eval-data", str(shapes), "--cache-dir", str(tmp_path / "cache"),
              "--set", "train.checkpoint_every=2", "--set", "validation.num_prompts=2", "--set", "validation.steps=2"]  # fmt: skip
    out = killed_and_resumed(micro_bundle_dir, shapes, tmp_path, common)
    bundle = load_bundle(out / "bundle")
    assert bundle.config.task is Task.INPAINT and bundle.config.unet.in_channels == 2 * 4 + 1
    assert bundle.config.vae == load_bundle(micro_bundle_dir).config.vae
    assert bundle.unet.conv_in.weight[:, 4:].abs().sum() > 0  # the new channels, zero at the start, were trained

    request = planned_sampling[-1]  # the final grid: two training images, masked, and their captions
    assert request.image.shape == (2, 3, 64, 64) and request.mask.shape == (2, 1, 64, 64)
    assert set(request.mask.unique().tolist()) == {0.0, 1.0} and request.strength == 1.0
    assert request.prompts == ["square 0", "disc 1"]
    (grid,) = (out / "samples").glob("samples-00000004.png")
    assert Image.open(grid).size == (2 * 64, 2 * 64)  # the inputs above the results


def test_upscale_run_resumes_exactly_and_writes_an_upscaling_bundle(micro_bundle_dir, shapes, tmp_path,
                                                                    planned_sampling):  # fmt: skip
    """No cache, 64-px images from 32-px ones (the default would be the bundle's size × 2: 128)."""
    common = [*COMMON, "--task", "upscale", "--factor", "2", "--resolution", "64", "--no-cache",
              "--eval-data", str(shapes), "--set", "train.checkpoint_every=2", "--set", "validation.num_prompts=2",
              "--set", "validation.noise_level=30", "--set", "validation.steps=2"]  # fmt: skip
    out = killed_and_resumed(micro_bundle_dir, shapes, tmp_path, common)
    config = load_bundle(out / "bundle").config
    assert config.task is Task.UPSCALE and config.upscale_factor == 2 and config.unet.in_channels == 2 * 4
    assert config.unet.num_class_embeds == 1000 and config.default_size == 128
    request = planned_sampling[-1]
    assert request.low_res.shape == (2, 3, 32, 32) and request.noise_level == 30 and request.width == 64
    assert Image.open(out / "samples" / "samples-00000004.png").size == (2 * 64, 2 * 64)


def resolve(argv):
    return train_unet.resolve_config(train_unet.build_parser().parse_args(argv))


def test_an_upscaler_trains_at_the_bundle_size_times_the_factor(micro_bundle_dir, shapes, inpaint_bundle_dir):
    for factor, side in ((None, 128), ("4", 256)):
        extra = ["--factor", factor] if factor else []
        cfg = resolve(["--bundle", str(micro_bundle_dir), "--data", str(shapes), "--task", "upscale", *extra])
        assert cfg.data.resolution == side and cfg.model.default_size == side and cfg.model.task is Task.UPSCALE
    # An inpainting bundle given for --task inpaint is trained on as it is.
    cfg = resolve(["--bundle", str(inpaint_bundle_dir), "--data", str(shapes), "--task", "inpaint"])
    base = load_bundle(inpaint_bundle_dir)
    assert cfg.model == base.config
    check_model(cfg, base)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--task", "upscale", "--resolution", "72"],
         "an x2 upscaler trains at a data.resolution that is a multiple of 16 .*got 72; try --resolution 64"),
        (["--task", "upscale", "--factor", "1"], "--factor must be at least 2 .*; try --factor 2"),
        (["--factor", "2"], "--factor is the upscaler's, and this run's task is text_to_image; pass --task upscale"),
        (["--bundle", "I"], "is an inpaint model, and --task text_to_image trains text_to_image bundles only"),
        (["--bundle", "I", "--task", "upscale"], "--task upscale starts from a text_to_image bundle"),
        (["--task", "inpaint", "--lora-rank", "2"], "LoRA adapters leave out; train without --lora-rank"),
        (["--task", "upscale", "--set", "task_inputs.max_noise_level=2000"],
         "max_noise_level must be at most 1000 .*got 2000"),
        (["--task", "inpaint", "--set", "task_inputs.full_masks=0.9"], "mask shares sum to 1.65, more than 1"),
        (["--set", "upscale_factor=1"], "upscale_factor must be at least 2"),
    ],
)  # fmt: skip
def test_bad_task_input_is_one_line_and_exit_2(argv, message, micro_bundle_dir, inpaint_bundle_dir, shapes, capsys,
                                               tmp_path, monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    bundle = inpaint_bundle_dir if "I" in argv else micro_bundle_dir
    argv = ["--bundle", str(bundle), "--data", str(shapes), *[a for a in argv if a not in ("--bundle", "I")]]
    assert run_cli(train_unet.main, argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]  # progress bars end with \r
    assert lines[-1].startswith("error: ") and sum("error" in line for line in lines) == 1, err
    assert re.search(message, lines[-1]), err
