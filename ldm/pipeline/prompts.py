"""Prompts as AUTOMATIC1111's web UI reads them: its attention syntax, 75-token chunks, and its weighting rule.

No well-kept PyPI package parses it exactly: compel reads InvokeAI's syntax (``word++``, ``(word)1.1``), not ``[word]``.

**Syntax** (:func:`parse_prompt`). ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by
1.1, ``(text:1.3)`` multiplies it by 1.3; brackets nest and their factors multiply. ``\\(``, ``\\)``, ``\\[``,
``\\]`` and ``\\\\`` are the characters themselves. Unbalanced brackets are read as A1111 reads them: one left open
weights the rest of the prompt, a closing one with nothing open is plain text. ``BREAK``, uppercase and a word of its
own, ends the current chunk. Everything else, ``<``, ``>`` and ``:`` included, is plain text.

**Chunks** (:func:`chunk_prompt`). The fragments are tokenized without start and end tokens, each token keeping its
fragment's weight, and packed into chunks of ``context_length − 2`` tokens (75 for CLIP). A chunk that would
overflow with a comma among its last :data:`COMMA_BACKTRACK` tokens ends after that comma instead, the tokens after
it moving to the next chunk, so a phrase is not cut in two. Each chunk is read by the text encoder on its own as
``start, tokens, end, padding``; a prompt of k chunks gives (k·context_length, D) hidden states.

**Embeddings** (an :class:`~ldm.models.embeddings.EmbeddingSet`). A word of a fragment that names a
textual-inversion embedding is read as its N vectors (negative ids, which the text encoder looks up in the set's
table), each with the fragment's weight, in place of the word's tokens. They count N tokens toward the chunk and are
never split between chunks: an embedding that does not fit in what is left of one starts the next, as in A1111.

**Weights** (:func:`apply_weights`). Each token's hidden state is multiplied by its weight, then the whole chunk is
scaled back to the mean it had unweighted, so emphasis shifts the balance between tokens rather than the overall
magnitude the UNet sees.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from ldm.models.embeddings import Embedding, names_in
from ldm.models.tokenizer import clean

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

    from ldm.models.embeddings import EmbeddingSet

EMPHASIS = 1.1  # the factor of one pair of round brackets; square brackets divide by it
COMMA_BACKTRACK = 20  # a full chunk ends after a comma among its last this many tokens (A1111's default)


class Fragment(NamedTuple):
    """A stretch of prompt text and its weight."""

    text: str
    weight: float


class Marker(enum.Enum):
    """What a parsed prompt holds besides weighted text."""

    BREAK = "BREAK"  # the current chunk ends here


# One piece of prompt syntax per match; the alternatives are tried in this order.
_SYNTAX = re.compile(
    r"""
      \\(?P<escaped>[()\[\]\\])?          # \( \) \[ \] \\ stand for the character; a lone backslash for nothing
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)    # ":1.3)" closes a round bracket with that factor
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+|:)
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")  # with the spaces around it


def parse_prompt(prompt: str) -> list[Fragment | Marker]:
    """The prompt as (text, weight) fragments and BREAK markers, adjacent fragments of one weight merged.

    ``'a (red:1.5) apple'`` → ``[('a ', 1.0), ('red', 1.5), (' apple', 1.0)]``. Weights are multiplied when a bracket
    closes (brackets left open close at the end), in the order A1111 multiplies them, so the floats agree exactly.
    """
    parts: list[list] = []  # [text, weight] or [Marker.BREAK]
    open_round: list[int] = []  # where each open bracket's text starts in parts
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for part in parts[start:]:
            if part[0] is not Marker.BREAK:
                part[1] *= factor

    for match in _SYNTAX.finditer(prompt):
        piece, factor = match.group(0), _number(match.group("weight"))
        if piece.startswith("\\"):
            parts.append([match.group("escaped") or "", 1.0])
        elif piece == "(":
            open_round.append(len(parts))
        elif piece == "[":
            open_square.append(len(parts))
        elif factor is not None and open_round:
            scale(open_round.pop(), factor)
        elif piece == ")" and open_round:
            scale(open_round.pop(), EMPHASIS)
        elif piece == "]" and open_square:
            scale(open_square.pop(), 1 / EMPHASIS)
        else:  # text, and brackets or weights with nothing open to close
            for i, text in enumerate(_BREAK.split(piece)):
                if i:
                    parts.append([Marker.BREAK])
                parts.append([text, 1.0])
    for start in open_round:
        scale(start, EMPHASIS)
    for start in open_square:
        scale(start, 1 / EMPHASIS)

    out: list[Fragment | Marker] = []
    for part in parts or [["", 1.0]]:
        if part[0] is Marker.BREAK:
            out.append(Marker.BREAK)
        elif out and isinstance(out[-1], Fragment) and out[-1].weight == part[1]:
            out[-1] = Fragment(out[-1].text + part[0], part[1])
        else:
            out.append(Fragment(part[0], part[1]))
    return out


def embedding_names(prompt: str, names: list[str]) -> list[str]:
    """Which of ``names`` (of textual-inversion embeddings) ``prompt`` uses, found as :func:`chunk_prompt` finds
    them: words of its fragments, after the syntax is read."""
    text = "\n".join(clean(part.text) for part in parse_prompt(prompt) if isinstance(part, Fragment))
    return names_in(text, names)


def plain_text(prompt: str) -> str:
    """The words of a prompt without its syntax (weights, brackets, escapes; BREAK as a space): what a scorer that
    reads plain text, such as a CLIP score, should be given."""
    parts = [" " if item is Marker.BREAK else item.text for item in parse_prompt(prompt)]
    return re.sub(r"\s+", " ", "".join(parts)).strip()


def _number(text: str | None) -> float | None:
    """``text`` as a float, or None where the digits and dots make none ("1.2.3", "."): then it is plain text."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


Token = tuple[int, float]  # a token id and its weight


def pack_chunks(
    tokens: list[Token | list[Token] | Marker], *, size: int, comma_id: int | None, backtrack: int = COMMA_BACKTRACK
) -> list[list[Token]]:
    """Weighted tokens (and BREAK markers) → chunks of at most ``size`` tokens, as A1111 packs them.

    A token that finds its chunk full starts the next one; if the full chunk has a comma among its last ``backtrack``
    tokens and the token is not itself a comma, the chunk ends after that comma and the tokens after it move along.
    A list of tokens (an embedding's vectors) stays in one chunk: it starts the next one where it does not fit in
    this one. BREAK ends the current chunk, even an empty one. There is always at least one chunk.
    """
    chunks: list[list[Token]] = []
    chunk: list[Token] = []
    comma = -1  # the index of the chunk's last comma, -1 for none

    def close() -> None:
        nonlocal chunk, comma
        chunks.append(chunk)
        chunk, comma = [], -1

    for token in tokens:
        if token is Marker.BREAK:
            close()
            continue
        group = token if isinstance(token, list) else [token]
        if len(group) > size:
            raise ValueError(f"{len(group)} tokens cannot stay together in a chunk of {size}")
        if group[0][0] == comma_id:
            comma = len(chunk)  # where the comma goes (a full chunk passes it on to the next, forgotten there)
        elif len(chunk) == size and comma >= 0 and size - comma <= backtrack:
            moved = chunk[comma + 1 :]
            chunk = chunk[: comma + 1]
            close()
            chunk = moved
        if len(chunk) + len(group) > size:
            close()
        chunk.extend(group)
    if chunk or not chunks:
        close()
    return chunks


@dataclass(frozen=True)
class Chunks:
    """A prompt as the text encoder reads it: k rows of ``start, tokens, end, padding``."""

    ids: torch.Tensor  # (k, L) token ids
    weights: torch.Tensor  # (k, L) float32: each token's weight, 1 for start, end and padding

    def __len__(self) -> int:
        return self.ids.shape[0]

    def padded(self, count: int, filler: Chunks) -> Chunks:
        """These chunks followed by copies of ``filler``'s (one chunk, the empty prompt's) up to ``count``."""
        extra = count - len(self)
        if extra <= 0:
            return self
        return Chunks(torch.cat([self.ids, filler.ids.expand(extra, -1)]),
                      torch.cat([self.weights, filler.weights.expand(extra, -1)]))  # fmt: skip


def chunk_prompt(tokenizer: CLIPTokenizer, prompt: str, *, context_length: int, pad_id: int,
                 embeddings: EmbeddingSet | None = None) -> Chunks:  # fmt: skip
    """``prompt`` parsed (:func:`parse_prompt`), tokenized fragment by fragment and packed into chunks
    (:func:`pack_chunks`) of ``context_length`` tokens with their start, end and ``pad_id`` padding; the words that
    name one of ``embeddings`` become its vectors' negative ids.

    A plain prompt of up to ``context_length − 2`` tokens gives one row, the same as
    :func:`ldm.models.tokenizer.tokenize`. HTML entities are unescaped per fragment (as ``tokenize`` does), after
    parsing, so ``&#40;`` stays a literal bracket.
    """
    parsed = parse_prompt(prompt)
    pieces = {i: embeddings.split(clean(part.text)) if embeddings is not None else [clean(part.text)]
              for i, part in enumerate(parsed) if isinstance(part, Fragment)}  # fmt: skip
    texts = [piece for split in pieces.values() for piece in split if isinstance(piece, str)]
    # verbose=False: a fragment longer than the context is expected here, and chunked, not truncated
    ids = iter(tokenizer(texts, add_special_tokens=False, verbose=False).input_ids if texts else [])
    tokens: list[Token | list[Token] | Marker] = []
    for i, part in enumerate(parsed):
        if part is Marker.BREAK:
            tokens.append(part)
            continue
        for piece in pieces[i]:
            if isinstance(piece, Embedding):
                tokens.append([(token, part.weight) for token in embeddings.ids(piece)])  # kept in one chunk
            else:
                tokens += [(token, part.weight) for token in next(ids)]
    comma_id = tokenizer.convert_tokens_to_ids(",</w>")
    chunks = pack_chunks(tokens, size=context_length - 2, comma_id=comma_id)

    out_ids = torch.full((len(chunks), context_length), pad_id, dtype=torch.long)
    out_weights = torch.ones(len(chunks), context_length)
    for row, chunk in enumerate(chunks):
        ids_row = [tokenizer.bos_token_id, *(t for t, _ in chunk), tokenizer.eos_token_id]
        out_ids[row, : len(ids_row)] = torch.tensor(ids_row)
        out_weights[row, 1 : 1 + len(chunk)] = torch.tensor([w for _, w in chunk], dtype=torch.float32)
    return Chunks(out_ids, out_weights)  # (k, L) each


def apply_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N, L, D) hidden states of N chunks and their (N, L) token weights → the weighted states, A1111's rule:
    ``z *= w`` per token, then ``z *= mean_before / mean_after`` over the chunk (all its tokens and channels).

    A1111 takes both means over the whole batch of prompts; here each chunk has its own, so an image does not depend
    on the prompts it is batched with. Chunks whose weights are all 1 are returned as they are (bit for bit; and
    ``hidden`` itself when every chunk is such). The arithmetic is float32 whatever ``hidden``'s dtype.
    """
    weighted = (weights != 1).any(dim=1).to(hidden.device)  # (N,)
    if not weighted.any():
        return hidden
    z = hidden[weighted].float()  # (n, L, D)
    w = weights.to(hidden.device)[weighted][..., None]  # (n, L, 1)
    before = z.mean(dim=(1, 2), keepdim=True)  # (n, 1, 1)
    z = z * w
    z = z * (before / z.mean(dim=(1, 2), keepdim=True))
    out = hidden.clone()
    out[weighted] = z.to(hidden.dtype)
    return out  # (N, L, D)
