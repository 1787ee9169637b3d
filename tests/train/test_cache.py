"""The feature cache (VAE encoder calls counted), aspect-ratio buckets and the items train_unet.py reads."""

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from test_train_unet import args, write_shapes

from ldm.cli import train_unet
from ldm.cli.common import run_cli
from ldm.data import DataConfig, scan_dataset, square_tensor
from ldm.formats.bundle import load_bundle, save_bundle
from ldm.train.cache import (
    BucketBatches,
    UNetItems,
    assign_buckets,
    cache_path,
    fit_tensor,
    load_or_build_cache,
    make_buckets,
    nearest_bucket,
)
from ldm.train.loop import batches

# Mixed sizes, including a 1000×50 strip, a 50×1000 one and an 8×8 image (usable with data.min_side=1).
MIXED = [(64, 64), (80, 64), (100, 100), (1000, 50), (50, 1000), (8, 8), (128, 40), (40, 128), (300, 200), (200, 300),
         (64, 48), (48, 64), (70, 70), (120, 32), (33, 90), (90, 33)]  # fmt: skip


@pytest.fixture
def encoder_calls(monkeypatch):
    """Every ``AutoencoderKL.encode`` call, by input shape."""
    calls = []
    original = AutoencoderKL.encode

    def counting(self, x, *rest, **kwargs):
        calls.append(tuple(x.shape))
        return original(self, x, *rest, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting)
    return calls


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("cache-data") / "shapes")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("cache-data") / "mixed", len(MIXED), sizes=MIXED)


def test_warm_cache_makes_no_encoder_calls(micro_bundle_dir, data, tmp_path, encoder_calls, capsys):
    cache = ["--cache-dir", str(tmp_path / "cache"), "--set", "data.random_flip=0.5"]
    assert run_cli(train_unet.main, args(micro_bundle_dir, data, tmp_path / "a", "--max-steps", "1", *cache)) == 0
    assert encoder_calls == [(16, 3, 64, 64)]  # 8 images and their mirror images, in one call
    assert "feature cache: building" in capsys.readouterr().out
    encoder_calls.clear()
    # 3 steps of 4 = 1.5 epochs of 8 images, from the cache written by the first run.
    assert run_cli(train_unet.main, args(micro_bundle_dir, data, tmp_path / "b", "--max-steps", "3", *cache)) == 0
    assert encoder_calls == []
    assert "feature cache: hit" in capsys.readouterr().out


def test_cache_is_rebuilt_when_the_vae_changes(micro_bundle_dir, data, tmp_path, encoder_calls, capsys):
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert run_cli(train_unet.main, args(micro_bundle_dir, data, tmp_path / "a", "--max-steps", "1", *cache)) == 0
    other = load_bundle(micro_bundle_dir)
    with torch.no_grad():
        other.vae.encoder.conv_in.weight.mul_(1.5)
    save_bundle(other, tmp_path / "other")
    assert (
        other.manifest["files"]["vae.safetensors"] != load_bundle(micro_bundle_dir).manifest["files"]["vae.safetensors"]
    )
    capsys.readouterr()
    encoder_calls.clear()
    assert run_cli(train_unet.main, args(tmp_path / "other", data, tmp_path / "b", "--max-steps", "1", *cache)) == 0
    out = capsys.readouterr().out
    assert "feature cache: building" in out and "(vae changed)" in out
    assert encoder_calls == [(8, 3, 64, 64)]  # rebuilt: no flipping, so one call for the 8 images


def test_cache_parts_are_checked_and_stale_ones_removed(micro_bundle_dir, data, tmp_path, encoder_calls, capsys):
    """The head names its parts: a part of an earlier build is removed when a new head is written, and a missing
    part or one from another build makes the cache a miss (rebuilt), never a mix of two builds."""
    folder = tmp_path / "cache"
    folder.mkdir()
    stale = folder / "shapes-stale.part-00001-of-00002.safetensors"
    stale.write_bytes(b"left by a run of another dataset")  # another cache's part: not this head's to remove
    run = ["--cache-dir", str(folder), "--max-steps", "1"]
    assert run_cli(train_unet.main, args(micro_bundle_dir, data, tmp_path / "a", *run)) == 0
    (head,) = [p for p in folder.glob("shapes-train-*.safetensors") if ".part-" not in p.name]
    own_stale = folder / f"{head.stem}.part-00001-of-00002.safetensors"
    own_stale.write_bytes(b"from a 2-process build of before")
    (part,) = folder.glob(f"{head.stem}.part-00000-of-00001*")

    part.rename(tmp_path / "kept-part")  # missing: rebuilt, and the earlier 2-process part removed
    capsys.readouterr()
    encoder_calls.clear()
    assert run_cli(train_unet.main, args(micro_bundle_dir, data, tmp_path / "b", *run)) == 0
    assert f"(part {part.name} is missing)" in capsys.readouterr().out
    assert encoder_calls == [(8, 3, 64, 64)]
    assert part.is_file() and not own_stale.exists() and stale.exists()

    (tmp_path / "kept-part").replace(part)  # a part of the first build beside the second build's head
    encoder_calls.clear()
    assert run_cli(train_unet.main, args(micro_bundle_dir, data, tmp_path / "c", *run)) == 0
    assert f"(part {part.name} is from another build)" in capsys.readouterr().out
    assert encoder_calls == [(8, 3, 64, 64)]


def test_no_cache_encodes_every_step(micro_bundle_dir, data, tmp_path, encoder_calls, capsys):
    argv = args(micro_bundle_dir, data, tmp_path / "run", "--max-steps", "3", "--no-cache",
                "--set", "train.gradient_accumulation=2")  # fmt: skip
    assert run_cli(train_unet.main, argv) == 0
    assert encoder_calls == [(4, 3, 64, 64)] * 6  # 3 steps × 2 micro-batches
    assert "feature cache" not in capsys.readouterr().out
    assert not (tmp_path / "run" / "cache").exists()


def test_cached_items_equal_encoded_pixels(micro_bundle_dir, data, tmp_path):
    """The cache's posterior of each item (mirrored when its flip is drawn) is the VAE's posterior of that item."""
    bundle = load_bundle(micro_bundle_dir)
    config = DataConfig(path=str(data), resolution=64, random_flip=0.5)
    report = scan_dataset(config, progress=False)
    targets = [(64, 64)] * len(report.pairs)
    path = cache_path(tmp_path, config, "train")
    cache = load_or_build_cache(path, bundle=bundle, data=config, report=report, targets=targets, buckets=None,
                                latents=True, batch_size=3, log=lambda m: None)  # fmt: skip
    assert cache.has_flipped and len(cache) == len(report.pairs) and "" in cache.captions
    plain = {"report": report, "targets": targets, "center_crop": True, "flip_p": 0.5, "caption_dropout": 0.5,
             "seed": 4}  # fmt: skip
    cached_items, pixel_items = UNetItems(**plain, cache=cache), UNetItems(**plain)
    both_items = UNetItems(**plain, cache=cache, pixels=True)  # inpainting and upscaling also encode the crop
    flips = 0
    for epoch in (0, 1):
        for items in (cached_items, pixel_items, both_items):
            items.set_epoch(epoch)
        for i in range(len(report.pairs)):
            a, b, both = cached_items[i], pixel_items[i], both_items[i]
            assert a["caption"] == b["caption"]  # the same dropout draw
            assert "pixel_values" not in a and "mean" not in b
            assert torch.equal(both["mean"], a["mean"]) and torch.equal(both["pixel_values"], b["pixel_values"])
            with torch.no_grad():
                posterior = bundle.vae.encode(b["pixel_values"][None]).latent_dist
            torch.testing.assert_close(a["mean"], posterior.mean[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(a["logvar"], posterior.logvar[0], atol=1e-5, rtol=1e-4)
            flipped_mean = cache.latent(i, flipped=True)[0]
            flips += torch.equal(a["mean"], flipped_mean) and not torch.equal(flipped_mean, cache.latent(i)[0])
    assert 0 < flips < 2 * len(report.pairs)  # both kinds were drawn
    # Text: the cached hidden states are the text encoder's.
    from ldm.pipeline import encode_prompts

    torch.testing.assert_close(cache.text(["disc 1", ""]), encode_prompts(bundle, ["disc 1", ""]).float())


def test_fit_tensor_crops_squares_like_the_dataset():
    image = Image.linear_gradient("L").convert("RGB").resize((120, 80))
    for center in (True, False):
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        ours = fit_tensor(image, (64, 64), center_crop=center, flip_p=0.5, generator=g1)
        theirs = square_tensor(image, resolution=64, center_crop=center, flip_p=0.5, generator=g2)
        assert torch.equal(ours, theirs)
    assert fit_tensor(image, (96, 32)).shape == (3, 32, 96)
    assert fit_tensor(Image.new("RGB", (1000, 50)), (32, 128)).shape == (3, 128, 32)  # extreme aspect, upscaled


def test_buckets():
    buckets = make_buckets(64, step=16, max_aspect=4)
    assert buckets == [(32, 128), (48, 80), (64, 64), (80, 48), (128, 32)]
    sd = make_buckets(512, step=64)
    assert (512, 512) in sd and (1024, 256) in sd and (256, 1024) in sd
    for w, h in sd:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and max(w / h, h / w) <= 4
        assert w * h >= 0.75 * 512 * 512  # roughly equal area
    assert buckets[nearest_bucket((1000, 50), buckets)] == (128, 32)  # clamped to the widest
    assert buckets[nearest_bucket((50, 1000), buckets)] == (32, 128)
    assert buckets[nearest_bucket((8, 8), buckets)] == (64, 64)
    assert buckets[nearest_bucket((0, 7), buckets)] == (32, 128)  # degenerate sizes do not crash
    # A bucket too small for a batch gives its images to the nearest used bucket.
    assignment = assign_buckets([(64, 64)] * 3 + [(80, 50)] + [(128, 30)] * 2, buckets, min_count=2)
    assert [buckets[b] for b in assignment] == [(64, 64)] * 4 + [(128, 32)] * 2  # (80, 48) was alone
    assert assign_buckets([(80, 50)], buckets, min_count=2) == [3]  # one bucket left: it stays


def test_bucketed_batches_are_one_shape_and_deterministic(mixed):
    report = scan_dataset(DataConfig(path=str(mixed), resolution=64, min_side=1), progress=False)
    assert len(report.pairs) == len(MIXED)  # the 8×8 and the 1000×50 images are used
    buckets = make_buckets(64, step=16)
    assignment = assign_buckets([report.sizes[p.image] for p in report.pairs], buckets, min_count=2)
    targets = [buckets[b] for b in assignment]
    items = UNetItems(report, targets=targets, center_crop=False, flip_p=0.5, seed=0)
    order = BucketBatches(assignment, 2, seed=0)
    seen = set()
    for epoch in (0, 1):
        for batch in batches(items, order, epoch, start=0, num_workers=0):  # the training loop's own data path
            ((w, h),) = {targets[i] for i in batch["index"]}  # torch.stack would fail on mixed shapes
            assert batch["pixel_values"].shape == (2, 3, h, w)
            seen.add((w, h))
    assert len(seen) >= 3 and (128, 32) in seen
    assert order.epoch(0) == BucketBatches(assignment, 2, seed=0).epoch(0)  # a pure function of (seed, epoch)
    assert order.epoch(0) != BucketBatches(assignment, 2, seed=1).epoch(0)
    assert order.epoch(0) != order.epoch(1)
    assert order.epoch(1, start=2) == order.epoch(1)[2:]
    assert len(order) == sum(n // 2 for n in [assignment.count(b) for b in set(assignment)])
    # Two processes split each global batch.
    r0, r1 = (
        BucketBatches(assignment, 2, seed=0, num_replicas=2),
        BucketBatches(assignment, 2, seed=0, num_replicas=2, rank=1),
    )
    for a, b, whole in zip(r0.epoch(0), r1.epoch(0), order.epoch(0), strict=True):  # one process's batches, halved
        assert a + b == whole and targets[a[0]] == targets[b[0]]


def test_bucketed_training_run(micro_bundle_dir, mixed, tmp_path, encoder_calls, capsys):
    argv = args(micro_bundle_dir, mixed, tmp_path / "run", "--max-steps", "3", "--bucketing",
                "--set", "data.min_side=1", "--set", "train.batch_size=2", "--set", "data.random_flip=0.5")  # fmt: skip
    assert run_cli(train_unet.main, argv) == 0
    out = capsys.readouterr().out
    assert "buckets (16 px steps" in out and "128×32" in out
    shapes = {shape[2:] for shape in encoder_calls}
    assert {(32, 128), (64, 64), (128, 32)} <= {(w, h) for h, w in shapes}  # cached per bucket shape
    assert (tmp_path / "run" / "bundle" / "manifest.json").is_file()


def test_repeated_images_are_encoded_once(micro_bundle_dir, tmp_path, encoder_calls):
    """A kohya repeat folder lists each of its images N times; the cache encodes each once, for all its items."""
    shapes = write_shapes(tmp_path / "shapes", 4)
    root = tmp_path / "kohya"
    for i, png in enumerate(sorted(shapes.glob("*.png"))):
        folder = root / ("3_shapes" if i < 3 else "plain")
        folder.mkdir(parents=True, exist_ok=True)
        png.rename(folder / png.name)
        (folder / png.with_suffix(".txt").name).write_text(f"shape {i}")
    config = DataConfig(path=str(root), resolution=64)
    report = scan_dataset(config, progress=False)
    assert len(report.pairs) == 10
    bundle = load_bundle(micro_bundle_dir)
    cache = load_or_build_cache(None, bundle=bundle, data=config, report=report, targets=[(64, 64)] * 10,
                                buckets=None, latents=True, batch_size=16, log=lambda m: None)  # fmt: skip
    assert encoder_calls == [(4, 3, 64, 64)] and len(cache) == 10
    pixels = UNetItems(report, targets=[(64, 64)] * 10, center_crop=True, flip_p=0.0)
    for i in range(10):
        with torch.no_grad():
            mean = bundle.vae.encode(pixels[i]["pixel_values"][None]).latent_dist.mean[0]
        torch.testing.assert_close(cache.latent(i)[0], mean, atol=1e-5, rtol=1e-4)
