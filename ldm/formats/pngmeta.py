"""Generation parameters in a PNG ``parameters`` text chunk, in the A1111 layout that A1111 and ComfyUI read::

    red apple, glossy
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 64x64, Model hash: 1a2b3c4d5e, Model: emoji-tiny
"""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image, PngImagePlugin

from ldm.errors import LdmError
from ldm.io import atomic_write

KEY = "parameters"
_NEGATIVE = "Negative prompt: "
_PAIR = re.compile(r'\s*([A-Za-z][\w ]*?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _quote(value: str) -> str:
    text = str(value)
    if any(c in text for c in ',:"\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value[1:-1])
    return value


def format_parameters(prompt: str, negative_prompt: str, settings: dict[str, object]) -> str:
    lines = [prompt]
    if negative_prompt:
        lines.append(_NEGATIVE + negative_prompt)
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in settings.items()))
    return "\n".join(lines)


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, settings) from a ``parameters`` text; inverse of :func:`format_parameters`."""
    *head, last = text.rstrip("\n").split("\n")
    if not _PAIR.match(last) or "Steps:" not in last:
        raise LdmError("the PNG's parameters text has no settings line (Steps: …); it was not written by a generator")
    settings = {m.group(1).strip(): _unquote(m.group(2)) for m in _PAIR.finditer(last) if m.group(0).strip()}
    prompt_lines, negative_lines, target = [], [], None
    for line in head:
        if line.startswith(_NEGATIVE):
            target = negative_lines
            line = line[len(_NEGATIVE) :]
        (target if target is not None else prompt_lines).append(line)
    return "\n".join(prompt_lines), "\n".join(negative_lines), settings


def save_png(image: Image.Image, path: str | Path, parameters: str | None = None) -> Path:
    """A PNG written atomically, with the A1111 ``parameters`` chunk when given."""
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text(KEY, parameters)
    return atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_png_parameters(path: str | Path) -> str:
    path = Path(path)
    try:
        with Image.open(path) as image:
            text = image.info.get(KEY) or getattr(image, "text", {}).get(KEY)
    except FileNotFoundError:
        raise LdmError(f"{path} not found; pass a PNG written by generate.py") from None
    except OSError:
        raise LdmError(f"{path} is not a readable image; pass a PNG written by generate.py") from None
    if not text:
        raise LdmError(f"{path} has no '{KEY}' text chunk; pass a PNG written by generate.py (or A1111)")
    return text
