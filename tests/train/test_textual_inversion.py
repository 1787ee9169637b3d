"""train_unet.py --textual-inversion on the micro bundle: exact resume, the model left bit for bit as it was, a word
that changes the image, the files A1111 and diffusers read, and bad input."""

import re
import shutil

import pytest
import torch
from test_train_unet import args, checkpoint_tensors, write_shapes

from ldm.cli import train_unet
from ldm.cli.common import run_cli
from ldm.formats.bundle import load_bundle
from ldm.formats.embeddings import read_embedding
from ldm.models.embeddings import EmbeddingSet
from ldm.pipeline import Request, generate
from ldm.pipeline.schedule import get_sampler

TI = ["--textual-inversion", "zqx-shape", "--init-word", "square shape", "--num-vectors", "3",
      "--set", "train.batch_size=2", "--set", "train.gradient_accumulation=2", "--set", "train.checkpoint_every=2", "--set", "train.sample_every=100",
      "--set", "data.random_flip=0.5", "--set", "train.lr=5e-2", "--set", "loss.noise_offset=0.1",
      "--set", "validation.prompts=[zqx-shape]"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(micro_bundle_dir, tmp_path_factory):
    """A 4-step run straight (its bundle kept as the run had it at the end), and the same run killed after its step-2
    checkpoint and resumed from its own config."""
    from ldm.train import textual_inversion

    root = tmp_path_factory.mktemp("ti")
    data = write_shapes(root / "shapes")
    straight, killed, seen = root / "straight", root / "killed", {}
    load_base = textual_inversion.load_base

    def keep(cfg, accelerator):
        seen["base"] = load_base(cfg, accelerator)
        return seen["base"]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(textual_inversion, "load_base", keep)
        argv = args(micro_bundle_dir, data, straight, "--max-steps", "4", "--cache-dir", root / "cache", *TI)
        assert run_cli(train_unet.main, [str(a) for a in argv]) == 0
    (killed / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "checkpoints" / "step-00000002.safetensors", killed / "checkpoints")
    shutil.copy(straight / "config.yaml", killed)
    assert run_cli(train_unet.main, ["--out", str(killed), "--resume", "latest"]) == 0
    return straight, killed, seen["base"]


def test_a_killed_run_resumes_exactly(runs):
    straight, killed, _ = runs
    a = checkpoint_tensors(straight / "checkpoints" / "step-00000004.safetensors")
    b = checkpoint_tensors(killed / "checkpoints" / "step-00000004.safetensors")
    assert a.keys() == b.keys() and "s.models.vectors.vectors" in a
    assert any(k.startswith("s.optimizers.vectors.state.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("zqx-shape.safetensors", "learned_embeds.safetensors"):
        assert torch.equal(read_embedding(straight / name).vectors, read_embedding(killed / name).vectors)


def test_only_the_word_trains_and_it_changes_the_image(runs, micro_bundle_dir):
    straight, _, trained = runs
    a1111, diffusers = (
        read_embedding(straight / "zqx-shape.safetensors"),
        read_embedding(straight / "learned_embeds.safetensors"),
    )
    assert a1111.name == diffusers.name == "zqx-shape" and torch.equal(a1111.vectors, diffusers.vectors)
    assert a1111.vectors.shape == (3, 32) and a1111.step == 4 and a1111.checkpoint_name == "micro"
    base = load_bundle(micro_bundle_dir)
    # the vectors moved away from "square shape"'s token embeddings (spread over 3 vectors: square, square, shape)
    ids = base.tokenizer(["square shape"], add_special_tokens=False).input_ids[0]
    start = base.text_encoder.model.get_input_embeddings().weight[[ids[0], ids[0], ids[1]]].detach()
    assert not torch.allclose(a1111.vectors, start, atol=1e-4)
    # nothing else trained: the run's own UNet, VAE and text encoder (its token table included) after training are
    # bit for bit as loaded, and the checkpoints hold the vectors only
    for part in ("vae", "text_encoder", "unet"):
        ref, got = base.modules()[part].state_dict(), trained.modules()[part].state_dict()
        assert all(torch.equal(ref[k], got[k].cpu()) for k in ref), part
    state = checkpoint_tensors(straight / "checkpoints" / "step-00000004.safetensors")
    assert {k for k in state if k.startswith("s.models.")} == {"s.models.vectors.vectors"}
    request = dict(negative_prompts=[""], seeds=[1], steps=2, guidance_scale=7.5, sampler=get_sampler("dpmpp_2m"),
                   width=32, height=32)  # fmt: skip
    with_word = generate(
        base, Request(prompts=["zqx-shape"], embeddings=EmbeddingSet([a1111]), **request), progress=False
    )
    without = generate(base, Request(prompts=["zqx-shape"], **request), progress=False)
    assert (with_word - without).abs().max() > 1e-3
    assert list((straight / "samples").glob("samples-00000004.png"))  # the final grid, drawn with the word


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--init-word", "cat"], "--init-word and --num-vectors are textual inversion's; pass --textual-inversion"),
        (["--textual-inversion", "two words"], "--textual-inversion must be one word"),
        (["--textual-inversion", "x", "--num-vectors", "76"], "--num-vectors 76 is more than a prompt chunk holds"),
        (["--textual-inversion", "x", "--lora-rank", "4"], "leave out --lora-rank and --train-text-encoder"),
        (["--textual-inversion", "x", "--prediction", "v_prediction"], "leave out --prediction"),
        (["--textual-inversion", "x", "--set", "textual_inversion.template=a photo"], "template must hold {token}"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(extra, message, micro_bundle_dir, tmp_path, capsys):
    data = write_shapes(tmp_path / "shapes", n=4)
    assert run_cli(train_unet.main, args(micro_bundle_dir, data, tmp_path / "run", "--max-steps", "1", *extra)) == 2
    lines = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if line.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1], lines
    assert not (tmp_path / "run" / "checkpoints").exists()
