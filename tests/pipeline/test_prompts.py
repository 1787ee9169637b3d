"""A1111's prompt language: the parser against the examples A1111 documents, chunking, the weighting rule, and the
loop on prompts of more than one chunk."""

import pytest
import torch

from ldm.formats.bundle import create_bundle
from ldm.models.presets import PRESETS
from ldm.models.tokenizer import build_tokenizer, tokenize
from ldm.pipeline import Request, encode_prompts, generate
from ldm.pipeline.prompts import Marker, apply_weights, chunk_prompt, pack_chunks, parse_prompt, plain_text
from ldm.pipeline.schedule import get_sampler

LONG = "red apple " * 75  # 150 tokens: two full chunks
END, START = 49407, 49406


@pytest.fixture(scope="module")
def bundle():
    return create_bundle(PRESETS["micro"], seed=0, name="micro")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def assert_parsed(prompt: str, expected: list) -> None:
    got = parse_prompt(prompt)
    assert len(got) == len(expected), got
    for part, want in zip(got, expected):
        if isinstance(want, Marker):
            assert part is want, got
        else:
            assert part.text == want[0] and part.weight == pytest.approx(want[1]), got


# --- the parser -------------------------------------------------------------------------------------------------------

# The examples in the docstring of A1111's parse_prompt_attention (modules/prompt_parser.py), its documented behaviour.
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]  # fmt: skip


@pytest.mark.parametrize("prompt, expected", A1111_EXAMPLES, ids=[p for p, _ in A1111_EXAMPLES])
def test_parser_gives_a1111s_documented_results(prompt, expected):
    assert_parsed(prompt, expected)


def test_house_weight_is_multiplied_in_a1111s_order():
    assert parse_prompt("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")[1].weight == 1.5730000000000004


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("((word))", [("word", 1.21)]),
        ("[word]", [("word", 1 / 1.1)]),
        ("[[word]]", [("word", 1 / 1.21)]),
        ("a (word:1.3) b", [("a ", 1.0), ("word", 1.3), (" b", 1.0)]),
        ("(word : 0.5 )", [("word ", 0.5)]),  # spaces around the number, as A1111 allows
        ("((a:2) b)", [("a", 2.2), (" b", 1.1)]),
        ("(a [b])", [("a ", 1.1), ("b", 1.0)]),
        ("[a:1.5]", [("a:1.5", 1 / 1.1)]),  # a weight closes round brackets only
        ("a:b", [("a:b", 1.0)]),
        ("(a:1.2.3)", [("a:1.2.3)", 1.1)]),  # no number: plain text (A1111 raises here)
        ("x) y]", [("x) y]", 1.0)]),  # closing brackets with nothing open are text
        ("a [b (c", [("a ", 1.0), ("b ", 1 / 1.1), ("c", 1.0)]),  # open ones weight the rest: c is ×1.1 ÷1.1
        ("\\\\ \\( \\) \\[ \\]", [("\\ ( ) [ ]", 1.0)]),
        ("\\(a:1.5\\)", [("(a:1.5)", 1.0)]),
        ("a\\b", [("ab", 1.0)]),  # a lone backslash stands for nothing, as in A1111
        ("<lora:name:0.8> a cat", [("<lora:name:0.8> a cat", 1.0)]),  # extra-network tags are text here
        ("(<x>:1.2)", [("<x>", 1.2)]),
        ("", [("", 1.0)]),
        ("()", [("", 1.0)]),
    ],
)
def test_parser_weights_and_escapes(prompt, expected):
    assert_parsed(prompt, expected)


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a BREAK b", [("a", 1.0), Marker.BREAK, ("b", 1.0)]),
        ("a  BREAK\nb", [("a", 1.0), Marker.BREAK, ("b", 1.0)]),  # the spaces around it go with it
        ("(a BREAK b:1.5)", [("a", 1.5), Marker.BREAK, ("b", 1.5)]),
        ("a BREAKFAST break", [("a BREAKFAST break", 1.0)]),  # uppercase, and a word of its own
        ("BREAK a", [("", 1.0), Marker.BREAK, ("a", 1.0)]),
        ("a BREAK BREAK b", [("a", 1.0), Marker.BREAK, ("", 1.0), Marker.BREAK, ("b", 1.0)]),
        ("\\(BREAK\\)", [("(", 1.0), Marker.BREAK, (")", 1.0)]),
    ],
)
def test_parser_break(prompt, expected):
    assert_parsed(prompt, expected)


# --- packing into chunks ----------------------------------------------------------------------------------------------

COMMA = 267


def tokens(ids, weight=1.0):
    return [(i, weight) for i in ids]


def test_pack_fills_chunks_in_order():
    stream = tokens(range(1, 151))
    chunks = pack_chunks(stream, size=75, comma_id=COMMA)
    assert [len(c) for c in chunks] == [75, 75] and chunks[0] + chunks[1] == stream
    assert [len(c) for c in pack_chunks(tokens(range(1, 77)), size=75, comma_id=COMMA)] == [75, 1]
    assert pack_chunks([], size=75, comma_id=COMMA) == [[]]  # the empty prompt is one chunk


def test_pack_backtracks_to_a_comma_among_the_last_20():
    stream = tokens([1] * 60 + [COMMA] + [2] * 30)
    first, second = pack_chunks(stream, size=75, comma_id=COMMA)
    assert len(first) == 61 and first[-1][0] == COMMA  # ends after the comma
    assert second == tokens([2] * 30)  # the 14 tokens after the comma moved along
    # a comma further back than 20 tokens: the chunk is cut at 75
    stream = tokens([1] * 50 + [COMMA] + [2] * 30)
    assert [len(c) for c in pack_chunks(stream, size=75, comma_id=COMMA)] == [75, 6]
    # the last comma counts
    stream = tokens([1] * 56 + [COMMA] + [1] * 10 + [COMMA] + [2] * 20)
    first, second = pack_chunks(stream, size=75, comma_id=COMMA)
    assert len(first) == 68 and second == tokens([2] * 20)


def test_pack_break_and_weights():
    a, b = tokens([1, 2], 1.5), tokens([3], 0.5)
    assert pack_chunks([*a, Marker.BREAK, *b], size=75, comma_id=COMMA) == [a, b]
    assert pack_chunks([Marker.BREAK, *b], size=75, comma_id=COMMA) == [[], b]  # BREAK first: an empty chunk
    assert pack_chunks([*a, Marker.BREAK], size=75, comma_id=COMMA) == [a]
    full = tokens(range(1, 76))
    assert pack_chunks([*full, Marker.BREAK, *b], size=75, comma_id=COMMA) == [full, b]  # no empty chunk between


def test_chunk_prompt_matches_tokenize_for_plain_prompts(tokenizer):
    prompts = ["red apple", "", "a cat face with tears of joy!", "x " * 75, "&amp; fish"]
    for pad_id in (END, 0):
        ours = torch.cat([chunk_prompt(tokenizer, p, context_length=77, pad_id=pad_id).ids for p in prompts])
        assert torch.equal(ours, tokenize(tokenizer, prompts, context_length=77, pad_id=pad_id))


def test_chunk_prompt_weights_and_long_prompts(tokenizer):
    chunks = chunk_prompt(tokenizer, "(red:1.5) [apple]", context_length=77, pad_id=0)
    assert torch.equal(chunks.ids, tokenize(tokenizer, ["red apple"], context_length=77, pad_id=0))
    assert chunks.weights[0, :4].tolist() == pytest.approx([1.0, 1.5, 1 / 1.1, 1.0])  # start, red, apple, end
    assert chunks.weights[0, 4:].eq(1).all()

    chunks = chunk_prompt(tokenizer, LONG, context_length=77, pad_id=0)
    assert chunks.ids.shape == (2, 77)
    assert chunks.ids[:, 0].eq(START).all() and chunks.ids[:, 76].eq(END).all()  # each chunk has its own specials
    assert torch.equal(chunks.ids[0], tokenize(tokenizer, ["red apple " * 37 + "red"], context_length=77, pad_id=0)[0])

    # a comma 5 tokens before the end of a full chunk: the chunk ends after it
    chunks = chunk_prompt(tokenizer, "x " * 70 + ", " + "y " * 10, context_length=77, pad_id=0)
    x, y, comma = (tokenizer.convert_tokens_to_ids(t) for t in ("x</w>", "y</w>", ",</w>"))
    assert chunks.ids[0, 1:73].tolist() == [x] * 70 + [comma, END] and chunks.ids[0, 73:].eq(0).all()
    assert chunks.ids[1, :12].tolist() == [START] + [y] * 10 + [END]

    chunks = chunk_prompt(tokenizer, "red BREAK apple", context_length=77, pad_id=0)
    assert chunks.ids[:, :3].tolist() == [[START, tokenizer.convert_tokens_to_ids("red</w>"), END],
                                          [START, tokenizer.convert_tokens_to_ids("apple</w>"), END]]  # fmt: skip


# --- the weighting rule -----------------------------------------------------------------------------------------------


def test_apply_weights_scales_tokens_and_restores_the_chunk_mean():
    hidden = torch.randn(3, 77, 8, generator=torch.Generator().manual_seed(0)) + 0.5  # (N, L, D)
    weights = torch.ones(3, 77)
    assert apply_weights(hidden, weights) is hidden
    weights[1, 5] = 1.5
    out = apply_weights(hidden, weights)
    assert torch.equal(out[0], hidden[0]) and torch.equal(out[2], hidden[2])  # unweighted chunks untouched
    assert out[1].mean().item() == pytest.approx(hidden[1].mean().item(), rel=1e-5)
    ratio = out[1] / hidden[1]  # (L, D): one factor r for every state, 1.5·r for the weighted token's
    r = ratio[0, 0].item()
    assert r != pytest.approx(1.0, abs=1e-4)
    torch.testing.assert_close(ratio[torch.arange(77) != 5], torch.full((76, 8), r), rtol=1e-4, atol=0)
    torch.testing.assert_close(ratio[5], torch.full((8,), 1.5 * r), rtol=1e-4, atol=0)


# --- encode_prompts ---------------------------------------------------------------------------------------------------


def test_plain_short_prompts_encode_as_before_bit_for_bit(bundle):
    prompts = ["red apple", "", "cat face with tears of joy", "x " * 75]
    te = bundle.config.text_encoder
    before = bundle.text_encoder(tokenize(bundle.tokenizer, prompts, context_length=77, pad_id=te.pad_id)).hidden_states
    assert torch.equal(encode_prompts(bundle, prompts), before.detach())
    assert torch.equal(encode_prompts(bundle, ["red apple"]), before[:1].detach())


def test_a_long_prompt_is_encoded_in_chunks(bundle):
    hidden = encode_prompts(bundle, [LONG])
    assert hidden.shape == (1, 154, bundle.config.text_encoder.width)
    first = encode_prompts(bundle, ["red apple " * 37 + "red"])  # its first chunk, alone
    torch.testing.assert_close(hidden[:, :77], first, atol=1e-5, rtol=0)
    assert not torch.allclose(hidden[:, 77:], first, atol=1e-3)
    # BREAK: a chunk each side, each encoded on its own
    broken = encode_prompts(bundle, ["red BREAK apple"])
    assert broken.shape[1] == 154
    torch.testing.assert_close(broken[:, 77:], encode_prompts(bundle, ["apple"]), atol=1e-5, rtol=0)


def test_shorter_prompts_of_a_batch_are_padded_with_the_empty_prompts_chunk(bundle, monkeypatch):
    rows, encoder = [], bundle.text_encoder

    def counting(ids):
        rows.append(len(ids))
        return type(encoder).forward(encoder, ids)

    monkeypatch.setattr(encoder, "forward", counting)
    hidden = encode_prompts(bundle, [LONG, "red apple", LONG, ""])
    assert hidden.shape[:2] == (4, 154) and torch.equal(hidden[0], hidden[2])
    assert rows == [4]  # LONG's two chunks, "red apple"'s and the empty one (prompt and padding), each once
    torch.testing.assert_close(hidden[1:2, :77], encode_prompts(bundle, ["red apple"]), atol=1e-5, rtol=0)
    empty = encode_prompts(bundle, [""])
    torch.testing.assert_close(hidden[1:2, 77:], empty, atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden[3:4], torch.cat([empty, empty], dim=1), atol=1e-5, rtol=0)


def test_weights_follow_a1111s_rule(bundle):
    plain = encode_prompts(bundle, ["red apple"])
    weighted = encode_prompts(bundle, ["(red:1.5) apple"])
    expected = plain.clone()
    expected[:, 1] *= 1.5  # "red" is token 1, after the start token
    expected *= plain.mean() / expected.mean()
    assert not torch.allclose(weighted, plain, atol=1e-3)
    torch.testing.assert_close(weighted, expected, atol=1e-5, rtol=1e-5)
    assert weighted.mean().item() == pytest.approx(plain.mean().item(), rel=1e-4, abs=1e-6)


# --- the loop ---------------------------------------------------------------------------------------------------------


def request(prompts, negatives, *, guidance=7.5) -> Request:
    return Request(prompts=prompts, negative_prompts=negatives, seeds=[5] * len(prompts), steps=2,
                   guidance_scale=guidance, sampler=get_sampler("dpmpp_2m"), width=64, height=64)  # fmt: skip


def test_unet_cross_attends_to_every_chunk(bundle):
    context = encode_prompts(bundle, [LONG])  # (1, 154, D)
    sample = torch.randn(1, bundle.unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = bundle.unet(sample, 500, encoder_hidden_states=context).sample
        other = context.clone()
        other[:, 77:] = encode_prompts(bundle, ["cat face"])
        changed = bundle.unet(sample, 500, encoder_hidden_states=other).sample
    assert out.shape == sample.shape and not torch.allclose(out, changed, atol=1e-6)


def test_the_second_chunk_changes_the_image(bundle):
    shared = "red apple " * 37 + "red "  # the first 75 tokens of both prompts
    images = generate(bundle, request([LONG, shared + "cat face " * 37], ["", ""]), progress=False)
    assert (images[0] - images[1]).abs().max().item() > 1e-3


def test_a_guided_batch_with_halves_of_different_chunk_counts(bundle, monkeypatch):
    lengths = []
    unet_forward = bundle.unet.forward

    def recording(sample, t, encoder_hidden_states, **kwargs):
        lengths.append(tuple(encoder_hidden_states.shape[:2]))
        return unet_forward(sample, t, encoder_hidden_states=encoder_hidden_states, **kwargs)

    monkeypatch.setattr(bundle.unet, "forward", recording)
    long_negative = "blurry, " * 40  # 80 tokens
    images = generate(bundle, request(["red apple", "cat face"], [long_negative, "blurry"]), progress=False)
    assert images.shape == (2, 3, 64, 64) and images.isfinite().all()
    assert lengths == [(4, 154)] * 2  # both halves, every image: one sequence length
    cut = generate(bundle, request(["red apple", "cat face"], ["blurry, " * 37 + "blurry", "blurry"]), progress=False)
    assert (images[0] - cut[0]).abs().max().item() > 1e-4  # the negative's second chunk counts


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", "a house on a hill, sun, sky."),
        ("red BREAK  apple", "red apple"),
        (r"\(literal\)", "(literal)"),
        ("<lora:x:0.5> cat", "<lora:x:0.5> cat"),
    ],
)
def test_plain_text_drops_the_syntax_only(prompt, expected):
    assert plain_text(prompt) == expected
