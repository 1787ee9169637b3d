"""Split subfolders (train/, validation/, test/): which one is read, what the report says, the held-out pick."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
from planted import write_png

from ldm.data import DataConfig, Layout, held_out, list_dataset, scan_dataset
from ldm.errors import LdmError

SIZES = {"train": 3, "validation": 1, "test": 2}


def write_split(folder, n: int, seed: int = 0):
    """``n`` images with a Hugging Face metadata.csv (file_name, text)."""
    rows = ["file_name,text"]
    for i in range(n):
        write_png(folder / f"{i}.png", seed + i)
        rows.append(f"{i}.png,{folder.name} {i}")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture
def splits(tmp_path):
    root = tmp_path / "hub"
    for seed, (split, n) in enumerate(SIZES.items()):
        write_split(root / split, n, 10 * seed)
    return root


def test_train_is_read_by_default_and_the_report_names_the_others(splits):
    report = scan_dataset(DataConfig(path=str(splits), min_side=8), progress=False)
    assert (report.split, report.splits, report.usable) == ("train", ("train", "validation", "test"), 3)
    assert report.root == splits and {p.caption for p in report.pairs} == {"train 0", "train 1", "train 2"}
    lines = report.format().splitlines()
    assert lines[0].startswith(f"dataset {splits} (layout csv, captions from train/metadata.csv")
    assert lines[1].split() == ["split", "read", "train", "also", "here:", "validation,", "test", "(--split", "NAME",
                                "reads", "one)"]  # fmt: skip


def test_split_picks_another(splits):
    listing = list_dataset(DataConfig(path=str(splits), split="test"))
    assert listing.split == "test" and [p.image.relative_to(splits).as_posix() for p in listing.pairs] == [
        "test/0.png", "test/1.png",
    ]  # fmt: skip


def test_a_split_that_does_not_exist_lists_those_that_do(splits, tmp_path):
    with pytest.raises(LdmError, match=r"split 'valid' not found in .*hub; it has train/, validation/, test/; pass"):
        list_dataset(DataConfig(path=str(splits), split="valid"))
    plain = write_split(tmp_path / "plain", 1)
    with pytest.raises(LdmError, match=r"split 'train' not found in .*plain; it has no split folders .* leave out"):
        list_dataset(DataConfig(path=str(plain), split="train"))


def test_splits_without_train_ask_which(splits):
    shutil.rmtree(splits / "train")
    with pytest.raises(LdmError, match=r"holds splits validation/, test/ but no train/; pass --split NAME"):
        list_dataset(DataConfig(path=str(splits)))


def test_a_folder_with_its_own_table_is_one_dataset(tmp_path):
    root = write_split(tmp_path / "d", 2)
    write_split(root / "test", 1)
    listing = list_dataset(DataConfig(path=str(root)))
    assert listing.split is None and listing.splits == () and len(listing.pairs) == 2
    assert held_out(DataConfig(path=str(root))) is None


def test_split_folders_in_other_layouts(tmp_path):
    for split in ("train", "test"):
        write_png(tmp_path / split / "a.png", 0)
        (tmp_path / split / "a.txt").write_text(f"a {split} picture")
    listing = list_dataset(DataConfig(path=str(tmp_path)))
    assert listing.layout is Layout.KOHYA and [p.caption for p in listing.pairs] == ["a train picture"]


def test_held_out_is_the_test_split_then_validation(splits):
    config = DataConfig(path=str(splits), random_flip=0.5, center_crop=False, resolution=64)
    held = held_out(config)
    assert (held.path, held.split, held.random_flip, held.center_crop, held.resolution) == (
        str(splits), "test", 0.0, True, 64,
    )  # fmt: skip
    assert len(list_dataset(held).pairs) == 2
    assert held_out(replace(config, split="test")).split == "validation"  # never the split trained on
    shutil.rmtree(splits / "test")
    assert held_out(config).split == "validation"
    assert held_out(replace(config, split="validation")) is None


def test_held_out_without_splits_is_none_and_an_explicit_folder_is_kept(tmp_path, splits):
    train = write_split(tmp_path / "train-only", 2)
    config = DataConfig(path=str(train), caption_column="text")
    assert held_out(config) is None and held_out(config, "") is None
    other = write_split(tmp_path / "eval", 1)
    assert held_out(config, str(other)) == replace(config, path=str(other), center_crop=True, random_flip=0.0)
    # An explicit folder of splits gives its test split, whatever split the training data names.
    assert held_out(replace(DataConfig(path=str(splits)), split="train"), str(splits)).split == "test"
    shutil.rmtree(splits / "test"), shutil.rmtree(splits / "validation")
    with pytest.raises(LdmError, match=r"split 'test' not found in .*hub; it has train/"):
        list_dataset(held_out(config, str(splits)))


def test_split_must_name_a_subfolder():
    for bad in ("", "..", "a/b"):
        with pytest.raises(ValueError, match="split names a subfolder"):
            DataConfig(path="x", split=bad)
