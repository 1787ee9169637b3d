"""Fixtures for the data tests: the planted-problem folder of tests/planted.py in each layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from planted import EXPECTED, build_dataset, noise

from ldm.data import Layout

CAPTIONED = [layout for layout in Layout if layout is not Layout.IMAGES]  # images reads no captions to plant


@pytest.fixture(params=CAPTIONED, ids=[layout.value for layout in CAPTIONED])
def planted(request, tmp_path) -> tuple[Path, Layout]:
    """(folder, layout) for each layout that reads captions, in turn."""
    layout = request.param
    return build_dataset(tmp_path / layout.value, layout), layout


@pytest.fixture
def good_folder(tmp_path) -> Path:
    """Three usable images of different shapes in the imagefolder layout."""
    root = tmp_path / "good"
    root.mkdir()
    sizes = {"wide.png": (96, 48), "tall.png": (40, 80), "square.png": (64, 64)}
    rows = []
    for seed, (name, size) in enumerate(sizes.items()):
        Image.fromarray(noise(*size, seed)).save(root / name)
        rows.append(json.dumps({"file_name": name, "text": name.removesuffix(".png")}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def make_dataset():
    """``make_dataset(root, layout)`` writes the planted-problem folder (``layout=None``: images only)."""

    return build_dataset


@pytest.fixture
def expected() -> dict:
    """What scanning the planted-problem folder must find, in every layout."""
    return EXPECTED
