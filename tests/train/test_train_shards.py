"""Training on webdataset shards written from a folder is training on the folder: the same checkpoint, bit for bit.
(2 processes on shards, killed and resumed: tests/train/test_distributed.py, in its one torchrun start.)"""

import json
import shutil

import pytest
from test_distributed import UNET
from test_train_unet import assert_same_checkpoints, write_shapes

from ldm.cli import train_unet
from ldm.cli.common import run_cli
from ldm.data import DataConfig, scan_dataset
from ldm.data.shard_writer import shard_pattern, write_shards

FINAL = "checkpoints/step-00000004.safetensors"


def kohya_shapes(shapes, root):
    """The 8 pictures as kohya folders: 4 in ``2_shapes/`` (each trained twice an epoch), 4 in ``plain/``."""
    for i, line in enumerate((shapes / "metadata.jsonl").read_text().splitlines()):
        row = json.loads(line)
        folder = root / ("2_shapes" if i < 4 else "plain")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(shapes / row["file_name"], folder)
        (folder / row["file_name"]).with_suffix(".txt").write_text(row["text"])
    return root


def shards_of(folder, out, size):
    return shard_pattern(write_shards(scan_dataset(DataConfig(path=str(folder)), progress=False), out, size,
                                      progress=False))  # fmt: skip


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("shard-data") / "shapes")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["imagefolder", "kohya"])
def test_training_on_the_shards_equals_training_on_the_folder(micro_bundle_dir, shapes, layout, tmp_path):
    """4 steps (2 epochs of the 8 pictures, 3 of the 12 kohya samples: the order is drawn again), shards of 3 that
    batches of 4 straddle, random flips, caption dropout, the feature cache: the same checkpoint (weights, optimizer
    state, EMA).

    kohya: the cache encodes a repeated image once, and the shards hold each repeat as a sample of its own, so the
    VAE would see batches of 8 images from the folder and of 12 from the shards; one image a VAE call
    (cache.batch_size=1) makes the latents equal by construction, whatever batch size a kernel is fastest at."""
    folder = shapes if layout == "imagefolder" else kohya_shapes(shapes, tmp_path / "kohya")
    pattern = shards_of(folder, tmp_path / "shards", 3)
    extra = ["--set", "cache.batch_size=1"] if layout == "kohya" else []
    for data, out in ((folder, tmp_path / "from-folder"), (pattern, tmp_path / "from-shards")):
        argv = ["--bundle", str(micro_bundle_dir), "--data", str(data), *UNET, *extra, "--out", str(out)]
        assert run_cli(train_unet.main, argv) == 0
    assert_same_checkpoints(tmp_path / "from-folder" / FINAL, tmp_path / "from-shards" / FINAL)

