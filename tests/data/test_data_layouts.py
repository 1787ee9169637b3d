"""Layout detection and caption reading for imagefolder, kohya, csv and webdataset folders."""

from __future__ import annotations

import json

import pytest
from planted import name_in_dataset

from ldm.data import DataConfig, Layout, detect_layout, list_dataset
from ldm.errors import LdmError


def test_detects_each_layout(planted):
    root, layout = planted
    assert detect_layout(root) is layout
    assert list_dataset(DataConfig(path=str(root))).layout is layout


def test_explicit_layout_is_used(planted):
    root, layout = planted
    listing = list_dataset(DataConfig(path=str(root), layout=layout))
    assert listing.layout is layout
    assert len(listing.pairs) == 13
    captions = {name_in_dataset(p.image, root): p.caption for p in listing.pairs}
    assert captions["sub/good3.png"] == "a wide blue thing"  # whitespace collapsed, subfolder path kept
    assert captions["empty.png"] == ""
    assert [name_in_dataset(p, root) for p in listing.uncaptioned] == ["nocap.png"]


def test_metadata_typo_names_what_was_found(tmp_path, make_dataset):
    make_dataset(tmp_path, None)
    (tmp_path / "metadata.json1").write_text('{"file_name": "good1.png", "text": "x"}\n')
    with pytest.raises(LdmError) as err:
        detect_layout(tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert "cannot tell the layout" in message
    assert "14 image(s)" in message
    assert "metadata.json1 (did you mean metadata.jsonl?)" in message
    assert "expected metadata.jsonl" in message and "metadata.csv" in message and "kohya" in message


def test_folder_matching_no_layout(tmp_path, make_dataset):
    make_dataset(tmp_path, None)
    with pytest.raises(LdmError, match=r"found 14 image\(s\), no \.txt captions beside them; expected"):
        list_dataset(DataConfig(path=str(tmp_path)))


def test_explicit_layout_without_its_table(tmp_path, make_dataset):
    make_dataset(tmp_path, None)
    (tmp_path / "metadata.json1").write_text("")
    with pytest.raises(LdmError, match=r"has no metadata.jsonl \(found metadata.json1 \(did you mean metadata.jsonl\?\)\)"):
        list_dataset(DataConfig(path=str(tmp_path), layout=Layout.IMAGEFOLDER))


def test_missing_folder(tmp_path):
    with pytest.raises(LdmError, match="dataset folder .*nope not found; check the path"):
        list_dataset(DataConfig(path=str(tmp_path / "nope")))


def test_both_tables_is_ambiguous(tmp_path, make_dataset):
    make_dataset(tmp_path, Layout.IMAGEFOLDER)
    make_dataset(tmp_path, Layout.CSV)
    with pytest.raises(LdmError, match="holds both metadata.jsonl and metadata.csv; pass --layout"):
        detect_layout(tmp_path)
    assert list_dataset(DataConfig(path=str(tmp_path), layout=Layout.CSV)).layout is Layout.CSV


def test_folders_of_other_names_say_pass_split(tmp_path, make_dataset):
    for split in ("cats", "dogs"):
        make_dataset(tmp_path / split, Layout.IMAGEFOLDER)
    with pytest.raises(LdmError, match=r"folders each with its own caption table \(cats/, dogs/\); pass --split NAME"):
        list_dataset(DataConfig(path=str(tmp_path)))
    assert len(list_dataset(DataConfig(path=str(tmp_path), split="dogs")).pairs) == 13


def test_wrong_caption_column_is_named(tmp_path, make_dataset):
    make_dataset(tmp_path, None)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "good1.png", "prompt": "x"}) + "\n")
    with pytest.raises(LdmError, match=r"neither 'text' nor 'caption' field \(found: file_name, prompt\); rename one "
                       "or pass --caption-column"):  # fmt: skip
        list_dataset(DataConfig(path=str(tmp_path)))
    with pytest.raises(LdmError, match=r"no 'words' field \(found: file_name, prompt\); rename it or pass"):
        list_dataset(DataConfig(path=str(tmp_path), caption_column="words"))
    listing = list_dataset(DataConfig(path=str(tmp_path), caption_column="prompt"))
    assert [p.caption for p in listing.pairs] == ["x"]


def test_named_csv_and_columns(tmp_path, make_dataset):
    make_dataset(tmp_path, None)
    (tmp_path / "captions.csv").write_text("path,prompt\ngood1.png,a red square\n")
    with pytest.raises(LdmError, match=r"captions.csv \(pass --metadata captions.csv"):
        detect_layout(tmp_path)
    with pytest.raises(LdmError, match=r"neither 'image' nor 'file_name' column \(found: path, prompt\); rename one"):
        list_dataset(DataConfig(path=str(tmp_path), metadata="captions.csv"))
    config = DataConfig(path=str(tmp_path), metadata="captions.csv", image_column="path", caption_column="prompt")
    listing = list_dataset(config)
    assert listing.layout is Layout.CSV
    assert [(p.image.name, p.caption) for p in listing.pairs] == [("good1.png", "a red square")]
    assert len(listing.uncaptioned) == 13


def test_bad_jsonl_rows_are_counted_not_fatal(tmp_path, make_dataset):
    make_dataset(tmp_path, None)
    rows = ['{"file_name": "good1.png", "text": "ok"}', "{not json", '["a list"]', '{"text": "no file"}']
    rows.append('{"file_name": "nocap.png", "text": null}')  # a null caption is a missing one
    (tmp_path / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    listing = list_dataset(DataConfig(path=str(tmp_path)))
    assert len(listing.pairs) == 1
    assert len(listing.uncaptioned) == 13 and len(set(listing.uncaptioned)) == 13
    assert listing.bad_rows == (
        "metadata.jsonl line 2: not valid JSON",
        "metadata.jsonl line 3: not a JSON object",
        "metadata.jsonl line 4: no 'file_name'",
    )


def test_the_images_layout_captions_every_image_alike(tmp_path, make_dataset):
    """layout images (DreamBooth's subject and class folders) lists every image file (subfolders too), with the
    one caption given; caption files are not read."""
    make_dataset(tmp_path, Layout.KOHYA)  # .txt captions beside the images: ignored
    listing = list_dataset(DataConfig(path=str(tmp_path), layout=Layout.IMAGES, caption="  a photo of\tsks dog "))
    names = [name_in_dataset(p.image, tmp_path) for p in listing.pairs]
    assert len(names) == 14 and "sub/good3.png" in names and "nocap.png" in names
    assert {p.caption for p in listing.pairs} == {"a photo of sks dog"}  # whitespace collapsed as for any caption
    assert listing.uncaptioned == () and listing.orphans == () and listing.layout is Layout.IMAGES
    assert {p.caption for p in list_dataset(DataConfig(path=str(tmp_path), layout=Layout.IMAGES)).pairs} == {""}
    assert detect_layout(tmp_path) is Layout.KOHYA  # never detected: asked for
    with pytest.raises(ValueError, match="caption is the caption of every image of the images layout"):
        DataConfig(path=str(tmp_path), caption="a photo of sks dog")
