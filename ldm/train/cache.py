"""What UNet training reads: aspect-ratio buckets, the items of a captioned folder, and the feature cache.

**Buckets.** Images of mixed sizes train at (width, height) buckets of about ``resolution²`` pixels whose sides
are multiples of ``step`` (the VAE factor × 2^(UNet levels − 1): 64 px for SD, so every latent level divides
evenly). Each image goes to the bucket nearest its aspect ratio (extreme ones clamp to the extreme buckets), is
resized to cover it and cropped; a batch holds one bucket only (:class:`BucketBatches`).

**Items.** Item ``i`` of an epoch is a pure function of (seed, epoch, i): one generator seeded by
:func:`~ldm.data.item_seed` draws the crop (top, left), the flip and the caption dropout, in that order — the
same first three draws as :func:`~ldm.data.square_tensor`, so the square case crops as ``CaptionedImageDataset``.

**Cache.** The frozen VAE's posterior (mean and log-variance, so a fresh latent is sampled each epoch) of every
centre-cropped image, and of its mirror image when flipping is on, plus the frozen text encoder's hidden states
of every caption and of the empty caption (for caption dropout); for distilling a tiny autoencoder
(``ldm.train.tiny_vae``) also the full decoder's output of each posterior mean. Its key — the VAE's and text
encoder's sha256 from the bundle manifest, resolution, crop, flip, buckets and a hash of the dataset listing (paths,
captions, sizes, file stats) — is stored in the cache's head file; a run whose key differs rebuilds it.

**At scale.** Every process of a multi-process run builds a share of the cache (every N-th VAE and text encoder
call, the calls themselves fixed by the data alone) and writes it as a part file; the main process then writes the
head, which names the parts. Any number of processes reads it back, and its numbers are those one process builds,
call for call: bit for bit where each process runs as many threads as the one did (a convolution's rounding depends
on the thread count and the batch, by about 1e-6 in float32; the calls' batches are fixed, so only threads remain).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ldm.data.config import DataConfig
from ldm.data.dataset import item_seed, read_scanned_image
from ldm.data.scan import ScanReport
from ldm.errors import LdmError
from ldm.images import crop_tensor, fit_tensor, plan_crop
from ldm.io import save_tensors, weights_sha256
from ldm.models.tokenizer import tokenize
from ldm.train.distributed import main_process_object, per_process_batch
from ldm.train.objectives import drop_captions

CACHE_FORMAT = 2  # 2: a head file and one part per building process
Size = tuple[int, int]  # (width, height) in pixels


# --- buckets ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class BucketConfig:
    enabled: bool = False  # False: every image is cropped square at data.resolution
    step: int = 0  # bucket sides are multiples of this many pixels; 0 = VAE factor × 2^(UNet levels − 1)
    max_aspect: float = 4.0  # the widest bucket's width / height (and the tallest's height / width)

    def __post_init__(self):
        if self.step < 0:  # a multiple of the VAE's factor too: checked against the bundle, which knows it
            raise ValueError(f"step must be 0 (auto) or a positive multiple of the VAE's factor, got {self.step}")
        if self.max_aspect < 1:
            raise ValueError(f"max_aspect must be at least 1, got {self.max_aspect}")


def make_buckets(resolution: int, *, step: int, max_aspect: float = 4.0) -> list[Size]:
    """(width, height) buckets with area ≤ resolution², sides multiples of ``step``, aspect ≤ ``max_aspect``.

    Only maximal buckets are kept (none fits inside another of the same width or height); the square one is always
    there. Sorted from the tallest to the widest.
    """
    area = resolution * resolution
    square = max(step, resolution // step * step)
    candidates = {(square, square)}
    for w in range(step, resolution * math.ceil(max_aspect) + step, step):
        h = area // w // step * step
        if h >= step and max(w / h, h / w) <= max_aspect + 1e-9:
            candidates |= {(w, h), (h, w)}
    maximal = {
        (w, h) for w, h in candidates if not any((w2 == w and h2 > h) or (h2 == h and w2 > w) for w2, h2 in candidates)
    }
    return sorted(maximal, key=lambda b: (b[0] / b[1], b[0]))


def nearest_bucket(size: Size, buckets: Sequence[Size]) -> int:
    """Index of the bucket whose aspect ratio is nearest ``size``'s (in log ratio); extremes clamp to the ends."""
    ratio = math.log(max(size[0], 1) / max(size[1], 1))
    return min(range(len(buckets)), key=lambda i: (abs(math.log(buckets[i][0] / buckets[i][1]) - ratio), i))


def assign_buckets(sizes: Sequence[Size], buckets: Sequence[Size], *, min_count: int = 1) -> list[int]:
    """Bucket index per image: nearest aspect ratio, then images of buckets with fewer than ``min_count`` images
    (which could never fill a batch) move to the nearest bucket that is used, smallest bucket first."""
    assignment = [nearest_bucket(size, buckets) for size in sizes]
    while True:
        counts = Counter(assignment)
        small = sorted((n, b) for b, n in counts.items() if n < min_count)
        if not small or len(counts) == 1:
            return assignment
        _, moving = small[0]
        log_ratio = math.log(buckets[moving][0] / buckets[moving][1])
        others = [b for b in counts if b != moving]
        target = min(others, key=lambda b: (abs(math.log(buckets[b][0] / buckets[b][1]) - log_ratio), -counts[b], b))
        assignment = [target if b == moving else b for b in assignment]


def bucket_step(*, vae_factor: int, unet_levels: int) -> int:
    """The pixel multiple at which every UNet level sees a whole number of latent pixels (64 for SD)."""
    return vae_factor * 2 ** (unet_levels - 1)


class BucketBatches:
    """Index batches for one epoch, each from one bucket; the interface of :class:`ldm.train.loop.EpochBatches`.

    Within each bucket the images are permuted and cut into global batches of ``batch_size`` (an incomplete rest is
    dropped), then all global batches are shuffled together; process ``r`` of W takes its ``r``-th slice of
    ``batch_size`` / W. Everything is drawn from one generator seeded by (seed, epoch), so the order is a pure function
    of them, the same for any W.
    """

    def __init__(self, buckets: Sequence[int], batch_size: int, *, seed: int, num_replicas: int = 1, rank: int = 0):
        self.per_process = per_process_batch(batch_size, num_replicas)
        self.batch_size, self.seed, self.num_replicas, self.rank = batch_size, seed, num_replicas, rank
        self.size = len(buckets)
        self.groups = [[i for i, b in enumerate(buckets) if b == key] for key in sorted(set(buckets))]
        if len(self) == 0:
            largest = max((len(g) for g in self.groups), default=0)
            raise LdmError(
                f"no bucket holds a whole batch ({batch_size}; the largest has {largest} images); lower "
                "--set train.batch_size, add data, or turn bucketing off"
            )

    def __len__(self) -> int:
        return sum(len(g) // self.batch_size for g in self.groups)

    def epoch(self, epoch: int, *, start: int = 0) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        span = self.batch_size
        global_batches = []
        for group in self.groups:
            perm = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
            global_batches += [perm[b * span : (b + 1) * span] for b in range(len(group) // span)]
        order = torch.randperm(len(global_batches), generator=generator).tolist()
        lo, hi = self.rank * self.per_process, (self.rank + 1) * self.per_process
        return [global_batches[b][lo:hi] for b in order[start:]]


# --- items -----------------------------------------------------------------------------------------------------------


class UNetItems(Dataset):
    """The usable pairs of a scanned folder, each at its target size.

    Item ``i``: ``caption`` (after dropout), ``index`` and either ``mean``/``logvar`` (C, h, w) from ``cache`` — the
    mirrored entry when the item's flip is drawn — or ``pixel_values`` (3, H, W) in [-1, 1]; with ``pixels`` both
    (inpainting and upscaling training encode a masked or low-res version of the same crop every step). A cache
    built with ``decoded`` adds ``decoded`` (3, H, W), the full decoder's output of ``mean``.
    """

    def __init__(
        self, report: ScanReport, *, targets: Sequence[Size], center_crop: bool, flip_p: float,
        caption_dropout: float = 0.0, seed: int = 0, cache: FeatureCache | None = None, pixels: bool = False,
    ):  # fmt: skip
        if len(targets) != len(report.pairs):
            raise ValueError("one target size per usable pair is needed")
        self.report, self.targets = report, list(targets)
        self.center_crop, self.flip_p, self.caption_dropout = center_crop, flip_p, caption_dropout
        self.seed, self.epoch = seed, 0
        self.cache = cache if cache is not None and cache.has_latents else None
        self.pixels = pixels

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.report.pairs)

    def __getitem__(self, index: int) -> dict:
        pair = self.report.pairs[index]
        generator = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, index))
        plan = plan_crop(
            self.report.sizes[pair.image], self.targets[index], center_crop=self.center_crop, flip_p=self.flip_p,
            generator=generator,
        )  # fmt: skip
        caption = drop_captions([pair.caption], self.caption_dropout, generator)[0]
        item = {}
        if self.cache is not None:
            item["mean"], item["logvar"] = self.cache.latent(index, flipped=plan.flip)
            if self.cache.has_decoded:
                item["decoded"] = self.cache.decoded(index, flipped=plan.flip)
        if self.cache is None or self.pixels:
            item["pixel_values"] = crop_tensor(read_scanned_image(pair), plan)
        return item | {"caption": caption, "index": index}


# --- the feature cache -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    enabled: bool = True  # False (--no-cache): encode every step
    dir: str = ""  # "" = OUTPUT_DIR/cache; share a folder between runs with --cache-dir
    batch_size: int = 16  # images per VAE call while building

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")


class FeatureCache:
    """Encoded features of one dataset: posterior (mean, logvar) per item (and mirrored), hidden states per caption."""

    def __init__(
        self, *, key: dict, latents: dict[str, torch.Tensor] | None, captions: list[str],
        hidden_states: torch.Tensor, path: Path | None = None,
    ):  # fmt: skip
        self.key, self.path = key, path
        self.captions = list(captions)
        self.hidden_states = hidden_states  # (U, L, D) float32
        self._caption_row = {c: i for i, c in enumerate(self.captions)}
        self.tensors = latents or {}
        self._where: dict[int, tuple[str, int]] = {}
        for name, value in self.tensors.items():
            if name.endswith(".index"):
                stem = name.removesuffix(".index")
                self._where |= {int(i): (stem, row) for row, i in enumerate(value.tolist())}

    @property
    def has_latents(self) -> bool:
        return bool(self._where)

    @property
    def has_flipped(self) -> bool:
        return any(name.endswith(".mean_flipped") for name in self.tensors)

    @property
    def has_decoded(self) -> bool:
        return any(name.endswith(".decoded") for name in self.tensors)

    def __len__(self) -> int:
        return len(self._where)

    def latent(self, index: int, *, flipped: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar), each (C, h, w) float32, of item ``index``'s posterior."""
        stem, row = self._where[index]
        suffix = "_flipped" if flipped else ""
        if flipped and f"{stem}.mean_flipped" not in self.tensors:
            raise LdmError("the feature cache holds no mirrored latents; it was built with data.random_flip=0")
        return self.tensors[f"{stem}.mean{suffix}"][row], self.tensors[f"{stem}.logvar{suffix}"][row]

    def decoded(self, index: int, *, flipped: bool = False) -> torch.Tensor:
        """(3, H, W) float32 in about [-1, 1]: the full decoder's output of item ``index``'s posterior mean."""
        stem, row = self._where[index]
        return self.tensors[f"{stem}.decoded{'_flipped' if flipped else ''}"][row]

    def text(self, captions: Sequence[str]) -> torch.Tensor:
        """(B, L, D) float32 hidden states of ``captions`` (each must be in the cache, as must '')."""
        try:
            rows = [self._caption_row[c] for c in captions]
        except KeyError as exc:
            raise LdmError(f"caption {exc} is not in the feature cache; delete {self.path} to rebuild it") from None
        return self.hidden_states[rows]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.tensors.values(), self.hidden_states])


def module_digest(bundle, part: str) -> str:
    """sha256 of a bundle part: the manifest's, or the tensors' own for a bundle never saved."""
    digest = bundle.manifest.get("files", {}).get(f"{part}.safetensors")
    if digest:
        return digest
    return "tensors:" + weights_sha256(bundle.modules()[part])


def listing_hash(report: ScanReport, targets: Sequence[Size]) -> str:
    """sha256 over the usable pairs (relative path, caption, size, file size and mtime — of the shard, with the
    member's offset, for an image in a tar) and their target sizes."""
    h = hashlib.sha256()
    for pair, target in zip(report.pairs, targets):
        stat = pair.file.stat()
        try:
            rel = pair.image.relative_to(report.root)
        except ValueError:
            rel = pair.image
        w, h_ = report.sizes[pair.image]
        at = f"\t@{pair.member.offset}" if pair.member is not None else ""
        line = f"{rel}\t{pair.caption}\t{w}x{h_}\t{stat.st_size}\t{stat.st_mtime_ns}\t{target[0]}x{target[1]}{at}\n"
        h.update(line.encode())
    return h.hexdigest()


def cache_key(
    bundle, data: DataConfig, report: ScanReport, targets: Sequence[Size], *, buckets: Sequence[Size] | None
) -> dict:
    """Everything the cached numbers depend on; a cache whose stored key differs is rebuilt."""
    return {
        "format": CACHE_FORMAT,
        "vae": module_digest(bundle, "vae"),
        "text_encoder": module_digest(bundle, "text_encoder"),
        "resolution": data.resolution,
        "center_crop": data.center_crop,
        "flip": data.random_flip > 0,
        "buckets": [list(b) for b in buckets] if buckets else None,
        "listing": listing_hash(report, targets),
    }


def cache_path(folder: str | Path, data: DataConfig, role: str) -> Path:
    """``FOLDER/<data folder name>-<role>-<hash of its absolute path>.safetensors``."""
    split = f":{data.split}" if data.split else ""  # a named split: a cache of its own
    where = hashlib.sha256(f"{Path(data.path).resolve()}{split}".encode()).hexdigest()[:10]
    return Path(folder) / f"{Path(data.path).name}-{role}-{where}.safetensors"


@torch.no_grad()
def encode_text(bundle, captions: Sequence[str], *, batch_size: int = 64, device=None) -> torch.Tensor:
    """(N, L, D) float32 hidden states of the (frozen) text encoder, as :func:`ldm.pipeline.encode_prompts`."""
    cfg = bundle.config.text_encoder
    out = []
    for start in range(0, len(captions), batch_size):
        ids = tokenize(
            bundle.tokenizer,
            list(captions[start : start + batch_size]),
            context_length=cfg.context_length,
            pad_id=cfg.pad_id,
        )
        out.append(bundle.text_encoder(ids.to(device)).hidden_states.float().cpu())
    return torch.cat(out) if out else torch.zeros(0, cfg.context_length, cfg.width)


@dataclass(frozen=True)
class Chunk:
    """One VAE call of a cache build: up to ``batch_size`` distinct images at one target size, and for each the items
    that share its posterior (a kohya repeat folder's copies). Chunks are numbered in one fixed order, and process
    ``r`` of ``n`` encodes chunks ``r, r + n, r + 2n, …``: the calls are the same whatever the number of processes,
    so a cache built by several is the one built by one."""

    target: Size
    items: tuple[tuple[int, ...], ...]  # per distinct image, its item indices; the first one is read


def plan_chunks(report: ScanReport, targets: Sequence[Size], batch_size: int) -> list[Chunk]:
    """The VAE calls that encode a dataset: by target size (sorted), the distinct images in listing order."""
    by_target: dict[Size, dict[Path, list[int]]] = {}
    for i, target in enumerate(targets):
        by_target.setdefault(tuple(target), {}).setdefault(report.pairs[i].image, []).append(i)
    chunks = []
    for target, images in sorted(by_target.items()):
        groups = [tuple(items) for items in images.values()]
        chunks += [Chunk(target, tuple(groups[s : s + batch_size])) for s in range(0, len(groups), batch_size)]
    return chunks


@torch.no_grad()
def encode_chunks(
    bundle, report: ScanReport, chunks: Sequence[Chunk], *, flip: bool, decoded: bool, device=None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The posteriors of ``chunks``: per target size ``latents.WxH.index`` (item indices) and ``.mean``/``.logvar``
    (one row per index; ``_flipped`` for the mirror images, ``.decoded`` for the decoder's output of each mean)."""
    vae = bundle.vae
    parts: dict[Size, dict[str, list[torch.Tensor]]] = {}
    bar = tqdm(total=sum(len(c.items) for c in chunks), desc="encoding latents", unit="img", disable=not progress,
               leave=False)  # fmt: skip
    for chunk in chunks:
        generator = torch.Generator().manual_seed(0)  # centre crops draw nothing that matters
        x = torch.stack([fit_tensor(read_scanned_image(report.pairs[items[0]]), chunk.target, generator=generator)
                         for items in chunk.items])  # fmt: skip
        n = len(x)
        if flip:
            x = torch.cat([x, x.flip(-1)])  # (2n, 3, H, W): the mirror images in the same VAE call
        dist = vae.encode(x.to(device, vae.dtype)).latent_dist
        encoded = {"mean": dist.mean.float().cpu(), "logvar": dist.logvar.float().cpu()}  # (n or 2n, C, h/f, w/f)
        if decoded:
            encoded["decoded"] = vae.decode(dist.mean).sample.float().cpu()  # (n or 2n, 3, H, W)
        rows = torch.tensor([row for row, items in enumerate(chunk.items) for _ in items])  # item → its image's row
        out = parts.setdefault(chunk.target, {})
        out.setdefault("index", []).append(torch.tensor([i for items in chunk.items for i in items]))
        for name, value in encoded.items():
            out.setdefault(name, []).append(value[:n][rows])
            if flip:
                out.setdefault(f"{name}_flipped", []).append(value[n:][rows])
        bar.update(n)
    bar.close()
    return {f"latents.{w}x{h}.{name}": torch.cat(values) for (w, h), out in parts.items() for name, values in out.items()}


def _merge(parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The tensors of several parts, each name's rows concatenated in part order (indices with their rows)."""
    names = dict.fromkeys(name for part in parts for name in part)
    return {name: torch.cat([part[name] for part in parts if name in part]) for name in names}


def cache_captions(report: ScanReport) -> list[str]:
    """The captions a cache encodes: every distinct one of the usable pairs and the empty one, sorted."""
    return sorted({pair.caption for pair in report.pairs} | {""})


def caption_chunks(count: int, batch_size: int = 64) -> list[range]:
    return [range(s, min(s + batch_size, count)) for s in range(0, count, batch_size)]


@torch.no_grad()
def encode_text_rows(bundle, captions: Sequence[str], chunks: Sequence[range], device=None) -> dict[str, torch.Tensor]:
    """``text.index`` (caption rows) and ``text.hidden_states`` of ``chunks`` of ``captions``, one encoder call each."""
    index = [i for chunk in chunks for i in chunk]
    hidden = [encode_text(bundle, [captions[i] for i in chunk], batch_size=len(chunk), device=device)
              for chunk in chunks] or [encode_text(bundle, [])]  # fmt: skip
    return {"text.index": torch.tensor(index, dtype=torch.int64), "text.hidden_states": torch.cat(hidden)}


def features_of(tensors: dict[str, torch.Tensor], *, key: dict, captions: list[str], path: Path | None = None):
    """A :class:`FeatureCache` from merged parts: the text rows put in caption order."""
    tensors = dict(tensors)
    index, rows = tensors.pop("text.index"), tensors.pop("text.hidden_states")
    if sorted(index.tolist()) != list(range(len(captions))):
        raise ValueError("the cache parts do not hold every caption once")
    hidden = torch.empty_like(rows)
    hidden[index] = rows
    return FeatureCache(key=key, latents=tensors, captions=captions, hidden_states=hidden, path=path)


def encode_share(
    bundle, report: ScanReport, targets: Sequence[Size], *, latents: bool, flip: bool, batch_size: int,
    rank: int = 0, processes: int = 1, device=None, progress: bool = True, decoded: bool = False,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Process ``rank`` of ``processes``'s share of a cache build: every ``processes``-th text encoder call and VAE call
    (centre crops, and their mirror images when ``flip``; with ``decoded`` the VAE's decoder too, on each posterior
    mean), as the tensors of one part."""
    captions = cache_captions(report)
    tensors = encode_text_rows(bundle, captions, caption_chunks(len(captions))[rank::processes], device=device)
    if latents:
        chunks = plan_chunks(report, targets, batch_size)[rank::processes]
        tensors |= encode_chunks(bundle, report, chunks, flip=flip, decoded=decoded, device=device, progress=progress)
    return tensors


# --- the cache on disk: a head file and one part per building process ---------------------------------------------


def part_path(head: Path, rank: int, processes: int) -> Path:
    """``NAME.part-00001-of-00002.safetensors`` beside the head ``NAME.safetensors``."""
    return head.with_name(f"{head.stem}.part-{rank:05d}-of-{processes:05d}{head.suffix}")


def _changed(saved: dict, key: dict) -> list[str]:
    return [name for name in key if saved.get(name) != key[name]] or ["format"]


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("ldm.train.cache", "{}"))
        return meta, {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open is not iterable


def load_cache(path: Path, key: dict) -> tuple[FeatureCache | None, str]:
    """The cache whose head is ``path``, if its key equals ``key`` and every part it lists is there and from the same
    build; else None and why. Any number of processes may read a cache that any number built."""
    if not path.is_file():
        return None, "no cache yet"
    try:
        meta, _ = _read(path)
        if meta.get("key") != key:
            return None, f"{', '.join(_changed(meta.get('key') or {}, key))} changed"
        parts = []
        for name in meta["parts"]:
            if not (path.parent / name).is_file():
                return None, f"part {name} is missing"
            part_meta, tensors = _read(path.parent / name)
            if part_meta.get("build") != meta["build"]:
                return None, f"part {name} is from another build"
            parts.append(tensors)
        cache = features_of(_merge(parts), key=key, captions=meta["captions"], path=path)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types; a damaged cache is simply rebuilt
        return None, f"unreadable ({type(exc).__name__})"
    return cache, "hit"


def _write_part(path: Path, tensors: dict[str, torch.Tensor], *, build: str) -> Path:
    return save_tensors(path, tensors, metadata={"ldm.train.cache": json.dumps({"build": build})})


def _write_head(path: Path, *, key: dict, captions: list[str], parts: list[Path], build: str) -> None:
    """The head, written after every part it lists (a build killed midway leaves no head that matches); parts of an
    earlier build beside it are removed."""
    meta = {"key": key, "captions": captions, "parts": [p.name for p in parts], "build": build}
    save_tensors(path, {"format": torch.tensor([CACHE_FORMAT])}, metadata={"ldm.train.cache": json.dumps(meta)})
    keep = {p.name for p in parts}
    for old in path.parent.glob(f"{path.stem}.part-*-of-*{path.suffix}"):
        if old.name not in keep:
            old.unlink(missing_ok=True)


def load_or_build_cache(
    path: Path | None, *, bundle, data: DataConfig, report: ScanReport, targets: Sequence[Size],
    buckets: Sequence[Size] | None, latents: bool, batch_size: int, device=None,
    log: Callable[[str], None] | None = None, decoded: bool = False, accelerator=None,
) -> FeatureCache:  # fmt: skip
    """The feature cache of a dataset: read from ``path`` when its key matches, else encoded (and written to ``path``;
    ``path`` None: kept in memory only). ``latents`` False caches the text only (random crops cannot be cached);
    ``decoded`` adds the full decoder's output of every posterior mean.

    With ``accelerator`` every process of the run calls this: each encodes its share of the VAE and text encoder
    calls (:class:`Chunk`) and writes it as one part, the main process writes the head, and all then read the whole
    cache. Only the main process logs."""
    main = accelerator is None or accelerator.is_main_process
    processes = 1 if accelerator is None or path is None else accelerator.num_processes
    log = log or (lambda message: print(message, file=sys.stdout, flush=True))
    say = log if main else (lambda message: None)
    key = cache_key(bundle, data, report, targets, buckets=buckets) | {"latents": latents}
    if decoded:
        key["decoded"] = True  # a key of its own: the UNet's caches keep theirs
    share = {"latents": latents, "flip": data.random_flip > 0, "batch_size": batch_size, "device": device,
             "decoded": decoded}  # fmt: skip
    if path is None:
        return features_of(encode_share(bundle, report, targets, **share), key=key, captions=cache_captions(report))
    cache, why = load_cache(path, key) if main else (None, "")
    if processes > 1:
        why = main_process_object(accelerator, "hit" if cache is not None else why)
    if why == "hit":
        cache = cache if cache is not None else _loaded(path, key)
        say(f"feature cache: hit {path} ({len(cache)} latents, {len(cache.captions)} captions); no VAE encoding")
        return cache
    shares = f" by {processes} processes" if processes > 1 else ""
    say(f"feature cache: building {path} ({why}){shares}")
    started = time.monotonic()
    rank = 0 if accelerator is None else accelerator.process_index
    build = uuid.uuid4().hex if processes == 1 else main_process_object(accelerator, uuid.uuid4().hex)
    captions = cache_captions(report)
    tensors = encode_share(bundle, report, targets, rank=rank, processes=processes, progress=main, **share)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [part_path(path, r, processes) for r in range(processes)]
    _write_part(parts[rank], tensors, build=build)
    if processes > 1:
        accelerator.wait_for_everyone()  # every part is on disk
    if main:
        _write_head(path, key=key, captions=captions, parts=parts, build=build)
        mib = sum(p.stat().st_size for p in [path, *parts]) / 2**20
        say(f"feature cache: wrote {path} and {len(parts)} part(s) ({mib:.1f} MiB) in "
            f"{time.monotonic() - started:.1f} s")  # fmt: skip
    if processes > 1:
        accelerator.wait_for_everyone()  # the head is on disk
    return _loaded(path, key)


def _loaded(path: Path, key: dict) -> FeatureCache:
    cache, why = load_cache(path, key)
    if cache is None:
        raise LdmError(f"the feature cache {path} could not be read back ({why}); delete it and start again")
    return cache
