"""Textual-inversion embeddings (Gal et al. 2022): words of a prompt that stand for learned vectors.

An :class:`Embedding` is a name and N vectors of the text encoder's width. In a prompt the name, as a word of its own
(not inside a longer run of letters, digits and underscores; any case, since CLIP's tokenizer lowercases), is read as
its N vectors in place of the tokens the word would give, as AUTOMATIC1111's web UI reads embeddings. A name wins over
the vocabulary: an embedding called ``cat`` replaces the word "cat" in every prompt of the run.

:class:`EmbeddingSet` is what the prompt reader (:mod:`ldm.pipeline.prompts`) and the text encoder
(:class:`ldm.models.text_encoder.TextEncoder`) share: the names, and one table of all their vectors. A prompt's token
ids carry an embedding's vectors as negative ids, −1 − j for row j of the table, so that chunks of token ids stay
plain integer tensors (comparable, hashable, packed as any token) and only the text encoder's first lookup changes.
The files they come from are :mod:`ldm.formats.embeddings`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True, kw_only=True)
class Embedding:
    """A word and the vectors it stands for, with what its file says of where it came from."""

    name: str
    vectors: torch.Tensor  # (N, D) float32: N vectors of the text encoder's width D
    path: Path | None = None  # the file it was read from
    hash: str = ""  # A1111's AutoV2 hash of that file: the first 10 hex digits of its sha256 ("TI hashes")
    step: int | None = None  # training steps, where the file records them
    checkpoint: str | None = None  # the hash of the model it was trained on, where recorded (A1111's sd_checkpoint)
    checkpoint_name: str | None = None  # that model's name (sd_checkpoint_name)

    @property
    def width(self) -> int:
        return self.vectors.shape[-1]

    def __len__(self) -> int:
        return self.vectors.shape[0]


def name_pattern(names: Iterable[str]) -> re.Pattern | None:
    """A regex that finds any of ``names`` as a word of its own, case-insensitively, the longest name first where
    one is the start of another; None for no names. Whitespace in a name matches any run of whitespace."""
    names = sorted({n for n in names if n.strip()}, key=lambda n: (-len(n), n))
    if not names:
        return None
    alternatives = "|".join(r"\s+".join(re.escape(part) for part in name.split()) for name in names)
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def canonical(name: str) -> str:
    """The form two names are compared in: lowercase (the tokenizer reads no case), whitespace runs as one space."""
    return " ".join(name.lower().split())


class EmbeddingSet:
    """The embeddings a run's prompts may name: their words, and their vectors as one (M, D) table."""

    def __init__(self, embeddings: Sequence[Embedding]):
        self.embeddings = tuple(embeddings)
        self.index: dict[str, int] = {}
        for i, embedding in enumerate(self.embeddings):
            key = canonical(embedding.name)
            if key in self.index:
                raise ValueError(f"two embeddings are named {embedding.name!r} (names are read without case)")
            self.index[key] = i
        widths = {e.width for e in self.embeddings}
        if len(widths) > 1:
            raise ValueError(f"embeddings of different widths {sorted(widths)} cannot be used together")
        self.pattern = name_pattern(e.name for e in self.embeddings)
        self.first: list[int] = []  # row of each embedding's first vector in the table
        rows = 0
        for embedding in self.embeddings:
            self.first.append(rows)
            rows += len(embedding)
        width = next(iter(widths), 0)
        self.vectors = (torch.cat([e.vectors.float() for e in self.embeddings]) if self.embeddings
                        else torch.zeros(0, width))  # (M, D)  # fmt: skip

    def __len__(self) -> int:
        return len(self.embeddings)

    def __iter__(self):
        return iter(self.embeddings)

    def find(self, name: str) -> Embedding | None:
        i = self.index.get(canonical(name))
        return None if i is None else self.embeddings[i]

    def split(self, text: str) -> list[str | Embedding]:
        """``text`` as its stretches of plain text and the embeddings its words name, in order:
        ``'a ugly-style cat'`` → ``['a ', <ugly-style>, ' cat']``. Text without a name is ``[text]``."""
        if self.pattern is None:
            return [text]
        out: list[str | Embedding] = []
        at = 0
        for match in self.pattern.finditer(text):
            if match.start() > at:
                out.append(text[at : match.start()])
            out.append(self.embeddings[self.index[canonical(match.group(0))]])
            at = match.end()
        if at < len(text) or not out:
            out.append(text[at:])
        return out

    def ids(self, embedding: Embedding) -> list[int]:
        """The negative token ids that stand for ``embedding``'s vectors: −1 − row, one per vector."""
        first = self.first[self.index[canonical(embedding.name)]]
        return [-1 - row for row in range(first, first + len(embedding))]


def names_in(text: str, names: Iterable[str]) -> list[str]:
    """Which of ``names`` occur in ``text`` as words (the way :meth:`EmbeddingSet.split` finds them), each once, as
    given in ``names``; used to load only the embeddings a run's prompts name."""
    by_key = {canonical(n): n for n in names}
    pattern = name_pattern(by_key.values())
    if pattern is None:
        return []
    return list(dict.fromkeys(by_key[canonical(m.group(0))] for m in pattern.finditer(text)))
