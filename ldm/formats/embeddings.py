"""Textual-inversion embedding files in the layouts they are shared in, read into
:class:`~ldm.models.embeddings.Embedding` and written for other tools.

Read (told apart by their keys):

- A1111's safetensors, as A1111, ComfyUI and model sites share them: one tensor ``emb_params`` (N, D);
- A1111's own ``.pt``: a pickled dict ``{"string_to_param": {"*": (N, D)}, "name": ..., "step": ...}``, and the same
  saved as safetensors, where the key becomes ``string_to_param.*``;
- diffusers' ``learned_embeds.safetensors`` / ``.bin``: ``{TOKEN: (N, D) or (D,)}``, one entry.

Pickles (``.pt``, ``.bin``) can run code when unpickled: they are read only with ``allow_pickle``, and then through
``torch.load(weights_only=True)``, which unpickles tensors and plain containers only. SDXL's two-encoder files
(``clip_l`` and ``clip_g``) are refused: every ldm model has one text encoder.

Written (:func:`save_a1111`, :func:`save_diffusers`): the first and the last layout, atomically. A folder of embeddings
(:func:`list_embeddings`) defines one word per file, the file's name without its suffix, as A1111's embeddings folder
does.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ldm.errors import LdmError
from ldm.io import save_tensors, sha256_file
from ldm.models.embeddings import Embedding, canonical

SUFFIXES = (".safetensors", ".pt", ".bin")  # what an embeddings folder's files may end in
PICKLE_SUFFIXES = (".pt", ".bin", ".ckpt", ".pth")
A1111_KEY = "emb_params"
DIFFUSERS_NAME = "learned_embeds"  # diffusers' file name, whose one key is the token
KNOWN_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL's second text encoder"}


def list_embeddings(folder: str | Path) -> dict[str, list[Path]]:
    """The words a folder of embeddings defines: every ``NAME.safetensors``, ``.pt`` or ``.bin`` in it or below
    (sorted; hidden files left out) defines ``NAME``. Each name maps to its files: more than one when two files share
    a name (in any case), which :func:`pick_file` refuses where the name is used."""
    folder = Path(folder)
    found: dict[str, list[Path]] = {}
    spelled: dict[str, str] = {}  # canonical name → the first spelling seen
    files = (p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file()) if folder.is_dir() else ()
    for path in sorted(files, key=lambda p: (len(p.relative_to(folder).parts), str(p))):
        if any(part.startswith(".") for part in path.relative_to(folder).parts) or not path.stem.strip():
            continue
        name = spelled.setdefault(canonical(path.stem), path.stem)
        found.setdefault(name, []).append(path)
    return found


def pick_file(name: str, paths: list[Path]) -> Path:
    """The one file of the word ``name``; two are an error, since which one a prompt meant is unknown."""
    if len(paths) > 1:
        raise LdmError(f"the embedding {name!r} is defined by {len(paths)} files ({', '.join(map(str, paths))}); "
                       "rename or remove all but one")  # fmt: skip
    return paths[0]


def is_pickle(path: Path) -> bool:
    """A torch pickle by its first bytes (a zip archive, as torch.save writes, or a pickle's protocol opcode), or by
    its suffix where the bytes are no safetensors header (whose JSON starts at byte 8)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":
        return False
    return head[:4] == b"PK\x03\x04" or head[:1] == b"\x80" or path.suffix.lower() in PICKLE_SUFFIXES


def read_embedding(path: str | Path, *, name: str | None = None, allow_pickle: bool = False) -> Embedding:
    """The embedding in ``path``, named ``name`` (default: the file's name without its suffix; for diffusers'
    ``learned_embeds`` file, its token). Every problem is one :class:`LdmError` line that says what to do."""
    path = Path(path)
    if not path.is_file():
        raise LdmError(f"no embedding file at {path}; check the path")
    if is_pickle(path):
        if not allow_pickle:
            raise LdmError(f"{path} is a pickle, which can run code when loaded; pass --allow-pickle to read it as "
                           "weights only (torch.load(weights_only=True)), or use a .safetensors embedding")  # fmt: skip
        data, info = _read_pickle(path)
    else:
        data, info = _read_safetensors(path)
    key, vectors = _vectors(data, path)
    if name is None:
        name = key if path.stem == DIFFUSERS_NAME and key not in (A1111_KEY, "string_to_param.*", "*") else path.stem
    return Embedding(name=name, vectors=vectors, path=path, hash=sha256_file(path)[:10], step=_int(info.get("step")),
                     checkpoint=_text(info.get("sd_checkpoint")), checkpoint_name=_text(info.get("sd_checkpoint_name")))  # fmt: skip


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            info = dict(f.metadata() or {})
            data = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        reason = " ".join(str(exc).split())[:120]
        raise LdmError(f"cannot read the embedding {path} ({reason}); the file is damaged or truncated: download "
                       "it again") from None  # fmt: skip
    return data, info


def _read_pickle(path: Path) -> tuple[dict, dict]:
    import pickle

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as exc:
        reason = " ".join(str(exc).split())[:120]
        raise LdmError(f"{path} does not load as weights only ({reason}); it holds more than tensors, or is damaged: "
                       "convert it to .safetensors with the tool that made it, or download it again") from None  # fmt: skip
    if not isinstance(data, dict):
        raise LdmError(f"{path} holds a {type(data).__name__}, not an embedding's dict; pass an A1111 or diffusers "
                       "embedding file")  # fmt: skip
    params = data.get("string_to_param")
    if isinstance(params, dict):  # A1111's .pt: the vectors under string_to_param, the rest beside them
        return {f"string_to_param.{k}": v for k, v in params.items()}, data
    return data, {}


def _vectors(data: dict, path: Path) -> tuple[str, torch.Tensor]:
    """(key, (N, D) float32 vectors) of a file's tensors, by the layout its keys show."""
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    params = [k for k in tensors if k.startswith("string_to_param.")]
    if A1111_KEY in tensors:
        key = A1111_KEY
    elif len(params) == 1:
        key = params[0]
    elif {"clip_l", "clip_g"} <= set(tensors):
        raise LdmError(f"{path} is an SDXL embedding (clip_l and clip_g, for two text encoders); ldm's models have "
                       "one: use an embedding trained for SD 1.x or 2.x, or for this model")  # fmt: skip
    elif len(tensors) == 1 and not params:
        key = next(iter(tensors))
    else:
        found = ", ".join(sorted(str(k) for k in data)[:8]) or "none"
        raise LdmError(f"{path} holds no embedding ldm recognises (keys found: {found}); an embedding file holds "
                       f"{A1111_KEY} (A1111), string_to_param (A1111's .pt) or one TOKEN entry (diffusers)")  # fmt: skip
    vectors = tensors[key]
    if vectors.dim() == 1:
        vectors = vectors[None]  # (D,) → (1, D): diffusers writes one vector flat
    if vectors.dim() != 2 or 0 in vectors.shape or not vectors.is_floating_point():
        raise LdmError(f"{path}: {key} is a {str(vectors.dtype).removeprefix('torch.')} tensor of shape "
                       f"{list(vectors.shape)}, not (vectors, width) floats; pass an embedding file")  # fmt: skip
    vectors = vectors.float()
    if not torch.isfinite(vectors).all():
        raise LdmError(f"{path}: {key} holds NaN or infinite values; the embedding is damaged: train it again")
    return key, vectors.contiguous()


def check_fits(embedding: Embedding, *, width: int, context_length: int) -> None:
    """An embedding must be of the text encoder's width, and fit in one prompt chunk (context − start and end)."""
    if embedding.width != width:
        where = embedding.path or embedding.name
        raise LdmError(f"the embedding {where} is {embedding.width} wide{_known(embedding.width)}, and this model's "
                       f"text encoder is {width} wide{_known(width)}; use an embedding trained for this model")  # fmt: skip
    if len(embedding) > context_length - 2:
        raise LdmError(f"the embedding {embedding.name!r} has {len(embedding)} vectors; a prompt chunk holds "
                       f"{context_length - 2}: use an embedding of fewer vectors")  # fmt: skip


def _known(width: int) -> str:
    """What a width is known as, in brackets: " (SD 1.x)" for 768."""
    return f" ({KNOWN_WIDTHS[width]})" if width in KNOWN_WIDTHS else ""


def save_a1111(path: str | Path, embedding: Embedding) -> Path:
    """``{"emb_params": (N, D)}``, what A1111 and ComfyUI load from an embeddings folder; the name, steps and base
    model go in the safetensors metadata (as strings, which other readers ignore)."""
    info = {"name": embedding.name, "step": embedding.step, "sd_checkpoint": embedding.checkpoint,
            "sd_checkpoint_name": embedding.checkpoint_name}  # fmt: skip
    metadata = {k: str(v) for k, v in info.items() if v is not None}
    return save_tensors(path, {A1111_KEY: embedding.vectors.float()}, metadata=metadata)


def save_diffusers(path: str | Path, embedding: Embedding) -> Path:
    """``{TOKEN: (N, D)}``, diffusers' ``learned_embeds.safetensors`` (``load_textual_inversion`` reads it)."""
    return save_tensors(path, {embedding.name: embedding.vectors.float()})


def _int(value) -> int | None:
    if isinstance(value, int):
        return value
    return int(value) if isinstance(value, str) and re.fullmatch(r"\d+", value) else None


def _text(value) -> str | None:
    return value if isinstance(value, str) and value else None
