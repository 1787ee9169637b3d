"""write_shards: any layout's usable pairs as webdataset shards that read back as the folder did — the same captions,
image bytes and order — written atomically into a new folder, and refused where they would mix with other files."""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections import Counter

import pytest
from planted import EXPECTED, write_png
from test_data_kohya_repeats import write_kohya

from ldm.data import DataConfig, Layout, list_dataset, scan_dataset
from ldm.data.shard_writer import shard_pattern, write_shards
from ldm.errors import LdmError


def scan(path, **settings):
    return scan_dataset(DataConfig(path=str(path), **settings), progress=False)


def assert_same_samples(source, shards):
    """Two scans list the same samples: captions, image bytes and order."""
    assert [p.caption for p in shards.pairs] == [p.caption for p in source.pairs]
    assert [p.read_bytes() for p in shards.pairs] == [p.read_bytes() for p in source.pairs]


def test_the_planted_folder_round_trips_without_its_bad_items(planted, tmp_path):
    """In every layout that reads captions: the 9 usable pairs are written, in the scan's order; the skipped images
    and the caption of a missing image are not, so the shards scan clean."""
    root, layout = planted
    source = scan(root)
    assert source.usable == EXPECTED["usable"] and source.skipped_images == 5
    written = write_shards(source, tmp_path / "out", 4, progress=False)
    assert [p.name for p in written] == ["000000.tar", "000001.tar", "000002.tar"]
    pattern = shard_pattern(written)
    assert pattern == f"{tmp_path / 'out'}/{{000000..000002}}.tar"
    shards = scan(pattern)
    assert_same_samples(source, shards)
    assert shards.layout is Layout.WEBDATASET and shards.usable == shards.images == shards.captions == 9
    assert (shards.skipped_images, shards.missing_images, shards.bad_rows, shards.outside) == (0, (), (), ())
    assert shards.empty_captions == 1 and shards.modes == source.modes  # as read: converted when trained
    assert [p.caption for p in list_dataset(DataConfig(path=pattern)).pairs] == [p.caption for p in source.pairs]
    assert scan(tmp_path / "out").pairs == shards.pairs  # the folder of shards reads the same


def test_members_are_the_key_the_original_bytes_and_the_caption(tmp_path, make_dataset):
    root = make_dataset(tmp_path / "d", Layout.IMAGEFOLDER)
    source = scan(root)
    (shard,) = write_shards(source, tmp_path / "out", 100, progress=False)
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        contents = [tar.extractfile(m).read() for m in members]
    expected = []
    for i, pair in enumerate(source.pairs):
        expected += [f"{i:08d}{pair.image.suffix}", f"{i:08d}.txt"]
    assert names == expected
    assert contents[0::2] == [pair.image.read_bytes() for pair in source.pairs]
    assert [c.decode("utf-8") for c in contents[1::2]] == [pair.caption for pair in source.pairs]
    assert "a wide blue thing" in [pair.caption for pair in source.pairs]  # as read: whitespace collapsed
    assert {(m.mtime, m.uid, m.gid, m.mode, m.isreg()) for m in members} == {(0, 0, 0, 0o644, True)}


def test_kohya_repeats_become_repeated_samples(tmp_path):
    """A repeat folder's image is written as often as the scan lists it, so the shards train with the same items,
    order and epoch length; a 0_x/ folder's images are not written."""
    root = write_kohya(tmp_path / "k", {"3_apple": 2, "plain": 1, "0_off": 1})
    source = scan(root, min_side=8)
    assert source.usable == 7 and len(source.distinct_pairs) == 3
    shards = scan(shard_pattern(write_shards(source, tmp_path / "out", 3, progress=False)), min_side=8)
    assert_same_samples(source, shards)
    assert Counter(p.caption for p in shards.pairs) == {"3_apple 0": 3, "3_apple 1": 3, "plain 0": 1}
    assert shards.repeats == () and shards.duplicate_files == 4  # each repeat is its own sample now


def test_a_split_the_images_layout_and_shards_round_trip(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        rows = [json.dumps({"file_name": f"{i}.png", "text": f"{split} {i}"}) for i in range(n)]
        for i in range(n):
            write_png(tmp_path / "hub" / split / f"{i}.png", 10 * n + i)
        (tmp_path / "hub" / split / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    test = scan(tmp_path / "hub", split="test", min_side=8)
    assert [p.caption for p in test.pairs] == ["test 0", "test 1"]
    assert_same_samples(test, scan(shard_pattern(write_shards(test, tmp_path / "test", 1, progress=False)), min_side=8))

    subject = scan(tmp_path / "hub" / "train", layout=Layout.IMAGES, caption="a photo of sks dog", min_side=8)
    written = write_shards(subject, tmp_path / "subject", 2, progress=False)
    assert_same_samples(subject, scan(shard_pattern(written), min_side=8))

    again = scan(shard_pattern(written), min_side=8)  # shards from shards: the same samples again
    assert_same_samples(again, scan(shard_pattern(write_shards(again, tmp_path / "again", 5, progress=False)),
                                    min_side=8))  # fmt: skip


def test_the_same_pairs_give_the_same_bytes(tmp_path, make_dataset):
    source = scan(make_dataset(tmp_path / "d", Layout.CSV))
    one = write_shards(source, tmp_path / "one", 2, progress=False)
    two = write_shards(source, tmp_path / "two", 2, progress=False)
    digests = [[hashlib.sha256(p.read_bytes()).hexdigest() for p in shards] for shards in (one, two)]
    assert len(one) == 5 and digests[0] == digests[1]
    assert shard_pattern(write_shards(source, tmp_path / "single", 9, progress=False)) == str(tmp_path / "single" /
                                                                                            "000000.tar")  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [p.name for p in one]  # no temp files left


def test_a_folder_that_is_not_new_is_refused_and_force_replaces_only_shards(tmp_path, make_dataset):
    source = scan(make_dataset(tmp_path / "d", Layout.KOHYA))
    out = tmp_path / "out"
    write_shards(source, out, 2, progress=False)  # 5 shards
    with pytest.raises(LdmError, match=r"out holds shards already \(000000.tar, ...\); pass --force to replace "
                                       r"them, or choose a new folder$"):  # fmt: skip
        write_shards(source, out, 3, progress=False)
    (out / ".000009.tar.abcd1234.tmp").write_bytes(b"x")  # what a killed write leaves
    assert [p.name for p in write_shards(source, out, 3, force=True, progress=False)] == [f"00000{i}.tar" for i in
                                                                                            range(3)]  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["000000.tar", "000001.tar", "000002.tar"]  # stale ones gone
    assert_same_samples(source, scan(out))

    (out / "notes.txt").write_text("mine")
    for force, fix in ((False, ""), (True, "--force replaces shards only: ")):
        with pytest.raises(LdmError, match=rf"out is not empty \(it holds notes.txt\); {fix}choose a new folder"):
            write_shards(source, out, 3, force=force, progress=False)
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 4


def test_bad_sizes_and_places_are_refused(tmp_path, make_dataset):
    source = scan(make_dataset(tmp_path / "d", Layout.WEBDATASET))
    for size in (0, -3):
        with pytest.raises(LdmError, match=rf"--size is the number of samples a shard holds and must be at least 1, "
                                           rf"got {size}$"):  # fmt: skip
            write_shards(source, tmp_path / "out", size, progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(LdmError, match="file is an existing file, not a folder; choose a folder path for the shards"):
        write_shards(source, tmp_path / "file", 2, progress=False)
    with pytest.raises(LdmError, match="d holds the shards being read; write the new ones to another folder"):
        write_shards(source, tmp_path / "d", 2, force=True, progress=False)
    assert not (tmp_path / "out").exists()
