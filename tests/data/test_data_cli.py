"""``python -m ldm data check`` as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from planted import png_bytes, write_png, write_tar

from ldm.data import Layout

REPO = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "ldm", "data", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=60
    )


def test_check_prints_the_report(planted):
    root, layout = planted
    result = run("check", str(root), "--resolution", "64")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"dataset {root} (layout {layout.value}")
    assert any(line.split()[:3] == ["usable", "pairs", "9"] for line in lines)
    assert any(line.split()[:3] == ["truncated", "1", "e.g."] for line in lines)
    assert result.stderr == ""


def test_check_with_explicit_layout(tmp_path, make_dataset):
    root = make_dataset(tmp_path / "d", Layout.CSV)
    result = run("check", str(root), "--layout", "csv", "--min-side", "45")
    assert result.returncode == 0, result.stderr
    assert any(line.split()[:3] == ["usable", "pairs", "2"] for line in result.stdout.splitlines())


def test_check_missing_folder_is_one_error_line(tmp_path):
    result = run("check", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == f"error: dataset folder {tmp_path / 'missing'} not found; check the path\n"


def test_check_unknown_layout_is_one_error_line(tmp_path, make_dataset):
    make_dataset(tmp_path, None)
    (tmp_path / "metadata.json1").write_text("")
    result = run("check", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: cannot tell the layout")
    assert "did you mean metadata.jsonl?" in result.stderr


def test_check_nothing_usable_prints_report_then_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "a.txt").write_text("a caption")
    result = run("check", str(tmp_path))
    assert result.returncode == 2
    assert any(line.split()[:3] == ["zero-size", "file", "1"] for line in result.stdout.splitlines())
    assert result.stderr.startswith("error: no usable image/caption pairs") and result.stderr.count("\n") == 1


def test_bad_argument_exits_2(tmp_path):
    result = run("check", str(tmp_path), "--layout", "folder")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "invalid choice: 'folder'" in result.stderr


def test_bad_counts_and_sizes_are_one_error_line(tmp_path, make_dataset, capsys):
    """--workers -1 was a traceback, --size 100000 an attempt to render 30-gigabyte images."""
    from ldm.cli import data as data_cli
    from ldm.cli import emoji as emoji_cli
    from ldm.cli.common import run_cli

    root = make_dataset(tmp_path / "d", Layout.CSV)
    for main, argv, message in [
        (data_cli.main, ["check", str(root), "--workers", "-1"], "--workers must be at least 1, got -1"),
        (emoji_cli.main, [str(tmp_path / "e"), "--size", "100000"], "size must be from 1 to 1024 pixels"),
    ]:
        try:
            code = run_cli(main, argv)
        except SystemExit as exit:  # argparse-level refusals exit 2 as well
            code = exit.code
        assert code == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "e").exists()


def test_check_reports_split_repeats_and_shards(tmp_path):
    for split in ("train", "test"):
        write_png(tmp_path / "hub" / split / "a.png", 0)
        (tmp_path / "hub" / split / "metadata.csv").write_text(f"file_name,text\na.png,a {split} picture\n")
    result = run("check", str(tmp_path / "hub"), "--split", "test", "--min-side", "8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].split()[:5] == ["split", "read", "test", "also", "here:"]
    for i in range(2):
        write_png(tmp_path / "kohya" / "10_apple" / f"{i}.png", i)
        (tmp_path / "kohya" / "10_apple" / f"{i}.txt").write_text("an apple")
    result = run("check", str(tmp_path / "kohya"), "--min-side", "8")
    assert result.returncode == 0, result.stderr
    assert "    10_apple: 2 images × 10 repeats = 20" in result.stdout.splitlines()
    for s in range(2):
        write_tar(tmp_path / "wds" / f"{s}.tar", [("k.png", png_bytes(s)), ("k.txt", b"a shard picture")])
    result = run("check", str(tmp_path / "wds" / "{0..1}.tar"), "--min-side", "8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"dataset {tmp_path / 'wds'} (layout webdataset)\n")
    assert result.stdout.splitlines()[1].split() == ["shards", "2", "e.g.", "0.tar,", "1.tar"]


def test_check_layout_errors_are_one_line_with_the_fix(tmp_path):
    write_png(tmp_path / "hub" / "train" / "a.png", 0)
    (tmp_path / "hub" / "train" / "metadata.csv").write_text("path,prompt\na.png,x\n")
    write_tar(tmp_path / "cut" / "0.tar", [("k.png", png_bytes(0)), ("k.txt", b"x")])
    (tmp_path / "cut" / "0.tar").write_bytes((tmp_path / "cut" / "0.tar").read_bytes()[:900])
    write_tar(tmp_path / "none" / "0.tar", [])
    for argv, message in [
        (["hub", "--split", "val"], "split 'val' not found in {}/hub; it has train/; pass one of those"),
        (["hub"], "{}/hub/train/metadata.csv has neither 'image' nor 'file_name' column (found: path, prompt); "
                  "rename one or pass --image-column"),
        (["cut"], "shard {}/cut/0.tar is truncated"),
        (["none"], "shard {}/none/0.tar is empty (a tar holding no files); remove it, or write it again"),
    ]:  # fmt: skip
        result = run("check", str(tmp_path / argv[0]), *argv[1:])
        assert result.returncode == 2, argv
        assert result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("error: " + message.format(tmp_path)), result.stderr


def test_shard_prints_the_report_then_the_shards_and_their_pattern(tmp_path, make_dataset):
    root = make_dataset(tmp_path / "d", Layout.KOHYA)
    result = run("shard", str(root), str(tmp_path / "out"), "--size", "4")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"dataset {root} (layout kohya)" and "    truncated                    1" in result.stdout
    assert lines[-1] == (f"wrote 9 samples in 3 shards of up to 4 to {tmp_path / 'out'}; train on them with "
                         f"--data '{tmp_path / 'out'}/{{000000..000002}}.tar'")  # fmt: skip
    assert result.stderr == ""
    # python -m ldm.data is the same command; the layout flags apply as in check.
    (root / "metadata.csv").write_text("image,caption\ngood1.png,from the table\n")
    result = subprocess.run([sys.executable, "-m", "ldm.data", "shard", str(root), str(tmp_path / "csv"), "--size",
                             "1", "--layout", "csv"], capture_output=True, text=True, cwd=REPO, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith("wrote 1 sample in 1 shard of up to 1 to ")
    assert result.stdout.splitlines()[-1].endswith(f"--data '{tmp_path / 'csv' / '000000.tar'}'")


def test_shard_errors_are_one_line_and_write_nothing(tmp_path, make_dataset, capsys):
    from ldm.cli import data as data_cli
    from ldm.cli.common import run_cli

    root = make_dataset(tmp_path / "d", Layout.IMAGEFOLDER)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.jpg").write_bytes(b"")
    new = tmp_path / "new"
    for argv, message in [
        ([str(root), str(new), "--size", "0"], "--size is the number of samples a shard holds and must be at least 1, "
                                               "got 0"),
        ([str(root), str(tmp_path / "full"), "--size", "2"], f"{tmp_path / 'full'} is not empty (it holds x.jpg); "
                                                             "choose a new folder for the shards"),
        ([str(root), str(tmp_path / "full"), "--size", "2", "--force"], "--force replaces shards only: choose"),
        ([str(tmp_path / "missing"), str(new), "--size", "2"], f"dataset folder {tmp_path / 'missing'} not found; "
                                                               "check the path"),
        ([str(root), str(new), "--size", "2", "--layout", "kohya"], "no usable image/caption pairs"),
    ]:  # fmt: skip
        assert run_cli(data_cli.main, ["shard", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not new.exists() and [p.name for p in (tmp_path / "full").iterdir()] == ["x.jpg"]
