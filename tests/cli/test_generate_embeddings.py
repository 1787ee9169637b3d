"""generate.py with textual-inversion embeddings: words of ``--embeddings DIR`` in the prompt, ``TI hashes`` in the
PNG, ``--from-png`` checking them, and the files it refuses, in one line before any weights load."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm.cli import generate
from ldm.cli.common import run_cli
from ldm.formats.pngmeta import parse_parameters, read_png_parameters
from ldm.io import sha256_file

pytestmark = pytest.mark.filterwarnings("ignore")


def run(argv):
    return run_cli(generate.main, [str(a) for a in argv])


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    """A folder with a 2-vector embedding ``zqx-style`` (micro's 32 wide), beside files no prompt below names: a
    pickle and a damaged file, which are never read."""
    folder = tmp_path_factory.mktemp("embeddings")
    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(1))},
              str(folder / "zqx-style.safetensors"))  # fmt: skip
    torch.save({"string_to_param": {"*": torch.ones(1, 32)}}, folder / "pickled.pt")
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    return folder


def make(model, out, *extra):
    assert run(["--seed", "3", "--steps", "2", "--width", "32", "--height", "32", "--model", model, "--out", out,
                "--quiet", *extra]) == 0  # fmt: skip
    pngs = sorted(Path(out).glob("0*.png"))
    return pngs, [np.asarray(Image.open(png)) for png in pngs]


def test_prompt_words_name_the_folders_embeddings(micro_bundle_dir, embeddings, tmp_path, capsys):
    style = embeddings / "zqx-style.safetensors"
    (named, plain), (styled, _) = make(micro_bundle_dir, tmp_path / "styled", "a (zqx-style:1.2) disc", "disc",
                                       "--embeddings", embeddings)  # fmt: skip
    assert parse_parameters(read_png_parameters(named))[2]["TI hashes"] == f"zqx-style: {sha256_file(style)[:10]}"
    assert "TI hashes" not in parse_parameters(read_png_parameters(plain))[2]  # each image records its own
    capsys.readouterr()
    # --from-png with the file given directly (--embedding FILE: the same word): the same pixels, no warning
    _, (again,) = make(micro_bundle_dir, tmp_path / "again", "--from-png", named, "--embedding", style)
    assert np.array_equal(again, styled) and "warning" not in capsys.readouterr().err


def test_from_png_warns_where_the_embeddings_differ(tmp_path, capsys):
    from ldm.cli.embedding_inputs import warn_about_embeddings
    from ldm.formats.embeddings import read_embedding
    from ldm.formats.pngmeta import EmbeddingRecord, ImageParameters
    from ldm.models.embeddings import EmbeddingSet

    recorded = ImageParameters(prompt="a my-cat", steps=2, sampler="DPM++ 2M", guidance_scale=7.5, seed=1, width=64,
                               height=64, embeddings=(EmbeddingRecord(name="my-cat", hash="0123456789"),))  # fmt: skip
    warn_about_embeddings(None, recorded, Path("x.png"))
    assert "x.png was made with the embedding my-cat (hash 0123456789), which this run lacks" in capsys.readouterr().err
    save_file({"emb_params": torch.zeros(1, 32)}, str(tmp_path / "my-cat.safetensors"))
    other = EmbeddingSet([read_embedding(tmp_path / "my-cat.safetensors")])
    warn_about_embeddings(other, recorded, Path("x.png"))
    assert f"of hash 0123456789, this run's {tmp_path / 'my-cat.safetensors'} is" in capsys.readouterr().err


@pytest.mark.parametrize(
    "prompt, extra, message",
    [
        ("pickled cat", [], r"pickled\.pt is a pickle, which can run code when loaded; pass --allow-pickle"),
        ("a broken one", [], r"cannot read the embedding .*broken\.safetensors .*download it again"),
        ("x", ["--embedding", "WIDE"], r"is 768 wide \(SD 1\.x\), and this model's text encoder is 32 wide"),
        ("x", ["--embeddings", "missing-folder"], r"--embeddings missing-folder is not a folder"),
    ],
    ids=["pickle", "truncated", "width", "no-folder"],
)
def test_bad_embeddings_are_one_line_before_any_work(micro_bundle_dir, embeddings, tmp_path, capsys, prompt, extra,
                                                     message):  # fmt: skip
    wide = tmp_path / "wide.safetensors"
    save_file({"emb_params": torch.ones(1, 768)}, str(wide))
    extra = [str(wide) if a == "WIDE" else a for a in extra]
    out = tmp_path / "out"
    argv = ["--model", micro_bundle_dir, "--out", out, "--embeddings", embeddings, prompt, *extra]
    if "--embeddings" in extra:
        argv = ["--model", micro_bundle_dir, "--out", out, prompt, *extra]
    assert run(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and re.search(message, err[0]), err
    assert not out.exists()  # nothing written
