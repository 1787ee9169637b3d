"""The CLIP BPE tokenizer, offline, from the vocabulary file that open_clip_torch ships.

open_clip's ``bpe_simple_vocab_16e6.txt.gz`` holds the merges; the vocabulary is the 256 byte symbols, the same
with the end-of-word mark ``</w>``, one entry per merge and the two special tokens — 49408 ids, identical to
OpenAI CLIP. From it we write the ``vocab.json``/``merges.txt`` pair that transformers' ``CLIPTokenizer`` reads.
"""

from __future__ import annotations

import gzip
import html
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import CLIPTokenizer

if TYPE_CHECKING:
    from ldm.models.embeddings import EmbeddingSet

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408
_NUM_MERGES = VOCAB_SIZE - 256 * 2 - 2


def open_clip_bpe_path() -> Path:
    from open_clip.tokenizer import default_bpe

    return Path(default_bpe())


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-character table (Radford et al. 2019)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}  # printable bytes first: their order fixes the ids
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + len(table) - len(printable))
    return table


def vocab_and_merges(bpe_path: Path | None = None) -> tuple[dict[str, int], list[str]]:
    """The CLIP vocabulary (token → id) and merge list derived from open_clip's BPE file."""
    lines = gzip.open(bpe_path or open_clip_bpe_path(), "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 1 + _NUM_MERGES]  # line 0 is a version header
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [START_TOKEN, END_TOKEN]
    if len(tokens) != VOCAB_SIZE:
        raise ValueError(f"{bpe_path}: expected {VOCAB_SIZE} tokens, derived {len(tokens)}")
    return {t: i for i, t in enumerate(tokens)}, merges


def build_tokenizer(*, context_length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer with open_clip's ids. Padding is done by :func:`tokenize`, not by the tokenizer."""
    vocab, merges = vocab_and_merges()
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
        vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizer(
            str(vocab_file),
            str(merges_file),
            bos_token=START_TOKEN,
            eos_token=END_TOKEN,
            unk_token=END_TOKEN,
            pad_token=END_TOKEN,
            model_max_length=context_length,
        )


_VOLATILE = ("is_local", "local_files_only", "name_or_path")


def save_tokenizer(tokenizer: CLIPTokenizer, folder: Path) -> None:
    """``save_pretrained`` without the keys that record where the tokenizer was loaded from, and with its
    vocabulary file written compactly (a third smaller than transformers' indented JSON)."""
    tokenizer.save_pretrained(str(folder))
    vocab_path = Path(folder, "tokenizer.json")
    if vocab_path.is_file():
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        vocab_path.write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    config_path = Path(folder, "tokenizer_config.json")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in _VOLATILE:
        config.pop(key, None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def load_tokenizer(folder: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def clean(text: str) -> str:
    """open_clip unescapes HTML entities before tokenizing ("&amp;" → "&"); transformers does not."""
    return html.unescape(html.unescape(text))


def token_count(tokenizer: CLIPTokenizer, prompt: str) -> int:
    """Tokens in ``prompt`` including the start and end tokens."""
    return len(tokenizer(clean(prompt)).input_ids)


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str], *, context_length: int, pad_id: int,
             embeddings: EmbeddingSet | None = None) -> torch.Tensor:  # fmt: skip
    """(B, context_length) token ids: start, text (truncated), end, then ``pad_id``; the words that name one of
    ``embeddings`` as its vectors' negative ids (:mod:`ldm.models.embeddings`).

    SD 1.x pads with the end token, SD 2.x with 0. Padding here rather than through the tokenizer's pad token
    keeps "!" (id 0) an ordinary character in prompts.
    """
    if embeddings is None:
        ids = tokenizer([clean(p) for p in prompts], truncation=True, max_length=context_length).input_ids
    else:
        ids = _with_embeddings(tokenizer, prompts, embeddings, context_length=context_length)
    out = torch.full((len(prompts), context_length), pad_id, dtype=torch.long)
    for row, seq in enumerate(ids):
        out[row, : len(seq)] = torch.tensor(seq)
    return out  # (B, context_length)


def _with_embeddings(tokenizer: CLIPTokenizer, prompts: list[str], embeddings: EmbeddingSet, *,
                     context_length: int) -> list[list[int]]:  # fmt: skip
    """Each prompt's ids as :func:`tokenize` makes them, its embedding words as their negative ids."""
    splits = [embeddings.split(clean(p)) for p in prompts]
    texts = [piece for split in splits for piece in split if isinstance(piece, str)]
    tokens = iter(tokenizer(texts, add_special_tokens=False, verbose=False).input_ids if texts else [])
    rows = []
    for split in splits:
        row = []
        for piece in split:
            row += next(tokens) if isinstance(piece, str) else embeddings.ids(piece)
        rows.append([tokenizer.bos_token_id, *row[: context_length - 2], tokenizer.eos_token_id])
    return rows
