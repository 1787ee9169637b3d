"""``python -m ldm data check`` as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
