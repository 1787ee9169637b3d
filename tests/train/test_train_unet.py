"""train_unet.py on the micro bundle: exact resume, a bundle that generate.py loads, held-out losses, bad input."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from tb_events import logged_steps

from ldm.cli import generate, train_unet
from ldm.cli.common import run_cli
from ldm.formats.bundle import load_bundle
from ldm.pipeline.schedule import Prediction
from ldm.train.loop import EpochBatches
from ldm.train.unet import ValidationConfig


def write_shapes(root, n=8, *, sizes=None):
    """``n`` captioned pictures of discs and squares on white (imagefolder layout); ``sizes``: (w, h) per image."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        w, h = sizes[i] if sizes else (64, 64)
        yy, xx = np.mgrid[:h, :w]
        image = np.full((h, w, 3), 255, np.uint8)
        cy, cx, r = h / 2 + rng.integers(-h // 8 - 1, h // 8 + 1), w * rng.uniform(0.25, 0.4), max(2, min(w, h) // 4)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2 if i % 2 else (abs(yy - cy) < r) & (abs(xx - cx) < r)
        image[mask] = rng.integers(0, 256, 3)
        Image.fromarray(image).save(root / f"{i:02d}.png")
        rows.append(json.dumps({"file_name": f"{i:02d}.png", "text": f"{'disc' if i % 2 else 'square'} {i % 3}"}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def args(bundle, data, out, *extra):
    return ["--bundle", str(bundle), "--data", str(data), "--out", str(out), "--set", "train.batch_size=4",
            "--set", "train.log_every=1", "--set", "train.warmup_steps=0", "--set", "validation.steps=2",
            *extra]  # fmt: skip


def checkpoint_tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("unet-data") / "shapes")


COMMON = ["--set", "train.ema_decay=0.9", "--set", "train.sample_every=100", "--set", "data.random_flip=0.5",
          "--set", "loss.caption_dropout=0.3", "--set", "train.lr=1e-3"]  # fmt: skip


def assert_same_checkpoints(path_a, path_b):
    a, b = checkpoint_tensors(path_a), checkpoint_tensors(path_b)
    assert a.keys() == b.keys()
    assert any(k.startswith("s.optimizers.unet.state.") for k in a)  # optimizer state is in there
    assert any(k.startswith("s.emas.unet.") for k in a)  # and the EMA
    assert any(k.startswith("s.models.unet.unet.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_is_exact(micro_bundle_dir, shapes_folder, tmp_path):
    """6 steps straight = 3 steps, stop, resume 3 (constant LR: a cosine schedule depends on --max-steps)."""
    common = [*COMMON, "--set", "train.lr_schedule=constant", "--set", "train.gradient_accumulation=2",
              "--set", "loss.noise_offset=0.1", "--set", "train.checkpoint_every=100",
              "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_cli(train_unet.main, args(micro_bundle_dir, shapes_folder, straight, "--max-steps", "6", *common)) == 0
    assert run_cli(train_unet.main, args(micro_bundle_dir, shapes_folder, split, "--max-steps", "3", *common)) == 0
    resumed = args(micro_bundle_dir, shapes_folder, split, "--max-steps", "6", "--resume", "latest", *common)
    assert run_cli(train_unet.main, resumed) == 0
    assert_same_checkpoints(straight / "checkpoints" / "step-00000006.safetensors",
                            split / "checkpoints" / "step-00000006.safetensors")  # fmt: skip
    first = checkpoint_tensors(split / "checkpoints" / "step-00000003.safetensors")
    last = checkpoint_tensors(split / "checkpoints" / "step-00000006.safetensors")
    assert any(not torch.equal(first[k], last[k]) for k in last if k.startswith("s.models."))  # the weights moved


def run_killed_and_resumed(bundle, data, tmp_path, common, *, steps: int, killed_at: int):
    """``steps`` steps straight, and the same run killed after its ``killed_at`` checkpoint and resumed (from the
    config the run saved): both end with the same checkpoint. Returns the two output folders."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_cli(train_unet.main, args(bundle, data, straight, "--max-steps", str(steps), *common)) == 0
    (killed / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "checkpoints" / f"step-{killed_at:08d}.safetensors", killed / "checkpoints")
    shutil.copy(straight / "config.yaml", killed)
    assert run_cli(train_unet.main, ["--out", str(killed), "--resume", "latest"]) == 0  # the saved config is used
    assert_same_checkpoints(straight / "checkpoints" / f"step-{steps:08d}.safetensors",
                            killed / "checkpoints" / f"step-{steps:08d}.safetensors")  # fmt: skip
    return straight, killed


def test_resume_from_a_mid_run_checkpoint_is_exact(micro_bundle_dir, shapes_folder, tmp_path):
    """A run killed after its step-3 checkpoint and resumed ends as the straight run: bucketed batches, no cache,
    v-prediction, warm-up + cosine LR."""
    common = [*COMMON, "--bucketing", "--no-cache", "--prediction", "v_prediction", "--set", "train.warmup_steps=2",
              "--set", "train.lr_schedule=cosine", "--set", "train.checkpoint_every=3"]  # fmt: skip
    run_killed_and_resumed(micro_bundle_dir, shapes_folder, tmp_path, common, steps=6, killed_at=3)


def test_trains_a_bundle_that_generate_loads(micro_bundle_dir, shapes_folder, tmp_path, capsys):
    out = tmp_path / "run"
    argv = args(micro_bundle_dir, shapes_folder, out, "--max-steps", "2", "--eval-data", str(shapes_folder),
                "--prediction", "v_prediction", "--set", "train.sample_every=1", "--set", "train.lr=1e-3",
                "--validation-prompt", "red disc", "--validation-prompt", "blue square")  # fmt: skip
    assert run_cli(train_unet.main, argv) == 0
    printed = capsys.readouterr().out
    assert "usable pairs" in printed  # the data report comes first
    assert "bundle written to" in printed and "steps/s" in printed

    base, trained = load_bundle(micro_bundle_dir), load_bundle(out / "bundle")
    assert trained.config.schedule.prediction is Prediction.V  # the bundle says what its UNet was trained for
    assert base.config.schedule.prediction is Prediction.EPSILON
    assert trained.config.vae == base.config.vae and trained.config.unet == base.config.unet
    for part in ("vae", "text_encoder"):  # frozen parts are carried over bit for bit
        sa, sb = base.modules()[part].state_dict(), trained.modules()[part].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ua, ub = base.unet.state_dict(), trained.unet.state_dict()
    assert any(not torch.equal(ua[k], ub[k]) for k in ua)

    # Validation: a grid of both prompts, held-out loss per timestep range, TensorBoard events.
    (grid,) = (out / "samples").glob("samples-00000002.png")
    assert Image.open(grid).size == (128, 64)
    losses = json.loads((out / "eval.json").read_text())
    assert len([k for k in losses if k.startswith("eval/loss_t")]) == 5 and "eval/loss" in losses
    assert all(np.isfinite(v) and v > 0 for v in losses.values())
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    # Validated after step 1 in the loop and once after the last step, with the weights the bundle gets.
    for tag in ("samples", "eval/loss", "eval/loss_t000-199"):
        assert logged_steps(out, tag) == {1: 1, 2: 1}, tag
    assert trained.name == "micro"  # the name of the bundle it started from, not of the output folder

    images = tmp_path / "images"
    assert run_cli(generate.main, ["disc", "--model", str(out / "bundle"), "--steps", "2", "--seed", "3",
                                   "--out", str(images), "--quiet"]) == 0  # fmt: skip
    (png,) = images.glob("0*.png")
    pixels = np.asarray(Image.open(png))
    assert pixels.shape == (64, 64, 3) and pixels.std() > 1


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide state: a bf16 run in this process needs it reset before and after."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_full_fine_tune_with_the_text_encoder(
    micro_bundle_dir, shapes_folder, tmp_path, capsys, fresh_accelerator_state
):
    out = tmp_path / "ft"
    argv = ["--init-from", str(micro_bundle_dir), *args(micro_bundle_dir, shapes_folder, out)[2:], "--max-steps", "2",
            "--train-text-encoder", "--gradient-checkpointing", "--name", "emoji-ft",
            "--set", "train.mixed_precision=bf16", "--set", "adam_8bit=true", "--set", "text_encoder_lr=1e-3",
            "--set", "train.sample_every=100"]  # fmt: skip
    assert run_cli(train_unet.main, argv) == 0
    assert "using torch AdamW" in capsys.readouterr().out  # bitsandbytes is not installed here, or no GPU
    base, trained = load_bundle(micro_bundle_dir), load_bundle(out / "bundle")
    ta, tb = base.text_encoder.model.state_dict(), trained.text_encoder.model.state_dict()
    assert any(not torch.equal(ta[k], tb[k]) for k in ta)
    va, vb = base.vae.state_dict(), trained.vae.state_dict()
    assert all(torch.equal(va[k], vb[k]) for k in va)
    assert trained.name == "emoji-ft"  # --name


def test_the_batch_order_is_built_once(micro_bundle_dir, shapes_folder, tmp_path, monkeypatch):
    """The run checks its batch order before encoding anything and hands that order to the loop."""
    built = []
    init = EpochBatches.__init__

    def counting(self, *args, **kwargs):
        built.append(args)
        init(self, *args, **kwargs)

    monkeypatch.setattr(EpochBatches, "__init__", counting)
    argv = args(micro_bundle_dir, shapes_folder, tmp_path / "run", "--max-steps", "1", "--no-cache",
                "--set", "train.sample_every=100")  # fmt: skip
    assert run_cli(train_unet.main, argv) == 0
    assert built == [(8, 4)]  # 8 pairs in batches of 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "d", "--out", "x"], "pass --bundle BUNDLE"),
        (["--bundle", "B", "--out", "x"], "no training data; pass --data FOLDER"),
        (["--bundle", "nowhere", "--data", "d"], "no model bundle at nowhere"),
        (["--bundle", "B", "--data", "d", "--lora-rank", "-1"], "--lora-rank must be ≥ 0"),
        (["--bundle", "B", "--data", "d", "--set", "loss.caption_dropout=2"], "caption_dropout must be in \\[0, 1\\]"),
        (["--bundle", "B", "--data", "d", "--set", "loss.min_snr_gama=1"], "did you mean 'min_snr_gamma'"),
        (
            ["--bundle", "B", "--data", "D", "--set", "model.unet.layers_per_block=2"],
            "model.unet differs from the bundle",
        ),
        (
            ["--bundle", "B", "--data", "D", "--lora-rank", "2", "--prediction", "v_prediction"],
            "LoRA adapters keep the base",
        ),
        (["--bundle", "B", "--data", "missing"], "dataset folder .*missing not found; check the path"),
        (["--bundle", "B", "--data", "D", "--budget-minutes", "-1"], "train.budget_minutes must be at least 0"),
        (["--bundle", "B", "--data", "D", "--caption-extension", "txt"], "caption_extension must start with '.'"),
        # Validation settings are checked when the config is read, not at the first validation mid-run.
        (["--bundle", "B", "--data", "D", "--set", "validation.steps=0"], "validation.steps must be at least 1"),
        (["--bundle", "B", "--data", "D", "--set", "validation.sampler=foo"], "validation.sampler: unknown sampler 'foo'"),
        (["--bundle", "B", "--data", "D", "--set", "train.batch_size=64"], "fewer than one batch"),
        (
            ["--bundle", "B", "--data", "D", "--bucketing", "--set", "train.batch_size=64"],
            "no bucket holds a whole batch",
        ),
        (
            ["--bundle", "B", "--data", "D", "--out", "o", "--resume", "nope.safetensors"],
            "checkpoint nope.safetensors not found",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    argv, message, micro_bundle_dir, shapes_folder, capsys, tmp_path, monkeypatch
):
    import re

    monkeypatch.chdir(tmp_path)
    argv = [str(micro_bundle_dir) if a == "B" else str(shapes_folder) if a == "D" else a for a in argv]
    assert run_cli(train_unet.main, argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]  # progress bars end with \r
    assert lines[-1].startswith("error: ") and sum("error" in line for line in lines) == 1, err
    assert re.search(message, lines[-1]), err


def test_validation_grids_sample_as_generate_does_by_default():
    validation = ValidationConfig()
    assert (validation.sampler, validation.guidance_scale, validation.steps) == (
        generate.DEFAULTS["sampler"], generate.DEFAULTS["guidance_scale"], generate.DEFAULTS["steps"]
    )


def test_cache_dir_and_resolution_are_checked_before_any_work(micro_bundle_dir, shapes_folder, tmp_path, capsys):
    (tmp_path / "a-file").write_text("keep me")
    argv = args(micro_bundle_dir, shapes_folder, tmp_path / "run", "--max-steps", "1", "--cache-dir", str(tmp_path / "a-file"))
    assert run_cli(train_unet.main, argv) == 2
    assert "--cache-dir" in capsys.readouterr().err and (tmp_path / "a-file").read_text() == "keep me"
    argv = args(micro_bundle_dir, shapes_folder, tmp_path / "run", "--max-steps", "1", "--resolution", "12")
    assert run_cli(train_unet.main, argv) == 2
    assert "UNet training: the resolution must be a positive multiple of 8, got 12; try 8" in capsys.readouterr().err
    argv = args(micro_bundle_dir, shapes_folder, tmp_path / "run", "--max-steps", "1", "--bucketing",
                "--set", "buckets.step=36")  # fmt: skip
    assert run_cli(train_unet.main, argv) == 2
    assert "buckets.step must be a multiple of the VAE's downsampling factor 8, got 36; try 32" in capsys.readouterr().err
