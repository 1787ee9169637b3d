"""Train the KL autoencoder of a preset, or fine-tune a bundle's VAE, and write the result into a bundle.

    python train_vae.py --preset emoji-tiny --data data/emoji/train --eval-data data/emoji/test \\
        --out runs/vae-emoji --max-minutes 30
    python train_vae.py --out runs/vae-emoji --resume latest            # continue exactly where it stopped
    python train_vae.py --init-from models/emoji-tiny --decoder-only --data my/images --out runs/ft

Loss: reconstruction (L1 or L2) + KL (weight ~1e-6) + optional LPIPS-style perceptual term (needs VGG16
weights given by path) + a PatchGAN discriminator (hinge loss) from ``loss.disc_start`` on, weighted
adaptively at the decoder's last layer (Esser et al. 2021). At the end the latent scaling factor
(1 / std of the latents over a sample of the data) is measured and stored in the VAE config.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn
from tqdm.auto import tqdm

from ldm.cli.common import ArgumentParser, run_cli
from ldm.cli.options import add_run_arguments, load_run_config, with_run_flags
from ldm.config import apply_overrides
from ldm.data import CaptionedImageDataset, DataConfig, report_dataset
from ldm.errors import LdmError
from ldm.eval.reconstruction import evaluate_batches
from ldm.formats.bundle import Bundle, create_bundle, load_bundle, save_bundle
from ldm.models.presets import PRESETS, ModelConfig, get_preset
from ldm.train.loop import (
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
from ldm.train.losses import VAELoss, VAELossConfig, perceptual_unavailable_message


@dataclass(frozen=True, kw_only=True)
class VAERunConfig:
    model: ModelConfig
    data: DataConfig
    # The loss is summed over pixels (so kl_weight keeps its LDM meaning): no gradient-norm clipping by default.
    train: TrainConfig = TrainConfig(output_dir="runs/vae", batch_size=16, lr=4.5e-6 * 16, max_steps=2000, grad_clip=0.0)
    loss: VAELossConfig = VAELossConfig()
    init_from: str = ""  # a bundle whose VAE is fine-tuned (and whose other parts are kept)
    decoder_only: bool = False  # fine-tune the decoder only: existing latents keep their meaning
    eval_data: str = ""  # held-out folder: PSNR/SSIM at the end
    scale_samples: int = 1024  # images used to measure the latent scaling factor
    sample_images: int = 8  # reconstructions in each sample grid
    # From scratch only: the posterior log-variance the encoder starts with. A freshly built encoder emits
    # log σ² ≈ 0, so its sampled latents carry unit noise that it must first learn to shrink; starting low
    # (e.g. -6, σ ≈ 0.05) skips that phase. None keeps diffusers' initialisation.
    posterior_logvar_init: float | None = None
    # From scratch only: start every residual block (and the mid-block attention) as the identity by zeroing
    # its last layer, so a new autoencoder begins as a shallow one and its depth joins in as it trains.
    zero_init_residual: bool = False


class Reconstruct(nn.Module):
    """x → (x̂, posterior mean, posterior log-variance) in one forward, so DDP sees every parameter used."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor):  # (B, 3, H, W) in [-1, 1]
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample()  # (B, 4, H/8, W/8)
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


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="train_vae.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), help="model preset to train from scratch")
    p.add_argument("--init-from", help="bundle whose VAE to fine-tune")
    p.add_argument("--decoder-only", action="store_true", help="with --init-from: train the decoder only")
    add_run_arguments(p, eval_help="held-out image folder for PSNR/SSIM at the end",
                      out_help="output folder: checkpoints/, samples/, logs/, bundle/")  # fmt: skip
    return p


def resolve_config(args) -> VAERunConfig:
    """Config file, else flags; a resumed run reads the config its checkpoints were written with."""
    cfg = load_run_config(VAERunConfig, args)
    if cfg is None:
        if not args.data:
            raise LdmError("no training data; pass --data FOLDER (see `python -m ldm data check FOLDER`)")
        if args.init_from:
            model = load_bundle(args.init_from, verify=False).config
        elif args.preset:
            model = get_preset(args.preset)
        else:
            raise LdmError("pass --preset NAME to train from scratch or --init-from BUNDLE to fine-tune")
        resolution = args.resolution or model.default_size
        cfg = VAERunConfig(
            model=model,
            data=DataConfig(path=args.data, resolution=resolution, center_crop=True, random_flip=0.5),
            init_from=args.init_from or "",
            decoder_only=args.decoder_only,
            eval_data=args.eval_data or "",
        )
    cfg = apply_overrides(with_run_flags(cfg, args), args.overrides)
    if cfg.decoder_only and not cfg.init_from:
        raise LdmError("--decoder-only needs --init-from BUNDLE: a fresh encoder has to be trained")
    if cfg.zero_init_residual and cfg.init_from:
        raise LdmError("zero_init_residual sets up a new autoencoder; drop it when fine-tuning with --init-from")
    if cfg.posterior_logvar_init is not None and cfg.init_from:
        raise LdmError("posterior_logvar_init sets up a new encoder; drop it when fine-tuning with --init-from")
    return cfg


@torch.no_grad()
def measure_scaling_factor(vae, dataset, *, samples: int, batch_size: int, device) -> float:
    """1 / std of posterior samples over up to ``samples`` images (how SD's 0.18215 was obtained)."""
    values = []
    indices = list(range(min(samples, len(dataset))))
    for start in tqdm(range(0, len(indices), batch_size), desc="scaling factor", leave=False):
        x = torch.stack([dataset[i]["pixel_values"] for i in indices[start : start + batch_size]]).to(device, vae.dtype)
        values.append(vae.encode(x).latent_dist.sample().float().flatten().cpu())
    return 1.0 / torch.cat(values).std().item()


def eval_batches(config: DataConfig, batch_size: int):
    dataset = CaptionedImageDataset(config, seed=0)
    for start in range(0, len(dataset), batch_size):
        yield torch.stack([dataset[i]["pixel_values"] for i in range(start, min(start + batch_size, len(dataset)))])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    out = Path(cfg.train.output_dir)
    resume = resolve_resume(args.resume, out)
    accelerator = make_accelerator(cfg.train, log_dir=out / "logs")
    torch.manual_seed(cfg.train.seed)

    report = report_dataset(cfg.data, file=sys.stdout if accelerator.is_main_process else None)
    dataset = CaptionedImageDataset(cfg.data, report=report, seed=cfg.train.seed)
    if cfg.loss.perceptual_weights is None and accelerator.is_main_process:
        print(perceptual_unavailable_message())

    base: Bundle = load_bundle(cfg.init_from) if cfg.init_from else create_bundle(cfg.model, seed=cfg.train.seed, name=out.name)
    vae = base.vae.float().train()
    if cfg.posterior_logvar_init is not None and resume is None:
        init_posterior_logvar(vae, cfg.posterior_logvar_init)
    if cfg.zero_init_residual and resume is None:
        zero_residual_branches(vae)
    if cfg.decoder_only:
        for module in (vae.encoder, vae.quant_conv):
            module.requires_grad_(False)
    model = Reconstruct(vae)
    loss_fn = VAELoss(cfg.loss)
    trainable = [p for p in vae.parameters() if p.requires_grad] + list(loss_fn.generator_parameters())
    opt_g = make_optimizer(trainable, cfg.train)
    opt_d = make_optimizer(loss_fn.discriminator_parameters(), cfg.train)
    sched_g, sched_d = (make_lr_scheduler(o, cfg.train, processes=accelerator.num_processes) for o in (opt_g, opt_d))
    model, loss_fn, opt_g, opt_d, sched_g, sched_d = accelerator.prepare(model, loss_fn, opt_g, opt_d, sched_g, sched_d)
    ema = make_ema(vae, cfg.train)
    state = TrainingState(
        models={"vae": model, "loss": loss_fn},
        optimizers={"vae": opt_g, "discriminator": opt_d},
        schedulers={"vae": sched_g, "discriminator": sched_d},
        emas={"vae": ema} if ema else {},
        progress=Progress(),
    )
    begin_run(accelerator, state, config=cfg, resume=resume, output_dir=out, name="train_vae")

    unwrapped_loss = accelerator.unwrap_model(loss_fn)
    last_layer = vae.decoder.conv_out.weight
    fixed = torch.stack([dataset[i]["pixel_values"] for i in range(min(cfg.sample_images, len(dataset)))])

    def step_fn(batch: dict, step: int) -> dict[str, float]:
        x = batch["pixel_values"].to(accelerator.device)  # (B, 3, H, W) in [-1, 1]
        with accelerator.accumulate(model, loss_fn):
            # Autoencoder update. The loss keeps the discriminator out of this backward pass.
            x_hat, mean, logvar = model(x)
            posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
            loss, logs = unwrapped_loss.generator_loss(x, x_hat, posterior, step=step, last_layer=last_layer)
            backward_step(accelerator, loss, opt_g, sched_g, params=trainable, grad_clip=cfg.train.grad_clip)
            # Discriminator update on the detached reconstruction, from loss.disc_start on.
            d_loss, d_logs = unwrapped_loss.discriminator_loss(x, x_hat.detach(), step=step)
            if unwrapped_loss.adversarial_active(step):  # the discriminator's LR schedule counts its own steps
                backward_step(accelerator, d_loss, opt_d, sched_d)
        return {k: float(v) for k, v in (logs | d_logs).items()}

    @torch.no_grad()
    def sample_fn(step: int) -> None:
        if not accelerator.is_main_process:
            return
        vae.eval()
        recon = vae.decode(vae.encode(fixed.to(accelerator.device)).latent_dist.mode()).sample.cpu().float()
        vae.train()
        grid = image_grid(torch.cat([fixed, recon]) / 2 + 0.5, columns=len(fixed))  # originals over reconstructions
        log_grid(accelerator, "reconstructions", grid, step, out)

    train_loop(
        accelerator=accelerator, cfg=cfg.train, state=state, dataset=dataset, step_fn=step_fn, config=cfg,
        sample_fn=sample_fn, ema_models=[(ema, vae)] if ema else [],
    )  # fmt: skip
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return 0

    if ema is not None:
        ema.copy_to(vae.parameters())  # the bundle gets the EMA weights
    vae.eval()
    sample_fn(state.progress.step)
    scale = measure_scaling_factor(vae, dataset, samples=cfg.scale_samples, batch_size=cfg.train.batch_size, device=accelerator.device)
    vae.register_to_config(scaling_factor=scale)
    config = replace(base.config, vae=replace(base.config.vae, scaling_factor=scale))
    bundle = replace(base, config=config, vae=vae.cpu(), name=base.name)
    save_bundle(bundle, out / "bundle")
    print(f"latent scaling factor {scale:.5f}; bundle written to {out / 'bundle'}")

    if cfg.eval_data:
        metrics = evaluate_batches(vae, eval_batches(cfg.data.held_out(cfg.eval_data), cfg.train.batch_size))
        (out / "eval.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print("held-out: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    accelerator.end_training()
    return 0


def entry() -> None:
    """The installed command and the root script: run with argv, exit with the status."""
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    entry()
