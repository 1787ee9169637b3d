"""Score a text-to-image bundle, or a folder of images with their prompts: CLIP score, FID/KID, VAE reconstructions.

    python -m ldm eval --model runs/unet-emoji/bundle --prompts prompts.txt --images-per-prompt 4 \\
        --reference data/emoji/test --vae-data data/emoji/test --out runs/unet-emoji/eval
    python -m ldm eval --model models/emoji-tiny --prompts data/emoji/test --max-prompts 100 \\
        --reference data/emoji/test --inception inception_v3.safetensors --out eval/emoji-tiny
    python -m ldm eval --images eval/emoji-tiny/images --clip runs/clip-emoji/clip.safetensors \\
        --reference data/emoji/test --out eval/rescored

* **CLIP score** (Hessel et al. 2021): 100·max(cos(image, prompt), 0), averaged over the images, with the CLIP of
  ``--clip`` or else the bundle's own ``clip.safetensors`` (``train_clip.py`` puts it there). No CLIP: skipped,
  with a note in the report.
* **FID** (Heusel et al. 2017) and **KID** (Bińkowski et al. 2018) of the images against ``--reference``: on the
  2048-d pool features of torchvision's Inception-v3 when ``--inception`` gives its weights, otherwise on the
  CLIP's normalised image embeddings. Numbers from different feature extractors are not comparable: the report
  names the one used.
* **VAE** PSNR, SSIM and MAE of the bundle's reconstructions of ``--vae-data`` (:func:`ldm.eval.reconstruction.evaluate_folder`).

Generation is batched and seeded: image j of every prompt starts from seed ``--seed`` + j, so a grid column shares
its starting noise and an image does not depend on the batch it was made in. ``OUT/`` gets ``eval.json``,
``eval.md``, ``grid-NNN.png`` (one row per prompt, one column per seed) and, for generated images, ``images/`` with
a ``metadata.jsonl`` (an imagefolder that ``--images`` reads back, e.g. to rescore with another CLIP).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from ldm import accel
from ldm.data import DataConfig, list_dataset, scan_dataset
from ldm.data.dataset import read_scanned_image
from ldm.errors import LdmError
from ldm.eval.metrics import (
    KID_SUBSET_SIZE,
    KID_SUBSETS,
    clip_score,
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
)
from ldm.eval.reconstruction import evaluate_folder, load_inception_features
from ldm.formats.bundle import CLIP_FILE, Bundle, load_bundle, read_config
from ldm.formats.pngmeta import ImageParameters, save_png
from ldm.images import find_images, pil_to_uint8, read_rgb, square_resize, to_uint8, uint8_to_pil, uint8_to_unit
from ldm.io import write_json, write_text
from ldm.models.clip import IMAGE_RANGE, encode_text, load_clip, read_clip_metadata
from ldm.models.tokenizer import build_tokenizer, tokenize
from ldm.pipeline import Request, check_settings, generate
from ldm.pipeline.prompts import plain_text
from ldm.pipeline.schedule import get_sampler
from ldm.runtime import resolve_device, resolve_dtype

GRID_ROWS = 16  # prompts per grid page: a page stays a viewable picture however many prompts there are

ImageFeatures = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) in [0, 1] → (B, D)


# --- config --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class GenerationSettings:
    """How the images to score are made; image j of every prompt uses seed ``seed + j``."""

    images_per_prompt: int = 1
    batch_size: int = 8
    steps: int = 20
    guidance_scale: float = 7.5
    sampler: str = "dpmpp_2m"
    seed: int = 0
    width: int | None = None  # None: the bundle's training size
    height: int | None = None
    negative_prompt: str = ""
    deep_cache: int = 0  # 0: exact sampling; N ≥ 2: the whole UNet every N-th step only (ldm.accel.deepcache)
    token_merging: float = 0.0  # 0: exact; R: a fraction R of the finest self-attention's tokens merged (ldm.accel.tome)
    backend: accel.Backend = accel.Backend.TORCH  # what runs the UNet (OpenVINO: fp32 on the CPU, ldm.accel.openvino)

    def __post_init__(self):
        if self.images_per_prompt < 1 or self.batch_size < 1:
            raise LdmError("--images-per-prompt and --batch-size must be at least 1")
        accel.check(deep_cache=self.deep_cache, token_merging=self.token_merging, backend=self.backend)


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """One evaluation: what to score (generated from ``model`` + ``prompts``, or ``images``) and against what."""

    out: Path
    model: Path | None = None
    loras: tuple[tuple[Path, float], ...] = ()  # LoRA files merged into the model at their scales (e.g. an LCM-LoRA)
    prompts: tuple[str, ...] = ()
    images: Path | None = None  # captioned folder of ready images (any ldm.data layout) instead of generating
    layout: tuple[tuple[str, object], ...] = ()  # DataConfig layout settings for --images (and a --prompts folder)
    clip: Path | None = None  # None: the bundle's clip.safetensors, if it has one
    reference: Path | None = None  # images for FID/KID
    inception: Path | None = None  # torchvision Inception-v3 state dict; None: CLIP image features
    vae_data: Path | None = None  # images for the VAE's PSNR/SSIM/MAE
    vae_size: int | None = None  # resize/crop vae_data images to this square side; None: as they are
    generation: GenerationSettings = GenerationSettings()
    kid_subsets: int = KID_SUBSETS
    kid_subset_size: int = KID_SUBSET_SIZE
    feature_batch_size: int = 32
    device: str = "auto"
    dtype: str = "fp32"
    progress: bool = True


# --- images --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Samples:
    """The images to score, each with its prompt (and its seed, when generated here)."""

    prompts: list[str]  # N
    images: list[torch.Tensor]  # N × (3, H, W) uint8
    seeds: list[int | None]  # N
    names: list[str] = field(default_factory=list)  # N file names (folder) or [] (generated)
    skipped: int = 0  # images of the folder left out: no caption, unreadable, truncated, empty

    def __len__(self) -> int:
        return len(self.images)


def unit_batches(images: Sequence[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive same-sized uint8 (3, H, W) images as float (B, 3, H, W) batches in [0, 1], in order."""
    start = 0
    while start < len(images):
        shape, end = images[start].shape, start + 1
        while end < len(images) and end - start < batch_size and images[end].shape == shape:
            end += 1
        yield uint8_to_unit(torch.stack(list(images[start:end])))  # (B, 3, H, W)
        start = end


def file_batches(paths: Sequence[Path], batch_size: int) -> Iterator[torch.Tensor]:
    """Image files read ``batch_size`` at a time (not all at once) as float (B, 3, H, W) batches in [0, 1]."""
    for start in range(0, len(paths), batch_size):
        yield from unit_batches([read_rgb(p) for p in paths[start : start + batch_size]], batch_size)


def read_prompts(source: str | Path, *, limit: int | None = None, layout: dict | None = None) -> list[str]:
    """Prompts from a text file (one per line, blank lines skipped) or the captions of a dataset folder (distinct,
    in file order; ``layout``: its DataConfig layout settings, default detected); the first ``limit`` of them."""
    path = Path(source)
    if path.is_dir():
        listing = list_dataset(DataConfig(path=str(path), **(layout or {})))
        prompts = list(dict.fromkeys(pair.caption for pair in listing.pairs))
    elif path.is_file():
        try:
            prompts = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise LdmError(f"prompt file {path} is not UTF-8 text; pass a text file with one prompt per line") from None
    else:
        raise LdmError(f"prompt file {path} not found; pass a text file with one prompt per line, or a dataset folder")
    if not prompts:
        raise LdmError(f"{path} holds no prompts; write one prompt per line")
    return prompts[:limit]


def read_samples(folder: Path, *, progress: bool = True, layout: dict | None = None) -> Samples:
    """The usable (image, caption) pairs of a captioned folder (any :mod:`ldm.data` layout; ``layout``: its
    DataConfig layout settings, default detected), images as uint8."""
    report = scan_dataset(DataConfig(path=str(folder), min_side=1, **(layout or {})), progress=progress)
    if not report.pairs:
        raise LdmError(f"no usable image/caption pairs in {folder}; run `python -m ldm data check {folder}`")
    pairs = report.distinct_pairs  # a kohya repeat folder's images are scored once
    reading = tqdm(pairs, desc="reading images", disable=not progress)
    images = [pil_to_uint8(read_scanned_image(pair)) for pair in reading]
    return Samples(
        prompts=[pair.caption for pair in pairs], images=images, seeds=[None] * len(images),
        names=[str(pair.image.relative_to(report.root)) for pair in pairs], skipped=report.skipped_images,
    )  # fmt: skip


def generation_requests(bundle: Bundle, prompts: Sequence[str], settings: GenerationSettings) -> list[Request]:
    """Prompt-major jobs (all seeds of prompt 0, then prompt 1, …) cut into batches of ``batch_size``."""
    sampler = get_sampler(settings.sampler)
    width = settings.width or bundle.config.default_size
    height = settings.height or bundle.config.default_size
    jobs = [(p, settings.seed + j) for p in prompts for j in range(settings.images_per_prompt)]
    return [
        Request(
            prompts=[p for p, _ in batch], negative_prompts=[settings.negative_prompt] * len(batch),
            seeds=[s for _, s in batch], steps=settings.steps, guidance_scale=settings.guidance_scale,
            sampler=sampler, width=width, height=height,
        )
        for batch in (jobs[i : i + settings.batch_size] for i in range(0, len(jobs), settings.batch_size))
    ]


def generate_samples(
    bundle: Bundle, prompts: Sequence[str], settings: GenerationSettings, *, progress: bool = True
) -> Samples:
    """Make ``images_per_prompt`` images of every prompt with :func:`ldm.pipeline.generate`, batch by batch; the
    approximations asked for (``deep_cache``, ``token_merging``) and the backend are on for these images only."""
    requests = generation_requests(bundle, prompts, settings)
    samples = Samples(prompts=[], images=[], seeds=[])
    bar = tqdm(total=sum(len(r.seeds) for r in requests), desc="generating", unit="img", disable=not progress)
    with accel.prepared(bundle, deep_cache=settings.deep_cache, token_merging=settings.token_merging,
                        backend=settings.backend):  # fmt: skip
        for request in requests:
            images = generate(bundle, request, progress=False)  # (B, 3, H, W) in [0, 1]
            samples.prompts.extend(request.prompts)
            samples.seeds.extend(request.seeds)
            samples.images.extend(to_uint8(images))
            bar.update(len(request.seeds))
    bar.close()
    return samples


# --- features ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scorer:
    """A CLIP loaded for scoring: open_clip model, its config, where it came from, and the pipeline's tokenizer."""

    model: torch.nn.Module
    config: object  # ldm.models.clip.CLIPModelConfig
    path: Path
    tokenizer: object  # CLIPTokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_scorer(path: Path, *, device: torch.device | str = "cpu") -> Scorer:
    try:
        model, config = load_clip(path)
    except RuntimeError as exc:  # weights that do not fit the config in the file's own metadata
        raise LdmError(f"{path}: the CLIP weights do not fit their config ({str(exc).splitlines()[0][:100]}); "
                       "pass the clip.safetensors that train_clip.py wrote") from None  # fmt: skip
    return Scorer(model.to(device), config, path, build_tokenizer(context_length=config.text.context_length))


def clip_image_features(scorer: Scorer) -> ImageFeatures:
    """(B, 3, H, W) in [0, 1] → (B, E) normalised CLIP image embeddings (square crop, resized to the tower's size)."""
    size = scorer.config.vision.image_size
    low, high = IMAGE_RANGE

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        x = square_resize(images.float(), size).to(scorer.device) * (high - low) + low  # (B, 3, S, S) in [-1, 1]
        return scorer.model.encode_image(x, normalize=True).float().cpu()  # (B, E)

    return features


@torch.no_grad()
def clip_text_features(scorer: Scorer, prompts: Sequence[str], *, batch_size: int = 256) -> torch.Tensor:
    """(N,) prompts → (N, E) normalised CLIP text embeddings, each distinct prompt encoded once. The prompt syntax
    (weights, BREAK) is the generator's, not words: CLIP reads the plain text (:func:`ldm.pipeline.prompts.plain_text`)."""
    distinct = list(dict.fromkeys(prompts))
    text = scorer.config.text
    chunks = []
    for start in range(0, len(distinct), batch_size):
        words = [plain_text(p) for p in distinct[start : start + batch_size]]
        ids = tokenize(scorer.tokenizer, words, context_length=text.context_length, pad_id=text.pad_id)  # (b, L)
        chunks.append(encode_text(scorer.model, ids.to(scorer.device), normalize=True).float().cpu())  # (b, E)
    table = torch.cat(chunks)  # (P, E)
    index = {p: i for i, p in enumerate(distinct)}
    return table[torch.tensor([index[p] for p in prompts])]  # (N, E)


def extract(
    features: ImageFeatures, batches: Iterator[torch.Tensor], *, total: int, desc: str, progress: bool = True
) -> torch.Tensor:
    """Run ``features`` over float (B, 3, H, W) batches; (N, D) float64 on the CPU."""
    out = []
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for batch in batches:
            out.append(features(batch).double().cpu())
            bar.update(batch.shape[0])
    return torch.cat(out)


@dataclass(frozen=True)
class Extractor:
    """A feature extractor for FID/KID and the name the report gives it."""

    name: str  # "inception-v3" or "clip-image"
    path: Path
    features: ImageFeatures


# --- metrics -------------------------------------------------------------------------------------------------------


def score_prompts(scorer: Scorer, samples: Samples, *, batch_size: int, progress: bool = True) -> torch.Tensor:
    """Per-image CLIP score of ``samples`` against their own prompts: (N,) float64."""
    image_f = extract(clip_image_features(scorer), unit_batches(samples.images, batch_size), total=len(samples),
                      desc="CLIP image features", progress=progress)  # (N, E)  # fmt: skip
    text_f = clip_text_features(scorer, samples.prompts)  # (N, E)
    return clip_score(image_f, text_f)  # (N,)


def distances(fake: torch.Tensor, real: torch.Tensor, *, kid_subsets: int, kid_subset_size: int) -> dict:
    """FID and KID (mean ± std over subsets) between (M, D) ``fake`` and (N, D) ``real`` features."""
    fid = frechet_distance(*feature_statistics(real), *feature_statistics(fake))
    kid, kid_std = kernel_inception_distance(real, fake, subsets=kid_subsets, subset_size=kid_subset_size)
    return {"fid": fid, "kid": kid, "kid_std": kid_std}


def per_prompt(samples: Samples, scores: torch.Tensor | None) -> list[dict]:
    """One entry per distinct prompt, in order of first appearance: its images' seeds or names and mean score."""
    rows: dict[str, dict] = {}
    for i, prompt in enumerate(samples.prompts):
        row = rows.setdefault(prompt, {"prompt": prompt, "images": [], "scores": []})
        row["images"].append(samples.names[i] if samples.names else samples.seeds[i])
        if scores is not None:
            row["scores"].append(float(scores[i]))
    for row in rows.values():
        values = row.pop("scores")
        row["clip_score"] = sum(values) / len(values) if values else None
    return list(rows.values())


# --- outputs -------------------------------------------------------------------------------------------------------


def prompt_grids(samples: Samples, *, rows_per_page: int = GRID_ROWS) -> list[tuple[list[str], Image.Image]]:
    """Pages of one row per distinct prompt (its images left to right) and the prompts of their rows.

    Cells take the first image's size (others are resized to it); short rows are padded with white.
    """
    groups: dict[str, list[torch.Tensor]] = {}
    for prompt, image in zip(samples.prompts, samples.images, strict=True):
        groups.setdefault(prompt, []).append(image)
    height, width = samples.images[0].shape[-2:]
    columns = max(len(g) for g in groups.values())
    prompts = list(groups)
    pages = []
    for start in range(0, len(prompts), rows_per_page):
        page = prompts[start : start + rows_per_page]
        grid = Image.new("RGB", (columns * width, len(page) * height), "white")
        for r, prompt in enumerate(page):
            for c, image in enumerate(groups[prompt]):
                cell = uint8_to_pil(image)
                if cell.size != (width, height):
                    cell = cell.resize((width, height), Image.Resampling.BICUBIC)
                grid.paste(cell, (c * width, r * height))
        pages.append((page, grid))
    return pages


def save_generated(samples: Samples, folder: Path, *, bundle: Bundle, settings: GenerationSettings) -> list[dict]:
    """Every generated image as ``folder/NNNNN-SEED.png`` (with its generation parameters) and a metadata.jsonl."""
    sampler = get_sampler(settings.sampler)
    rows = []
    for i, (prompt, seed, image) in enumerate(zip(samples.prompts, samples.seeds, samples.images, strict=True)):
        name = f"{i:05d}-{seed}.png"
        params = ImageParameters(
            prompt=prompt, negative_prompt=settings.negative_prompt, steps=settings.steps, sampler=sampler.label,
            guidance_scale=settings.guidance_scale, seed=seed, width=image.shape[-1], height=image.shape[-2],
            model_hash=bundle.model_hash, model=bundle.name, deep_cache=settings.deep_cache,
            token_merging=settings.token_merging, backend=settings.backend.recorded,
        )  # fmt: skip
        save_png(uint8_to_pil(image), folder / name, params.text())
        rows.append({"file_name": name, "text": prompt, "seed": seed})
    write_text(folder / "metadata.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    return rows


def _fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(report: dict) -> str:
    """eval.md: the headline numbers as one table, then the notes, grids and per-prompt scores."""
    source = report["source"]
    what = f"{source['images']} images of {source['prompts']} prompts"
    if source["kind"] == "generated":
        g = source["settings"]
        what += f" from bundle `{source['model']}` ({g['steps']} steps, {g['sampler']}, CFG {g['guidance_scale']})"
    elif source["kind"] == "folder":
        what += f" from `{source['folder']}`"
    clip, features, reference, vae = report["clip"], report["features"], report["reference"], report["vae"]
    rows = [("CLIP score", _fmt(report["clip_score"], 2), f"CLIP `{clip['path']}`" if clip else "skipped")]
    if report["fid"] is not None:
        against = f"{features['name']} features vs `{reference['folder']}` ({reference['images']} images)"
        subsets = f"mean ± std over {report['kid_subsets']} subsets of {report['kid_subset_size']} a side"
        rows += [("FID", _fmt(report["fid"], 3), against),
                 ("KID", f"{report['kid']:.5f} ± {report['kid_std']:.5f}", subsets)]  # fmt: skip
    else:
        rows += [("FID", "—", "skipped"), ("KID", "—", "skipped")]
    if vae is not None:
        rows += [("VAE PSNR (dB)", _fmt(vae["psnr"], 2), f"`{vae['folder']}`, {vae['count']} images"),
                 ("VAE SSIM", _fmt(vae["ssim"], 4), ""), ("VAE MAE", _fmt(vae["mae"], 4), "")]  # fmt: skip
    lines = [f"# Evaluation\n\n{what}.\n", "| metric | value | notes |", "| --- | --- | --- |"]
    lines += [f"| {metric} | {value} | {note} |" for metric, value, note in rows]
    if report["notes"]:
        lines += ["", *(f"- {note}" for note in report["notes"])]
    if report["grids"]:
        lines += ["", "## Grids (one row per prompt)", ""]
        for grid in report["grids"]:
            lines.append(f"- `{grid['file']}`: " + "; ".join(f"{i + 1}. {p}" for i, p in enumerate(grid["prompts"])))
    if report["prompts"] and report["clip_score"] is not None:
        lines += ["", "## CLIP score per prompt", "", "| prompt | images | CLIP score |", "| --- | --- | --- |"]
        lines += [f"| {_cell(p['prompt'])} | {len(p['images'])} | {p['clip_score']:.2f} |" for p in report["prompts"]]
    return "\n".join(lines) + "\n"


def summary(report: dict, out: Path) -> str:
    """The one line printed at the end."""
    parts = ["CLIP score " + (f"{report['clip_score']:.2f}" if report["clip_score"] is not None else "skipped")]
    if report["fid"] is not None:
        parts.append(f"FID {report['fid']:.3f}, KID {report['kid']:.5f} ({report['features']['name']} features, "
                     f"{report['source']['images']} vs {report['reference']['images']} images)")  # fmt: skip
    if report["vae"] is not None:
        v = report["vae"]
        parts.append(f"VAE PSNR {v['psnr']:.2f} dB, SSIM {v['ssim']:.4f}, MAE {v['mae']:.4f}")
    return " | ".join(parts) + f" → {out / 'eval.json'}"


# --- the run -------------------------------------------------------------------------------------------------------


def check_inputs(cfg: EvalConfig) -> None:
    """Everything the flags alone decide, before any model is loaded or image made."""
    if cfg.images is None and cfg.model is None:
        raise LdmError("nothing to evaluate; pass --model BUNDLE with --prompts FILE or --prompt TEXT, or --images DIR")
    if cfg.images is not None and cfg.prompts:
        raise LdmError("pass --images DIR (images already made) or prompts to generate from, not both")
    if cfg.images is None and not cfg.prompts and cfg.vae_data is None:
        raise LdmError("no prompts; pass --prompts FILE (one prompt per line) or --prompt TEXT, or --images DIR")
    if cfg.images is not None and not cfg.images.is_dir():
        raise LdmError(f"image folder {cfg.images} not found; pass a captioned image folder (any ldm.data layout)")
    if cfg.vae_data is not None and cfg.model is None:
        raise LdmError("--vae-data needs a bundle whose VAE to measure; pass --model BUNDLE")
    config = read_config(cfg.model) if cfg.model is not None else None  # its sizes, before its weights load
    factor = config.vae.downsampling_factor if config is not None else None  # None: no model, no VAE, nothing made
    if cfg.vae_size is not None and factor is not None and (cfg.vae_size < 16 or cfg.vae_size % factor):
        raise LdmError(f"--vae-size must be a multiple of {factor} (the VAE's downsampling factor) of at least 16 "
                       f"(the SSIM window), got {cfg.vae_size}")  # fmt: skip
    if cfg.kid_subsets < 1 or cfg.kid_subset_size < 2:
        raise LdmError("--kid-subsets must be at least 1 and --kid-subset-size at least 2; try 100 and 1000")
    for flag, folder in (("--reference", cfg.reference), ("--vae-data", cfg.vae_data)):
        if folder is not None and not Path(folder).is_dir():
            raise LdmError(f"{flag} folder {folder} not found; pass a folder of PNG, JPEG or WebP images")
        if folder is not None:
            find_images(folder)
    if cfg.clip is not None:
        read_clip_metadata(cfg.clip)
    if cfg.inception is not None and not cfg.inception.is_file():
        raise LdmError(f"no Inception weights at {cfg.inception}; pass a torchvision inception_v3 state dict")
    g = cfg.generation
    get_sampler(g.sampler)
    size = config.default_size if config is not None else 1  # no model, nothing made: sizes need only be positive
    check_settings(steps=g.steps, width=g.width or size, height=g.height or size, guidance_scale=g.guidance_scale,
                   factor=factor)  # fmt: skip


def find_clip(cfg: EvalConfig, bundle: Bundle | None) -> tuple[Path | None, str]:
    """The CLIP to score with and where it came from; (None, why) when there is none."""
    if cfg.clip is not None:
        return cfg.clip, "--clip"
    if bundle is not None:
        path = bundle.extras.get(CLIP_FILE) or (cfg.model / CLIP_FILE)
        if Path(path).is_file():
            return Path(path), "bundle"
        return None, (f"CLIP score skipped: bundle {cfg.model} has no {CLIP_FILE} (train_clip.py writes one); "
                      "pass --clip FILE")  # fmt: skip
    return None, "CLIP score skipped: no CLIP; pass --clip FILE (the clip.safetensors train_clip.py wrote)"


def evaluate(cfg: EvalConfig) -> dict:
    """Run the evaluation ``cfg`` describes, write its files to ``cfg.out`` and return the report (eval.json)."""
    check_inputs(cfg)
    device = resolve_device(cfg.device)
    accel.check(backend=cfg.generation.backend, dtype=cfg.dtype, device=device.type)  # before any model is loaded
    notes: list[str] = []
    bundle = load_bundle(cfg.model) if cfg.model is not None else None
    if bundle is not None and cfg.loras:
        from ldm.train.lora import apply_loras

        apply_loras(bundle, list(cfg.loras))
    if bundle is not None:
        bundle.to(device, resolve_dtype(cfg.dtype, device))

    clip_path, clip_from = find_clip(cfg, bundle)
    scorer = load_scorer(clip_path, device=device) if clip_path is not None else None
    if scorer is None:
        notes.append(clip_from)
    extractor = None
    if cfg.inception is not None:
        extractor = Extractor("inception-v3", cfg.inception, load_inception_features(cfg.inception, device=device))
    elif scorer is not None:
        extractor = Extractor("clip-image", scorer.path, clip_image_features(scorer))
    elif cfg.reference is not None:
        notes.append("FID/KID skipped: no feature extractor; pass --inception FILE or a CLIP (--clip FILE)")

    report: dict = {
        "clip_score": None, "clip_score_std": None, "fid": None, "kid": None, "kid_std": None,
        "kid_subsets": cfg.kid_subsets, "kid_subset_size": cfg.kid_subset_size, "vae": None, "clip": None,
        "features": None, "reference": None, "prompts": [], "grids": [], "notes": notes,
    }  # fmt: skip
    samples = None
    if cfg.images is not None:
        samples = read_samples(cfg.images, progress=cfg.progress, layout=dict(cfg.layout))
        report["source"] = {"kind": "folder", "folder": str(cfg.images), "images": len(samples),
                            "prompts": len(set(samples.prompts)), "skipped": samples.skipped}  # fmt: skip
        if samples.skipped:
            notes.append(f"{samples.skipped} images of {cfg.images} left out (no caption or unreadable); "
                         f"see `python -m ldm data check {cfg.images}`")  # fmt: skip
    elif cfg.prompts:
        g = cfg.generation
        g = replace(g, width=g.width or bundle.config.default_size, height=g.height or bundle.config.default_size)
        samples = generate_samples(bundle, cfg.prompts, g, progress=cfg.progress)
        save_generated(samples, cfg.out / "images", bundle=bundle, settings=g)
        report["source"] = {"kind": "generated", "model": str(cfg.model),
                             "loras": [[str(path), scale] for path, scale in cfg.loras], "model_hash": bundle.short_hash,
                            "images": len(samples), "prompts": len(set(samples.prompts)), "images_folder": "images",
                            "settings": {**asdict(g), "sampler": get_sampler(g.sampler).name,
                                         "backend": g.backend.value}}  # fmt: skip
    else:
        report["source"] = {"kind": "none", "model": str(cfg.model), "images": 0, "prompts": 0}

    if samples is not None:
        scores = None
        if scorer is not None:
            scores = score_prompts(scorer, samples, batch_size=cfg.feature_batch_size, progress=cfg.progress)  # (N,)
            report["clip_score"] = float(scores.mean())
            report["clip_score_std"] = float(scores.std(unbiased=False))
            report["clip"] = {"path": str(scorer.path), "from": clip_from}
        report["prompts"] = per_prompt(samples, scores)
        for k, (page, grid) in enumerate(prompt_grids(samples)):
            name = f"grid-{k:03d}.png"
            save_png(grid, cfg.out / name)
            report["grids"].append({"file": name, "prompts": page})

    if cfg.reference is not None and extractor is not None and samples is not None:
        references = find_images(cfg.reference)
        report["features"] = {"name": extractor.name, "path": str(extractor.path)}
        report["reference"] = {"folder": str(cfg.reference), "images": len(references)}
        if len(samples) < 2 or len(references) < 2:
            notes.append(f"FID/KID skipped: they need 2+ images a side, got {len(samples)} and {len(references)}")
        else:
            fake = extract(extractor.features, unit_batches(samples.images, cfg.feature_batch_size), total=len(samples),
                           desc="features", progress=cfg.progress)  # (M, D)  # fmt: skip
            real = extract(extractor.features, file_batches(references, cfg.feature_batch_size), total=len(references),
                           desc="reference features", progress=cfg.progress)  # (N, D)  # fmt: skip
            report["features"]["dim"] = fake.shape[1]
            report |= distances(fake, real, kid_subsets=cfg.kid_subsets, kid_subset_size=cfg.kid_subset_size)
            report["kid_subset_size"] = min(cfg.kid_subset_size, len(samples), len(references))  # what was used
            if min(len(samples), len(references)) < fake.shape[1]:
                notes.append(f"FID from {len(samples)} and {len(references)} images of {fake.shape[1]}-d features: "
                             "biased upwards with few images; compare only runs with the same counts")  # fmt: skip

    if cfg.vae_data is not None:
        vae = evaluate_folder(bundle, cfg.vae_data, size=cfg.vae_size, batch_size=cfg.feature_batch_size,
                              progress=cfg.progress)  # fmt: skip
        report["vae"] = {**vae, "folder": str(cfg.vae_data)}

    write_json(cfg.out / "eval.json", report)
    write_text(cfg.out / "eval.md", markdown(report))
    return report
