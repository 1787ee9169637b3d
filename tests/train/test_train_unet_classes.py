"""train_unet.py --conditioning class / none: the label tokens trained with the UNet, exact resume, the bundle a
class-conditional generate.py reads, and classes from folder names."""

import numpy as np
import torch
from PIL import Image
from test_train_unet import COMMON, args, checkpoint_tensors, run_killed_and_resumed, write_shapes

from ldm.cli import train_unet
from ldm.cli.common import run_cli
from ldm.formats.bundle import load_bundle
from ldm.models.labels import Conditioning
from ldm.pipeline import encode_prompts

SHORT = [*COMMON, "--set", "validation.num_prompts=2", "--set", "train.checkpoint_every=2"]


def test_a_class_run_resumes_exactly_and_writes_a_class_bundle(micro_bundle_dir, tmp_path):
    data = write_shapes(tmp_path / "shapes")  # captions "square 0", "disc 1", … : 6 classes
    straight, _ = run_killed_and_resumed(micro_bundle_dir, data, tmp_path, ["--conditioning", "class", *SHORT],
                                         steps=4, killed_at=2)  # fmt: skip
    bundle = load_bundle(straight / "bundle")
    assert bundle.config.conditioning is Conditioning.CLASS
    assert bundle.config.classes == ("disc 0", "disc 1", "disc 2", "square 0", "square 1", "square 2")
    assert bundle.labels.model.weight.shape == (6 + 1, 32)  # a token per class and the null one
    saved = checkpoint_tensors(straight / "checkpoints" / "step-00000004.safetensors")
    trained = [v for k, v in saved.items() if "labels" in k]
    assert len(trained) == 1 and torch.equal(trained[0], bundle.labels.model.weight.float())  # trained, and saved
    assert encode_prompts(bundle, ["disc 1", ""]).shape == (2, 1, 32)


def test_classes_from_folder_names_and_an_unconditional_run(micro_bundle_dir, tmp_path):
    root = tmp_path / "folders"
    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((64, 64, 3), colour, np.uint8)).save(root / name / f"{i}.png")
            (root / name / f"{i}.txt").write_text(f"a {name} square {i}")  # captions that are not the class
    out = tmp_path / "cls"
    argv = args(micro_bundle_dir, root, out, "--conditioning", "class", "--labels-from", "folder", "--max-steps", "2",
                *SHORT)  # fmt: skip
    assert run_cli(train_unet.main, argv) == 0
    assert load_bundle(out / "bundle").config.classes == ("blue", "red")
    out = tmp_path / "none"
    assert run_cli(train_unet.main, args(micro_bundle_dir, root, out, "--conditioning", "none", "--max-steps", "2",
                                         *SHORT)) == 0  # fmt: skip
    bundle = load_bundle(out / "bundle")
    assert bundle.config.conditioning is Conditioning.NONE and bundle.labels.model.weight.shape == (1, 32)


def test_bad_class_runs_are_one_line(micro_bundle_dir, tmp_path, capsys):
    data = write_shapes(tmp_path / "shapes")
    cases = [
        (["--labels-from", "folder"], "--labels-from says where the classes come from"),
        (["--conditioning", "class", "--lora-rank", "2"], "leave out --lora-rank and --train-text-encoder"),
    ]
    for extra, message in cases:
        assert run_cli(train_unet.main, args(micro_bundle_dir, data, tmp_path / "x", *extra, "--max-steps", "1")) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and message in err, err
