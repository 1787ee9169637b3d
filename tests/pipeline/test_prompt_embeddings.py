"""Textual-inversion embeddings in prompts: an embedding file changes the image exactly as its vectors put into the
token table by hand do, diffusers' own loader reads the prompt the same, and an embedding of N vectors counts N tokens
of its chunk and is never split."""

import copy

import pytest
import torch

from ldm.formats.bundle import load_bundle
from ldm.formats.embeddings import read_embedding, save_a1111, save_diffusers
from ldm.models.embeddings import Embedding, EmbeddingSet, names_in
from ldm.pipeline import Request, encode_prompts, generate
from ldm.pipeline.prompts import chunk_prompt, embedding_names, pack_chunks
from ldm.pipeline.schedule import get_sampler

# Three words of one token each, whose rows of the token table the reference overwrites with the vectors.
STAND_INS = "zebra violin tulip"


@pytest.fixture(scope="module")
def bundle(micro_bundle_dir):
    return load_bundle(micro_bundle_dir)


@pytest.fixture(scope="module")
def vectors(bundle):
    return torch.randn(3, bundle.config.text_encoder.width, generator=torch.Generator().manual_seed(5)) * 0.5


def by_hand(bundle, vectors):
    """A copy of the bundle whose token table holds ``vectors`` in the rows of the three stand-in words."""
    ids = bundle.tokenizer([STAND_INS], add_special_tokens=False).input_ids[0]
    assert len(ids) == 3
    copied = copy.deepcopy(bundle)
    with torch.no_grad():
        copied.text_encoder.model.get_input_embeddings().weight[torch.tensor(ids)] = vectors
    return copied


def images(bundle, prompts, negative, embeddings=None):
    request = Request(prompts=prompts, negative_prompts=negative, seeds=[3, 4], steps=2, guidance_scale=7.5,
                      sampler=get_sampler("dpmpp_2m"), width=32, height=32, embeddings=embeddings)  # fmt: skip
    return generate(bundle, request, progress=False)


def test_a1111_and_diffusers_files_change_the_image_as_the_vectors_put_in_by_hand(bundle, vectors, tmp_path):
    """Weighted, in any case, and in the negative prompt: the images are bit-identical to the hand-made reference's
    (which the word read as text would not give); the diffusers file reads the same."""
    a1111 = read_embedding(save_a1111(tmp_path / "zqx-style.safetensors", Embedding(name="zqx-style", vectors=vectors)))
    diffusers = read_embedding(save_diffusers(tmp_path / "learned_embeds.safetensors",
                                              Embedding(name="zqx-style", vectors=vectors)))  # fmt: skip
    assert a1111.name == diffusers.name == "zqx-style"  # diffusers' file is named by its token
    prompts, negative = ["a (zqx-style:1.3) disc", "ZQX-Style square"], ["zqx-style", ""]
    by_text = [p.replace("zqx-style", STAND_INS).replace("ZQX-Style", STAND_INS) for p in prompts]
    reference = images(by_hand(bundle, vectors), by_text, [STAND_INS, ""])
    assert torch.equal(images(bundle, prompts, negative, EmbeddingSet([a1111])), reference)
    texts = prompts + negative
    assert torch.equal(encode_prompts(bundle, texts, embeddings=EmbeddingSet([diffusers])),
                       encode_prompts(by_hand(bundle, vectors), by_text + [STAND_INS, ""]))  # fmt: skip


def test_diffusers_load_textual_inversion_reads_the_prompt_the_same(bundle, vectors, micro_diffusers_dir):
    """diffusers' own loader (new tokens in its tokenizer and token table) as the oracle of the prompt's hidden states."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(micro_diffusers_dir, local_files_only=True)
    pipe.load_textual_inversion({"zqx-style": vectors.clone()}, token="zqx-style")
    prompt = "a zqx-style disc, with zqx-style"
    theirs = pipe.encode_prompt(prompt, torch.device("cpu"), 1, False)[0]  # (1, 77, D)
    ours = encode_prompts(bundle, [prompt], embeddings=EmbeddingSet([Embedding(name="zqx-style", vectors=vectors)]))
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() <= 1e-6


def test_n_vectors_count_n_tokens_and_stay_in_one_chunk(bundle):
    te = bundle.config.text_encoder
    ten = EmbeddingSet([Embedding(name="wide", vectors=torch.ones(10, te.width))])
    # 70 plain tokens, then the 10 vectors: they do not fit in the 75 left, so the second chunk starts with them
    chunks = chunk_prompt(bundle.tokenizer, "a " * 70 + "wide cat", context_length=te.context_length, pad_id=te.pad_id,
                          embeddings=ten)  # fmt: skip
    assert len(chunks) == 2
    assert (chunks.ids[0] < 0).sum() == 0 and chunks.ids[0, 71] == bundle.tokenizer.eos_token_id
    assert chunks.ids[1, 1:11].tolist() == list(range(-1, -11, -1))
    # 60 plain tokens: the vectors fit, and the chunk holds 70 then "cat"
    chunks = chunk_prompt(bundle.tokenizer, "a " * 60 + "(wide:1.5) cat", context_length=te.context_length,
                          pad_id=te.pad_id, embeddings=ten)  # fmt: skip
    assert len(chunks) == 1 and (chunks.ids[0] < 0).sum() == 10
    assert chunks.weights[0, 61:71].tolist() == [1.5] * 10 and chunks.weights[0, 71] == 1.0


def test_pack_chunks_keeps_a_group_together():
    tokens = [(1, 1.0)] * 3 + [[(-1, 1.0), (-2, 1.0)]] + [(2, 1.0)]
    assert [len(c) for c in pack_chunks(tokens, size=4, comma_id=None)] == [3, 3]
    with pytest.raises(ValueError, match="cannot stay together"):
        pack_chunks([[(-1, 1.0)] * 5], size=4, comma_id=None)


def test_an_embedding_named_like_a_word_wins_over_the_vocabulary(bundle):
    """As in A1111: "cat" reads as the embedding wherever it is a word of its own, in any case, but not inside
    "cats", "cat_face" or "tomcat"."""
    te = bundle.config.text_encoder
    cat = EmbeddingSet([Embedding(name="cat", vectors=torch.ones(2, te.width))])

    def ids(prompt):
        return chunk_prompt(bundle.tokenizer, prompt, context_length=te.context_length, pad_id=te.pad_id,
                            embeddings=cat).ids[0].tolist()  # fmt: skip

    assert ids("a cat")[:5] == [bundle.tokenizer.bos_token_id, 320, -1, -2, bundle.tokenizer.eos_token_id]
    assert ids("(CAT:1.2), dog").count(-1) == 1
    for prompt in ("cats", "cat_face", "tomcat"):
        assert -1 not in ids(prompt), prompt
        assert ids(prompt) == chunk_prompt(bundle.tokenizer, prompt, context_length=te.context_length,
                                           pad_id=te.pad_id).ids[0].tolist()  # fmt: skip
    assert embedding_names("x (my style:1.1) [cat], <lora:cat:1>", ["cat", "my style", "dog"]) == ["my style", "cat"]
    assert names_in("bad-hands-5 bad-hands", ["bad-hands", "bad-hands-5"]) == ["bad-hands-5", "bad-hands"]


def test_the_vectors_take_the_tokens_place_and_its_gradient(bundle):
    """The gradient reaches the vectors; the token table's row that the ids hand the model (0) gets none from them."""
    te = bundle.config.text_encoder
    encoder = copy.deepcopy(bundle.text_encoder)
    vectors = torch.zeros(2, te.width, requires_grad=True)
    ids = torch.tensor([[bundle.tokenizer.bos_token_id, -1, -2, bundle.tokenizer.eos_token_id]])
    encoder(ids, vectors=vectors).hidden_states.sum().backward()
    table = encoder.model.get_input_embeddings().weight.grad  # (V, D)
    assert vectors.grad.abs().sum() > 0
    assert table[0].abs().sum() == 0 and table[bundle.tokenizer.bos_token_id].abs().sum() > 0
    with pytest.raises(ValueError, match="pass vectors="):
        encoder(ids)
