"""Train the UNet of a bundle on its frozen VAE's latents, conditioned on its frozen text encoder, into a new bundle.

    python train_unet.py --bundle runs/vae-emoji/bundle --data data/emoji/train --eval-data data/emoji/test \\
        --out runs/unet-emoji --max-steps 20000 --set train.mixed_precision=bf16
    python train_unet.py --out runs/unet-emoji --resume latest              # continue exactly where it stopped
    python train_unet.py --init-from models/emoji-tiny --data my/images --out runs/ft            # full fine-tune
    python train_unet.py --init-from models/emoji-tiny --data my/images --out runs/lora --lora-rank 8

Loss: mean-squared error of the UNet's ε or v prediction (the bundle's ``model.schedule.prediction``, which
``--prediction`` or ``--set model.schedule.…`` may change; the new bundle records it), weighted per sample by
Min-SNR-γ (Hang et al. 2023; ``loss.min_snr_gamma``, 0 = off), with optional offset noise (``loss.noise_offset``)
and caption dropout for classifier-free guidance (``loss.caption_dropout``, 10 %). Latents are posterior samples of
the VAE times its scaling factor from the bundle config. VAE posteriors and caption hidden states are cached
(see ``ldm.train.cache``) unless ``--no-cache``.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ldm.cli.common import ArgumentParser, run_cli
from ldm.cli.options import add_run_arguments, load_run_config, with_run_flags
from ldm.config import apply_overrides
from ldm.data import DataConfig, ScanReport, report_dataset
from ldm.errors import LdmError
from ldm.formats.bundle import Bundle, load_bundle, save_bundle
from ldm.models.presets import ModelConfig
from ldm.models.tokenizer import tokenize
from ldm.pipeline import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, Request, generate
from ldm.pipeline.schedule import Prediction, get_sampler
from ldm.train.cache import (
    BucketBatches,
    BucketConfig,
    CacheConfig,
    FeatureCache,
    UNetItems,
    assign_buckets,
    bucket_step,
    cache_path,
    load_or_build_cache,
    make_buckets,
)
from ldm.train.loop import (
    EpochBatches,
    LRSchedule,
    Progress,
    TrainConfig,
    TrainingState,
    backward_step,
    begin_run,
    image_grid,
    log_grid,
    make_accelerator,
    make_ema,
    make_lr_scheduler,
    make_optimizer,
    resolve_resume,
    train_loop,
)
from ldm.train.objectives import (
    add_noise,
    alphas_cumprod,
    min_snr_weights,
    offset_noise,
    sample_timesteps,
    timestep_bucket_edges,
    training_target,
    weighted_mse,
)


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    min_snr_gamma: float = 5.0  # Min-SNR-γ loss weighting (Hang et al. 2023); 0 = off
    noise_offset: float = 0.0  # offset-noise strength; 0 = off (0.05–0.1 is usual)
    caption_dropout: float = 0.1  # share of captions replaced by '' (classifier-free guidance)

    def __post_init__(self):
        if self.min_snr_gamma < 0:
            raise ValueError(f"min_snr_gamma must be ≥ 0 (0 = off), got {self.min_snr_gamma}")
        if self.noise_offset < 0:
            raise ValueError(f"noise_offset must be ≥ 0, got {self.noise_offset}")
        if not 0 <= self.caption_dropout <= 1:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    rank: int = 0  # 0 = full fine-tune; R > 0 trains rank-R LoRA adapters on to_q, to_k, to_v, to_out.0 only
    alpha: float = 0.0  # LoRA α (the update is scaled by α / rank); 0 = rank
    merge_bundle: bool = False  # also write OUT/bundle with the adapters merged in (a full-size copy)

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"rank must be ≥ 0 (0 = full fine-tune), got {self.rank}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be ≥ 0, got {self.alpha}")


@dataclass(frozen=True, kw_only=True)
class ValidationConfig:
    prompts: tuple[str, ...] = ()  # () = the first num_prompts distinct captions of the training data
    num_prompts: int = 4
    seed: int = 0  # image i uses seed + i; the held-out noise is drawn from this seed too
    # generate.py's defaults, so the grids show what the bundle will draw for users
    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    sampler: str = DEFAULT_SAMPLER
    timestep_buckets: int = 5  # held-out loss reported per this many ranges of t
    eval_images: int = 64  # at most this many held-out images

    def __post_init__(self):  # checked when the config is read, not at the first validation mid-run
        for name, fix in (("num_prompts", 4), ("steps", 20), ("timestep_buckets", 5), ("eval_images", 64)):
            if getattr(self, name) < 1:
                raise ValueError(f"validation.{name} must be at least 1, got {getattr(self, name)}; try {fix}")
        if self.guidance_scale < 0:
            raise ValueError(f"validation.guidance_scale must be at least 0 (≤ 1: no guidance), got {self.guidance_scale}")
        try:
            get_sampler(self.sampler)
        except LdmError as exc:
            raise ValueError(f"validation.sampler: {exc}") from None


@dataclass(frozen=True, kw_only=True)
class UNetRunConfig:
    model: ModelConfig  # the bundle's; only model.schedule may differ (what the UNet is trained for)
    data: DataConfig
    bundle: str  # the bundle whose UNet is trained (and whose VAE, text encoder, tokenizer are used)
    train: TrainConfig = TrainConfig(
        output_dir="runs/unet", batch_size=16, lr=1e-4, weight_decay=1e-2, lr_schedule=LRSchedule.COSINE,
        warmup_steps=500, max_steps=20000, ema_decay=0.9999, checkpoint_every=1000, sample_every=1000,
    )  # fmt: skip
    loss: LossConfig = LossConfig()
    cache: CacheConfig = CacheConfig()
    buckets: BucketConfig = BucketConfig()
    lora: LoraConfig = LoraConfig()
    validation: ValidationConfig = ValidationConfig()
    train_text_encoder: bool = False  # also train the text encoder (LoRA on it too when lora.rank > 0)
    text_encoder_lr: float = 0.0  # 0 = train.lr
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~30 % slower
    adam_8bit: bool = False  # bitsandbytes' 8-bit AdamW (CUDA only; falls back to torch AdamW with a note)
    eval_data: str = ""  # held-out folder: loss per timestep range at every validation


class Denoiser(nn.Module):
    """(x_t, t, text) → the UNet's prediction, with the text encoder inside when it is trained, so that accelerate/DDP
    see every trained parameter in one forward. Checkpoints keep the trained parameters only."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None = None):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, *, context: torch.Tensor | None = None,
                input_ids: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        if input_ids is not None:  # (B, L) token ids → (B, L, D) hidden states, with gradients
            context = self.text_encoder(input_ids).hidden_states
        return self.unet(x_t, t, encoder_hidden_states=context).sample  # (B, C, h, w)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.trainable_state_dict())
        if set(state) != expected:
            raise LdmError(
                "the checkpoint's trained parameters do not fit this run (LoRA rank or --train-text-encoder changed?)"
            )
        self.load_state_dict(state, strict=False)


@dataclass
class RunResult:
    """What a run leaves behind; the modules are the trained ones (EMA weights copied in)."""

    progress: Progress
    unet: nn.Module
    text_encoder: nn.Module
    bundle_dir: Path | None = None
    lora_path: Path | None = None
    eval_losses: dict[str, float] = field(default_factory=dict)
    steps_per_second: float = 0.0


# --- configuration ------------------------------------------------------------------------------------------------


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="train_unet.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", help="bundle whose UNet to train (from train_vae.py / train_clip.py)")
    p.add_argument("--init-from", help="the same as --bundle: fine-tune this bundle's UNet")
    add_run_arguments(p, eval_help="held-out image folder: loss per timestep range at each validation",
                      out_help="output folder: checkpoints/, samples/, logs/, cache/, bundle/")  # fmt: skip
    p.add_argument(
        "--prediction", choices=[p.value for p in Prediction], help="train for ε or v (default: the bundle's)"
    )
    p.add_argument("--no-cache", action="store_true", default=None, help="encode images and captions every step")
    p.add_argument("--cache-dir", help="feature cache folder, shareable between runs (default OUT/cache)")
    p.add_argument("--bucketing", action="store_true", default=None, help="aspect-ratio buckets for mixed-size data")
    p.add_argument("--lora-rank", type=int, help="train rank-R LoRA adapters only; written to OUT/lora.safetensors")
    p.add_argument("--train-text-encoder", action="store_true", default=None, help="also train the text encoder")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None, help="less memory, slower steps")
    p.add_argument(
        "--validation-prompt",
        action="append",
        dest="validation_prompts",
        metavar="PROMPT",
        help="prompt of the sample grids (repeatable; default: captions from the data)",
    )
    return p


def resolve_config(args) -> UNetRunConfig:
    """Config file, else flags; a resumed run reads the config its checkpoints were written with."""
    if args.bundle and args.init_from and args.bundle != args.init_from:
        raise LdmError("--bundle and --init-from name the same thing; pass one of them")
    bundle = args.bundle or args.init_from
    cfg = load_run_config(UNetRunConfig, args)
    if cfg is None:
        if not args.data:
            raise LdmError("no training data; pass --data FOLDER (see `python -m ldm data check FOLDER`)")
        if not bundle:
            raise LdmError("pass --bundle BUNDLE: the bundle (from train_vae.py or train_clip.py) whose UNet to train")
        if not Path(bundle).is_dir():
            raise LdmError(
                f"no model bundle at {bundle}; pass --bundle the bundle folder train_vae.py wrote (OUT/bundle)"
            )
        model = load_bundle(bundle, verify=False).config
        cfg = UNetRunConfig(
            model=model,
            data=DataConfig(path=args.data, resolution=args.resolution or model.default_size, center_crop=True),
            bundle=str(bundle),
        )
    cfg = with_run_flags(cfg, args)
    if args.eval_data is not None:
        cfg = replace(cfg, eval_data=args.eval_data)
    if args.prediction:
        cfg = replace(
            cfg, model=replace(cfg.model, schedule=replace(cfg.model.schedule, prediction=Prediction(args.prediction)))
        )
    if args.no_cache:
        cfg = replace(cfg, cache=replace(cfg.cache, enabled=False))
    if args.cache_dir:
        cfg = replace(cfg, cache=replace(cfg.cache, dir=args.cache_dir))
    if args.bucketing:
        cfg = replace(cfg, buckets=replace(cfg.buckets, enabled=True))
    if args.lora_rank is not None:
        if args.lora_rank < 0:
            raise LdmError(f"--lora-rank must be ≥ 0 (0 = full fine-tune), got {args.lora_rank}; try --lora-rank 8")
        cfg = replace(cfg, lora=replace(cfg.lora, rank=args.lora_rank))
    if args.train_text_encoder:
        cfg = replace(cfg, train_text_encoder=True)
    if args.gradient_checkpointing:
        cfg = replace(cfg, gradient_checkpointing=True)
    if args.validation_prompts:
        cfg = replace(cfg, validation=replace(cfg.validation, prompts=tuple(args.validation_prompts)))
    return apply_overrides(cfg, args.overrides)


def check_model(cfg: UNetRunConfig, base: Bundle) -> None:
    """The run config's model must be the bundle's, but for the schedule (which LoRA must keep as well)."""
    for part in ("vae", "text_encoder", "unet"):
        if getattr(cfg.model, part) != getattr(base.config, part):
            raise LdmError(
                f"model.{part} differs from the bundle {cfg.bundle}'s; only model.schedule may be changed (the UNet is "
                "trained for it), the parts' shapes come from the bundle"
            )
    if cfg.lora.rank and cfg.model.schedule != base.config.schedule:
        raise LdmError(
            "LoRA adapters keep the base model's schedule and prediction type; train without --lora-rank to change them"
        )


# --- parts --------------------------------------------------------------------------------------------------------


def make_unet_optimizer(groups: list[dict], cfg: UNetRunConfig, *, cuda: bool) -> torch.optim.Optimizer:
    """AdamW: bitsandbytes' 8-bit one when asked for, installed and on CUDA; else torch's, with a note why."""
    if cfg.adam_8bit:
        try:
            import bitsandbytes as bnb
        except ImportError:
            print("note: adam_8bit asked for but bitsandbytes is not installed; using torch AdamW")
        else:
            if cuda:
                t = cfg.train
                return bnb.optim.AdamW8bit(groups, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)
            print("note: 8-bit AdamW needs a CUDA GPU; using torch AdamW")
    return make_optimizer(groups, cfg.train)


def training_targets(cfg: UNetRunConfig, report: ScanReport, base: Bundle) -> tuple[list[tuple[int, int]], list | None]:
    """(width, height) per usable pair, and the buckets (None without bucketing); prints the bucket table."""
    r = cfg.data.resolution
    if not cfg.buckets.enabled:
        return [(r, r)] * len(report.pairs), None
    step = cfg.buckets.step or bucket_step(
        vae_factor=base.config.vae.downsampling_factor, unet_levels=len(base.config.unet.block_out_channels)
    )
    buckets = make_buckets(r, step=step, max_aspect=cfg.buckets.max_aspect)
    sizes = [report.sizes[pair.image] for pair in report.pairs]
    assignment = assign_buckets(sizes, buckets, min_count=cfg.train.batch_size)
    counts = {b: assignment.count(i) for i, b in enumerate(buckets) if i in assignment}
    print(
        f"buckets ({step} px steps, about {r}×{r} px each): "
        + ", ".join(f"{w}×{h} {n}" for (w, h), n in counts.items())
    )
    return [buckets[i] for i in assignment], buckets


def validation_prompts(cfg: UNetRunConfig, report: ScanReport) -> list[str]:
    if cfg.validation.prompts:
        return list(cfg.validation.prompts)
    distinct = list(dict.fromkeys(pair.caption for pair in report.pairs if pair.caption))
    return distinct[: cfg.validation.num_prompts] or [""]


@contextlib.contextmanager
def ema_weights(ema, module: nn.Module):
    """Run the body with the EMA weights in ``module``; the training weights come back bit-exactly."""
    if ema is None:
        yield
        return
    ema.store(module.parameters())
    ema.copy_to(module.parameters())
    try:
        yield
    finally:
        ema.restore(module.parameters())


# --- the run ------------------------------------------------------------------------------------------------------


def run(cfg: UNetRunConfig, *, resume: str | None = None) -> RunResult:
    out = Path(cfg.train.output_dir)
    accelerator = make_accelerator(cfg.train, log_dir=out / "logs")
    main_process = accelerator.is_main_process
    device = accelerator.device
    resume_path = resolve_resume(resume, out)
    torch.manual_seed(cfg.train.seed)

    base = load_bundle(cfg.bundle)
    check_model(cfg, base)
    schedule = cfg.model.schedule
    if main_process and base.config.vae.scaling_factor == 1.0:
        print("note: the VAE's scaling factor is 1.0 (not measured); train_vae.py measures it, and latents far from "
              "unit variance train poorly")  # fmt: skip
    if schedule != base.config.schedule and main_process:
        print(f"note: training for {schedule.prediction.value} / {schedule.beta_schedule.value}; the bundle was "
              f"{base.config.schedule.prediction.value} / {base.config.schedule.beta_schedule.value}")  # fmt: skip

    report = report_dataset(cfg.data, file=sys.stdout if main_process else None)
    targets, buckets = training_targets(cfg, report, base)
    # The batch order, checked before anything is encoded: too little data for one batch fails here.
    if buckets is not None:
        order = BucketBatches(
            [buckets.index(t) for t in targets], cfg.train.batch_size, seed=cfg.train.seed,
            num_replicas=accelerator.num_processes, rank=accelerator.process_index,
        )  # fmt: skip
    else:
        order = None
        EpochBatches(len(targets), cfg.train.batch_size, seed=cfg.train.seed, num_replicas=accelerator.num_processes)
    vae = base.vae.float().eval().requires_grad_(False).to(device)
    text_encoder = base.text_encoder.float().to(device)
    text_model = text_encoder.model

    # The feature cache: VAE posteriors (centre crops only) and caption hidden states, in float32.
    cache: FeatureCache | None = None
    cache_dir = Path(cfg.cache.dir) if cfg.cache.dir else out / "cache"
    cache_latents = cfg.data.center_crop
    if cfg.cache.enabled:
        if not cache_latents and main_process:
            print("note: random crops (data.center_crop=false) cannot be cached; the VAE encodes every step")
        for builder in (True, False):  # the main process builds the file, the others then read it
            if builder == main_process:
                cache = load_or_build_cache(
                    cache_path(cache_dir, cfg.data, "train"), bundle=base, data=cfg.data, report=report,
                    targets=targets, buckets=buckets, latents=cache_latents, batch_size=cfg.cache.batch_size,
                    device=device, log=None if main_process else (lambda message: None),
                )  # fmt: skip
            if builder:
                accelerator.wait_for_everyone()
    items = UNetItems(
        report, targets=targets, center_crop=cfg.data.center_crop, flip_p=cfg.data.random_flip,
        caption_dropout=cfg.loss.caption_dropout, seed=cfg.train.seed, cache=cache,
    )  # fmt: skip

    # Held-out set: fixed latents (posterior means), timesteps and noise, drawn once.
    eval_set = eval_features = None
    if cfg.eval_data and main_process:
        eval_data = cfg.data.held_out(cfg.eval_data)
        eval_report = report_dataset(eval_data, progress=False)
        eval_report = replace(eval_report, pairs=eval_report.pairs[: cfg.validation.eval_images])
        r = cfg.data.resolution
        eval_cache = load_or_build_cache(
            cache_path(cache_dir, eval_data, "eval") if cfg.cache.enabled else None, bundle=base,
            data=eval_data, report=eval_report, targets=[(r, r)] * len(eval_report.pairs), buckets=None, latents=True,
            batch_size=cfg.cache.batch_size, device=device,
        )  # fmt: skip
        eval_set = held_out_set(eval_cache, eval_report, cfg, base)
        eval_features = eval_cache if cfg.cache.enabled else None

    # What is trained: the UNet (all of it, or LoRA adapters), and the text encoder when asked.
    unet = base.unet.float().to(device)
    if cfg.lora.rank:
        from ldm.train.lora import TEXT_TARGETS, UNET_TARGETS, add_lora

        unet_params = add_lora(unet, rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=UNET_TARGETS)
        text_params = (
            add_lora(text_model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=TEXT_TARGETS)
            if cfg.train_text_encoder
            else []
        )
    else:
        unet_params = list(unet.requires_grad_(True).parameters())
        text_params = list(text_model.requires_grad_(True).parameters()) if cfg.train_text_encoder else []
    if not cfg.train_text_encoder:
        text_encoder.requires_grad_(False).eval()
    unet.train()
    if cfg.train_text_encoder:
        text_encoder.train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:  # transformers 5 renamed it
            getattr(text_model, "activation_checkpointing_enable", text_model.gradient_checkpointing_enable)()
    trainable = unet_params + text_params
    groups = [{"params": unet_params}]
    if text_params:
        groups.append({"params": text_params, "lr": cfg.text_encoder_lr or cfg.train.lr})
    denoiser = Denoiser(unet, text_encoder if cfg.train_text_encoder else None)
    optimizer = make_unet_optimizer(groups, cfg, cuda=device.type == "cuda")
    lr_scheduler = make_lr_scheduler(optimizer, cfg.train, processes=accelerator.num_processes)
    denoiser, optimizer, lr_scheduler = accelerator.prepare(denoiser, optimizer, lr_scheduler)
    ema = make_ema(unet, cfg.train)
    state = TrainingState(
        models={"unet": denoiser}, optimizers={"unet": optimizer}, schedulers={"unet": lr_scheduler},
        emas={"unet": ema} if ema else {}, progress=Progress(),
    )  # fmt: skip
    begin_run(accelerator, state, config=cfg, resume=resume_path, output_dir=out, name="train_unet")

    ac = alphas_cumprod(schedule)  # (T,)
    scaling = base.config.vae.scaling_factor
    cfg_te = base.config.text_encoder

    def token_ids(captions: list[str]) -> torch.Tensor:  # (B, L)
        return tokenize(base.tokenizer, captions, context_length=cfg_te.context_length, pad_id=cfg_te.pad_id).to(device)

    def conditioning(captions: list[str], features: FeatureCache | None = cache) -> dict:
        if cfg.train_text_encoder:
            return {"input_ids": token_ids(captions)}
        if features is not None:
            return {"context": features.text(captions).to(device)}  # (B, L, D)
        with torch.no_grad(), accelerator.autocast():
            return {"context": text_encoder(token_ids(captions)).hidden_states}

    def latents_of(batch: dict) -> torch.Tensor:
        """Scaled posterior samples z = (μ + σ·n)·scaling_factor; n from the global RNG, which checkpoints restore."""
        if "mean" in batch:
            mean, logvar = batch["mean"].to(device), batch["logvar"].to(device)  # (B, C, h, w)
        else:
            with torch.no_grad(), accelerator.autocast():
                posterior = vae.encode(batch["pixel_values"].to(device)).latent_dist
            mean, logvar = posterior.mean.float(), posterior.logvar.float()
        n = torch.randn(mean.shape).to(device)
        return (mean + torch.exp(0.5 * logvar) * n) * scaling  # (B, C, h, w)

    def step_fn(batch: dict, step: int) -> dict[str, float]:
        with accelerator.accumulate(denoiser):
            x0 = latents_of(batch)  # (B, C, h, w)
            noise = offset_noise(x0.shape, strength=cfg.loss.noise_offset).to(device)
            t = sample_timesteps(len(x0), schedule.num_train_timesteps).to(device)  # (B,)
            x_t = add_noise(x0, noise, t, ac)
            target = training_target(x0, noise, t, ac, schedule.prediction)
            prediction = denoiser(x_t, t, **conditioning(batch["caption"]))
            weights = min_snr_weights(t, ac, gamma=cfg.loss.min_snr_gamma, prediction=schedule.prediction)
            loss = weighted_mse(prediction, target, weights)
            backward_step(accelerator, loss, optimizer, lr_scheduler, params=trainable, grad_clip=cfg.train.grad_clip)
        return {"loss": float(loss.detach())}

    prompts = validation_prompts(cfg, report)
    result_config = replace(base.config, schedule=schedule)

    @torch.no_grad()
    def validate(step: int) -> dict[str, float]:
        """Sample grid and held-out losses with the EMA weights; leaves the training state (and RNG) untouched."""
        if not main_process:
            return {}
        devices = [device] if device.type == "cuda" else []
        losses = {}
        with torch.random.fork_rng(devices=devices), ema_weights(ema, unet):
            unet.eval()
            text_encoder.eval()
            bundle = replace(base, config=result_config, vae=vae, text_encoder=text_encoder, unet=unet)
            v = cfg.validation
            request = Request(
                prompts=prompts, negative_prompts=[""] * len(prompts), seeds=[v.seed + i for i in range(len(prompts))],
                steps=v.steps, guidance_scale=v.guidance_scale, sampler=get_sampler(v.sampler),
                width=cfg.data.resolution, height=cfg.data.resolution,
            )  # fmt: skip
            images = generate(bundle, request, progress=False)  # (N, 3, H, W) in [0, 1]
            log_grid(accelerator, "samples", image_grid(images, columns=len(images)), step, out)
            if eval_set is not None:
                losses = held_out_losses(eval_set, denoiser=accelerator.unwrap_model(denoiser),
                                         conditioning=lambda captions: conditioning(captions, eval_features),
                                         ac=ac, prediction=schedule.prediction, batch_size=cfg.train.batch_size,
                                         accelerator=accelerator)  # fmt: skip
                accelerator.log(losses, step=step)
            unet.train()
            if cfg.train_text_encoder:
                text_encoder.train()
        return losses

    started, first_step = time.monotonic(), state.progress.step
    train_loop(
        accelerator=accelerator, cfg=cfg.train, state=state, dataset=items, step_fn=step_fn, config=cfg,
        sample_fn=validate, ema_models=[(ema, unet)] if ema else [], batch_order=order,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    speed = (state.progress.step - first_step) / elapsed if elapsed > 0 else 0.0
    accelerator.wait_for_everyone()
    result = RunResult(progress=state.progress, unet=unet, text_encoder=text_encoder, steps_per_second=speed)
    if not main_process:
        return result
    print(f"{state.progress.step - first_step} steps in {elapsed:.1f} s ({speed:.2f} steps/s)")

    if ema is not None:
        ema.copy_to(unet.parameters())  # the result gets the EMA weights
    result.eval_losses = validate(state.progress.step)
    if result.eval_losses:
        (out / "eval.json").write_text(json.dumps(result.eval_losses, indent=2) + "\n")
        print(
            "held-out loss: " + ", ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in result.eval_losses.items())
        )
    unet.eval()
    text_encoder.eval()
    if cfg.lora.rank:
        from ldm.train.lora import apply_lora, save_lora

        result.lora_path = save_lora(out / "lora.safetensors", unet=unet.cpu(),
                                     text_encoder=text_model.cpu() if cfg.train_text_encoder else None)  # fmt: skip
        print(f"LoRA written to {result.lora_path}; use it with: generate.py --model {cfg.bundle} --lora FILE")
        if cfg.lora.merge_bundle:
            merged = apply_lora(load_bundle(cfg.bundle), result.lora_path, scale=1.0)
            result.bundle_dir = save_bundle(replace(merged, name=out.name), out / "bundle")
            print(f"bundle with the LoRA merged written to {result.bundle_dir}")
    else:
        bundle = replace(
            base, config=result_config, vae=vae.cpu(), text_encoder=text_encoder.cpu(), unet=unet.cpu(), name=out.name
        )
        result.bundle_dir = save_bundle(bundle, out / "bundle")
        print(f"bundle written to {result.bundle_dir} (UNet trained for {schedule.prediction.value})")
    accelerator.end_training()
    return result


@dataclass
class HeldOut:
    latents: torch.Tensor  # (N, C, h, w) scaled posterior means
    captions: list[str]
    buckets: list[tuple[int, int]]  # [lo, hi) timestep ranges
    timesteps: torch.Tensor  # (K, N) one fixed t per bucket and image
    noise: torch.Tensor  # (K, N, C, h, w)


def held_out_set(cache: FeatureCache, report: ScanReport, cfg: UNetRunConfig, base: Bundle) -> HeldOut:
    """Fixed held-out latents (posterior means), and per timestep range one t and one noise per image, from a private
    generator (the training RNG is untouched)."""
    n = len(report.pairs)
    latents = torch.stack([cache.latent(i)[0] for i in range(n)]) * base.config.vae.scaling_factor  # (N, C, h, w)
    generator = torch.Generator().manual_seed(cfg.validation.seed)
    ranges = timestep_bucket_edges(cfg.model.schedule.num_train_timesteps, cfg.validation.timestep_buckets)
    timesteps = torch.stack([torch.randint(lo, hi, (n,), generator=generator) for lo, hi in ranges])  # (K, N)
    noise = torch.randn((len(ranges), *latents.shape), generator=generator)  # (K, N, C, h, w)
    return HeldOut(
        latents=latents,
        captions=[pair.caption for pair in report.pairs],
        buckets=ranges,
        timesteps=timesteps,
        noise=noise,
    )


@torch.no_grad()
def held_out_losses(
    held: HeldOut, *, denoiser, conditioning, ac, prediction, batch_size, accelerator
) -> dict[str, float]:
    """Unweighted MSE of the prediction target per timestep range (``eval/loss_t000-199``) and their mean."""
    device = accelerator.device
    losses = {}
    for k, (lo, hi) in enumerate(held.buckets):
        total = 0.0
        for start in range(0, len(held.latents), batch_size):
            end = min(start + batch_size, len(held.latents))
            x0 = held.latents[start:end].to(device)
            noise, t = held.noise[k, start:end].to(device), held.timesteps[k, start:end].to(device)
            with accelerator.autocast():
                pred = denoiser(add_noise(x0, noise, t, ac), t, **conditioning(held.captions[start:end]))
            total += weighted_mse(pred, training_target(x0, noise, t, ac, prediction)).item() * (end - start)
        width = len(str(held.buckets[-1][1] - 1))
        losses[f"eval/loss_t{lo:0{width}d}-{hi - 1:0{width}d}"] = total / len(held.latents)
    losses["eval/loss"] = sum(losses.values()) / len(held.buckets)
    return losses


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    run(cfg, resume=args.resume)
    return 0


def entry() -> None:
    """The installed command and the root script: run with argv, exit with the status."""
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    entry()
