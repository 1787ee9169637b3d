"""train_vae.py on the micro preset: it learns, resumes exactly, survives a messy folder, and writes a bundle."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from planted import build_dataset
from safetensors import safe_open
from tb_events import logged_steps

from ldm.cli import train_vae
from ldm.cli.common import run_cli
from ldm.data import DataConfig, Layout
from ldm.formats.bundle import load_bundle
from ldm.train.vae import eval_batches, init_posterior_logvar, zero_residual_branches


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    """24 captioned 64×64 pictures of coloured discs and squares on white: easy to learn, not trivial."""
    root = tmp_path_factory.mktemp("shapes")
    rows = []
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    for i in range(24):
        image = np.full((64, 64, 3), 255, np.uint8)
        cy, cx, r = rng.integers(20, 44), rng.integers(20, 44), rng.integers(8, 18)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2 if i % 2 else (abs(yy - cy) < r) & (abs(xx - cx) < r)
        image[mask] = rng.integers(0, 256, 3)
        Image.fromarray(image).save(root / f"{i:02d}.png")
        rows.append(json.dumps({"file_name": f"{i:02d}.png", "text": "disc" if i % 2 else "square"}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def args(data, out, *extra):
    return ["--preset", "micro", "--data", str(data), "--out", str(out), "--set", "train.batch_size=4",
            "--set", "train.log_every=1", *extra]  # fmt: skip


def checkpoint_tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable


@pytest.mark.slow
def test_reconstruction_loss_goes_down(shapes_folder, tmp_path):
    from ldm.eval.reconstruction import evaluate_batches

    out = tmp_path / "run"
    before = evaluate_batches(load_bundle_vae_of_preset(), eval_batches(DataConfig(path=str(shapes_folder), resolution=64), 8))
    assert run_cli(train_vae.main, args(shapes_folder, out, "--max-steps", "40", "--set", "train.lr=2e-3",
                                        "--eval-data", str(shapes_folder))) == 0  # fmt: skip
    after = json.loads((out / "eval.json").read_text())
    assert after["psnr"] > before["psnr"] + 3  # dB
    bundle = load_bundle(out / "bundle")
    assert bundle.config.vae.scaling_factor != 1.0  # measured, and stored in the config
    assert bundle.vae.config.scaling_factor == pytest.approx(bundle.config.vae.scaling_factor)
    assert list((out / "samples").glob("reconstructions-*.png"))
    assert list((out / "logs").rglob("events.out.tfevents.*"))


def load_bundle_vae_of_preset():
    from ldm.formats.bundle import create_bundle
    from ldm.models.presets import PRESETS

    return create_bundle(PRESETS["micro"], seed=0).vae.eval()


@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_is_exact(shapes_folder, tmp_path, accumulation):
    common = ["--set", f"train.gradient_accumulation={accumulation}", "--set", "train.ema_decay=0.9",
              "--set", "loss.disc_start=3", "--set", "train.checkpoint_every=100"]  # fmt: skip
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_cli(train_vae.main, args(shapes_folder, straight, "--max-steps", "6", *common)) == 0
    assert run_cli(train_vae.main, args(shapes_folder, split, "--max-steps", "3", *common)) == 0
    assert run_cli(train_vae.main, args(shapes_folder, split, "--max-steps", "6", "--resume", "latest", *common)) == 0
    a = checkpoint_tensors(straight / "checkpoints" / "step-00000006.safetensors")
    b = checkpoint_tensors(split / "checkpoints" / "step-00000006.safetensors")
    assert a.keys() == b.keys()
    assert any(k.startswith("s.optimizers.vae.state.") for k in a)  # optimizer state is in there
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_trains_on_a_folder_with_planted_problems(tmp_path, capsys):
    data = build_dataset(tmp_path / "messy", Layout.KOHYA)
    assert run_cli(train_vae.main, args(data, tmp_path / "run", "--max-steps", "2")) == 0
    out = capsys.readouterr().out
    assert "usable" in out.lower()  # the data report is printed before training
    assert (tmp_path / "run" / "bundle" / "manifest.json").is_file()


def test_the_last_grid_is_drawn_once_and_the_bundle_takes_the_preset_name(shapes_folder, tmp_path):
    out = tmp_path / "run"
    assert run_cli(train_vae.main, args(shapes_folder, out, "--max-steps", "2", "--set", "train.sample_every=1",
                                        "--set", "train.ema_decay=0.5")) == 0  # fmt: skip
    # After step 1 in the loop; after the last step once, with the EMA weights the bundle gets.
    assert logged_steps(out, "reconstructions") == {1: 1, 2: 1}
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == [
        "reconstructions-00000001.png", "reconstructions-00000002.png"
    ]
    assert load_bundle(out / "bundle").name == "micro"  # the preset's, not the output folder's


def test_layout_flags_reach_the_training_and_held_out_folders(shapes_folder, tmp_path, capsys):
    # A csv table under another name with other column names: the error's hint is a flag this script takes.
    data = tmp_path / "csv"
    data.mkdir()
    rows = [json.loads(line) for line in (shapes_folder / "metadata.jsonl").read_text().splitlines()]
    lines = ["path,label"] + [f"{row['file_name']},{row['text']}" for row in rows]
    (data / "captions.csv").write_text("\n".join(lines) + "\n")
    for row in rows:
        (data / row["file_name"]).write_bytes((shapes_folder / row["file_name"]).read_bytes())
    assert run_cli(train_vae.main, args(data, tmp_path / "no", "--max-steps", "1")) == 2
    assert "pass --metadata captions.csv" in capsys.readouterr().err
    layout = ["--metadata", "captions.csv", "--image-column", "path", "--caption-column", "label"]
    run = tmp_path / "run"
    assert run_cli(train_vae.main, args(data, run, "--max-steps", "1", "--eval-data", str(data), *layout)) == 0
    assert json.loads((run / "eval.json").read_text())["count"] == 24  # the held-out folder read the same way
    saved = (run / "config.yaml").read_text()
    assert "metadata: captions.csv" in saved and "caption_column: label" in saved
    # A held-out folder in the standard layout, which the training folder's settings do not fit, is detected.
    other = tmp_path / "other"
    assert run_cli(train_vae.main, args(data, other, "--max-steps", "1", "--eval-data", str(shapes_folder), *layout)) == 0
    assert json.loads((other / "eval.json").read_text())["count"] == 24
    # Resuming with other layout settings would move the saved data position to another listing.
    capsys.readouterr()
    resume = ["--out", str(run), "--resume", "latest", "--max-steps", "2"]
    assert run_cli(train_vae.main, [*resume, "--caption-column", "path"]) == 2
    assert "would change the data of a run being resumed" in capsys.readouterr().err
    assert run_cli(train_vae.main, [*resume, *layout]) == 0  # the same settings are no change


def test_fine_tune_decoder_only_keeps_the_encoder(shapes_folder, tmp_path, micro_bundle_dir):
    out = tmp_path / "ft"
    argv = ["--init-from", str(micro_bundle_dir), "--decoder-only", "--data", str(shapes_folder), "--out", str(out),
            "--max-steps", "2", "--set", "train.batch_size=4", "--set", "train.lr=1e-2", "--name", "fine"]  # fmt: skip
    assert run_cli(train_vae.main, argv) == 0
    before, after = load_bundle(micro_bundle_dir), load_bundle(out / "bundle")
    enc_a, enc_b = before.vae.encoder.state_dict(), after.vae.encoder.state_dict()
    assert all(torch.equal(enc_a[k], enc_b[k]) for k in enc_a)
    dec_a, dec_b = before.vae.decoder.state_dict(), after.vae.decoder.state_dict()
    assert any(not torch.equal(dec_a[k], dec_b[k]) for k in dec_a)
    unet_a, unet_b = before.unet.state_dict(), after.unet.state_dict()
    assert all(torch.equal(unet_a[k], unet_b[k]) for k in unet_a)  # other parts are carried over
    assert (before.name, after.name) == ("micro", "fine")  # --name


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "micro", "--out", "x"], "no training data; pass --data FOLDER"),
        (["--data", "d", "--out", "x"], "pass --preset NAME to train from scratch or --init-from BUNDLE"),
        (["--preset", "micro", "--data", "d", "--decoder-only"], "--decoder-only needs --init-from BUNDLE"),
        (["--preset", "micro", "--data", "d", "--set", "train.lr=fast"], "'train.lr' must be a number"),
    ],
)
def test_bad_arguments(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli(train_vae.main, argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("setting", ["posterior_logvar_init=-6", "zero_init_residual=true"])
def test_initialisations_are_for_new_autoencoders_only(setting, micro_bundle_dir, tmp_path, capsys):
    argv = ["--init-from", str(micro_bundle_dir), "--data", "d", "--out", str(tmp_path / "x"), "--set", setting]
    assert run_cli(train_vae.main, argv) == 2
    assert f"{setting.split('=')[0]} sets up a new" in capsys.readouterr().err


def test_posterior_logvar_init_sets_the_starting_noise():
    from ldm.formats.bundle import create_bundle
    from ldm.models.presets import PRESETS

    vae = create_bundle(PRESETS["micro"], seed=0).vae.eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        before = vae.encode(x).latent_dist
        init_posterior_logvar(vae, -6.0)
        after = vae.encode(x).latent_dist
    assert before.logvar.mean().abs() < 2  # diffusers' initialisation: log σ² near 0
    assert after.logvar.mean().item() == pytest.approx(-6.0, abs=0.5)
    assert after.logvar.std() < before.logvar.std()
    torch.testing.assert_close(after.mean, before.mean)  # the means are untouched


def test_zero_init_residual_makes_every_residual_block_start_as_the_identity():
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    from ldm.formats.bundle import create_bundle
    from ldm.models.presets import PRESETS

    vae = create_bundle(PRESETS["micro"], seed=0).vae.eval()
    resnets = [m for m in vae.modules() if isinstance(m, ResnetBlock2D)]
    attentions = [m for m in vae.modules() if isinstance(m, Attention)]
    same_width = [m for m in resnets if m.conv_shortcut is None]
    assert same_width and attentions
    x = torch.randn(2, same_width[0].in_channels, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(same_width[0](x, None), x)  # diffusers' initialisation: not the identity
        assert zero_residual_branches(vae) == len(resnets) + len(attentions)
        for block in same_width:
            x = torch.randn(2, block.in_channels, 8, 8)
            torch.testing.assert_close(block(x, None), x)
        for attention in attentions:
            x = torch.randn(2, attention.inner_dim, 4, 4)
            torch.testing.assert_close(attention(x), x)  # residual_connection: x + to_out(...) = x
        out = vae.decode(vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).latent_dist.mean).sample
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


KILL_DURING_BUNDLE_WRITE = """
import os, signal, sys
import ldm.formats.bundle as bundle_module
from ldm.cli import train_vae
from ldm.cli.common import run_cli

real = bundle_module.save_tensors
def save_then_die(path, tensors, metadata=None):  # the final bundle's second part: a kill midway through the write
    if path.name == "text_encoder.safetensors":
        path.with_name(f".{path.name}.k1ll3d_x.tmp").write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, tensors, metadata)
bundle_module.save_tensors = save_then_die
sys.exit(run_cli(train_vae.main, sys.argv[1:]))
"""


@pytest.mark.slow
def test_killed_while_writing_the_bundle_resumes_to_the_same_bundle(shapes_folder, tmp_path):
    """SIGKILL during the final bundle write, then --resume latest: every file of the bundle is bit-identical to
    the unbroken run's (the scaling factor included), and the killed write's temp file is gone."""
    import subprocess
    import sys

    common = ["--max-steps", "7", "--set", "train.ema_decay=0.9", "--set", "data.random_flip=0.5",  # 6 steps an epoch
              "--set", "train.checkpoint_every=100", "--set", "scale_samples=12"]  # fmt: skip
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_cli(train_vae.main, args(shapes_folder, straight, *common)) == 0
    result = subprocess.run([sys.executable, "-c", KILL_DURING_BUNDLE_WRITE, *args(shapes_folder, killed, *common)],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == -9, result.stderr
    assert (killed / "checkpoints" / "step-00000007.safetensors").is_file()  # the last step's checkpoint
    assert not (killed / "bundle" / "manifest.json").exists()  # written last: no manifest, no bundle
    assert run_cli(train_vae.main, args(shapes_folder, killed, *common, "--resume", "latest")) == 0
    assert not list(killed.rglob("*.tmp"))
    a, b = json.loads((straight / "bundle" / "manifest.json").read_text()), json.loads((killed / "bundle" / "manifest.json").read_text())
    assert a["files"] == b["files"] and a["hash"] == b["hash"]
    assert load_bundle(killed / "bundle").config.vae.scaling_factor == load_bundle(straight / "bundle").config.vae.scaling_factor


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--resolution", "7"], "VAE training: the resolution must be a positive multiple of 8, got 7; try 8"),
        (["--resolution", "100000"], "VAE training at 100000×100000 px, batch 4 needs about"),
        (["--set", "train.seed=" + str(2**70)], "'train.seed' must be an integer of at most 63 bits"),
        (["--set", "train.lr=-1"], "train.lr must be a positive number"),
        (["--set", "train.adam_betas=[2, 3]"], "train.adam_betas must both be in [0, 1)"),
        (["--max-minutes", "nan"], "train.max_minutes must be a finite number, got nan"),
        (["--budget-minutes", "inf"], "train.budget_minutes must be a finite number, got inf"),
    ],
)
def test_bad_run_settings_fail_before_training(shapes_folder, tmp_path, capsys, extra, message):
    assert run_cli(train_vae.main, args(shapes_folder, tmp_path / "run", "--max-steps", "1", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("out", ["a-file", "a-file/run", "/proc/ldm/run"])
def test_the_output_folder_is_checked_before_the_data(shapes_folder, tmp_path, capsys, out):
    (tmp_path / "a-file").write_text("keep me")
    path = out if out.startswith("/") else tmp_path / out
    assert run_cli(train_vae.main, args(shapes_folder, path, "--max-steps", "1")) == 2
    err = capsys.readouterr()
    assert "--out" in err.err and err.err.count("\n") == 1 and "dataset" not in err.out  # no data report yet
    assert (tmp_path / "a-file").read_text() == "keep me"


def test_a_folder_of_splits_trains_on_train_and_holds_out_test(shapes_folder, tmp_path):
    rows = [json.loads(line) for line in (shapes_folder / "metadata.jsonl").read_text().splitlines()]
    hub = tmp_path / "hub"
    for split, part in (("train", rows[:16]), ("test", rows[16:])):
        (hub / split).mkdir(parents=True)
        for row in part:
            (hub / split / row["file_name"]).write_bytes((shapes_folder / row["file_name"]).read_bytes())
        (hub / split / "metadata.csv").write_text("file_name,text\n" + "".join(f"{r['file_name']},{r['text']}\n"
                                                                            for r in part))  # fmt: skip
    run = tmp_path / "run"
    assert run_cli(train_vae.main, args(hub, run, "--max-steps", "1")) == 0  # no --eval-data: test/ is held out
    assert json.loads((run / "eval.json").read_text())["count"] == 8
