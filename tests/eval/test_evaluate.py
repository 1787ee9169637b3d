"""ldm.eval.evaluate and the metrics behind it: FID/KID by hand and against naive references, the CLIP score of a CLIP
trained here on coloured pictures (matched captions beat shuffled ones), the VAE figures against numpy and
scikit-image, and the command line end to end on the micro bundle, with its one-line errors."""

import importlib.util
import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.cli import train_clip
from ldm.cli.common import run_cli
from ldm.cli.evaluate import main
from ldm.errors import LdmError
from ldm.eval.evaluate import EvalConfig, evaluate, prompt_grids, read_prompts, read_samples, square_resize
from ldm.eval.metrics import (
    clip_score,
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
    mmd2_unbiased,
    polynomial_kernel,
)
from ldm.formats.bundle import CLIP_FILE, load_bundle
from ldm.formats.pngmeta import parse_parameters, read_png_parameters
from ldm.models.clip import encode_text, load_clip
from ldm.models.tokenizer import build_tokenizer, tokenize

COLOURS = {"red": (210, 30, 30), "green": (30, 170, 40), "blue": (30, 40, 210), "yellow": (225, 205, 25)}


def fid(a: torch.Tensor, b: torch.Tensor) -> float:
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def features(seed: int, n: int = 300, d: int = 8) -> torch.Tensor:
    """(n, d) correlated Gaussian features with a non-zero mean."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64) + 1


# --- FID / KID ------------------------------------------------------------------------------------------------------


def test_fid_is_zero_against_itself_and_grows_with_noise():
    x = features(0)
    scale = feature_statistics(x)[1].trace().item()
    assert abs(fid(x, x)) <= 1e-6 * scale
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    values = [fid(x, x + level * noise) for level in (0.0, 0.1, 0.3, 1.0, 3.0)]
    assert values[0] <= 1e-6 * scale
    assert all(a < b for a, b in itertools.pairwise(values)), values


def test_kid_is_zero_against_itself_and_grows_with_noise():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 500, 16, generator=g, dtype=torch.float64)  # two samples of one distribution
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
    whole = {"subsets": 1, "subset_size": len(x)}  # every subset is the whole set: no sampling noise
    values = [kernel_inception_distance(x, x + level * noise, **whole)[0] for level in (0.0, 0.3, 1.0, 3.0)]
    assert all(a < b for a, b in itertools.pairwise(values)), values
    # Against itself MMD²_u is exactly 2(mean off-diagonal k − mean diagonal k)/n: O(1/n), slightly negative.
    k = polynomial_kernel(x, x)
    off, diag = (k.sum() - k.diagonal().sum()) / (500 * 499), k.diagonal().mean()
    assert values[0] == pytest.approx(float(2 * (off - diag) / 500), rel=1e-9)
    assert abs(values[0]) < 0.01 * float(diag) and abs(values[0]) < 0.25 * values[2]
    # Subsets of two samples of one distribution: an unbiased estimate of 0.
    mean, std = kernel_inception_distance(x, y, subsets=50, subset_size=250)
    assert abs(mean) < 0.1 * values[2] and std > 0
    # Deterministic: the subsets come from a seeded generator.
    assert kernel_inception_distance(x, y, subsets=5, subset_size=50) == kernel_inception_distance(
        x, y, subsets=5, subset_size=50
    )


def test_kid_by_hand():
    # d = 2, k(a, b) = (a·b/2 + 1)³.  x = (1,0), (0,1); y = (1,1), (2,0).
    # k(x1,x2) = 1 → Σ_{i≠j}/2·1 = 1.   k(y1,y2) = (2/2+1)³ = 8 → 8.
    # k(x,y): x1·y1 = 1 → 3.375, x1·y2 = 2 → 8, x2·y1 = 1 → 3.375, x2·y2 = 0 → 1: mean 15.75/4 = 3.9375.
    # MMD²_u = 1 + 8 − 2·3.9375 = 1.125; every subset of size 2 is the whole set, so the std is 0.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    assert kernel_inception_distance(x, y, subsets=3) == (pytest.approx(1.125, abs=1e-12), 0.0)
    assert float(mmd2_unbiased(x.double(), y.double())) == pytest.approx(1.125, abs=1e-12)


def test_mmd_matches_a_naive_double_loop():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(9, 5, generator=g, dtype=torch.float64)

    def k(a, b):
        return (float(a @ b) / 5 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(y[i], y[j]) for i in range(9) for j in range(9) if i != j) / (9 * 8)
    xy = sum(k(x[i], y[j]) for i in range(7) for j in range(9)) / (7 * 9)
    assert float(mmd2_unbiased(x, y)) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
    assert float(polynomial_kernel(x, y)[2, 3]) == pytest.approx(k(x[2], y[3]), rel=1e-12)
    with pytest.raises(ValueError):
        kernel_inception_distance(x[:1], y)


def test_clip_score_by_hand():
    images = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    texts = torch.tensor([[1.0, 1.0], [0.0, 5.0], [-1.0, 0.0]])
    # cos = 1/√2, 1, −1 → 70.71, 100, 0 (negative similarity counts as 0)
    torch.testing.assert_close(clip_score(images, texts), torch.tensor([100 / 2**0.5, 100.0, 0.0], dtype=torch.float64))


# --- a CLIP trained here -----------------------------------------------------------------------------------------


def write_folder(root, images, captions):
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        Image.fromarray(image).save(root / f"{i:02d}.png")
        rows.append(json.dumps({"file_name": f"{i:02d}.png", "text": caption}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def colour_pictures(n: int, seed: int, size: int = 32):
    """``n`` (size, size, 3) pictures, colour i % 4: a jittered colour field with a white border; their captions."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for i in range(n):
        name = list(COLOURS)[i % 4]
        image = np.full((size, size, 3), 255, np.uint8)
        border = rng.integers(2, 8)
        colour = np.clip(np.array(COLOURS[name]) + rng.integers(-25, 26, 3), 0, 255)
        image[border:-border, border:-border] = colour
        images.append(image)
        captions.append(f"{name}")
    return images, captions


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory, micro_bundle_dir):
    """train_clip.py on 32 coloured pictures, from the micro bundle: OUT/clip.safetensors and OUT/bundle."""
    root = tmp_path_factory.mktemp("evaluate-clip")
    data = write_folder(root / "data", *colour_pictures(32, seed=0))
    out = root / "run"
    argv = ["--bundle", str(micro_bundle_dir), "--data", str(data), "--out", str(out), "--resolution", "32",
            "--max-steps", "40", "--set", "train.batch_size=8", "--set", "train.warmup_steps=2",
            "--set", "train.lr=2e-3", "--set", "model.vision.width=32", "--set", "model.vision.layers=1",
            "--set", "model.vision.heads=2", "--set", "model.embed_dim=32"]  # fmt: skip
    assert run_cli(train_clip.main, argv) == 0
    return out


def test_train_clip_puts_its_clip_into_the_bundle(clip_run):
    bundle_dir = clip_run / "bundle"
    assert (bundle_dir / CLIP_FILE).read_bytes() == (clip_run / CLIP_FILE).read_bytes()
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert CLIP_FILE in manifest["extras"] and CLIP_FILE not in manifest["files"]
    assert load_bundle(bundle_dir).extras == {CLIP_FILE: bundle_dir / CLIP_FILE}


def test_clip_score_ranks_matched_captions_above_shuffled(clip_run, tmp_path):
    images, captions = colour_pictures(12, seed=5)  # new pictures of the trained colours
    names = list(COLOURS)
    shuffled = [names[(names.index(c) + 1) % 4] for c in captions]  # every caption the wrong colour
    clip = clip_run / CLIP_FILE
    matched = evaluate(EvalConfig(out=tmp_path / "m", images=write_folder(tmp_path / "a", images, captions), clip=clip,
                                  progress=False))  # fmt: skip
    wrong = evaluate(EvalConfig(out=tmp_path / "w", images=write_folder(tmp_path / "b", images, shuffled), clip=clip,
                                progress=False))  # fmt: skip
    assert matched["clip"] == {"path": str(clip), "from": "--clip"}
    assert matched["source"] == {"kind": "folder", "folder": str(tmp_path / "a"), "images": 12, "prompts": 4,
                                 "skipped": 0}  # fmt: skip
    assert matched["clip_score"] > wrong["clip_score"] + 10, (matched["clip_score"], wrong["clip_score"])
    for prompt in matched["prompts"]:  # each colour, not just the average
        other = next(p for p in wrong["prompts"] if p["images"] == prompt["images"])
        assert prompt["clip_score"] > other["clip_score"], (prompt, other)

    # The report's number is 100·max(cos, 0) of the CLIP's own embeddings, averaged over the images.
    model, cfg = load_clip(clip)
    pixels = torch.stack([torch.from_numpy(i).permute(2, 0, 1) for i in images]).float() / 127.5 - 1  # (12, 3, 32, 32)
    ids = tokenize(build_tokenizer(), captions, context_length=cfg.text.context_length, pad_id=cfg.text.pad_id)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(model.encode_image(pixels), encode_text(model, ids))
    assert matched["clip_score"] == pytest.approx(float(100 * cos.clamp(min=0).mean()), rel=1e-5)


def test_fid_and_kid_on_clip_features(clip_run, tmp_path):
    images, captions = colour_pictures(8, seed=1)
    folder = write_folder(tmp_path / "imgs", images, captions)
    same = evaluate(EvalConfig(out=tmp_path / "a", images=folder, clip=clip_run / CLIP_FILE, reference=folder,
                               kid_subsets=1, kid_subset_size=8, progress=False))  # fmt: skip
    assert same["features"]["name"] == "clip-image" and same["features"]["dim"] == 32
    assert same["reference"] == {"folder": str(folder), "images": 8}
    other = write_folder(tmp_path / "grey", [np.full((32, 32, 3), 128 + 10 * i, np.uint8) for i in range(8)], ["x"] * 8)
    far = evaluate(EvalConfig(out=tmp_path / "b", images=folder, clip=clip_run / CLIP_FILE, reference=other,
                              progress=False))  # fmt: skip
    # The same images both sides: FID 0; KID ≤ 0, the estimator's −2(mean diagonal − mean off-diagonal k)/n.
    assert abs(same["fid"]) < 1e-6 and same["kid"] <= 0
    assert far["fid"] > 0.1 and far["kid"] > 0.01


# --- VAE figures --------------------------------------------------------------------------------------------------


def test_vae_figures_match_numpy_and_scikit_image(micro_bundle_dir, tmp_path):
    structural_similarity = pytest.importorskip("skimage.metrics").structural_similarity
    rng = np.random.default_rng(0)
    folder = tmp_path / "vae"
    folder.mkdir()
    arrays = [(rng.random((16, 24, 3)) * 255).astype(np.uint8) for _ in range(3)]
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(folder / f"{i}.png")
    report = evaluate(EvalConfig(out=tmp_path / "out", model=micro_bundle_dir, vae_data=folder, progress=False))

    vae = load_bundle(micro_bundle_dir).vae
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (3, 3, 16, 24)
    with torch.no_grad():
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample  # the posterior mean, decoded
    real = np.stack(arrays).astype(np.float64) / 255  # (3, 16, 24, 3)
    fake = (recon.permute(0, 2, 3, 1).double().numpy() / 2 + 0.5).clip(0, 1)
    mse = ((real - fake) ** 2).mean(axis=(1, 2, 3))
    ssims = [structural_similarity(r, f, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1,
                                   channel_axis=2) for r, f in zip(real, fake)]  # fmt: skip
    assert report["vae"]["count"] == 3 and report["vae"]["folder"] == str(folder)
    assert report["vae"]["psnr"] == pytest.approx(np.mean(10 * np.log10(1 / mse)), abs=1e-3)
    assert report["vae"]["ssim"] == pytest.approx(np.mean(ssims), abs=1e-4)
    assert report["vae"]["mae"] == pytest.approx(np.abs(real - fake).mean(), abs=1e-5)
    assert report["clip_score"] is None and report["source"]["kind"] == "none"
    assert "| VAE PSNR (dB) |" in (tmp_path / "out" / "eval.md").read_text()


# --- command line ------------------------------------------------------------------------------------------------


def test_cli_end_to_end(clip_run, tmp_path, capsys):
    bundle = clip_run / "bundle"  # the micro bundle with the CLIP train_clip.py put there
    reference = write_folder(tmp_path / "ref", *colour_pictures(6, seed=2))
    (tmp_path / "prompts.txt").write_text("red\n\n  blue  \nred\n")  # blank lines and repeats are dropped
    out = tmp_path / "eval"
    argv = ["--model", bundle, "--prompts", tmp_path / "prompts.txt", "--steps", "2", "--images-per-prompt", "1",
            "--seed", "7", "--reference", reference, "--vae-data", reference, "--out", out, "--quiet"]  # fmt: skip
    assert run_cli(main, [str(a) for a in argv]) == 0
    stdout = capsys.readouterr().out
    assert stdout.count("\n") == 1 and stdout.startswith("CLIP score ") and "FID" in stdout and "VAE PSNR" in stdout
    report = json.loads((out / "eval.json").read_text())
    assert report["clip"]["from"] == "bundle" and report["clip"]["path"] == str(bundle / CLIP_FILE)
    assert report["features"]["name"] == "clip-image" and report["reference"]["images"] == 6
    assert all(isinstance(report[k], float) for k in ("clip_score", "fid", "kid"))
    assert report["source"]["settings"]["seed"] == 7 and report["source"]["settings"]["width"] == 64
    assert [p["prompt"] for p in report["prompts"]] == ["red", "blue"] and report["prompts"][0]["images"] == [7]
    assert report["vae"]["count"] == 6
    assert report["grids"] == [{"file": "grid-000.png", "prompts": ["red", "blue"]}]
    with Image.open(out / "grid-000.png") as grid:
        assert grid.size == (64, 128)  # one column (seed), one row per prompt
    md = (out / "eval.md").read_text()
    assert "| CLIP score |" in md and "| FID |" in md and "| KID |" in md and "grid-000.png" in md

    # The images it wrote read back as an imagefolder and score the same.
    again = evaluate(EvalConfig(out=tmp_path / "again", images=out / "images", clip=bundle / CLIP_FILE, progress=False))
    assert again["clip_score"] == pytest.approx(report["clip_score"], abs=1e-9)
    assert read_samples(out / "images", progress=False).prompts == ["red", "blue"]

    # Same seeds, batch size 2 instead of 1: the same pictures.
    argv2 = ["--model", bundle, "--prompt", "red", "--prompt", "blue", "--steps", "2", "--seed", "7", "--batch-size",
             "2", "--out", tmp_path / "eval2", "--quiet"]  # fmt: skip
    assert run_cli(main, [str(a) for a in argv2]) == 0
    for name in ("00000-7.png", "00001-7.png"):
        a, b = (np.asarray(Image.open(folder / "images" / name)) for folder in (out, tmp_path / "eval2"))
        assert np.array_equal(a, b), name


def test_without_a_clip_the_score_is_skipped_with_a_note(micro_bundle_dir, tmp_path, capsys):
    argv = ["--model", micro_bundle_dir, "--prompt", "red", "--steps", "1", "--out", tmp_path, "--quiet"]
    assert run_cli(main, [str(a) for a in argv]) == 0
    stdout, stderr = capsys.readouterr()
    assert stdout.startswith("CLIP score skipped") and stdout.count("\n") == 1
    assert "note: CLIP score skipped: bundle" in stderr and "pass --clip FILE" in stderr
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["clip_score"] is None and report["notes"]
    assert "skipped" in (tmp_path / "eval.md").read_text()


def test_deep_cache_scores_the_approximate_images(micro_bundle_dir, tmp_path):
    # The same prompts and seeds, exact and with --deep-cache 2: other images (so other scores), the interval recorded
    # in the report and in every PNG.
    common = ["--model", micro_bundle_dir, "--prompt", "red", "--prompt", "blue", "--steps", "4", "--quiet"]
    assert run_cli(main, [str(a) for a in [*common, "--out", tmp_path / "exact"]]) == 0
    assert run_cli(main, [str(a) for a in [*common, "--deep-cache", "2", "--out", tmp_path / "dc"]]) == 0
    exact, approx = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("exact", "dc"))
    assert exact["source"]["settings"]["deep_cache"] == 0 and approx["source"]["settings"]["deep_cache"] == 2
    pngs = [sorted((tmp_path / d / "images").glob("*.png")) for d in ("exact", "dc")]
    assert len(pngs[0]) == len(pngs[1]) == 2
    for a, b in zip(*pngs, strict=True):
        assert not np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
        assert parse_parameters(read_png_parameters(b))[2]["Deep cache"] == "2"
        assert "Deep cache" not in parse_parameters(read_png_parameters(a))[2]


def test_token_merging_scores_the_approximate_images(micro_bundle_dir, tmp_path, capsys):
    common = ["--model", micro_bundle_dir, "--prompt", "red", "--steps", "4", "--quiet"]
    assert run_cli(main, [str(a) for a in [*common, "--out", tmp_path / "exact"]]) == 0
    assert run_cli(main, [str(a) for a in [*common, "--token-merging", "0.5", "--out", tmp_path / "tm"]]) == 0
    approx = json.loads((tmp_path / "tm" / "eval.json").read_text())
    assert approx["source"]["settings"]["token_merging"] == 0.5
    (a,), (b,) = (sorted((tmp_path / d / "images").glob("*.png")) for d in ("exact", "tm"))
    assert not np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    assert parse_parameters(read_png_parameters(b))[2]["Token merging ratio"] == "0.5"
    bad = [*common, "--token-merging", "0.5", "--deep-cache", "2", "--out", tmp_path / "bad"]
    capsys.readouterr()
    assert run_cli(main, [str(x) for x in bad]) == 2
    err = capsys.readouterr().err
    assert "--token-merging and --deep-cache do not combine" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                    reason="openvino is not installed (pip install 'ldm[openvino]')")  # fmt: skip
def test_openvino_backend_scores_torchs_images_and_says_so(micro_bundle_dir, tmp_path, capsys):
    common = ["--model", micro_bundle_dir, "--prompt", "red", "--steps", "4", "--quiet"]
    assert run_cli(main, [str(a) for a in [*common, "--out", tmp_path / "torch"]]) == 0
    assert run_cli(main, [str(a) for a in [*common, "--backend", "openvino", "--out", tmp_path / "ov"]]) == 0
    reports = {d: json.loads((tmp_path / d / "eval.json").read_text()) for d in ("torch", "ov")}
    assert reports["torch"]["source"]["settings"]["backend"] == "torch"
    assert reports["ov"]["source"]["settings"]["backend"] == "openvino"
    (a,), (b,) = (sorted((tmp_path / d / "images").glob("*.png")) for d in ("torch", "ov"))
    assert np.abs(np.asarray(Image.open(a), np.int16) - np.asarray(Image.open(b), np.int16)).max() <= 1
    assert parse_parameters(read_png_parameters(b))[2]["Backend"] == "openvino"
    assert "Backend" not in parse_parameters(read_png_parameters(a))[2]
    capsys.readouterr()
    bad = [*common, "--backend", "openvino", "--deep-cache", "2", "--out", tmp_path / "bad"]
    assert run_cli(main, [str(x) for x in bad]) == 2
    err = capsys.readouterr().err
    assert "--backend openvino replaces" in err and len(err.strip().splitlines()) == 1
    bf16 = [*common, "--backend", "openvino", "--dtype", "bf16", "--device", "cpu", "--out", tmp_path / "bf16"]
    assert run_cli(main, [str(x) for x in bf16]) == 2
    err = capsys.readouterr().err
    assert "runs fp32 weights on the CPU, not --dtype bf16" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_inception_features_from_a_local_file(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import Inception3

    torch.manual_seed(0)
    weights = tmp_path / "inception.safetensors"
    save_file(Inception3(aux_logits=False, init_weights=False).state_dict(), str(weights))
    images, captions = colour_pictures(3, seed=3)
    folder = write_folder(tmp_path / "imgs", images, captions)
    reference = write_folder(tmp_path / "ref", *colour_pictures(4, seed=4))
    report = evaluate(EvalConfig(out=tmp_path / "out", images=folder, reference=reference, inception=weights,
                                 progress=False))  # fmt: skip
    assert report["features"] == {"name": "inception-v3", "path": str(weights), "dim": 2048}
    assert report["fid"] > 0 and report["kid_subset_size"] == 3  # capped at the smaller set
    assert report["clip_score"] is None  # no CLIP given and no bundle


def test_grid_pages_and_square_resize():
    from ldm.eval.evaluate import Samples

    red, blue = torch.zeros(3, 8, 8, dtype=torch.uint8), torch.full((3, 16, 16), 255, dtype=torch.uint8)
    red[0] = 255
    samples = Samples(prompts=["a", "b", "a", "c"], images=[red, blue, red, red], seeds=[0, 0, 1, 0])
    pages = prompt_grids(samples, rows_per_page=2)
    assert [p for p, _ in pages] == [["a", "b"], ["c"]]
    first = np.asarray(pages[0][1])
    assert first.shape == (16, 16, 3)  # 2 rows × 2 columns of 8×8 cells (the 16×16 image is resized to fit)
    assert (first[:8, :8] == (255, 0, 0)).all() and (first[8:, :8] == 255).all() and (first[8:, 8:] == 255).all()
    x = torch.arange(2 * 3 * 6 * 10, dtype=torch.float32).view(2, 3, 6, 10)
    assert square_resize(x, 6).shape == (2, 3, 6, 6) and torch.equal(square_resize(x, 6), x[..., 2:8])
    assert square_resize(x, 3).shape == (2, 3, 3, 3)


def test_a_folder_with_bad_items_is_scored_without_them_and_says_so(tmp_path):
    folder = write_folder(tmp_path / "imgs", *colour_pictures(3, seed=0))
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "uncaptioned.png")
    (folder / "broken.png").write_bytes(b"not a picture")
    with open(folder / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "broken.png", "text": "red"}) + "\n")
    report = evaluate(EvalConfig(out=tmp_path / "out", images=folder, progress=False))
    assert report["source"]["images"] == 3 and report["source"]["skipped"] == 2
    assert any("2 images of" in note and "ldm data check" in note for note in report["notes"])
    assert report["clip_score"] is None and any("CLIP score skipped" in note for note in report["notes"])
    assert report["grids"] == [{"file": "grid-000.png", "prompts": ["red", "green", "blue"]}]


def test_read_prompts_from_a_file_or_a_dataset_folder(tmp_path):
    (tmp_path / "p.txt").write_text("red apple\n\n  cat face \n| pipe\n")
    assert read_prompts(tmp_path / "p.txt") == ["red apple", "cat face", "| pipe"]
    assert read_prompts(tmp_path / "p.txt", limit=1) == ["red apple"]
    folder = write_folder(tmp_path / "data", *colour_pictures(6, seed=0))
    assert read_prompts(folder) == ["red", "green", "blue", "yellow"]  # distinct captions, in file order
    (folder / "metadata.jsonl").rename(folder / "captions.jsonl")  # a table the layout flags have to name
    with pytest.raises(LdmError, match="pass --metadata captions.jsonl"):
        read_prompts(folder)
    assert read_prompts(folder, layout={"metadata": "captions.jsonl"}) == ["red", "green", "blue", "yellow"]


def test_vae_size_resizes_images_the_vae_cannot_take_as_they_are(micro_bundle_dir, tmp_path, capsys):
    folder = tmp_path / "odd"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((20, 20, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
    argv = ["--model", str(micro_bundle_dir), "--vae-data", str(folder), "--out", str(tmp_path / "out"), "--quiet"]
    assert run_cli(main, argv) == 2
    assert "resize with --size N (python -m ldm eval: --vae-size N)" in capsys.readouterr().err
    assert run_cli(main, [*argv, "--vae-size", "16"]) == 0
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["vae"]["count"] == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--out", "OUT"], "nothing to evaluate; pass --model BUNDLE"),
        (["--model", "BUNDLE", "--out", "OUT"], "no prompts; pass --prompts FILE"),
        (["--model", "BUNDLE", "--prompts", "missing.txt", "--out", "OUT"], "prompt file missing.txt not found"),
        (["--model", "BUNDLE", "--prompts", "EMPTY", "--out", "OUT"], "holds no prompts; write one prompt per line"),
        (["--model", "BUNDLE", "--prompt", "", "--out", "OUT"], "empty prompt"),
        (["--model", "no/such/bundle", "--prompt", "red", "--out", "OUT"], "no model bundle at no/such/bundle"),
        (["--model", "BUNDLE", "--prompt", "red", "--clip", "WRONGCLIP", "--out", "OUT"], "is not an ldm-clip file"),
        (["--model", "BUNDLE", "--prompt", "red", "--clip", "nope.safetensors", "--out", "OUT"], "no CLIP model at"),
        (["--model", "BUNDLE", "--prompt", "red", "--reference", "nowhere", "--out", "OUT"], "folder nowhere not"),
        (["--model", "BUNDLE", "--prompt", "red", "--reference", "EMPTYDIR", "--out", "OUT"], "no PNG, JPEG or WebP"),
        (
            ["--model", "BUNDLE", "--prompt", "red", "--inception", "no.safetensors", "--out", "OUT"],
            "no Inception weights",
        ),
        (["--model", "BUNDLE", "--prompt", "red", "--steps", "0", "--out", "OUT"], "steps must be a positive number"),
        (["--model", "BUNDLE", "--prompt", "red", "--sampler", "warp", "--out", "OUT"], "unknown sampler 'warp'"),
        (["--model", "BUNDLE", "--prompt", "red", "--width", "30", "--out", "OUT"], "multiple of 8"),
        (["--model", "BUNDLE", "--prompt", "red", "-n", "0", "--out", "OUT"], "--images-per-prompt and --batch-size"),
        (["--model", "BUNDLE", "--prompt", "red", "--deep-cache", "1", "--out", "OUT"], "N must be 0 (off) or 2"),
        (["--images", "nowhere", "--out", "OUT"], "image folder nowhere not found"),
        (["--images", "EMPTYDIR", "--prompt", "red", "--out", "OUT"], "not both"),
        (["--images", "EMPTYDIR", "--vae-data", "EMPTYDIR", "--out", "OUT"], "--vae-data needs a bundle"),
        (
            ["--model", "BUNDLE", "--vae-data", "EMPTYDIR", "--vae-size", "12", "--out", "OUT"],
            "--vae-size must be a multiple of 8",
        ),
        (["--model", "BUNDLE", "--prompt", "red"], "the following arguments are required: --out"),
    ],
)
def test_bad_input(argv, message, micro_bundle_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "EMPTY").write_text("\n  \n")
    (tmp_path / "EMPTYDIR").mkdir()
    subs = {"BUNDLE": str(micro_bundle_dir), "WRONGCLIP": str(micro_bundle_dir / "unet.safetensors"),
            "OUT": str(tmp_path / "out")}  # fmt: skip
    code = run_cli(main, [subs.get(a, a) for a in argv]) if "--out" in argv else None
    if code is None:
        with pytest.raises(SystemExit) as exit_info:
            main([subs.get(a, a) for a in argv])
        code = exit_info.value.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out" / "eval.json").exists()


def test_output_folder_and_seed_are_checked_before_generating(micro_bundle_dir, tmp_path, capsys, monkeypatch):
    import ldm.eval.evaluate as evaluation

    monkeypatch.setattr(evaluation, "generate_samples", lambda *a, **k: pytest.fail("generated before checking --out"))
    (tmp_path / "file").write_text("keep me")
    argv = ["--model", micro_bundle_dir, "--prompt", "red", "--steps", "1", "--quiet"]
    assert run_cli(main, [str(a) for a in [*argv, "--out", tmp_path / "file"]]) == 2
    assert "--out" in capsys.readouterr().err and (tmp_path / "file").read_text() == "keep me"
    with pytest.raises(SystemExit):
        run_cli(main, [str(a) for a in [*argv, "--seed", 2**70, "--out", tmp_path / "e"]])
    assert "out of range" in capsys.readouterr().err
