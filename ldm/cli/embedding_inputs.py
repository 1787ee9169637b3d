"""generate.py's textual-inversion embeddings, used by name in the prompt as A1111 uses them.

``--embeddings DIR`` (default ``models/embeddings/`` where it exists): every ``NAME.safetensors`` in it (``.pt`` and
``.bin`` with ``--allow-pickle``) defines the word NAME; ``--embedding FILE`` (repeatable) adds one file, whose word
is its name without the suffix (diffusers' ``learned_embeds`` file: its token). Only the embeddings the prompts name
are read, and each is checked against the model's text encoder before any weights load. The PNG records each
image's as A1111 does (``TI hashes``); ``--from-png`` warns where this run's differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm.cli.lora_inputs import strip_lora_tags
from ldm.errors import LdmError
from ldm.formats.embeddings import check_fits, list_embeddings, pick_file, read_embedding
from ldm.formats.pngmeta import EmbeddingRecord, ImageParameters
from ldm.models.embeddings import EmbeddingSet, canonical
from ldm.models.labels import Conditioning
from ldm.models.presets import ModelConfig
from ldm.pipeline.prompts import embedding_names

DEFAULT_EMBEDDINGS_DIR = Path("models/embeddings")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("textual-inversion embeddings")
    g.add_argument("--embeddings", type=Path, default=None, metavar="DIR",
                   help="where prompts find embeddings by name: each NAME.safetensors in DIR (or below) is the word "
                        f"NAME (default {DEFAULT_EMBEDDINGS_DIR}/ where it exists)")  # fmt: skip
    g.add_argument("--embedding", type=Path, action="append", default=[], metavar="FILE",
                   help="an embedding file whose word is its name without the suffix (repeatable)")  # fmt: skip
    g.add_argument("--allow-pickle", action="store_true",
                   help="read pickled embeddings (.pt, .bin), which can run code when loaded, as weights only")  # fmt: skip


def embeddings_folder(folder: Path | None) -> Path | None:
    """The folder prompts find embeddings in: ``folder`` (which must be one), else ``models/embeddings/`` where it
    exists, else None."""
    if folder is not None and not folder.is_dir():
        raise LdmError(f"--embeddings {folder} is not a folder; pass the folder that holds the embedding files")
    if folder is None and DEFAULT_EMBEDDINGS_DIR.is_dir():
        return DEFAULT_EMBEDDINGS_DIR
    return folder


def resolve(args: argparse.Namespace, texts: list[str], config: ModelConfig) -> EmbeddingSet | None:
    """The run's embeddings: the ``--embedding`` files, and those of ``--embeddings`` that ``texts`` (the prompts
    and the negative prompt) name, read and checked against the model's text encoder; None when there are none."""
    folder = embeddings_folder(args.embeddings)
    if config.conditioning is not Conditioning.TEXT:
        if args.embedding:
            raise LdmError(f"embeddings are words of a text prompt, and this model is {config.conditioning.value}-"
                           "conditioned; leave out --embedding")  # fmt: skip
        return None
    given = [read_embedding(path, allow_pickle=args.allow_pickle) for path in args.embedding]
    taken = {canonical(e.name) for e in given}
    listed = {n: paths for n, paths in (list_embeddings(folder) if folder else {}).items() if canonical(n) not in taken}
    used: list[str] = []
    for text in texts:
        used += [n for n in embedding_names(strip_lora_tags(text), list(listed)) if n not in used]
    loaded = given + [read_embedding(pick_file(n, listed[n]), name=n, allow_pickle=args.allow_pickle) for n in used]
    te = config.text_encoder
    for embedding in loaded:
        check_fits(embedding, width=te.width, context_length=te.context_length)
    try:
        return EmbeddingSet(loaded) if loaded else None
    except ValueError as exc:  # two --embedding files of one name
        raise LdmError(f"{exc}; pass each --embedding once, or rename one file") from None


def record(embeddings: EmbeddingSet | None, texts: list[str]) -> tuple[EmbeddingRecord, ...]:
    """What the PNG records of the embeddings ``texts`` (an image's prompt and negative prompt) name."""
    if embeddings is None:
        return ()
    names = [e.name for e in embeddings]
    used = list(dict.fromkeys(n for text in texts for n in embedding_names(strip_lora_tags(text), names)))
    return tuple(EmbeddingRecord(name=n, hash=embeddings.find(n).hash) for n in used)


def warn_about_embeddings(embeddings: EmbeddingSet | None, recorded: ImageParameters | None, png: Path | None) -> None:
    """Where ``--from-png``'s image was made with embeddings this run lacks, or with other files of their names."""
    if recorded is None:
        return
    for r in recorded.embeddings:
        found = embeddings.find(r.name) if embeddings is not None else None
        if found is None:
            print(f"warning: {png} was made with the embedding {r.name} (hash {r.hash}), which this run lacks, so the "
                  f"word is read as text; put {r.name}.safetensors in --embeddings DIR to reproduce it",
                  file=sys.stderr)  # fmt: skip
        elif found.hash and r.hash != found.hash:
            print(f"warning: {png} was made with the embedding {r.name} of hash {r.hash}, this run's "
                  f"{found.path or r.name} is {found.hash}", file=sys.stderr)  # fmt: skip
