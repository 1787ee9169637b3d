"""Distil a tiny autoencoder (:mod:`ldm.models.tiny_autoencoder`) from a bundle's VAE, and put it into the bundle.

The tiny decoder learns to map the VAE's latents of the training images (posterior means × the scaling factor, the
latents the diffusion model sees) to what the full decoder makes of them, and the tiny encoder to map the images to
those latents (as TAESD is trained, Bohan 2023). The loss is the decoder's pixel distance to the full decoder's
output (L1 or L2, ``loss.reconstruction``; plus an LPIPS-style term with ``loss.perceptual_weights``) and the
encoder's squared error to the latents; the two halves share no weights, so each term trains its own half.

Both targets come from the frozen VAE once, through the feature cache (:mod:`ldm.train.cache`: per image and per
mirror image the posterior and the full decoder's output of its mean), so a step runs the tiny autoencoder only.
The posterior's spread is left out: a trained VAE's is far below a latent's precision that the decoder resolves.

:func:`run` is the whole run: the data, the tiny autoencoder, the step, the sample grids, the end (the held-out
comparison with the full decoder in ``OUT/eval.json``, and the tiny autoencoder into the bundle, in place, in the
dtype of the bundle's VAE).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from torch import nn

from ldm.data import CaptionedImageDataset, DataConfig, held_out, report_dataset
from ldm.errors import LdmError
from ldm.eval.metrics import psnr, ssim
from ldm.formats.bundle import Bundle, add_tiny_vae, check_tiny_vae, load_bundle, read_config
from ldm.images import signed_to_unit
from ldm.models.presets import get_tiny_preset
from ldm.models.tiny_autoencoder import TinyAutoencoderConfig, build_tiny_autoencoder, tiny_decode, tiny_encode
from ldm.train.cache import CacheConfig, UNetItems, cache_path, load_or_build_cache
from ldm.train.distributed import scan_share
from ldm.train.loop import (
    Progress,
    StepFn,
    TrainConfig,
    TrainingState,
    backward_step,
    begin_run,
    check_training_size,
    held_run,
    image_grid,
    log_grid,
    make_ema,
    make_lr_scheduler,
    make_optimizer,
    resolve_resume,
    train_loop,
)
from ldm.train.losses import PerceptualLoss, Reconstruction, reconstruction_loss

TINY_TRAIN = TrainConfig(output_dir="runs/tiny-vae", batch_size=16, lr=1e-3, max_steps=5000, grad_clip=1.0)


@dataclass(frozen=True, kw_only=True)
class TinyLossConfig:
    reconstruction: Reconstruction = Reconstruction.L1  # the decoder's distance to the full decoder's pixels
    perceptual_weights: str | None = None  # VGG16 safetensors (losses.PerceptualLoss): an LPIPS term on top
    perceptual_weight: float = 0.1

    def __post_init__(self):
        if not self.perceptual_weight >= 0:
            raise ValueError(f"perceptual_weight must be at least 0, got {self.perceptual_weight}")


@dataclass(frozen=True, kw_only=True)
class TinyVAERunConfig:
    bundle: str  # whose VAE is distilled; the tiny autoencoder is written into it at the end
    data: DataConfig
    model: TinyAutoencoderConfig | None = None  # None: the preset's, with the bundle's latent channels
    preset: str = "taesd"  # ldm.models.presets.TINY_AUTOENCODER_PRESETS
    eval_data: str = ""  # held-out folder: the comparison with the full decoder; "": the data's test/ split
    train: TrainConfig = TINY_TRAIN
    loss: TinyLossConfig = field(default_factory=TinyLossConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    sample_images: int = 8  # images in each sample grid


def with_model(cfg: TinyVAERunConfig) -> TinyVAERunConfig:
    """``cfg`` with its model filled in when the run config leaves it out: the preset's, for the bundle's VAE."""
    if cfg.model is not None:
        return cfg
    vae = read_config(cfg.bundle).vae
    return replace(cfg, model=get_tiny_preset(cfg.preset, latent_channels=vae.latent_channels))


def check_config(cfg: TinyVAERunConfig) -> None:
    """What the types cannot say; raised before any training so a bad run fails in seconds."""
    config = read_config(cfg.bundle)
    check_tiny_vae(cfg.model, config, what=f"the tiny autoencoder (preset {cfg.preset})")
    if not cfg.data.center_crop:
        raise LdmError("the tiny autoencoder trains on the VAE's cached centre crops; drop data.center_crop=false")
    if not cfg.cache.enabled:
        raise LdmError("the tiny autoencoder trains on the cached outputs of the full VAE; drop --no-cache")
    widest = max(cfg.model.encoder_channels, cfg.model.decoder_channels)
    check_training_size(side=cfg.data.resolution, factor=config.vae.downsampling_factor, batch=cfg.train.batch_size,
                        channels=[widest] * len(cfg.model.decoder_blocks), layers=max(cfg.model.decoder_blocks),
                        what="tiny autoencoder training")  # fmt: skip


# --- the tiny autoencoder -------------------------------------------------------------------------------------------


class Distil(nn.Module):
    """(latents, pixels) → (tiny decoder's pixels, tiny encoder's latents) in one forward, so DDP sees every
    parameter used."""

    def __init__(self, tiny):
        super().__init__()
        self.tiny = tiny

    def forward(self, latents: torch.Tensor, pixels: torch.Tensor):  # (B, C, h, w) scaled, (B, 3, H, W) in [-1, 1]
        return tiny_decode(self.tiny, latents), tiny_encode(self.tiny, pixels)  # (B, 3, H, W), (B, C, h, w)


@dataclass
class Trainables:
    """The tiny autoencoder, accelerate-prepared, with its optimizer, LR schedule and EMA."""

    tiny: nn.Module  # the plain AutoencoderTiny (its weights go into the bundle)
    model: nn.Module  # the prepared Distil(tiny)
    optimizer: torch.optim.Optimizer
    scheduler: object
    ema: EMAModel | None

    def state(self) -> TrainingState:
        return TrainingState(models={"tiny_vae": self.model}, optimizers={"tiny_vae": self.optimizer},
                             schedulers={"tiny_vae": self.scheduler}, emas={"tiny_vae": self.ema} if self.ema else {},
                             progress=Progress())  # fmt: skip


def build_trainables(cfg: TinyVAERunConfig, accelerator: Accelerator) -> Trainables:
    tiny = build_tiny_autoencoder(cfg.model).train()  # seeded by the caller
    optimizer = make_optimizer(tiny.parameters(), cfg.train)
    scheduler = make_lr_scheduler(optimizer, cfg.train, processes=accelerator.num_processes)
    model, optimizer, scheduler = accelerator.prepare(Distil(tiny), optimizer, scheduler)
    return Trainables(tiny=tiny, model=model, optimizer=optimizer, scheduler=scheduler, ema=make_ema(tiny, cfg.train))


@dataclass
class RunResult:
    """What a run leaves behind (on the main process; elsewhere the progress alone)."""

    progress: Progress
    bundle_dir: Path | None = None
    metrics: dict = field(default_factory=dict)  # the held-out comparison, as in OUT/eval.json


# --- the run --------------------------------------------------------------------------------------------------------


def run(cfg: TinyVAERunConfig, *, resume: str | None = None) -> RunResult:
    """Train as ``cfg`` says, from the checkpoint ``resume`` names ('latest' or a file; None: from the start), then
    write the tiny autoencoder into ``cfg.bundle`` and, with held-out data, ``OUT/eval.json``."""
    cfg = with_model(cfg)
    check_config(cfg)
    resume_path = resolve_resume(resume, Path(cfg.train.output_dir))
    return held_run(cfg.train, lambda accelerator: _run(cfg, accelerator, resume_path=resume_path))


def _run(cfg: TinyVAERunConfig, accelerator: Accelerator, *, resume_path: Path | None) -> RunResult:
    """:func:`run` once the output folder is held."""
    out = Path(cfg.train.output_dir)
    torch.manual_seed(cfg.train.seed)

    base = load_bundle(cfg.bundle)
    stored = base.vae.dtype  # the tiny autoencoder is stored in the bundle's precision
    base.to(accelerator.device, torch.float32)  # the teacher in fp32, as generate.py runs it
    items = training_items(cfg, base, accelerator)
    model = build_trainables(cfg, accelerator)
    state = model.state()
    begin_run(accelerator, state, config=cfg, resume=resume_path, output_dir=out, name="train_tiny_vae")

    sample_fn = sample_grid(cfg, base, model.tiny, items, accelerator=accelerator)
    train_loop(
        accelerator=accelerator, cfg=cfg.train, state=state, dataset=items, config=cfg,
        step_fn=step_function(cfg, base, model, accelerator=accelerator), sample_fn=sample_fn,
        ema_models=[(model.ema, model.tiny)] if model.ema else [],
    )  # fmt: skip
    accelerator.wait_for_everyone()
    result = RunResult(progress=state.progress)
    if accelerator.is_main_process:
        finish(cfg, base, model, sample_fn, result, stored=stored, accelerator=accelerator)
    return result


def training_items(cfg: TinyVAERunConfig, base: Bundle, accelerator: Accelerator) -> UNetItems:
    """The data report, then the items with their cached targets: the VAE's posterior mean and the full decoder's
    pixels of it, for each centre crop and its mirror image, in the cache all processes build together."""
    main_process = accelerator.is_main_process
    report = report_dataset(cfg.data, quiet=not main_process, share=scan_share(accelerator))
    targets = [(cfg.data.resolution, cfg.data.resolution)] * len(report.pairs)
    folder = Path(cfg.cache.dir) if cfg.cache.dir else Path(cfg.train.output_dir) / "cache"
    cache = load_or_build_cache(
        cache_path(folder, cfg.data, "tiny-vae"), bundle=base, data=cfg.data, report=report, targets=targets,
        buckets=None, latents=True, decoded=True, batch_size=cfg.cache.batch_size, device=accelerator.device,
        accelerator=accelerator,
    )  # fmt: skip
    if main_process and cfg.loss.perceptual_weights is None:
        print("perceptual term off (loss.perceptual_weights, a VGG16 safetensors file, turns it on)")
    return UNetItems(report, targets=targets, center_crop=True, flip_p=cfg.data.random_flip, seed=cfg.train.seed,
                     cache=cache, pixels=True)  # fmt: skip


def step_function(cfg: TinyVAERunConfig, base: Bundle, model: Trainables, *, accelerator: Accelerator) -> StepFn:
    """One micro-batch: the decoder's pixel loss against the full decoder, the encoder's latent loss against the
    VAE's posterior mean, one update."""
    scale = base.config.vae.scaling_factor
    perceptual = None
    if cfg.loss.perceptual_weights is not None:
        perceptual = PerceptualLoss.from_file(cfg.loss.perceptual_weights).to(accelerator.device).eval()
    params = list(model.tiny.parameters())

    def step_fn(batch: dict, step: int) -> dict[str, float]:
        latents = batch["mean"].to(accelerator.device) * scale  # (B, C, h, w): what the diffusion model sees
        target = batch["decoded"].to(accelerator.device)  # (B, 3, H, W): the full decoder's pixels
        pixels = batch["pixel_values"].to(accelerator.device)  # (B, 3, H, W) in [-1, 1]
        with accelerator.accumulate(model.model):
            decoded, encoded = model.model(latents, pixels)
            decoded, encoded = decoded.float(), encoded.float()
            decoder_loss = reconstruction_loss(target, decoded, cfg.loss.reconstruction).mean()
            encoder_loss = F.mse_loss(encoded, latents)
            loss = decoder_loss + encoder_loss  # disjoint weights: each term trains its own half
            logs = {"loss/decoder": decoder_loss, "loss/encoder": encoder_loss}
            if perceptual is not None:
                lpips = perceptual(target, decoded).mean()
                loss = loss + cfg.loss.perceptual_weight * lpips
                logs["loss/perceptual"] = lpips
            backward_step(accelerator, loss, model.optimizer, model.scheduler, params=params,
                          grad_clip=cfg.train.grad_clip)  # fmt: skip
        return {k: float(v.detach()) for k, v in logs.items()}

    return step_fn


def sample_grid(cfg: TinyVAERunConfig, base: Bundle, tiny: nn.Module, items: UNetItems, *,
                accelerator: Accelerator) -> Callable[[int], None]:  # fmt: skip
    """``sample_fn(step)``: for training images spread over the dataset, rows of the image, the full decoder's
    output, the tiny decoder's, and the tiny round trip (tiny encoder, then tiny decoder), as a grid in ``samples/``
    and TensorBoard, on the main process."""
    count = min(cfg.sample_images, len(items))
    picked = [i * len(items) // count for i in range(count)]
    latents = torch.stack([items.cache.latent(i)[0] for i in picked]) * base.config.vae.scaling_factor  # (N, C, h, w)
    full = torch.stack([items.cache.decoded(i) for i in picked])  # (N, 3, H, W)
    originals = CaptionedImageDataset(replace(cfg.data, random_flip=0.0), report=items.report, seed=0)
    pixels = torch.stack([originals[i]["pixel_values"] for i in picked])

    @torch.no_grad()
    def sample_fn(step: int) -> None:
        if not accelerator.is_main_process:
            return
        tiny.eval()
        device = accelerator.device
        decoded = tiny_decode(tiny, latents.to(device)).cpu()
        round_trip = tiny_decode(tiny, tiny_encode(tiny, pixels.to(device))).cpu()
        tiny.train()
        rows = torch.cat([pixels, full, decoded, round_trip])  # image, full decoder, tiny decoder, tiny round trip
        grid = image_grid(signed_to_unit(rows), columns=len(picked))
        log_grid(accelerator, "tiny-vae", grid, step, Path(cfg.train.output_dir))

    return sample_fn


# --- the end --------------------------------------------------------------------------------------------------------


def finish(cfg: TinyVAERunConfig, base: Bundle, model: Trainables, sample_fn, result: RunResult, *,
           stored: torch.dtype, accelerator: Accelerator) -> None:  # fmt: skip
    """The EMA weights into the tiny autoencoder, the final grid, the held-out comparison (``OUT/eval.json``, of the
    weights rounded to ``stored``, the bundle's precision) and the tiny autoencoder into the bundle."""
    out, tiny = Path(cfg.train.output_dir), model.tiny
    if model.ema is not None:
        model.ema.copy_to(tiny.parameters())
    sample_fn(result.progress.step)
    tiny = tiny.eval().cpu()
    if (held := held_out(cfg.data, cfg.eval_data)) is not None:
        rounded = copy.deepcopy(tiny).to(stored).float()  # the numbers the bundle will hold
        result.metrics = compare_decoders(base, rounded, held, batch_size=cfg.train.batch_size)
        (out / "eval.json").write_text(json.dumps(result.metrics, indent=2) + "\n")
        print("held-out: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in result.metrics.items()))  # fmt: skip
    result.bundle_dir = add_tiny_vae(cfg.bundle, tiny)
    print(f"tiny autoencoder written into {cfg.bundle} ({sum(p.numel() for p in tiny.parameters()):,} weights)")
    accelerator.end_training()


@torch.no_grad()
def compare_decoders(base: Bundle, tiny: nn.Module, data: DataConfig, *, batch_size: int = 16) -> dict:
    """The tiny autoencoder beside the full VAE on ``data``'s images (centre crops), averaged over images:

    ``decoder_psnr`` / ``decoder_ssim``: the tiny decoder's pixels against the full decoder's, on the VAE's latents
    (posterior means); ``roundtrip_psnr``: the tiny encoder then the tiny decoder, against the image, beside
    ``vae_roundtrip_psnr``, the full VAE's; ``encoder_rmse``: the tiny encoder's latents against the VAE's (the
    latents have about unit variance)."""
    vae, scale = base.vae, base.config.vae.scaling_factor
    device = next(vae.parameters()).device
    dataset = CaptionedImageDataset(data, seed=0)
    sums = {"decoder_psnr": 0.0, "decoder_ssim": 0.0, "roundtrip_psnr": 0.0, "vae_roundtrip_psnr": 0.0}
    squared, count = 0.0, 0
    tiny = tiny.to(device)
    for start in range(0, len(dataset), batch_size):
        x = torch.stack([dataset[i]["pixel_values"] for i in range(start, min(start + batch_size, len(dataset)))])
        x = x.to(device)  # (B, 3, H, W) in [-1, 1]
        mean = vae.encode(x).latent_dist.mean  # (B, C, h, w)
        full = signed_to_unit(vae.decode(mean).sample)
        fast = signed_to_unit(tiny_decode(tiny, mean * scale))
        encoded = tiny_encode(tiny, x)
        real = signed_to_unit(x)
        sums["decoder_psnr"] += psnr(full, fast).double().sum().item()
        sums["decoder_ssim"] += ssim(full, fast).double().sum().item()
        sums["roundtrip_psnr"] += psnr(real, signed_to_unit(tiny_decode(tiny, encoded))).double().sum().item()
        sums["vae_roundtrip_psnr"] += psnr(real, full).double().sum().item()
        squared += (encoded - mean * scale).double().square().flatten(1).mean(1).sum().item()
        count += x.shape[0]
    if not count:
        raise LdmError(f"no held-out images in {data.path}; pass --eval-data FOLDER")
    return {k: v / count for k, v in sums.items()} | {"encoder_rmse": (squared / count) ** 0.5, "count": count}
