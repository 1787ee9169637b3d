"""CaptionedImageDataset: shapes, range, and randomness that depends only on (seed, epoch, index)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ldm.config import ConfigError, from_dict, to_dict
from ldm.data import CaptionedImageDataset, DataConfig, Layout, scan_dataset, square_tensor
from ldm.errors import LdmError


def test_items_have_the_right_shape_and_range(planted):
    root, _ = planted
    dataset = CaptionedImageDataset(DataConfig(path=str(root), resolution=32))
    assert len(dataset) == 9
    captions = set()
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["index"] == index
        assert item["pixel_values"].shape == (3, 32, 32)
        assert item["pixel_values"].dtype == torch.float32
        assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
        captions.add(item["caption"])
    assert "" in captions and "a wide blue thing" in captions


def test_colours_survive(planted):
    root, _ = planted
    dataset = CaptionedImageDataset(DataConfig(path=str(root), resolution=32))
    by_name = {dataset.image_path(i).name: dataset[i]["pixel_values"] for i in range(len(dataset))}
    red = torch.tensor([220, 30, 30]) / 127.5 - 1  # good1.png is (220, 30, 30)
    assert torch.allclose(by_name["good1.png"][:, 16, 16], red, atol=1e-5)
    # rgba.png is blue at alpha 128 on white: (127, 127, 255).
    assert torch.allclose(by_name["rgba.png"][:, 0, 0], torch.tensor([127, 127, 255]) / 127.5 - 1, atol=1e-5)


def test_full_range_is_reached():
    ramp = Image.new("RGB", (64, 64))
    ramp.putpixel((0, 0), (0, 0, 0))
    ramp.putpixel((1, 0), (255, 255, 255))
    pixels = square_tensor(ramp, resolution=64)
    assert pixels.min() == -1.0 and pixels.max() == 1.0


def test_random_crop_and_flip_are_deterministic(good_folder):
    config = DataConfig(path=str(good_folder), resolution=32, center_crop=False, random_flip=0.5)
    report = scan_dataset(config, progress=False)
    a = CaptionedImageDataset(config, report=report, seed=7)
    b = CaptionedImageDataset(config, report=report, seed=7)
    torch.manual_seed(0)
    first = [a[i]["pixel_values"] for i in range(len(a))]
    torch.manual_seed(123)  # global RNG must not matter
    second = [b[i]["pixel_values"] for i in reversed(range(len(b)))][::-1]  # nor the order of access
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    # Another seed or epoch gives other crops/flips for at least one item (wide.png has 33 crops × 2 flips).
    other_seed = CaptionedImageDataset(config, report=report, seed=8)
    assert not all(torch.equal(x, other_seed[i]["pixel_values"]) for i, x in enumerate(first))
    a.set_epoch(1)
    epoch1 = [a[i]["pixel_values"] for i in range(len(a))]
    assert not all(torch.equal(x, y) for x, y in zip(first, epoch1))
    a.set_epoch(0)
    assert all(torch.equal(x, a[i]["pixel_values"]) for i, x in enumerate(first))


def test_center_crop_without_flip_is_fixed(good_folder):
    config = DataConfig(path=str(good_folder), resolution=32)
    first = CaptionedImageDataset(config, seed=1)
    second = CaptionedImageDataset(config, seed=2)
    second.set_epoch(5)
    assert all(torch.equal(first[i]["pixel_values"], second[i]["pixel_values"]) for i in range(len(first)))


def test_flip_probability_one_mirrors():
    image = Image.new("RGB", (32, 32), (0, 0, 0))
    image.putpixel((0, 0), (255, 255, 255))
    plain = square_tensor(image, resolution=32, generator=torch.Generator().manual_seed(0))
    flipped = square_tensor(image, resolution=32, flip_p=1.0, generator=torch.Generator().manual_seed(0))
    assert plain[:, 0, 0].tolist() == [1.0, 1.0, 1.0]
    assert torch.equal(flipped, plain.flip(-1))


def test_random_crop_covers_the_longer_side():
    image = Image.new("RGB", (64, 32))
    for x in range(64):
        for y in range(32):
            image.putpixel((x, y), (x * 4, 0, 0))
    lefts = set()
    for seed in range(40):
        pixels = square_tensor(image, resolution=32, center_crop=False, generator=torch.Generator().manual_seed(seed))
        lefts.add(round(((pixels[0, 0, 0] + 1) * 127.5).item() / 4))
    assert len(lefts) > 10 and min(lefts) >= 0 and max(lefts) <= 32
    centre = square_tensor(image, resolution=32, generator=torch.Generator().manual_seed(0))
    assert round(((centre[0, 0, 0] + 1) * 127.5).item() / 4) == 16


def test_dataloader_batches(good_folder):
    dataset = CaptionedImageDataset(DataConfig(path=str(good_folder), resolution=16))
    batch = next(iter(DataLoader(dataset, batch_size=3)))
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    assert batch["caption"] == ["wide", "tall", "square"]
    assert batch["index"].tolist() == [0, 1, 2]


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "metadata.jsonl").write_text("")
    with pytest.raises(LdmError, match="no usable image/caption pairs"):
        CaptionedImageDataset(DataConfig(path=str(tmp_path)))


def test_config_round_trips_through_yaml_data():
    config = from_dict(DataConfig, {"path": "data/emoji/train", "layout": "csv", "resolution": 64, "random_flip": 0.5})
    assert config.layout is Layout.CSV and config.resolution == 64
    assert from_dict(DataConfig, to_dict(config)) == config
    with pytest.raises(ConfigError, match="random_flip is a probability"):
        from_dict(DataConfig, {"path": "x", "random_flip": 2})
    with pytest.raises(ConfigError, match="one of 'imagefolder', 'kohya', 'csv'"):
        from_dict(DataConfig, {"path": "x", "layout": "folder"})
