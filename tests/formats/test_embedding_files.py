"""Embedding files in A1111's and diffusers' layouts, read by their keys; a folder of them; and every file that is
not one, refused in one line that says what to do."""

import hashlib

import pytest
import torch
from safetensors.torch import save_file

from ldm.errors import LdmError
from ldm.formats.embeddings import check_fits, list_embeddings, pick_file, read_embedding, save_a1111, save_diffusers
from ldm.formats.pngmeta import EmbeddingRecord, ImageParameters
from ldm.models.embeddings import Embedding

VECTORS = torch.arange(2 * 32, dtype=torch.float32).reshape(2, 32) / 100


def one_line(exc) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "write, name",
    [
        (lambda p: save_file({"emb_params": VECTORS}, str(p / "style.safetensors")), "style"),  # A1111, ComfyUI
        (
            lambda p: save_file({"string_to_param.*": VECTORS}, str(p / "style.safetensors")),
            "style",
        ),  # A1111 .pt saved flat
        (lambda p: save_file({"<my-token>": VECTORS}, str(p / "style.safetensors")), "style"),  # A1111 names by file
        (
            lambda p: save_file({"<my-token>": VECTORS}, str(p / "learned_embeds.safetensors")),
            "<my-token>",
        ),  # diffusers
    ],
    ids=["emb_params", "string_to_param", "one-key", "learned_embeds"],
)
def test_safetensors_layouts(tmp_path, write, name):
    write(tmp_path)
    (path,) = tmp_path.iterdir()
    e = read_embedding(path)
    assert e.name == name and torch.equal(e.vectors, VECTORS) and e.width == 32 and len(e) == 2
    assert e.hash == hashlib.sha256(path.read_bytes()).hexdigest()[:10]  # A1111's AutoV2 hash of the file


def test_a1111_pt_needs_allow_pickle_and_reads_its_record(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": VECTORS}, "name": "old", "step": 1500,
                "sd_checkpoint": "a1b2c3d4", "sd_checkpoint_name": "v1-5"}, path)  # fmt: skip
    with pytest.raises(LdmError) as exc:
        read_embedding(path)
    assert "pass --allow-pickle" in one_line(exc)
    e = read_embedding(path, allow_pickle=True)
    assert torch.equal(e.vectors, VECTORS) and (e.step, e.checkpoint, e.checkpoint_name) == (1500, "a1b2c3d4", "v1-5")
    bin_path = tmp_path / "learned_embeds.bin"  # diffusers' pickled form, one vector flat
    torch.save({"<tok>": VECTORS[0]}, bin_path)
    e = read_embedding(bin_path, allow_pickle=True)
    assert e.name == "<tok>" and e.vectors.shape == (1, 32)


def test_a_pickle_of_more_than_tensors_is_refused_even_when_allowed(tmp_path):
    path = tmp_path / "module.pt"
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(VECTORS)})}, path)
    with pytest.raises(LdmError) as exc:
        read_embedding(path, allow_pickle=True)
    assert "does not load as weights only" in one_line(exc)


def test_round_trip_of_what_training_writes(tmp_path):
    trained = Embedding(name="my-cat", vectors=VECTORS, step=12, checkpoint="0123456789", checkpoint_name="micro")
    a = read_embedding(save_a1111(tmp_path / "my-cat.safetensors", trained))
    d = read_embedding(save_diffusers(tmp_path / "learned_embeds.safetensors", trained))
    assert a.name == d.name == "my-cat" and torch.equal(a.vectors, d.vectors) and torch.equal(a.vectors, VECTORS)
    assert (a.step, a.checkpoint, a.checkpoint_name) == (12, "0123456789", "micro")


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"a": VECTORS, "b": VECTORS.clone()}, r"holds no embedding ldm recognises \(keys found: a, b\)"),
        ({"clip_l": VECTORS, "clip_g": VECTORS.clone()}, "is an SDXL embedding"),
        ({"emb_params": torch.zeros(2, 3, 4)}, r"shape \[2, 3, 4\], not \(vectors, width\)"),
        ({"emb_params": torch.ones(2, 4, dtype=torch.int64)}, "int64 tensor"),
        ({"emb_params": torch.full((1, 4), float("nan"))}, "NaN or infinite"),
    ],
    ids=["unknown-keys", "sdxl", "shape", "dtype", "nan"],
)
def test_files_that_are_no_embedding(tmp_path, tensors, message):
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(LdmError, match=message) as exc:
        read_embedding(path)
    one_line(exc)


def test_truncated_and_missing_files(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"emb_params": torch.ones(8, 768)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(LdmError, match="damaged or truncated: download it again") as exc:
        read_embedding(path)
    one_line(exc)
    with pytest.raises(LdmError, match="no embedding file at"):
        read_embedding(tmp_path / "nope.safetensors")


def test_width_and_length_are_checked_against_the_model():
    sd2 = Embedding(name="sd2", vectors=torch.ones(4, 1024))
    with pytest.raises(LdmError) as exc:
        check_fits(sd2, width=768, context_length=77)
    assert "is 1024 wide (SD 2.x), and this model's text encoder is 768 wide (SD 1.x)" in one_line(exc)
    with pytest.raises(LdmError, match="has 76 vectors; a prompt chunk holds 75"):
        check_fits(Embedding(name="long", vectors=torch.ones(76, 768)), width=768, context_length=77)
    check_fits(Embedding(name="ok", vectors=torch.ones(75, 768)), width=768, context_length=77)


def test_a_folder_defines_one_word_per_file(tmp_path):
    for rel in ("a.safetensors", "sub/b.pt", "sub/c.bin", "notes.txt", ".hidden/d.safetensors", "sub/A.safetensors"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    found = list_embeddings(tmp_path)
    assert sorted(found) == ["a", "b", "c"]
    assert found["a"] == [tmp_path / "a.safetensors", tmp_path / "sub/A.safetensors"]  # the same word, in any case
    with pytest.raises(LdmError, match="defined by 2 files .* rename or remove all but one"):
        pick_file("a", found["a"])
    assert list_embeddings(tmp_path / "missing") == {}


def test_png_records_ti_hashes_as_a1111_writes_them():
    p = ImageParameters(prompt="a my-cat", steps=2, sampler="DPM++ 2M", guidance_scale=7.5, seed=1, width=64,
                        height=64, embeddings=(EmbeddingRecord(name="my-cat", hash="0123456789"),
                                               EmbeddingRecord(name="bad", hash="abcdef0123")))  # fmt: skip
    assert 'TI hashes: "my-cat: 0123456789, bad: abcdef0123"' in p.text()
    assert ImageParameters.from_text(p.text()) == p
    a1111 = ('x, easynegative\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, '
             'TI hashes: "easynegative: c74b4e810b", Version: v1.9.4')  # fmt: skip
    read = ImageParameters.from_text(a1111)
    assert read.embeddings == (EmbeddingRecord(name="easynegative", hash="c74b4e810b"),) and read.extra == ()
