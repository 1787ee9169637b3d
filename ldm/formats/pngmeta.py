"""Generation parameters in a PNG ``parameters`` text chunk, in the A1111 layout that A1111 and ComfyUI read::

    red apple, glossy
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 64x64, Model hash: 1a2b3c4d5e,
    Model: emoji-tiny, Lora hashes: "style: 0f1e2d3c4b", TI hashes: "my-style: 9a8b7c6d5e"

(on one line). The sampler is written as current A1111 writes it, the schedule type apart (``Sampler: DPM++ 2M,
Schedule type: Karras``); the older joined form (``Sampler: DPM++ 2M Karras``) is read too. Entries this module does
not know (an extension's) are kept in :attr:`ImageParameters.extra` and written back.

:class:`ImageParameters` is what one image records, typed; it writes the text (:meth:`ImageParameters.text`) and
reads it back (:meth:`ImageParameters.from_text`), so the keys and their order live here only.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
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
    """The ``parameters`` text: the prompt, the negative prompt's line when there is one, then ``Key: value, ...``."""
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


def _png_info(parameters: str | None) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text(KEY, parameters)
    return info


def save_png(image: Image.Image, path: str | Path, parameters: str | None = None) -> Path:
    """A PNG written atomically, with the A1111 ``parameters`` chunk when given."""
    info = _png_info(parameters)
    return atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def png_bytes(image: Image.Image, parameters: str | None = None) -> bytes:
    """The bytes :func:`save_png` writes, in memory (an HTTP response's image)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=_png_info(parameters))
    return buffer.getvalue()


MAX_TEXT = 1 << 16  # characters of a parameters chunk: A1111 writes a few hundred, a long prompt a few thousand


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
    if len(text) > MAX_TEXT:
        raise LdmError(f"{path}'s '{KEY}' chunk is {len(text):,} characters, more than the {MAX_TEXT:,} that settings "
                       "take; it is not a generation record")  # fmt: skip
    return text


# A1111's "VAE Decoder" setting ("Full", the default, is not written): the decode by TAESD, a tiny autoencoder.
TINY_DECODER = "TAESD"

# A1111's "Schedule type" names; "Automatic" is the sampler's own. ldm's labels join the type to the sampler's name
# ("DPM++ 2M Karras"), as A1111 wrote them before it had the entry.
SCHEDULE_TYPES = ("Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
                  "Align Your Steps", "Simple", "Normal", "DDIM", "Beta")  # fmt: skip


def split_sampler(label: str) -> tuple[str, str | None]:
    """An ldm sampler label as A1111's (Sampler, Schedule type): "DPM++ 2M Karras" → ("DPM++ 2M", "Karras")."""
    for kind in SCHEDULE_TYPES[1:]:
        if label.endswith(" " + kind) and len(label) > len(kind) + 1:
            return label[: -len(kind) - 1], kind
    return label, None


def join_sampler(sampler: str, schedule_type: str | None) -> str:
    """Inverse of :func:`split_sampler`; the "Automatic" type (or none) is the sampler alone."""
    if schedule_type in (None, "", "Automatic") or sampler.endswith(" " + schedule_type):
        return sampler
    return f"{sampler} {schedule_type}"


def _listing(value: str) -> list[tuple[str, str]]:
    """``"a: x, b: y"`` (A1111's Lora hashes) as [(a, x), (b, y)]."""
    return [tuple(part.strip() for part in item.rsplit(":", 1)) for item in value.split(",") if ":" in item]


@dataclass(frozen=True, kw_only=True)
class LoraRecord:
    """One LoRA merged into the model: its file name, scale and AutoV2 hash (first 10 hex digits of its sha256)."""

    name: str
    scale: float = 1.0
    hash: str | None = None

    @property
    def short_name(self) -> str:
        """The name A1111 gives it in ``<lora:NAME:…>`` and ``Lora hashes``: the file name without its suffix."""
        return Path(self.name).stem


@dataclass(frozen=True, kw_only=True)
class EmbeddingRecord:
    """A textual-inversion embedding a prompt used: its name (the word) and the AutoV2 hash of its file."""

    name: str
    hash: str


@dataclass(frozen=True, kw_only=True)
class ImageParameters:
    """What made one image, as its PNG's ``parameters`` records it (A1111's keys, and ldm's own for the rest).

    Optional entries are written only when they say something: a batch of more than one image, a LoRA, a dtype, the
    fast path, an approximation, a version.
    """

    prompt: str
    negative_prompt: str = ""
    steps: int
    sampler: str  # the A1111 label, e.g. "DPM++ 2M" (ldm.pipeline.schedule.Sampler.label)
    guidance_scale: float
    seed: int
    width: int
    height: int
    model_hash: str | None = None  # the bundle's short hash
    model: str | None = None  # the bundle's name
    # a VAE swapped in at generation time (generate.py --vae), in A1111's keys; None: the model's own
    vae: str | None = None  # its file or folder name
    vae_hash: str | None = None  # the first 10 hex digits of its weights' sha256
    tiny_vae: bool = False  # decoded by the bundle's tiny autoencoder (generate.py --tiny-vae): A1111's "VAE Decoder"
    batch_size: int = 1  # the UNet batch the image was made in, and its place there: the numbers depend on them
    batch_pos: int = 0
    loras: tuple[LoraRecord, ...] = ()  # the LoRAs merged in, in order
    embeddings: tuple[EmbeddingRecord, ...] = ()  # the embeddings the prompt and negative prompt name ("TI hashes")
    dtype: str | None = None  # "fp32", "bf16", "fp16"; None: not recorded
    fast: bool = False  # made on the fast path (ldm.accel.fast)
    deep_cache: int = 0  # the deep-feature reuse interval (ldm.accel.deepcache); 0: exact
    token_merging: float = 0.0  # the token-merging ratio (ldm.accel.tome); 0: exact
    backend: str | None = None  # what ran the UNet where not torch ("openvino": ldm.accel.openvino)
    version: str | None = None  # e.g. "ldm 0.1.0"
    clip_skip: int = 1  # A1111's "Clip skip", written when above 1 as A1111 does
    # img2img and inpainting (A1111's keys where it has them); None: not used. Files are recorded by path and sha256.
    strength: float | None = None  # "Denoising strength"
    resize_mode: str | None = None  # A1111's label, e.g. "Crop and resize"
    init_image: str | None = None
    init_image_hash: str | None = None
    mask: str | None = None
    mask_hash: str | None = None
    mask_blur: int | None = None
    masked_content: str | None = None  # "original", "latent noise", "latent nothing"
    only_masked: bool = False  # "Inpaint area: Only masked" (else "Whole picture")
    masked_padding: int | None = None  # "Masked area padding", with only_masked
    outpaint: str | None = None  # "left,top,right,bottom" pixels
    # latent upscaling of the image after it was made
    upscaler: str | None = None  # the upscaler bundle's path
    upscaler_hash: str | None = None  # its short hash
    upscale_steps: int | None = None
    noise_level: int | None = None
    extra: tuple[tuple[str, str], ...] = ()  # entries ldm does not read (another tool's), kept as they were

    @property
    def lora(self) -> str | None:
        """The LoRA files' names, comma-separated; None without one."""
        return ", ".join(r.name for r in self.loras) or None

    def settings(self) -> dict[str, object]:
        """The ``Key: value`` pairs of the last line, in A1111's order and then ldm's."""
        pairs: dict[str, object] = {
            "Steps": self.steps, "Sampler": split_sampler(self.sampler)[0],
        }  # fmt: skip
        if (schedule_type := split_sampler(self.sampler)[1]) is not None:
            pairs["Schedule type"] = schedule_type
        pairs |= {"CFG scale": self.guidance_scale, "Seed": self.seed, "Size": f"{self.width}x{self.height}"}
        if self.clip_skip > 1:
            pairs["Clip skip"] = self.clip_skip
        if self.model_hash is not None:
            pairs["Model hash"] = self.model_hash
        if self.model is not None:
            pairs["Model"] = self.model
        if self.vae is not None:
            pairs |= {"VAE hash": self.vae_hash, "VAE": self.vae}
        if self.tiny_vae:
            pairs["VAE Decoder"] = TINY_DECODER
        if self.batch_size > 1:
            pairs |= {"Batch size": self.batch_size, "Batch pos": self.batch_pos}
        if self.loras:  # one: "Lora: a.safetensors, Lora scale: 0.8"; several: both entries as lists
            pairs |= {"Lora": self.lora, "Lora scale": ", ".join(str(r.scale) for r in self.loras)}
            if all(r.hash for r in self.loras):
                pairs["Lora hashes"] = ", ".join(f"{r.short_name}: {r.hash}" for r in self.loras)
        if self.embeddings:
            pairs["TI hashes"] = ", ".join(f"{r.name}: {r.hash}" for r in self.embeddings)
        if self.dtype is not None:
            pairs["Dtype"] = self.dtype
        if self.fast:
            pairs["Fast"] = "on"
        if self.backend is not None:
            pairs["Backend"] = self.backend
        if self.deep_cache:
            pairs["Deep cache"] = self.deep_cache
        if self.token_merging:
            pairs["Token merging ratio"] = self.token_merging
        if self.init_image is not None:
            pairs["Denoising strength"] = self.strength
            if self.resize_mode is not None:
                pairs["Resize mode"] = self.resize_mode
            pairs |= {"Init image": self.init_image, "Init image hash": self.init_image_hash}
        if self.mask is not None or self.outpaint is not None:
            if self.mask is not None:
                pairs |= {"Mask": self.mask, "Mask hash": self.mask_hash}
            pairs |= {"Mask blur": self.mask_blur, "Masked content": self.masked_content,
                      "Inpaint area": "Only masked" if self.only_masked else "Whole picture"}  # fmt: skip
            if self.only_masked:
                pairs["Masked area padding"] = self.masked_padding
            if self.outpaint is not None:
                pairs["Outpaint"] = self.outpaint
        if self.upscaler is not None:
            pairs |= {"Upscaler": self.upscaler, "Upscaler hash": self.upscaler_hash,
                      "Upscale steps": self.upscale_steps, "Noise level": self.noise_level}  # fmt: skip
        if self.version is not None:
            pairs["Version"] = self.version
        return pairs | {key: value for key, value in self.extra if key not in pairs}

    def text(self) -> str:
        """The ``parameters`` chunk's text."""
        return format_parameters(self.prompt, self.negative_prompt, self.settings())

    @classmethod
    def from_text(cls, text: str) -> ImageParameters:
        """Inverse of :meth:`text`; also reads A1111's own PNGs (keys it does not know are kept in ``extra``).

        Raises :class:`KeyError` or :class:`ValueError` (naming the entry) when a needed entry is missing or garbled,
        and :class:`LdmError` when there is no settings line at all.
        """
        prompt, negative, s = parse_parameters(text)
        width, height = (int(v) for v in s["Size"].split("x"))
        size, pos = int(s.get("Batch size", 1)), int(s.get("Batch pos", 0))
        if size < 1 or not 0 <= pos < size:
            raise ValueError(f"'Batch pos: {pos}' of 'Batch size: {size}' (a position from 0 below a size of 1 or more)")
        extra = tuple((k, v) for k, v in s.items() if k not in KNOWN_KEYS)
        return cls(
            prompt=prompt, negative_prompt=negative, steps=int(s["Steps"]),
            sampler=join_sampler(s["Sampler"], s.get("Schedule type")), loras=_loras(s), extra=extra,
            embeddings=tuple(EmbeddingRecord(name=n, hash=h) for n, h in _listing(s.get("TI hashes", ""))),
            guidance_scale=float(s["CFG scale"]), seed=int(s["Seed"]), width=width, height=height,
            model_hash=s.get("Model hash"), model=s.get("Model"), batch_size=int(s.get("Batch size", 1)),
            vae=s.get("VAE"), vae_hash=s.get("VAE hash"), tiny_vae=s.get("VAE Decoder") == TINY_DECODER,
            batch_pos=int(s.get("Batch pos", 0)),
            dtype=s.get("Dtype"), fast=s.get("Fast") == "on", deep_cache=int(s.get("Deep cache", 0)),
            token_merging=float(s.get("Token merging ratio", 0)), version=s.get("Version"), backend=s.get("Backend"),
            strength=_maybe(float, s.get("Denoising strength")), resize_mode=s.get("Resize mode"),
            init_image=s.get("Init image"), init_image_hash=s.get("Init image hash"), mask=s.get("Mask"),
            mask_hash=s.get("Mask hash"), mask_blur=_maybe(int, s.get("Mask blur")),
            masked_content=s.get("Masked content"), only_masked=s.get("Inpaint area") == "Only masked",
            masked_padding=_maybe(int, s.get("Masked area padding")), outpaint=s.get("Outpaint"),
            upscaler=s.get("Upscaler"), upscaler_hash=s.get("Upscaler hash"),
            upscale_steps=_maybe(int, s.get("Upscale steps")), noise_level=_maybe(int, s.get("Noise level")),
            clip_skip=int(s.get("Clip skip", 1)),
        )  # fmt: skip


# Every key ImageParameters writes, so every key it reads: the rest are another tool's, kept in ``extra``.
KNOWN_KEYS = frozenset(
    ImageParameters(prompt="", steps=1, sampler="DPM++ 2M Karras", guidance_scale=1.0, seed=0, width=1, height=1,
                    model_hash="", model="", vae="", tiny_vae=True, batch_size=2, loras=(LoraRecord(name="x", hash="x"),), dtype="",
                    embeddings=(EmbeddingRecord(name="x", hash="x"),),
                    fast=True, deep_cache=2, token_merging=0.5, backend="", version="", init_image="", resize_mode="", mask="",
                    only_masked=True, outpaint="", upscaler="", clip_skip=2).settings()
)  # fmt: skip


def _loras(s: dict[str, str]) -> tuple[LoraRecord, ...]:
    """The ``Lora`` and ``Lora scale`` entries (one name and scale, or comma-separated lists) with ``Lora hashes``."""
    if "Lora" not in s:
        return ()
    names = [n.strip() for n in s["Lora"].split(",")]
    scales = [float(v) for v in s.get("Lora scale", "").split(",") if v.strip()] or [1.0] * len(names)
    if len(scales) != len(names):
        raise ValueError(f"'Lora scale: {s.get('Lora scale')}' (one scale for each of {len(names)} LoRAs)")
    hashes = dict(_listing(s.get("Lora hashes", "")))
    return tuple(LoraRecord(name=n, scale=v, hash=hashes.get(Path(n).stem)) for n, v in zip(names, scales))


def _maybe(kind: type, value: str | None):
    """``kind(value)``, or None for an entry that is not there."""
    return None if value is None else kind(value)
