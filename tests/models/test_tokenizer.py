import open_clip
import pytest
import torch

from ldm.models.tokenizer import VOCAB_SIZE, build_tokenizer, token_count, tokenize

PROMPTS = [
    "a red apple",
    "A photo of an ASTRONAUT riding a horse, 4k!!",
    "café naïve résumé 😀🍎 emoji",
    "  spaces   and\ttabs\nnewlines ",
    "&amp; html &lt;entities&gt;",
    "don't \"quote\" me: 3.14, #tag @user (word:1.3) [brackets]",
    "日本語のプロンプト",
    "",
    "x " * 100,  # longer than the context: truncated, ends with the end token
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.mark.parametrize("pad_id", [0, VOCAB_SIZE - 1], ids=["sd2-pad-zero", "sd1-pad-end"])
def test_ids_equal_open_clip(tokenizer, pad_id):
    reference = open_clip.tokenize(PROMPTS)  # open_clip pads with 0
    if pad_id:
        reference = torch.where(reference == 0, torch.full_like(reference, pad_id), reference)
    ours = tokenize(tokenizer, PROMPTS, context_length=77, pad_id=pad_id)
    for prompt, a, b in zip(PROMPTS, ours, reference):
        assert torch.equal(a, b), prompt


def test_vocabulary_size_and_specials(tokenizer):
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer.bos_token_id == VOCAB_SIZE - 2 and tokenizer.eos_token_id == VOCAB_SIZE - 1


def test_exclamation_mark_stays_an_ordinary_token(tokenizer):
    ids = tokenize(tokenizer, ["wow!"], context_length=77, pad_id=0)[0]
    assert ids[:4].tolist() == open_clip.tokenize(["wow!"])[0, :4].tolist()


def test_token_count_counts_specials(tokenizer):
    assert token_count(tokenizer, "red apple") == 4
    assert token_count(tokenizer, "x " * 100) == 102
