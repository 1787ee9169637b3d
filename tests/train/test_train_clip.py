"""train_clip.py on the micro text config and 32×32 shapes: retrieval metrics by hand, it learns, it resumes
exactly, and the bundle it writes carries the trained text tower exactly and generates."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from tb_events import logged_steps

from ldm.cli import generate, train_clip
from ldm.cli.common import run_cli
from ldm.config import load_yaml
from ldm.formats.bundle import load_bundle
from ldm.models.clip import CLIPModelConfig, VisionTowerConfig, build_clip, encode_text, load_clip, retrieval_metrics
from ldm.models.presets import PRESETS
from ldm.models.text_encoder import Padding
from ldm.models.tokenizer import build_tokenizer, tokenize
from ldm.train.clip import CLIPRunConfig, evaluate, token_ids_for

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 210, 20)}
SHAPES = ("disc", "square")


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    """32 captioned 32×32 pictures: four colours × two shapes, placed and sized at random, on white."""
    root = tmp_path_factory.mktemp("clip-shapes")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    rows = []
    for i in range(32):
        colour, shape = list(COLOURS)[i % 4], SHAPES[(i // 4) % 2]
        image = np.full((32, 32, 3), 255, np.uint8)
        cy, cx, r = rng.integers(10, 22), rng.integers(10, 22), rng.integers(5, 10)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2 if shape == "disc" else (abs(yy - cy) < r) & (abs(xx - cx) < r)
        image[mask] = COLOURS[colour]
        Image.fromarray(image).save(root / f"{i:02d}.png")
        rows.append(json.dumps({"file_name": f"{i:02d}.png", "text": f"{colour} {shape}"}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


TINY = ["--resolution", "32", "--set", "train.batch_size=8", "--set", "train.log_every=1", "--set", "train.warmup_steps=2",
        "--set", "model.vision.width=32", "--set", "model.vision.layers=1", "--set", "model.vision.heads=2",
        "--set", "model.embed_dim=32"]  # fmt: skip


def args(source, data, out, *extra):
    return [*source, "--data", str(data), "--out", str(out), *TINY, *extra]


def checkpoint_tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable


# --- retrieval metrics by hand -------------------------------------------------------------------------------------


def test_retrieval_metrics_hand_cases():
    eye = torch.eye(6)
    m = retrieval_metrics(eye, eye)
    assert m["image_to_text_top1"] == m["text_to_image_top1"] == m["image_to_text_top5"] == 1.0
    assert m["image_to_text_mean_rank"] == 1.0 and m["n"] == 6

    # Text j is image perm[j]: three fixed points out of 8. Every other image's own text scores 0, tied with six
    # other texts and below one: rank 8, outside the top 5 too (ties count against the query).
    perm = [0, 1, 2, 4, 5, 3, 7, 6]
    images = torch.eye(8)
    m = retrieval_metrics(images, images[perm])
    assert m["image_to_text_top1"] == m["text_to_image_top1"] == 3 / 8
    assert m["image_to_text_top5"] == m["text_to_image_top5"] == 3 / 8
    assert m["image_to_text_mean_rank"] == (3 * 1 + 5 * 8) / 8

    # Asymmetric: similarity rows are images, columns texts
    #   [[0.6, 0.0, 0.0],      image 0: own text best             text 0: image 1 (0.8) beats image 0 (0.6)
    #    [0.8, 0.6, 0.0],      image 1: text 0 (0.8) beats own    text 1: image 2 (0.8) beats image 1 (0.6)
    #    [0.0, 0.8, 1.0]]      image 2: own text best             text 2: own image best
    texts = torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.6, 0.8], [0.0, 0.0, 1.0]])
    m = retrieval_metrics(torch.eye(3), texts, ks=(1, 2))
    assert m["image_to_text_top1"] == pytest.approx(2 / 3) and m["text_to_image_top1"] == pytest.approx(1 / 3)
    assert m["image_to_text_top2"] == m["text_to_image_top2"] == 1.0
    assert m["text_to_image_mean_rank"] == pytest.approx(5 / 3)

    # Image 1's best text is text 0, which has image 1's caption: a hit once captions are given.
    assert retrieval_metrics(torch.eye(3), texts, captions=["a", "a", "b"])["image_to_text_top1"] == 1.0
    assert retrieval_metrics(torch.eye(3), texts, captions=["a", "a", "b"])["duplicate_captions"] == 2

    # All-alike features earn nothing; top-5 is never below top-1.
    assert retrieval_metrics(torch.ones(4, 3), torch.ones(4, 3))["image_to_text_top1"] == 0.0
    torch.manual_seed(0)
    m = retrieval_metrics(torch.randn(20, 8), torch.randn(20, 8))
    for way in ("image_to_text", "text_to_image"):
        assert m[f"{way}_top5"] >= m[f"{way}_top1"]


@pytest.mark.parametrize("padding", [Padding.END, Padding.ZERO])
def test_encode_text_skipping_padding_matches_open_clip(padding):
    from dataclasses import replace

    text = replace(PRESETS["micro"].text_encoder, padding=padding)
    torch.manual_seed(0)
    model = build_clip(
        CLIPModelConfig(text=text, vision=VisionTowerConfig(image_size=32, width=32, layers=1, heads=2), embed_dim=16)
    ).eval()
    with torch.no_grad():
        for p in model.parameters():  # open_clip starts some tensors at constants; make every one matter
            p.add_(torch.randn_like(p) * 0.02)
    ids = tokenize(
        build_tokenizer(),
        ["red disc", "a much longer caption about a blue square", ""],
        context_length=77,
        pad_id=text.pad_id,
    )
    with torch.no_grad():
        torch.testing.assert_close(encode_text(model, ids), model.encode_text(ids), rtol=1e-5, atol=1e-6)


# --- training -------------------------------------------------------------------------------------------------------


def test_learns_shapes(shapes_folder, tmp_path, capsys):
    out = tmp_path / "run"
    argv = args(["--preset", "micro"], shapes_folder, out, "--eval-data", str(shapes_folder), "--max-steps", "30",
                "--set", "train.lr=2e-3")  # fmt: skip
    assert run_cli(train_clip.main, argv) == 0
    printed = capsys.readouterr().out
    assert "usable" in printed.lower() and "held-out retrieval over 32 pairs" in printed
    after = json.loads((out / "eval.json").read_text())

    # The same model at its initial weights, on the same split.
    cfg = load_yaml(CLIPRunConfig, out / "config.yaml")
    torch.manual_seed(cfg.train.seed)
    untrained = build_clip(cfg.model)
    from ldm.data import CaptionedImageDataset, DataConfig

    data = CaptionedImageDataset(DataConfig(path=str(shapes_folder), resolution=32))
    images = torch.stack([data[i]["pixel_values"] for i in range(len(data))])
    ids = token_ids_for(build_tokenizer(), data.captions, cfg.model)
    before = evaluate(untrained, images, ids, data.captions, batch_size=64, device="cpu")

    assert after["step"] == 30 and after["duplicate_captions"] == 32  # 8 captions, 4 pictures each
    assert after["loss"] < before["loss"] - 1.0  # 3.84 → 2.08 when written (ln 4 = 1.39 is the floor here)
    assert after["image_to_text_top1"] >= before["image_to_text_top1"] + 0.2  # 0.13 → 0.53
    for way in ("image_to_text", "text_to_image"):  # 14.6 → 2.9 and 9.0 → 1.5
        assert after[f"{way}_mean_rank"] <= before[f"{way}_mean_rank"] / 2
        assert after[f"{way}_top5"] > before[f"{way}_top5"]
    assert list((out / "logs").rglob("events.out.tfevents.*"))


@pytest.mark.parametrize(
    "accumulation, schedule, first_leg",
    [
        # Stopped by --max-steps 3: the run length is part of a cosine schedule, so this leg uses a constant one.
        (1, "constant", ["--max-steps", "3"]),
        # Stopped by the clock after its first step, as a real run is: max_steps and the cosine schedule stay 6.
        (2, "cosine", ["--max-steps", "6", "--max-minutes", "1e-9"]),
    ],
)
def test_resume_is_exact(shapes_folder, tmp_path, accumulation, schedule, first_leg):
    # Held-out evaluation every 2 steps runs inside the loop: it must not disturb what resuming restores.
    common = ["--set", f"train.gradient_accumulation={accumulation}", "--set", f"train.lr_schedule={schedule}",
              "--set", "train.warmup_steps=4", "--set", "train.ema_decay=0.9", "--set", "train.checkpoint_every=100",
              "--set", "train.sample_every=2",
              "--eval-data", str(shapes_folder)]  # fmt: skip
    straight, split = tmp_path / "straight", tmp_path / "split"
    source = ["--preset", "micro"]
    assert run_cli(train_clip.main, args(source, shapes_folder, straight, "--max-steps", "6", *common)) == 0
    assert run_cli(train_clip.main, args(source, shapes_folder, split, *first_leg, *common)) == 0
    assert len(list((split / "checkpoints").glob("step-*.safetensors"))) == 1
    assert (
        run_cli(train_clip.main, ["--out", str(split), "--max-steps", "6", "--max-minutes", "0", "--resume", "latest"])
        == 0
    )
    a = checkpoint_tensors(straight / "checkpoints" / "step-00000006.safetensors")
    b = checkpoint_tensors(split / "checkpoints" / "step-00000006.safetensors")
    assert a.keys() == b.keys()
    assert any(k.startswith("s.optimizers.clip.state.") for k in a)  # optimizer state is in there
    assert any(k.startswith("s.emas.clip.") for k in a)
    assert "s.models.clip.clip.logit_scale" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert json.loads((split / "eval.json").read_text()) == json.loads((straight / "eval.json").read_text())
    assert load_bundle(split / "bundle").name == "micro"  # from a preset: a new bundle, named after it
    # Held-out retrieval every 2 steps in the loop, and once after the last step with the EMA weights.
    assert logged_steps(straight, "eval/loss") == {2: 1, 4: 1, 6: 1}


def test_bundle_carries_the_trained_text_tower(shapes_folder, tmp_path, micro_bundle_dir, capsys):
    out = tmp_path / "run"
    assert (
        run_cli(train_clip.main, args(["--bundle", str(micro_bundle_dir)], shapes_folder, out, "--max-steps", "3")) == 0
    )
    before, after = load_bundle(micro_bundle_dir), load_bundle(out / "bundle")
    for part in ("vae", "unet"):  # carried over unchanged
        a, b = before.modules()[part].state_dict(), after.modules()[part].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), part
    a, b = before.text_encoder.model.state_dict(), after.text_encoder.model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # replaced by the trained tower

    clip, cfg = load_clip(out / "clip.safetensors")
    assert cfg.text == after.config.text_encoder and cfg.vision.image_size == 32
    ids = tokenize(after.tokenizer, ["red disc", "blue square", "", "a yellow disc on white"],
                   context_length=cfg.text.context_length, pad_id=cfg.text.pad_id)  # fmt: skip
    with torch.no_grad():
        got = after.text_encoder(ids).pooled @ clip.text_projection
        torch.testing.assert_close(got, clip.encode_text(ids), rtol=1e-5, atol=1e-5)
        assert clip.encode_image(torch.zeros(1, 3, 32, 32)).shape == (1, 32)  # the image tower is in there too

    capsys.readouterr()
    argv = [
        "red disc",
        "--model",
        str(out / "bundle"),
        "--steps",
        "1",
        "--seed",
        "1",
        "--out",
        str(tmp_path / "gen"),
        "--quiet",
    ]
    assert run_cli(generate.main, argv) == 0
    assert len(list((tmp_path / "gen").glob("*.png"))) == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "micro", "--out", "x"], "no training data; pass --data FOLDER"),
        (["--data", "DATA"], "pass --bundle BUNDLE to train its text encoder, or --preset NAME"),
        (["--preset", "tiny-imaginary", "--data", "DATA"], "unknown preset 'tiny-imaginary'"),
        (["--bundle", "no/such/bundle", "--data", "DATA"], "no model bundle at no/such/bundle"),
        (["--preset", "micro", "--data", "EMPTY", "--out", "x"], "EMPTY"),
        (["--preset", "micro", "--data", "DATA", "--set", "model.vision.image_size=48"], "must equal data.resolution"),
        (["--preset", "micro", "--data", "DATA", "--set", "model.vision.patch_size=5"], "not divisible by patch_size"),
    ],
)
def test_bad_input(argv, message, shapes_folder, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "EMPTY").mkdir()
    argv = [str(shapes_folder) if a == "DATA" else a for a in argv]
    assert run_cli(train_clip.main, argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x" / "checkpoints").exists()
