"""Optional bundle files (clip.safetensors): listed in the manifest with their sha256, checked on load, carried
through save → load → save, and left out of the bundle hash."""

import json

import pytest

from ldm.cli.bundle import main
from ldm.cli.common import run_cli
from ldm.formats.bundle import CLIP_FILE, BundleError, load_bundle, save_bundle
from ldm.io import sha256_file


@pytest.fixture
def with_clip(tmp_path, micro_bundle_dir):
    clip = tmp_path / "elsewhere" / CLIP_FILE
    clip.parent.mkdir()
    clip.write_bytes(b"not really a CLIP, but the bundle only copies and hashes it")
    bundle = load_bundle(micro_bundle_dir)
    bundle.extras = {CLIP_FILE: clip}
    return save_bundle(bundle, tmp_path / "b"), clip


def test_extras_are_listed_checked_and_carried(with_clip, micro_bundle_dir, tmp_path):
    folder, source = with_clip
    manifest = json.loads((folder / "manifest.json").read_text())
    plain = json.loads((micro_bundle_dir / "manifest.json").read_text())
    assert manifest["extras"] == {CLIP_FILE: sha256_file(source)}
    assert manifest["files"] == plain["files"] and manifest["hash"] == plain["hash"]  # the model hash is unchanged
    assert (folder / CLIP_FILE).read_bytes() == source.read_bytes()

    loaded = load_bundle(folder)
    assert loaded.extras == {CLIP_FILE: folder / CLIP_FILE}
    save_bundle(loaded, tmp_path / "copy")  # carried into a new folder
    assert (tmp_path / "copy" / CLIP_FILE).read_bytes() == source.read_bytes()
    save_bundle(load_bundle(folder), folder)  # and saved over itself
    assert json.loads((folder / "manifest.json").read_text())["extras"] == manifest["extras"]


def test_a_damaged_or_missing_extra_is_reported(with_clip):
    folder, _ = with_clip
    (folder / CLIP_FILE).write_bytes(b"edited")
    with pytest.raises(BundleError, match="clip.safetensors does not match its sha256"):
        load_bundle(folder)
    (folder / CLIP_FILE).unlink()
    with pytest.raises(BundleError, match="is missing clip.safetensors"):
        load_bundle(folder)
    assert load_bundle(folder, verify=False).extras == {CLIP_FILE: folder / CLIP_FILE}


def test_unknown_extras_are_refused(tmp_path, micro_bundle_dir):
    bundle = load_bundle(micro_bundle_dir)
    bundle.extras = {"notes.txt": micro_bundle_dir / "model.yaml"}
    with pytest.raises(ValueError, match="unknown optional bundle file"):
        save_bundle(bundle, tmp_path / "b")


def test_info_lists_extras(with_clip, capsys):
    folder, _ = with_clip
    assert run_cli(main, ["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"optional files: {CLIP_FILE}" in out and '"extras"' not in out
