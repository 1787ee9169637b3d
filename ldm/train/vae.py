"""Train the KL autoencoder of a preset, or fine-tune a bundle's VAE, and write the result into a bundle.

Loss: reconstruction (L1 or L2) + KL (weight ~1e-6) + optional LPIPS-style perceptual term (needs VGG16 weights given
by path) + a PatchGAN discriminator (hinge loss) from ``loss.disc_start`` on, weighted adaptively at the decoder's
last layer (Esser et al. 2021). At the end the latent scaling factor (1 / std of the latents over a sample of the
data) is measured and stored in the VAE config.

:func:`run` is the whole run, in the order of its named steps: the data, the autoencoder, what is trained, the step,
the reconstruction grids, the end (the scaling factor, the bundle and ``OUT/eval.json``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import EMAModel
from torch import nn
from tqdm.auto import tqdm

from ldm.data import CaptionedImageDataset, DataConfig, held_out, report_dataset
from ldm.errors import LdmError
from ldm.eval.reconstruction import evaluate_batches
from ldm.formats.bundle import Bundle, create_bundle, load_bundle, save_bundle
from ldm.models.presets import ModelConfig, get_preset
from ldm.train.distributed import BatchShard, batch_shard, scan_share
from ldm.train.loop import (
    SHARDED,
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
from ldm.train.losses import VAELoss, VAELossConfig, perceptual_unavailable_message

# The loss is summed over pixels (so kl_weight keeps its LDM meaning): no gradient-norm clipping by default.
VAE_TRAIN = TrainConfig(output_dir="runs/vae", batch_size=16, lr=4.5e-6 * 16, max_steps=2000, grad_clip=0.0)


@dataclass(frozen=True, kw_only=True)
class VAERunConfig:
    model: ModelConfig | None = None  # None: the preset's, or the init_from bundle's (filled in by with_model)
    data: DataConfig
    train: TrainConfig = VAE_TRAIN
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    preset: str = ""  # the preset a new autoencoder (and a new bundle around it) is built from
    init_from: str = ""  # a bundle whose VAE is fine-tuned (and whose other parts are kept)
    decoder_only: bool = False  # fine-tune the decoder only: existing latents keep their meaning
    eval_data: str = ""  # held-out folder: PSNR/SSIM at the end; "": the data's test/ split, where it has one
    scale_samples: int = 1024  # images used to measure the latent scaling factor
    sample_images: int = 8  # reconstructions in each sample grid
    # From scratch only: the posterior log-variance the encoder starts with. A freshly built encoder emits
    # log σ² ≈ 0, so its sampled latents carry unit noise that it must first learn to shrink; starting low
    # (e.g. -6, σ ≈ 0.05) skips that phase. None keeps diffusers' initialisation.
    posterior_logvar_init: float | None = None
    # From scratch only: start every residual block (and the mid-block attention) as the identity by zeroing
    # its last layer, so a new autoencoder begins as a shallow one and its depth joins in as it trains.
    zero_init_residual: bool = False
    name: str = ""  # the written bundle's name; "" = the init_from bundle's, or the preset's


def with_model(cfg: VAERunConfig) -> VAERunConfig:
    """``cfg`` with its model filled in when the run config leaves it out: the init_from bundle's, else the
    preset's."""
    if cfg.model is not None:
        return cfg
    if cfg.init_from:
        return replace(cfg, model=load_bundle(cfg.init_from, verify=False).config)
    if cfg.preset:
        return replace(cfg, model=get_preset(cfg.preset))
    raise LdmError("pass --preset NAME to train from scratch or --init-from BUNDLE to fine-tune")


def check_config(cfg: VAERunConfig) -> None:
    """What the types cannot say; raised before any training so a bad run fails in seconds."""
    if cfg.preset and cfg.init_from:
        raise LdmError("pass --preset NAME (a new autoencoder) or --init-from BUNDLE (fine-tune its VAE), not both")
    if cfg.decoder_only and not cfg.init_from:
        raise LdmError("--decoder-only needs --init-from BUNDLE: a fresh encoder has to be trained")
    if cfg.zero_init_residual and cfg.init_from:
        raise LdmError("zero_init_residual sets up a new autoencoder; drop it when fine-tuning with --init-from")
    if cfg.posterior_logvar_init is not None and cfg.init_from:
        raise LdmError("posterior_logvar_init sets up a new encoder; drop it when fine-tuning with --init-from")
    vae = cfg.model.vae
    check_training_size(side=cfg.data.resolution, factor=vae.downsampling_factor, batch=cfg.train.batch_size,
                        channels=vae.block_out_channels, layers=vae.layers_per_block, what="VAE training")  # fmt: skip


# --- the autoencoder ------------------------------------------------------------------------------------------------


class Reconstruct(nn.Module):
    """x → (x̂, posterior mean, posterior log-variance) in one forward, so DDP sees every parameter used. The
    posterior sample's noise comes from the global RNG, drawn for the whole global batch (``shard``)."""

    def __init__(self, vae, shard: BatchShard = BatchShard()):
        super().__init__()
        self.vae, self.shard = vae, shard

    def forward(self, x: torch.Tensor):  # (B, 3, H, W) in [-1, 1]
        posterior = self.vae.encode(x).latent_dist
        noise = self.shard.local(torch.randn(self.shard.global_shape(posterior.mean.shape))).to(posterior.mean)
        z = posterior.mean + posterior.std * noise  # (B, C, H/f, W/f)
        return self.vae.decode(z).sample, posterior.mean, posterior.logvar


@torch.no_grad()
def init_posterior_logvar(vae, value: float) -> None:
    """Make a new encoder's posterior log-variance start at ``value``: the log-variance half of quant_conv
    (or of the encoder's last conv when there is no quant_conv) gets that bias and its weights are scaled down."""
    conv = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
    half = conv.out_channels // 2
    conv.weight[half:] *= 0.1
    conv.bias[half:] = value


@torch.no_grad()
def zero_residual_branches(vae) -> int:
    """Zero the last layer of every residual branch of ``vae`` (resnet ``conv2``, attention ``to_out``); the count."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    count = 0
    for module in vae.modules():
        if isinstance(module, ResnetBlock2D):
            last = module.conv2
        elif isinstance(module, Attention):
            last = module.to_out[0]
        else:
            continue
        last.weight.zero_()
        last.bias.zero_()
        count += 1
    return count


def base_bundle(cfg: VAERunConfig) -> Bundle:
    """The bundle whose VAE is trained: the init_from one, or a new one of the model config named after the preset."""
    if cfg.init_from:
        return load_bundle(cfg.init_from)
    return create_bundle(cfg.model, seed=cfg.train.seed, name=cfg.preset or "model")


def prepare_vae(vae, cfg: VAERunConfig, *, fresh: bool) -> nn.Module:
    """The VAE in training mode, with a new autoencoder's initialisations (``fresh``: not resumed) and the encoder
    frozen for a decoder-only fine-tune."""
    vae = vae.float().train()
    if cfg.posterior_logvar_init is not None and fresh:
        init_posterior_logvar(vae, cfg.posterior_logvar_init)
    if cfg.zero_init_residual and fresh:
        zero_residual_branches(vae)
    if cfg.decoder_only:
        for module in (vae.encoder, vae.quant_conv):
            module.requires_grad_(False)
    return vae


@dataclass
class Trainables:
    """The autoencoder and the loss (whose discriminator trains too), accelerate-prepared, with an optimizer and LR
    schedule each, and the VAE's EMA."""

    vae: nn.Module  # the plain module (its weights go into the bundle)
    model: nn.Module  # the prepared Reconstruct(vae)
    loss_fn: nn.Module  # the VAELoss, on the device (not prepared: see build_trainables)
    params: list[nn.Parameter]  # the autoencoder side's trained parameters (the VAE's and the loss's own)
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    sched_g: object
    sched_d: object
    ema: EMAModel | None

    def state(self) -> TrainingState:
        """What a checkpoint restores of them."""
        return TrainingState(
            models={"vae": self.model, "loss": self.loss_fn},
            optimizers={"vae": self.opt_g, "discriminator": self.opt_d},
            schedulers={"vae": self.sched_g, "discriminator": self.sched_d},
            emas={"vae": self.ema} if self.ema else {},
            progress=Progress(),
        )


def build_trainables(cfg: VAERunConfig, vae: nn.Module, accelerator: Accelerator) -> Trainables:
    """The prepared autoencoder, optimizers and schedules. The loss module stays unprepared: it runs outside a DDP
    forward (its discriminator twice a step), so :func:`~ldm.train.loop.backward_step` averages its gradients."""
    model = Reconstruct(vae, batch_shard(accelerator))
    loss_fn = VAELoss(cfg.loss).to(accelerator.device)
    params = [p for p in vae.parameters() if p.requires_grad] + list(loss_fn.generator_parameters())
    opt_g = make_optimizer(params, cfg.train)
    opt_d = make_optimizer(loss_fn.discriminator_parameters(), cfg.train)
    sched_g, sched_d = (make_lr_scheduler(o, cfg.train, processes=accelerator.num_processes) for o in (opt_g, opt_d))
    model, opt_g, opt_d, sched_g, sched_d = accelerator.prepare(model, opt_g, opt_d, sched_g, sched_d)
    return Trainables(vae=vae, model=model, loss_fn=loss_fn, params=params, opt_g=opt_g, opt_d=opt_d,
                      sched_g=sched_g, sched_d=sched_d, ema=make_ema(vae, cfg.train))  # fmt: skip


@dataclass
class RunResult:
    """What a run leaves behind (on the main process; elsewhere the progress alone)."""

    progress: Progress
    bundle_dir: Path | None = None
    scaling_factor: float | None = None
    metrics: dict = field(default_factory=dict)  # held-out PSNR/SSIM, as in OUT/eval.json


# --- the run --------------------------------------------------------------------------------------------------------


def run(cfg: VAERunConfig, *, resume: str | None = None) -> RunResult:
    """Train as ``cfg`` says, from the checkpoint ``resume`` names ('latest' or a file; None: from the start), and
    write ``OUT/bundle`` and, with eval_data, ``OUT/eval.json``."""
    cfg = with_model(cfg)
    check_config(cfg)
    out = Path(cfg.train.output_dir)
    resume_path = resolve_resume(resume, out)

    def unsharded(accelerator: Accelerator) -> None:
        if accelerator.distributed_type in SHARDED:
            raise LdmError(f"train_vae.py runs on one process or under DDP, not {accelerator.distributed_type.value}: "
                           "its two optimizers and its adaptive GAN weight need whole weights; launch it with "
                           "configs/accelerate/ddp-gpu.yaml")  # fmt: skip

    return held_run(cfg.train, lambda accelerator: _run(cfg, accelerator, resume_path=resume_path), check=unsharded)


def _run(cfg: VAERunConfig, accelerator: Accelerator, *, resume_path: Path | None) -> RunResult:
    """:func:`run` once the output folder is held."""
    out = Path(cfg.train.output_dir)
    torch.manual_seed(cfg.train.seed)

    dataset = training_dataset(cfg, accelerator)
    base = base_bundle(cfg)
    model = build_trainables(cfg, prepare_vae(base.vae, cfg, fresh=resume_path is None), accelerator)
    state = model.state()
    begin_run(accelerator, state, config=cfg, resume=resume_path, output_dir=out, name="train_vae")

    fixed = torch.stack([dataset[i]["pixel_values"] for i in range(min(cfg.sample_images, len(dataset)))])
    sample_fn = reconstruction_grid(model.vae, fixed, accelerator=accelerator, output_dir=out)
    train_loop(
        accelerator=accelerator, cfg=cfg.train, state=state, dataset=dataset, config=cfg,
        step_fn=step_function(cfg, model, accelerator=accelerator), sample_fn=sample_fn,
        ema_models=[(model.ema, model.vae)] if model.ema else [],
    )  # fmt: skip
    accelerator.wait_for_everyone()
    result = RunResult(progress=state.progress)
    if accelerator.is_main_process:
        finish(cfg, base, model, dataset, sample_fn, result, accelerator=accelerator)
    return result


def training_dataset(cfg: VAERunConfig, accelerator: Accelerator) -> CaptionedImageDataset:
    """The training images, after the data report (and a note when the perceptual term is off)."""
    report = report_dataset(cfg.data, quiet=not accelerator.is_main_process, share=scan_share(accelerator))
    dataset = CaptionedImageDataset(cfg.data, report=report, seed=cfg.train.seed)
    if cfg.loss.perceptual_weights is None and accelerator.is_main_process:
        print(perceptual_unavailable_message())
    return dataset


def step_function(cfg: VAERunConfig, model: Trainables, *, accelerator: Accelerator) -> StepFn:
    """One micro-batch: the autoencoder's update, then the discriminator's on the detached reconstruction."""
    loss_fn = model.loss_fn
    last_layer = model.vae.decoder.conv_out.weight  # where the adversarial term's adaptive weight is measured
    # The adaptive weight compares gradients of the global batch's losses: each process's, averaged.
    average = (lambda g: accelerator.reduce(g, reduction="mean")) if accelerator.num_processes > 1 else None

    def step_fn(batch: dict, step: int) -> dict[str, float]:
        x = batch["pixel_values"].to(accelerator.device)  # (B, 3, H, W) in [-1, 1]
        with accelerator.accumulate(model.model):
            # Autoencoder update. The loss keeps the discriminator out of this backward pass.
            x_hat, mean, logvar = model.model(x)
            posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
            loss, logs = loss_fn.generator_loss(x, x_hat, posterior, step=step, last_layer=last_layer, average=average)
            backward_step(accelerator, loss, model.opt_g, model.sched_g, params=model.params,
                          grad_clip=cfg.train.grad_clip, unprepared=loss_fn.generator_parameters())  # fmt: skip
            # Discriminator update on the detached reconstruction, from loss.disc_start on.
            d_loss, d_logs = loss_fn.discriminator_loss(x, x_hat.detach(), step=step)
            if loss_fn.adversarial_active(step):  # the discriminator's LR schedule counts its own steps
                backward_step(accelerator, d_loss, model.opt_d, model.sched_d,
                              unprepared=loss_fn.discriminator_parameters())  # fmt: skip
        return {k: float(v) for k, v in (logs | d_logs).items()}

    return step_fn


def reconstruction_grid(vae: nn.Module, fixed: torch.Tensor, *, accelerator: Accelerator,
                        output_dir: Path) -> Callable[[int], None]:  # fmt: skip
    """``sample_fn(step)``: the fixed images over their reconstructions (posterior modes), as a grid in
    ``samples/`` and TensorBoard, on the main process; the VAE goes back to training mode."""

    @torch.no_grad()
    def sample_fn(step: int) -> None:
        if not accelerator.is_main_process:
            return
        vae.eval()
        recon = vae.decode(vae.encode(fixed.to(accelerator.device)).latent_dist.mode()).sample.cpu().float()
        vae.train()
        grid = image_grid(torch.cat([fixed, recon]) / 2 + 0.5, columns=len(fixed))  # originals over reconstructions
        log_grid(accelerator, "reconstructions", grid, step, output_dir)

    return sample_fn


# --- the end --------------------------------------------------------------------------------------------------------


def finish(cfg: VAERunConfig, base: Bundle, model: Trainables, dataset, sample_fn, result: RunResult, *,
           accelerator: Accelerator) -> None:  # fmt: skip
    """The EMA weights into the VAE, the final grid (once), the scaling factor, ``OUT/bundle`` and the held-out
    metrics (``OUT/eval.json``)."""
    out, vae = Path(cfg.train.output_dir), model.vae
    if model.ema is not None:
        model.ema.copy_to(vae.parameters())  # the bundle gets the EMA weights
    sample_fn(result.progress.step)
    vae.eval()
    scale = measure_scaling_factor(vae, dataset, samples=cfg.scale_samples, batch_size=cfg.train.batch_size,
                                   device=accelerator.device, seed=cfg.train.seed)  # fmt: skip
    vae.register_to_config(scaling_factor=scale)
    config = replace(base.config, vae=replace(base.config.vae, scaling_factor=scale))
    if base.tiny_vae is not None:  # distilled from the VAE as it was: its latents have moved since
        print("note: the bundle's tiny autoencoder is left out of the new bundle, which it no longer fits; distil "
              f"another with `python train_tiny_vae.py --bundle {out / 'bundle'} --data IMAGES --out OUT`")  # fmt: skip
    written = replace(base, config=config, vae=vae.cpu(), name=cfg.name or base.name, tiny_vae=None)
    result.bundle_dir = save_bundle(written, out / "bundle")
    result.scaling_factor = scale
    print(f"latent scaling factor {scale:.5f}; bundle written to {out / 'bundle'}")
    if (held := held_out(cfg.data, cfg.eval_data)) is not None:
        result.metrics = evaluate_batches(vae, eval_batches(held, cfg.train.batch_size))
        (out / "eval.json").write_text(json.dumps(result.metrics, indent=2) + "\n")
        print("held-out: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in result.metrics.items()))  # fmt: skip


@torch.no_grad()
def measure_scaling_factor(vae, dataset, *, samples: int, batch_size: int, device, seed: int = 0) -> float:
    """1 / std of posterior samples over up to ``samples`` images (how SD's 0.18215 was obtained).

    A pure function of the weights, the data and ``seed``: the images as the first epoch draws them and the
    posterior noise from a generator of its own, so a run resumed at its last step, whose epoch and global RNG
    are not those of the unbroken run, measures the same factor."""
    images = CaptionedImageDataset(dataset.config, report=dataset.report, seed=dataset.seed)  # epoch 0
    generator = torch.Generator().manual_seed(seed)
    values = []
    indices = list(range(min(samples, len(images))))
    for start in tqdm(range(0, len(indices), batch_size), desc="scaling factor", leave=False):
        x = torch.stack([images[i]["pixel_values"] for i in indices[start : start + batch_size]]).to(device, vae.dtype)
        posterior = vae.encode(x).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean)
        values.append((posterior.mean + posterior.std * noise).float().flatten().cpu())
    return 1.0 / torch.cat(values).std().item()


def eval_batches(config: DataConfig, batch_size: int) -> Iterator[torch.Tensor]:
    """The held-out images in order, as (B, 3, H, W) batches in [-1, 1]."""
    dataset = CaptionedImageDataset(config, seed=0)
    for start in range(0, len(dataset), batch_size):
        yield torch.stack([dataset[i]["pixel_values"] for i in range(start, min(start + batch_size, len(dataset)))])
