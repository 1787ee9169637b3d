"""ldm.models.tiling, ldm.eval.reconstruction and ldm.cli.vae: tiled encode/decode, the fp32 retry, evaluation, and the encode/decode/roundtrip/eval command line."""

import itertools
import json
import math
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from ldm.cli.common import run_cli
from ldm.cli.vae import main
from ldm.errors import LdmError
from ldm.eval.metrics import psnr, ssim
from ldm.eval.reconstruction import evaluate_batches, evaluate_folder, load_inception_features
from ldm.formats.bundle import create_bundle, load_bundle, save_bundle
from ldm.formats.latents import MetaKey
from ldm.models.autoencoder import build_autoencoder, decode_latents
from ldm.models.presets import PRESETS
from ldm.models.tiling import blend_weights, check_tiling, decode, encode_images, reconstruct, run_tiled, tile_spans


@pytest.fixture(scope="module")
def vae():
    """The random-init ``micro`` VAE (seed 0), fp32, on the CPU."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_autoencoder(PRESETS["micro"].vae).eval()


def _smooth_image(seed: int, width: int, height: int) -> np.ndarray:
    """(height, width, 3) uint8: a random image blurred to blobs, like a small natural-ish picture."""
    coarse = torch.rand(1, 3, max(2, height // 8), max(2, width // 8), generator=torch.Generator().manual_seed(seed))
    fine = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    return (fine[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _write(path, seed=0, size=(64, 64), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_smooth_image(seed, *size)).convert(mode).save(path)
    return path


def _cli(capsys, *argv):
    code = run_cli(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- tile geometry and blending (exact, no VAE) ------------------------------------------------------------------


@pytest.mark.parametrize(
    "length,tile,overlap", [(48, 16, 8), (32, 16, 0), (13, 8, 4), (100, 16, 4), (16, 16, 8), (5, 16, 2)]
)
def test_tile_spans_cover_the_axis_with_at_least_the_overlap(length, tile, overlap):
    spans = tile_spans(length, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(end - start == min(tile, length) for start, end in spans)
    assert all(prev_end - start >= overlap for (_, prev_end), (start, _) in itertools.pairwise(spans))
    if length > tile:  # the fewest tiles: one fewer could not keep the overlap
        assert (len(spans) - 2) * (tile - overlap) + tile < length


def test_blend_weights_are_linear_ramps_summing_to_one():
    spans = [(0, 4), (2, 6)]  # overlap of 2 cells = 4 output units at scale 2
    first, second = blend_weights(spans, 2)
    torch.testing.assert_close(first, torch.tensor([1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2], dtype=torch.float64))
    torch.testing.assert_close(second, torch.tensor([0.2, 0.4, 0.6, 0.8, 1, 1, 1, 1], dtype=torch.float64))


@pytest.mark.parametrize("size,tile,overlap", [((24, 40), 8, 4), ((13, 13), 8, 4), ((20, 9), 6, 0), ((7, 7), 8, 2)])
def test_run_tiled_is_exact_for_a_local_function(size, tile, overlap):
    """A function without context (per-cell) must come out of tiling unchanged: the weights are a partition of one."""
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))

    def up(t):  # decode-like: 1 cell → 8×8 pixels, 3 → 2 channels
        return torch.nn.functional.interpolate(t[:, :2] * 3 + t[:, 2:], scale_factor=8, mode="nearest")

    torch.testing.assert_close(run_tiled(up, x, tile=tile, overlap=overlap, in_scale=1, out_scale=8), up(x))
    pixels = up(x)

    def down(t):  # encode-like: 8×8 pixels → 1 cell
        return torch.nn.functional.avg_pool2d(t, 8)

    tiled = run_tiled(down, pixels, tile=tile, overlap=overlap, in_scale=8, out_scale=1)
    torch.testing.assert_close(tiled, down(pixels))


def test_bad_tiling_settings_are_rejected():
    for tile, overlap in [(100, 8), (0, 0), (64, 12), (64, 40), (64, -8)]:
        with pytest.raises(LdmError, match="try"):
            check_tiling(tile, overlap, factor=8)
    check_tiling(None, 12345, factor=8)  # no tiling: the overlap does not matter
    check_tiling(64, 32, factor=8)
    check_tiling(100, 12, factor=4)  # on a 4-pixel grid
    with pytest.raises(LdmError, match="tile overlap 6 must be a multiple of 4 .*; try 4"):
        check_tiling(100, 6, factor=4)


# --- tiled VAE vs untiled ----------------------------------------------------------------------------------------


def _distance_to_seams(height, width, rows, cols):
    """(height, width) distance of each output pixel's centre to the nearest internal seam line."""
    dy = torch.stack([(torch.arange(height) + 0.5 - r).abs() for r in rows]).min(0).values
    dx = torch.stack([(torch.arange(width) + 0.5 - c).abs() for c in cols]).min(0).values
    return torch.minimum(dy[:, None], dx[None, :])


def _borders(length, tile, overlap, scale):
    """Output columns where a tile starts or ends inside the image."""
    spans = tile_spans(length, tile, overlap)
    return sorted({s * scale for s, _ in spans[1:]} | {e * scale for _, e in spans[:-1]})


def _jump_ratio(tiled, full, borders):
    """Mean |horizontal step of the error (tiled − full)| across tile-border columns ÷ the same elsewhere.

    About 1 when nothing happens at the borders; well above 1 when the error jumps there (a visible seam).
    """
    err = tiled - full
    step = (err[..., 1:] - err[..., :-1]).abs().mean(dim=(0, 1, 2))  # (W−1,): between columns c and c+1
    at = torch.zeros_like(step, dtype=torch.bool)
    at[[b - 1 for b in borders]] = True
    return (step[at].mean() / step[~at].mean()).item()


def _seam_report(full, blended, hard, *, rows, cols, band, interior):
    """Per-pixel |error| of both tilings, split by distance to the hard tiling's seam lines (output units)."""
    blended_err = (blended - full).abs().mean(dim=(0, 1))  # (H, W)
    hard_err = (hard - full).abs().mean(dim=(0, 1))
    d = _distance_to_seams(*full.shape[-2:], rows, cols)
    return {
        "context": hard_err[d >= interior].mean().item(),  # far from seams: the non-local error no tiling can avoid
        "hard_seam": hard_err[d < band].mean().item(),
        "blended_seam": blended_err[d < band].mean().item(),
        "blended_all": blended_err.mean().item(),
        "spread": (full - full.mean()).abs().mean().item(),
    }


def _assert_seamless(r, *, bound):
    # The measurement can see a seam: without blending the error next to a seam is several times the context error.
    assert r["hard_seam"] > 2 * r["context"], r
    # With blending the seams disappear into the context error ...
    assert r["blended_seam"] < bound * r["context"], r
    assert r["blended_seam"] < 0.5 * r["hard_seam"], r
    # ... and overall the tiled output stays within a small multiple of the irreducible context error.
    assert r["blended_all"] < bound * r["context"], r
    assert r["blended_all"] < 0.5 * r["spread"], r


def test_tiled_decode_is_close_to_untiled_and_has_no_seams(vae):
    """Tiling a random-init VAE cannot be exact, so the bound is relative to what tiling must lose.

    A tile sees nothing outside itself, but the decoder is not local: GroupNorm statistics and the mid-block
    self-attention are taken over the whole input, and the 3×3 convolutions see ~5 latent cells (40 px) past a
    tile's edge (zero padding there instead). The first part we call the *context error*: the mean |tiled −
    untiled| of a hard-cut (overlap 0) tiling far (≥ 6 cells) from any seam, ~0.076 here against a mean output
    deviation of ~0.19; no blending can remove it. The second part is the seam: within 1 cell of a hard cut the
    error is ~3× the context error (2.8–3.9× over three seeds) and jumps across the cut. Blending 8-cell overlaps
    with linear ramps must bring the seam band down to the context error (bound 1.5×; measured 0.99–1.14× over
    three seeds), below half the hard-cut seam error, keep the mean error under 1.5× the context error (measured
    0.96–1.07×), and leave no jump at tile borders (step ratio < 1.3, measured ~1.07, against 1.8–2.9 hard-cut).
    A blend whose weights did not sum to one, or a tile put one cell off, fails these by far.
    """
    z = torch.randn(1, 4, 32, 48, generator=torch.Generator().manual_seed(0))  # 256×384 px: 2×5 tiles of 128 px
    full = decode(vae, z, scaling_factor=1.0)
    blended = decode(vae, z, scaling_factor=1.0, tile=128, overlap=64)
    hard = decode(vae, z, scaling_factor=1.0, tile=128, overlap=0)  # 2×3 tiles meeting edge to edge
    assert full.shape == blended.shape == hard.shape == (1, 3, 256, 384)
    assert blended.abs().max() <= 1
    _assert_seamless(_seam_report(full, blended, hard, rows=[128], cols=[128, 256], band=8, interior=48), bound=1.5)
    blended_jump = _jump_ratio(blended, full, _borders(48, 16, 8, 8))
    hard_jump = _jump_ratio(hard, full, _borders(48, 16, 0, 8))
    assert blended_jump < 1.3 and hard_jump > 1.5, (blended_jump, hard_jump)


def test_tiled_encode_is_close_to_untiled_and_has_no_seams(vae):
    """As for decode, on the latent grid: seam band < 1 cell, context ≥ 6 cells from a seam.

    The encoder's context error is small in absolute terms (~0.01 against a latent spread of ~0.09 on this smooth
    image), so the blended error is a larger multiple of it: bound 2× (measured 1.06–1.55× at the seams and
    1.12–1.45× overall over three seeds), while a hard cut is 5–6.5× at its seams.
    """
    pixels = torch.nn.functional.avg_pool2d(
        torch.rand(1, 3, 256, 384, generator=torch.Generator().manual_seed(0)) * 2 - 1, 5, stride=1, padding=2
    )
    full = encode_images(vae, pixels, scaling_factor=0.5)
    blended = encode_images(vae, pixels, scaling_factor=0.5, tile=128, overlap=64)
    hard = encode_images(vae, pixels, scaling_factor=0.5, tile=128, overlap=0)
    assert full.shape == blended.shape == (1, 4, 32, 48)
    _assert_seamless(_seam_report(full, blended, hard, rows=[16], cols=[16, 32], band=1, interior=6), bound=2.0)
    assert _jump_ratio(blended, full, _borders(48, 16, 8, 1)) < _jump_ratio(hard, full, _borders(48, 16, 0, 1))


def test_encode_scales_by_the_factor_and_can_sample(vae):
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mean = encode_images(vae, pixels, scaling_factor=1.0)
    torch.testing.assert_close(encode_images(vae, pixels, scaling_factor=0.25), mean * 0.25)
    posterior = vae.encode(pixels).latent_dist
    torch.testing.assert_close(mean, posterior.mean)
    a = encode_images(vae, pixels, scaling_factor=1.0, generator=torch.Generator().manual_seed(5))
    b = encode_images(vae, pixels, scaling_factor=1.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, mean)
    # the sample's spread around the mean is the posterior std, also when the posterior is blended from tiles
    gen = torch.Generator().manual_seed(5)
    tiled = encode_images(vae, pixels, scaling_factor=1.0, tile=16, overlap=8, generator=gen)
    z = (tiled - mean) / posterior.std
    assert 0.7 < z.std().item() < 1.3
    with pytest.raises(LdmError, match="multiple of 8"):
        encode_images(vae, pixels[..., :30], scaling_factor=1.0)


@torch.no_grad()
def test_a_factor_4_vae_tiles_on_its_own_grid():
    """Tiles are cut on the VAE's own latent grid: where only the first tile reaches, the tiled output is that tile's."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        vae = build_autoencoder(replace(PRESETS["micro"].vae, block_out_channels=(8, 16, 16))).eval()  # 4 px a cell
    pixels = torch.from_numpy(_smooth_image(4, 36, 44)).permute(2, 0, 1)[None].float() / 127.5 - 1  # (1, 3, 44, 36)
    whole = encode_images(vae, pixels, scaling_factor=1.0)
    tiled = encode_images(vae, pixels, scaling_factor=1.0, tile=16, overlap=8)  # 4-cell tiles, 2 cells shared
    assert whole.shape == tiled.shape == (1, 4, 11, 9)
    rows, cols = tile_spans(11, 4, 2), tile_spans(9, 4, 2)
    top, left = rows[1][0], cols[1][0]  # where the second tile starts, down and across
    first = vae.encode(pixels[..., :16, :16]).latent_dist.mean  # (1, 4, 4, 4)
    torch.testing.assert_close(tiled[..., :top, :left], first[..., :top, :left])
    images = decode(vae, whole, scaling_factor=1.0, tile=16, overlap=8)
    assert images.shape == (1, 3, 44, 36)
    first = decode_latents(vae, whole[..., :4, :4], scaling_factor=1.0).clamp(-1, 1)  # (1, 3, 16, 16)
    torch.testing.assert_close(images[..., : 4 * top, : 4 * left], first[..., : 4 * top, : 4 * left])
    torch.testing.assert_close(decode(vae, whole, scaling_factor=1.0, tile=None), vae.decode(whole).sample.clamp(-1, 1))
    with pytest.raises(LdmError, match="image size 34×44 is not a multiple of 4"):
        encode_images(vae, pixels[..., :34], scaling_factor=1.0)


def test_half_precision_overflow_is_redone_in_fp32_per_tile(vae):
    """A bf16 decode whose last layer overflows (injected inf) comes back finite, with the fp32 warning."""
    half = build_autoencoder(PRESETS["micro"].vae).eval()
    half.load_state_dict(vae.state_dict())
    half.to(torch.bfloat16)
    z = torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(2))

    def overflow(module, inputs, output):
        return output * math.inf if output.dtype == torch.bfloat16 else output

    hook = half.decoder.conv_out.register_forward_hook(overflow)
    try:
        with pytest.warns(UserWarning, match="fp32") as record:
            images = decode(half, z, scaling_factor=1.0, tile=64, overlap=32)  # 3 tiles along the width
    finally:
        hook.remove()
    assert len([w for w in record if "fp32" in str(w.message)]) == 3
    assert torch.isfinite(images).all() and images.shape == (1, 3, 64, 128)
    assert half.dtype == torch.bfloat16  # put back after the retry
    torch.testing.assert_close(images, decode(vae, z, scaling_factor=1.0, tile=64, overlap=32), atol=0.05, rtol=0)


# --- evaluation --------------------------------------------------------------------------------------------------


def test_evaluate_batches_averages_per_image_metrics_and_computes_rfid(vae):
    gen = torch.Generator().manual_seed(3)
    batches = [torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1, torch.rand(1, 3, 24, 40, generator=gen) * 2 - 1]
    seen = []

    def features(images):  # (B, 3, H, W) in [0, 1] → (B, 4): a stand-in feature extractor
        seen.append(images.shape)
        return torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3))[:, :1]], dim=1)

    result = evaluate_batches(vae, batches, scaling_factor=0.5, feature_extractor=features)
    real = [(b + 1) / 2 for b in batches]
    fake = [(reconstruct(vae, b, scaling_factor=0.5) + 1) / 2 for b in batches]
    expected_psnr = torch.cat([psnr(r, f) for r, f in zip(real, fake, strict=True)]).mean().item()
    expected_ssim = torch.cat([ssim(r, f) for r, f in zip(real, fake, strict=True)]).mean().item()
    assert result["count"] == 3 and len(seen) == 4
    assert result["psnr"] == pytest.approx(expected_psnr, rel=1e-5)
    assert result["ssim"] == pytest.approx(expected_ssim, rel=1e-5)
    assert 0 < result["mae"] < 1 and result["rfid"] > 0
    # without a scaling factor the VAE's own config.scaling_factor is used (it cancels out of a reconstruction)
    default = evaluate_batches(vae, batches[:1])
    assert "rfid" not in default and default["psnr"] == pytest.approx(
        evaluate_batches(vae, batches[:1], scaling_factor=0.5)["psnr"], rel=1e-4
    )


def test_evaluate_folder_reads_a_folder_deterministically(micro_bundle_dir, tmp_path):
    for i, name in enumerate(["a.png", "sub/b.jpg", "sub/deeper/c.webp", "d.png"]):
        _write(tmp_path / "imgs" / name, seed=i, size=(48, 40))
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    bundle = load_bundle(micro_bundle_dir)
    first = evaluate_folder(bundle, tmp_path / "imgs", size=32, limit=3, batch_size=2, progress=False)
    again = evaluate_folder(bundle, tmp_path / "imgs", size=32, limit=3, batch_size=3, progress=False)
    assert first["count"] == 3 and set(first) == {"psnr", "ssim", "mae", "count"}
    assert first == pytest.approx(again)


def test_inception_features_load_from_a_torchvision_state_dict(tmp_path):
    from torchvision.models import Inception3

    with torch.random.fork_rng():
        torch.manual_seed(0)
        state = Inception3(aux_logits=False, init_weights=False).state_dict()
    save_file(state, str(tmp_path / "inception.safetensors"))
    features = load_inception_features(tmp_path / "inception.safetensors", resolution=75)
    out = features(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 2048) and torch.isfinite(out).all()
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(LdmError, match="not a torchvision Inception-v3"):
        load_inception_features(tmp_path / "other.safetensors")


# --- command line ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_bundle_dir(tmp_path_factory):
    """A second micro bundle with different weights (seed 1)."""
    folder = tmp_path_factory.mktemp("bundles") / "other"
    save_bundle(create_bundle(PRESETS["micro"], seed=1, name="other"), folder)
    return folder


def test_encode_then_decode_keeps_shapes_scale_and_sources(micro_bundle_dir, other_bundle_dir, tmp_path, capsys):
    a = _write(tmp_path / "in" / "cat.png", seed=0, size=(80, 64))
    b = _write(tmp_path / "in" / "dog.jpg", seed=1, size=(64, 96), mode="RGB")
    c = _write(tmp_path / "in" / "sub" / "cat.png", seed=2, size=(64, 64), mode="RGBA")
    out = tmp_path / "latents.safetensors"
    model = ["--model", micro_bundle_dir, "--device", "cpu"]
    tiles = ["--tile-size", 16, "--tile-overlap", 8]  # forced tiling of the 32×32 images
    code, stdout, err = _cli(capsys, "encode", a, b, c, "-o", out, "--size", 32, *tiles, *model)
    assert code == 0, err
    assert "3 latents" in stdout

    bundle = load_bundle(micro_bundle_dir)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        latents = f.get_tensor("latents")
    assert latents.shape == (3, 4, 4, 4) and latents.dtype == torch.float32
    assert float(meta[MetaKey.SCALING_FACTOR.value]) == bundle.config.vae.scaling_factor
    assert meta[MetaKey.VAE_SHA256.value] == bundle.manifest["files"]["vae.safetensors"]
    assert meta[MetaKey.BUNDLE.value] == "micro"
    assert json.loads(meta[MetaKey.SOURCES.value]) == [
        {"name": "cat.png", "width": 80, "height": 64},
        {"name": "dog.jpg", "width": 64, "height": 96},
        {"name": "cat.png", "width": 64, "height": 64},
    ]

    code, stdout, err = _cli(capsys, "decode", out, "-o", tmp_path / "dec", *model)
    assert code == 0, err
    assert "warning" not in err
    names = sorted(p.name for p in (tmp_path / "dec").iterdir())
    assert names == ["cat-1.png", "cat.png", "dog.png"]
    with Image.open(tmp_path / "dec" / "dog.png") as image:
        assert image.size == (32, 32) and image.mode == "RGB"
        decoded = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    expected = (decode(bundle.vae, latents[1:2], scaling_factor=bundle.config.vae.scaling_factor)[0] + 1) / 2
    assert (decoded - expected).abs().max() <= 1 / 255 + 1e-6

    code, _, err = _cli(capsys, "decode", out, "-o", tmp_path / "dec2", "--model", other_bundle_dir, "--device", "cpu")
    assert code == 0
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "different VAE" in warning[0]


def test_roundtrip_writes_side_by_side_images_and_prints_metrics(micro_bundle_dir, tmp_path, capsys):
    a = _write(tmp_path / "a.png", seed=0, size=(48, 32))
    b = _write(tmp_path / "b.png", seed=1, size=(64, 64))
    model = ["--model", micro_bundle_dir, "--device", "cpu"]
    code, stdout, err = _cli(capsys, "roundtrip", a, b, "-o", tmp_path / "out", *model)
    assert code == 0, err
    with Image.open(tmp_path / "out" / "a.png") as image:
        assert image.size == (96, 32)
        left = np.asarray(image)[:, :48]
    np.testing.assert_array_equal(left, np.asarray(Image.open(a)))  # the left half is the original
    lines = stdout.strip().splitlines()
    assert len(lines) == 2 and all("PSNR" in line and "dB" in line and "SSIM" in line for line in lines)
    value = float(lines[0].split("PSNR ")[1].split(" dB")[0])
    assert 0 < value < 60


def test_eval_reports_metrics_and_writes_json(micro_bundle_dir, tmp_path, capsys):
    for i, name in enumerate(["x/a.png", "b.jpg", "c.webp"]):
        _write(tmp_path / "data" / name, seed=i, size=(40, 40))
    report = tmp_path / "eval.json"
    code, stdout, err = _cli(
        capsys, "eval", tmp_path / "data", "--size", 32, "--json", report, "--limit", 2, "--model", micro_bundle_dir,
        "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    assert "rFID: skipped (no feature extractor; pass --features FILE)" in stdout
    assert "PSNR:" in stdout and "SSIM:" in stdout and "MAE:" in stdout
    data = json.loads(report.read_text())
    assert {"psnr", "ssim", "mae", "count"} <= set(data) and data["count"] == 2 and data["rfid"] is None
    assert -1 <= data["ssim"] <= 1 and data["mae"] > 0  # SSIM of a random VAE may be < 0


def test_eval_with_features_reports_rfid(micro_bundle_dir, tmp_path, capsys, monkeypatch):
    """The --features hook: the file is handed to the loader and its features give the rFID line."""
    import ldm.cli.vae

    loaded = []

    def fake_loader(path, *, device="cpu", resolution=299):
        loaded.append(path)
        return lambda images: images.mean(dim=(2, 3))  # (B, 3)

    monkeypatch.setattr(ldm.cli.vae, "load_inception_features", fake_loader)
    for i in range(3):
        _write(tmp_path / "data" / f"{i}.png", seed=i, size=(32, 32))
    code, stdout, err = _cli(
        capsys, "eval", tmp_path / "data", "--features", tmp_path / "inception.safetensors", "--model",
        micro_bundle_dir, "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    assert loaded == [tmp_path / "inception.safetensors"]
    rfid = [line for line in stdout.splitlines() if line.startswith("rFID:")]
    assert len(rfid) == 1 and float(rfid[0].split()[1]) >= 0


def test_the_command_line_takes_sizes_on_the_vaes_grid(micro_f4_bundle_dir, tmp_path, capsys):
    image = _write(tmp_path / "in" / "tall.png", seed=3, size=(36, 44))
    model = ["--model", micro_f4_bundle_dir, "--device", "cpu"]
    code, _, err = _cli(capsys, "encode", image, "-o", tmp_path / "l.safetensors", "--size", 36, *model)
    assert code == 0, err
    with safe_open(str(tmp_path / "l.safetensors"), framework="pt") as f:
        assert f.get_tensor("latents").shape == (1, 4, 9, 9)
    code, _, err = _cli(capsys, "roundtrip", image, "-o", tmp_path / "rt", "--tile-size", 16, "--tile-overlap", 4, *model)
    assert code == 0, err
    assert Image.open(tmp_path / "rt" / "tall.png").size == (72, 44)  # original | reconstruction
    code, _, err = _cli(capsys, "encode", image, "-o", tmp_path / "m.safetensors", "--size", 30, *model)
    assert code == 2 and "--size must be a positive multiple of 4" in err and "try 28" in err


def _bad_cases(tmp_path):
    good = _write(tmp_path / "good.png", size=(32, 32))
    odd = _write(tmp_path / "odd.png", size=(30, 36))
    wide = _write(tmp_path / "wide.png", size=(64, 32))
    fake = tmp_path / "fake.png"
    fake.write_text("this is not a png")
    plain = tmp_path / "plain.safetensors"
    save_file({"latents": torch.zeros(1, 4, 4, 4)}, str(plain))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 32)
    empty = tmp_path / "empty"
    empty.mkdir()
    return {
        "missing file": (["encode", tmp_path / "nope.png", "-o", tmp_path / "l.safetensors"], "no such file"),
        "not an image": (["encode", fake, "-o", tmp_path / "l.safetensors"], "not a usable image"),
        "sizes differ": (["encode", good, wide, "-o", tmp_path / "l.safetensors"], "--size"),
        "not a multiple of 8": (["roundtrip", odd, "-o", tmp_path / "o"], "resize with --size"),
        "bad --size": (["encode", good, "-o", tmp_path / "l.safetensors", "--size", 30], "multiple of 8"),
        "latents without metadata": (["decode", plain, "-o", tmp_path / "o"], "no scaling_factor metadata"),
        "not safetensors": (["decode", junk, "-o", tmp_path / "o"], "not a readable safetensors"),
        "empty folder": (["eval", empty], "no PNG, JPEG or WebP"),
        "bad overlap": (["roundtrip", good, "-o", tmp_path / "o", "--tile-overlap", 12], "overlap"),
        "missing bundle": (["roundtrip", good, "-o", tmp_path / "o", "--model", tmp_path / "none"], "no model bundle"),
        "missing features": (["eval", tmp_path, "--features", tmp_path / "none.safetensors"], "feature extractor"),
    }


def test_bad_input_is_one_error_line_and_exit_2(micro_bundle_dir, tmp_path, capsys):
    for name, (argv, needle) in _bad_cases(tmp_path).items():
        if "--model" not in argv:
            argv = [*argv, "--model", micro_bundle_dir]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            code, _, err = _cli(capsys, *argv, "--device", "cpu")
        lines = err.strip().splitlines()
        assert code == 2, (name, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert needle in lines[0], (name, lines[0])
    assert not (tmp_path / "l.safetensors").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_decode_refuses_latents_that_are_not_finite(micro_bundle_dir, tmp_path, capsys, value):
    """NaN or inf latents decode to a black image: refused with the count, and no PNG is written."""
    bundle = load_bundle(micro_bundle_dir)
    from ldm.formats.latents import latents_metadata
    from ldm.io import save_tensors

    latents = torch.zeros(1, 4, 4, 4)
    latents[0, 0, 0, :2] = value
    path = save_tensors(tmp_path / "bad.safetensors", {"latents": latents}, latents_metadata(bundle, [{"name": "x"}]))
    code, _, err = _cli(capsys, "decode", path, "-o", tmp_path / "out", "--model", micro_bundle_dir, "--device", "cpu")
    assert code == 2 and "latents hold 2 NaN or inf values" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "command, output, message",
    [
        ("encode", "folder", "-o {path} is a folder; give a file path inside it"),
        ("encode", "file/x.safetensors", "is a file, so nothing can be written under it"),
        ("decode", "file", "-o {path} is an existing file, not a folder"),
        ("roundtrip", "file", "is an existing file, not a folder"),
        ("roundtrip", "/proc/ldm/x", "cannot write to -o /proc/ldm/x"),
        ("eval", "folder", "--json {path} is a folder"),
    ],
)
def test_output_paths_are_checked_before_the_work(micro_bundle_dir, tmp_path, capsys, command, output, message):
    image = _write(tmp_path / "in" / "a.png")
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("keep me")
    path = output if output.startswith("/") else tmp_path / output
    source = {"encode": image, "roundtrip": image, "decode": tmp_path / "latents.safetensors", "eval": image.parent}
    flag = "--json" if command == "eval" else "-o"
    code, _, err = _cli(capsys, command, source[command], flag, path, "--model", micro_bundle_dir, "--device", "cpu")
    assert code == 2 and err.count("\n") == 1, err
    assert message.format(path=path) in err, err
    assert (tmp_path / "file").read_text() == "keep me"


def test_size_above_the_largest_side_is_refused(micro_bundle_dir, tmp_path, capsys):
    image = _write(tmp_path / "a.png")
    code, _, err = _cli(capsys, "roundtrip", image, "-o", tmp_path / "o", "--size", 100000, "--model", micro_bundle_dir)
    assert code == 2 and "--size must be at most 16384 pixels, got 100000" in err
