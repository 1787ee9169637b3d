"""webdataset shards: samples paired by key, members read by offset, traversal refused, broken shards named."""

from __future__ import annotations

import gzip
import io
import json
import tarfile

import pytest
import torch
from PIL import Image
from planted import png_bytes, write_png, write_tar

import ldm.data.shards as shards_module
from ldm.data import CaptionedImageDataset, DataConfig, Layout, detect_layout, list_dataset, scan_dataset
from ldm.data.shards import expand_braces
from ldm.errors import LdmError


def solid_png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, "PNG")
    return buffer.getvalue()


def sample_members(shard: int, n: int = 3) -> list[tuple[str, bytes]]:
    """``n`` samples: the last one captioned by a .json (``caption``), the others by a .txt."""
    members = []
    for i in range(n):
        key = f"{shard:02d}{i:04d}"
        members.append((f"{key}.png", solid_png((40 * i, 100, 10 * shard))))
        if i == n - 1:
            members.append((f"{key}.json", json.dumps({"caption": f"json {shard} {i}", "width": 8}).encode()))
        else:
            members.append((f"{key}.txt", f"text {shard} {i}".encode()))
    return members


@pytest.fixture
def shards(tmp_path):
    root = tmp_path / "wds"
    for s in range(3):
        write_tar(root / f"shard-{s:03d}.tar", sample_members(s))
    return root


def test_a_folder_of_shards(shards):
    assert detect_layout(shards) is Layout.WEBDATASET
    report = scan_dataset(DataConfig(path=str(shards), min_side=8, resolution=8), progress=False)
    assert report.layout is Layout.WEBDATASET and report.usable == 9 and report.images == 9
    assert [p.name for p in report.shards] == ["shard-000.tar", "shard-001.tar", "shard-002.tar"]
    assert [p.caption for p in report.pairs][:3] == ["text 0 0", "text 0 1", "json 0 2"]
    assert report.pairs[0].image == shards / "shard-000.tar" / "000000.png"
    text = report.format()
    assert text.splitlines()[0] == f"dataset {shards} (layout webdataset)"
    assert "shards                         3   e.g. shard-000.tar, shard-001.tar, shard-002.tar" in text


def test_items_are_read_by_offset(shards):
    dataset = CaptionedImageDataset(DataConfig(path=str(shards), min_side=8, resolution=8))
    item = dataset[4]  # shard 1, sample 1: (40, 100, 10)
    assert item["caption"] == "text 1 1"
    torch.testing.assert_close(item["pixel_values"][:, 0, 0], torch.tensor([40, 100, 10]) / 127.5 - 1)


def test_one_shard_or_a_brace_pattern(shards):
    one = list_dataset(DataConfig(path=str(shards / "shard-001.tar")))
    assert one.layout is Layout.WEBDATASET and len(one.pairs) == 3 and one.root == shards
    some = list_dataset(DataConfig(path=str(shards / "shard-{000..001}.tar")))
    assert [p.name for p in some.shards] == ["shard-000.tar", "shard-001.tar"] and len(some.pairs) == 6
    with pytest.raises(LdmError, match=r"shard .*shard-003.tar and 1 more of the pattern .* not found"):
        list_dataset(DataConfig(path=str(shards / "shard-{001..004}.tar")))
    with pytest.raises(LdmError, match="is a shard, not a folder"):
        list_dataset(DataConfig(path=str(shards / "shard-001.tar"), split="train"))


def test_expand_braces():
    assert expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_braces("{x,y}-{8..10}.tar") == ["x-8.tar", "x-9.tar", "x-10.tar", "y-8.tar", "y-9.tar", "y-10.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(LdmError, match=r"write \{FIRST..LAST\}"):
        expand_braces("a-{5..2}.tar")


def test_captions_and_their_problems(tmp_path):
    members = [
        ("a.jpg", png_bytes(0)), ("a.json", json.dumps({"text": "from text"}).encode()),  # text when no caption key
        ("b.webp", png_bytes(1)), ("b.json", b'{"url": "x"}'),  # no caption: a bad row, b uncaptioned
        ("c.png", png_bytes(2)),  # no caption member at all
        ("d.txt", b"a caption without its image"),
        ("e.png", png_bytes(3)), ("e.txt", b"caf\xe9"),  # not UTF-8
        ("f.png", png_bytes(4)), ("f.json", b"{broken"),
        ("sub/g.png", png_bytes(5)), ("sub/g.txt", b"  a   nested\nkey "), ("sub/g.json", b'{"caption": "loses"}'),
    ]  # fmt: skip
    write_tar(tmp_path / "wds" / "000.tar", members)
    listing = list_dataset(DataConfig(path=str(tmp_path / "wds")))
    assert [(p.member.name, p.caption) for p in listing.pairs] == [
        ("a.jpg", "from text"), ("sub/g.png", "a nested key"),
    ]  # fmt: skip
    assert [p.name for p in listing.uncaptioned] == ["b.webp", "c.png", "f.png"]
    assert [p.name for p in listing.undecodable] == ["e.png"]
    assert listing.orphans == ("000.tar:d.txt",)
    assert listing.bad_rows == ("000.tar:b.json: no 'caption' or 'text' (found: url)", "000.tar:f.json: not valid JSON")
    named = list_dataset(DataConfig(path=str(tmp_path / "wds"), caption_column="url"))
    assert ("b.webp", "x") in [(p.member.name, p.caption) for p in named.pairs]


def test_traversal_and_links_are_refused_and_never_read(tmp_path, monkeypatch):
    path = write_tar(tmp_path / "wds" / "000.tar", [
        ("ok.png", png_bytes(0)), ("ok.txt", b"fine"),
        ("../up.png", png_bytes(1)), ("../up.txt", b"a way up"),
        ("/etc/abs.png", png_bytes(2)), ("/etc/abs.txt", b"absolute"),
        ("sub/../../round.png", png_bytes(3)), ("sub/../../round.txt", b"a way round"),
    ])  # fmt: skip
    with tarfile.open(path, "a") as tar:
        for kind, name in ((tarfile.SYMTYPE, "link.png"), (tarfile.LNKTYPE, "hard.png")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "../../outside.png"
            tar.addfile(info)
        tar.addfile(tarfile.TarInfo("link.txt"), io.BytesIO(b""))
    read = []
    real = shards_module.Member.read
    def counted(self, file=None):
        read.append(self.name)
        return real(self, file)

    monkeypatch.setattr(shards_module.Member, "read", counted)
    report = scan_dataset(DataConfig(path=str(tmp_path / "wds"), min_side=8), workers=1, progress=False)
    assert [p.member.name for p in report.pairs] == ["ok.png"]
    assert set(report.outside) == {f"000.tar:{name}" for name in (
        "../up.png", "../up.txt", "/etc/abs.png", "/etc/abs.txt", "sub/../../round.png", "sub/../../round.txt",
        "link.png", "hard.png",
    )}  # fmt: skip
    assert set(read) <= {"ok.png", "ok.txt", "link.txt"}
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["000.tar"]  # nothing was extracted


def test_truncated_shard_is_one_line_error(shards):
    data = (shards / "shard-001.tar").read_bytes()
    for cut in (700, len(data) // 2, 3 * 1024):
        (shards / "shard-001.tar").write_bytes(data[:cut])
        with pytest.raises(LdmError) as error:
            list_dataset(DataConfig(path=str(shards)))
        message = str(error.value)
        assert "\n" not in message and "shard-001.tar is truncated" in message and "write it again" in message


def test_empty_and_compressed_shards_are_errors(tmp_path, shards):
    (shards / "shard-001.tar").write_bytes(b"")
    with pytest.raises(LdmError, match=r"shard .*shard-001.tar is empty \(0 bytes\); remove it"):
        list_dataset(DataConfig(path=str(shards)))
    write_tar(shards / "shard-001.tar", [])
    with pytest.raises(LdmError, match=r"shard-001.tar is empty \(a tar holding no files\)"):
        list_dataset(DataConfig(path=str(shards)))
    plain = write_tar(tmp_path / "plain.tar", sample_members(1)).read_bytes()
    (shards / "shard-001.tar").write_bytes(gzip.compress(plain))
    with pytest.raises(LdmError, match=r"shard-001.tar is gzip-compressed; .* decompress it to a .tar"):
        list_dataset(DataConfig(path=str(shards)))


def test_shards_beside_kohya_captions_are_ambiguous(shards):
    write_png(shards / "loose.png", 0)
    (shards / "loose.txt").write_text("a loose picture")
    with pytest.raises(LdmError, match="holds both .tar shards and captioned images; pass --layout"):
        list_dataset(DataConfig(path=str(shards)))
    assert len(list_dataset(DataConfig(path=str(shards), layout=Layout.WEBDATASET)).pairs) == 9
