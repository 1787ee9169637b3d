"""Hugging Face imagefolder caption tables: metadata.csv / metadata.jsonl with file_name and a caption column."""

from __future__ import annotations

import json

import pytest
from planted import write_png

from ldm.data import DataConfig, Layout, list_dataset, scan_dataset
from ldm.errors import LdmError


def hf_folder(root, table: str, rows: list[dict]):
    """Images under images/ and the caption table ``table`` naming them, in Hugging Face's form."""
    for seed, row in enumerate(rows):
        write_png(root / row["file_name"], seed)
    if table.endswith(".jsonl"):
        (root / table).write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        columns = list(rows[0])
        lines = [",".join(columns)] + [",".join(str(row[c]) for c in columns) for row in rows]
        (root / table).write_text("\n".join(lines) + "\n")
    return root


def test_metadata_csv_with_file_name_and_text(tmp_path):
    rows = [{"file_name": "images/a.png", "text": "an apple"}, {"file_name": "images/b.png", "text": "a pear"}]
    root = hf_folder(tmp_path / "d", "metadata.csv", rows)
    report = scan_dataset(DataConfig(path=str(root), min_side=8), progress=False)
    assert report.layout is Layout.CSV and report.columns == ("file_name", "text")
    assert [(p.image.relative_to(root).as_posix(), p.caption) for p in report.pairs] == [
        ("images/a.png", "an apple"), ("images/b.png", "a pear"),
    ]  # fmt: skip
    assert report.format().splitlines()[0].endswith("captions from metadata.csv, columns file_name and text)")


def test_image_column_wins_over_file_name_and_options_still_name_columns(tmp_path):
    root = tmp_path / "d"
    write_png(root / "images/a.png", 0), write_png(root / "images/b.png", 1)
    (root / "metadata.csv").write_text("image,file_name,caption,text\nimages/a.png,images/b.png,ours,theirs\n")
    listing = list_dataset(DataConfig(path=str(root)))
    assert [(p.image.name, p.caption) for p in listing.pairs] == [("a.png", "ours")]
    listing = list_dataset(DataConfig(path=str(root), image_column="file_name", caption_column="text"))
    assert [(p.image.name, p.caption) for p in listing.pairs] == [("b.png", "theirs")]


def test_jsonl_with_another_caption_column(tmp_path):
    rows = [{"file_name": "images/a.png", "prompt": "an apple", "score": 7}]
    root = hf_folder(tmp_path / "d", "metadata.jsonl", rows)
    with pytest.raises(LdmError, match=r"neither 'text' nor 'caption' field \(found: file_name, prompt, score\)"):
        list_dataset(DataConfig(path=str(root)))
    listing = list_dataset(DataConfig(path=str(root), caption_column="prompt"))
    assert listing.layout is Layout.IMAGEFOLDER and [p.caption for p in listing.pairs] == ["an apple"]


def test_file_name_is_relative_to_the_metadata_file(tmp_path):
    root = tmp_path / "d"
    hf_folder(root / "part", "meta.csv", [{"file_name": "images/a.png", "text": "an apple"}])
    listing = list_dataset(DataConfig(path=str(root), metadata="part/meta.csv"))
    assert [p.image.relative_to(root).as_posix() for p in listing.pairs] == ["part/images/a.png"]


def test_file_name_outside_the_folder_is_never_opened(tmp_path):
    write_png(tmp_path / "secret.png", 1)
    root = hf_folder(tmp_path / "d", "metadata.csv", [{"file_name": "images/a.png", "text": "an apple"}])
    with open(root / "metadata.csv", "a") as f:
        f.write("../secret.png,a way up\n")
    report = scan_dataset(DataConfig(path=str(root), min_side=8), progress=False)
    assert report.outside == ("../secret.png",) and report.usable == 1


def test_table_with_neither_image_nor_file_name_is_one_line(tmp_path):
    root = tmp_path / "d"
    write_png(root / "a.png", 0)
    (root / "metadata.csv").write_text("path,text\na.png,an apple\n")
    with pytest.raises(LdmError) as error:
        list_dataset(DataConfig(path=str(root)))
    message = str(error.value)
    assert "\n" not in message
    assert "neither 'image' nor 'file_name' column (found: path, text); rename one or pass --image-column" in message
