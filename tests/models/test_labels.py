"""Class-conditional and unconditional models: the label tokens, their bundle round trip, sampling and the CLI."""

from dataclasses import replace

import pytest
import torch

from ldm.cli import generate as generate_cli
from ldm.cli.common import run_cli
from ldm.errors import LdmError
from ldm.formats.bundle import create_bundle, load_bundle, save_bundle
from ldm.formats.diffusers import export_diffusers
from ldm.models.labels import Conditioning, label_ids
from ldm.models.presets import PRESETS
from ldm.pipeline import Request, encode_prompts, generate
from ldm.pipeline.schedule import get_sampler

CLASSES = ("apple", "cat face", "rocket")


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundles") / "classes"
    config = replace(PRESETS["micro"], conditioning=Conditioning.CLASS, classes=CLASSES)
    save_bundle(create_bundle(config, seed=0, name="classes"), folder)
    return folder


def test_label_ids_and_their_errors():
    assert label_ids(CLASSES, ["rocket", "", "apple"]) == [2, 3, 0]
    with pytest.raises(LdmError, match="unknown class 'rockett'; did you mean 'rocket'"):
        label_ids(CLASSES, ["rockett"])
    with pytest.raises(LdmError, match="this model is unconditional"):
        label_ids((), ["x"])
    assert label_ids((), [""]) == [0]


def test_a_class_bundle_round_trips_and_conditions_on_one_token(class_dir):
    bundle = load_bundle(class_dir)
    assert bundle.config.classes == CLASSES and "labels.safetensors" in bundle.manifest["files"]
    hidden = encode_prompts(bundle, ["cat face", "", "cat face"])
    assert hidden.shape == (3, 1, 32)
    weight = bundle.labels.model.weight
    torch.testing.assert_close(hidden[0, 0], weight[1]) and torch.testing.assert_close(hidden[1, 0], weight[3])
    request = Request(prompts=["apple", "rocket"], negative_prompts=["", ""], seeds=[1, 1], steps=2,
                      guidance_scale=5.0, sampler=get_sampler("ddim"), width=64, height=64)  # fmt: skip
    images = generate(bundle, request, progress=False)
    assert not torch.equal(images[0], images[1])  # same seed, different class


def test_configs_refuse_classes_that_do_not_fit():
    micro = PRESETS["micro"]
    with pytest.raises(ValueError, match="need at least one"):
        replace(micro, conditioning=Conditioning.CLASS)
    with pytest.raises(ValueError, match="need at least one"):
        replace(micro, classes=("a",))
    with pytest.raises(ValueError, match="distinct and non-empty"):
        replace(micro, conditioning=Conditioning.CLASS, classes=("a", "a"))


def test_generate_takes_classes_and_unconditional_models_take_nothing(class_dir, tmp_path, capsys):
    def run(argv):
        return run_cli(generate_cli.main, [str(a) for a in argv])

    assert run(["--class", "apple", "--class", "rocket", "--model", class_dir, "--steps", "2", "--out", tmp_path / "a",
                "--quiet"]) == 0  # fmt: skip
    assert len(list((tmp_path / "a").glob("*.png"))) == 2
    assert run(["--class", "aple", "--model", class_dir, "--out", tmp_path / "b", "--quiet"]) == 2
    assert "did you mean 'apple'" in capsys.readouterr().err
    unconditional = tmp_path / "unconditional"
    save_bundle(create_bundle(replace(PRESETS["micro"], conditioning=Conditioning.NONE), seed=1), unconditional)
    assert run(["--model", unconditional, "--steps", "2", "-n", "2", "--out", tmp_path / "c", "--quiet"]) == 0
    assert len(list((tmp_path / "c").glob("*.png"))) == 2
    assert run(["a prompt", "--model", unconditional, "--out", tmp_path / "d", "--quiet"]) == 2
    assert "this model is unconditional" in capsys.readouterr().err


def test_diffusers_export_is_refused(class_dir, tmp_path):
    with pytest.raises(LdmError, match="class-conditioned model has no diffusers pipeline"):
        export_diffusers(load_bundle(class_dir), tmp_path / "x")
