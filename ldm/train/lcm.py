"""Latent consistency distillation (Luo et al. 2023, "Latent Consistency Models", Algorithm 1): a UNet that samples
in 1–8 steps, distilled from a bundle's UNet (the teacher) on the training data's latents.

The student learns the consistency function f(z_t, ω, c, t) = c_skip(t)·z_t + c_out(t)·x̂₀(z_t) (Eq. 9), which maps
any point of the teacher's guided probability-flow ODE to the ODE's origin. One step of training (Algorithm 1):

1. z = the data's latents; t_{n+k} drawn from the skipping-step grid of N DDIM timesteps (``ddim_timesteps``, the
   grid diffusers' ``LCMScheduler`` samples from; k = T/N training timesteps apart), t_n = t_{n+k} − k;
   ω ~ U[``guidance_min`` − 1, ``guidance_max`` − 1]; z_{t_{n+k}} = √ᾱ·z + √(1−ᾱ)·ε.
2. The teacher runs one DDIM step (Song et al. 2021, η = 0) from t_{n+k} to t_n on its classifier-free-guided
   prediction ε_c + ω·(ε_c − ε_u) (Eq. 8's augmented PF-ODE, solved with DDIM as the paper's Φ).
3. The loss d(f_θ(z_{t_{n+k}}, ω, c, t_{n+k}), f_θ⁻(ẑ_{t_n}, ω, c, t_n)) (Eq. 10), d the pseudo-Huber distance
   √(‖a − b‖² + c²) − c of Song & Dhariwal 2023 (``loss: huber``) or the squared L2 one (``loss: l2``); θ⁻ the
   target network, an exponential moving average θ⁻ ← μ·θ⁻ + (1 − μ)·θ (``target_decay`` μ).

The boundary scalings c_skip(t) = σ²/((st)² + σ²), c_out(t) = st/√((st)² + σ²), σ = 0.5, s = ``timestep_scaling``
(10), are those of ``LCMScheduler``, so the student samples with ``--sampler lcm``.

Two results:

- **A full student** (``lora.rank`` 0): the teacher's UNet with a guidance-scale input (``guidance_embedding_dim``,
  diffusers' ``time_cond_proj_dim``; its projection starts at zero, so the student starts as the teacher), written as
  ``OUT/bundle``. It runs once per step whatever the guidance scale (no unconditional half).
- **An LCM-LoRA** (Luo et al. 2023b, "LCM-LoRA"; ``lora.rank`` > 0): LoRA adapters on the teacher, written as
  ``OUT/lora.safetensors``; the teacher is the same UNet with its adapters off, and the target network is the
  student itself under a stop-gradient (as the LCM-LoRA report trains it). It has no guidance input: sample with
  ``--guidance 1`` to ``2``.

Everything else (data, feature cache, checkpoints, exact resume, grids) is :mod:`ldm.train.unet`'s.
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from ldm.errors import LdmError
from ldm.formats.bundle import Bundle
from ldm.models.presets import ModelConfig, Task
from ldm.models.unet import guidance_embedding, with_guidance_input
from ldm.pipeline.schedule import LCM_GRID_STEPS, Prediction
from ldm.train.distributed import batch_shard
from ldm.train.loop import (
    LRSchedule,
    StepFn,
    TrainConfig,
    backward_step,
    begin_run,
    held_run,
    resolve_resume,
)
from ldm.train.objectives import add_noise, alphas_cumprod
from ldm.train.unet import (
    RunResult,
    TextConditioning,
    Trainables,
    UNetRunConfig,
    ValidationConfig,
    build_trainables,
    finish,
    latents_of,
    load_base,
    train_timed,
    training_data,
    validation,
    validation_prompts,
    with_model,
)

SIGMA_DATA = 0.5  # σ_data of the boundary scalings (Song et al. 2023, consistency models, Appendix C; LCMScheduler's)


class ConsistencyLoss(enum.Enum):
    HUBER = "huber"  # pseudo-Huber √(‖a − b‖² + c²) − c (Song & Dhariwal 2023, §3.3): robust to outliers
    L2 = "l2"  # squared L2 ‖a − b‖² (LCM paper, Eq. 10's d)


@dataclass(frozen=True, kw_only=True)
class LCMConfig:
    ddim_timesteps: int = LCM_GRID_STEPS  # N: the skipping-step grid; k = T / N (the paper's skipping interval)
    guidance_min: float = 3.0  # the guidance scale 1 + ω is drawn uniformly from [min, max] (paper: ω ∈ [2, 14])
    guidance_max: float = 15.0
    guidance_embedding_dim: int = 256  # the full student's guidance input width (diffusers' time_cond_proj_dim)
    loss: ConsistencyLoss = ConsistencyLoss.HUBER
    huber_c: float = 0.001  # c of the pseudo-Huber distance
    target_decay: float = 0.95  # μ of the target network's EMA (the paper's); the LCM-LoRA's target is the student
    timestep_scaling: float = 10.0  # s of the boundary scalings; LCMScheduler's default, which sampling uses

    def __post_init__(self):
        if not 1 <= self.ddim_timesteps <= 1000:
            raise ValueError(f"lcm.ddim_timesteps must be in 1 … 1000, got {self.ddim_timesteps}; 50 is usual")
        if not 1.0 <= self.guidance_min <= self.guidance_max:
            raise ValueError(f"lcm.guidance_min and guidance_max must satisfy 1 ≤ min ≤ max, got "
                             f"{self.guidance_min}, {self.guidance_max}; 3 and 15 are the paper's")  # fmt: skip
        if self.guidance_embedding_dim < 2 or self.guidance_embedding_dim % 2:
            raise ValueError(f"lcm.guidance_embedding_dim must be an even number ≥ 2, got {self.guidance_embedding_dim}")
        if not self.huber_c > 0:
            raise ValueError(f"lcm.huber_c must be positive, got {self.huber_c}; 0.001 is usual")
        if not 0 <= self.target_decay < 1:
            raise ValueError(f"lcm.target_decay must be in [0, 1), got {self.target_decay}; 0.95 is the paper's")
        if not self.timestep_scaling > 0:
            raise ValueError(f"lcm.timestep_scaling must be positive, got {self.timestep_scaling}")


LCM_TRAIN = TrainConfig(
    output_dir="runs/lcm", batch_size=16, lr=1e-5, weight_decay=0.0, lr_schedule=LRSchedule.CONSTANT,
    warmup_steps=100, max_steps=4000, ema_decay=0.0, checkpoint_every=500, sample_every=500,
)  # fmt: skip


def _lcm_validation() -> ValidationConfig:
    return ValidationConfig(steps=4, sampler="lcm")


@dataclass(frozen=True, kw_only=True)
class LCMRunConfig(UNetRunConfig):
    """A UNet run config (``bundle`` is the teacher, ``lora`` chooses LCM-LoRA) with the distillation's settings.
    The task and conditioning stay text-to-image and text; ``train.ema_decay`` is an EMA of the student besides the
    target network, off by default."""

    lcm: LCMConfig = field(default_factory=LCMConfig)
    train: TrainConfig = LCM_TRAIN
    validation: ValidationConfig = field(default_factory=_lcm_validation)


# --- the objective, as pure functions ----------------------------------------------------------------------------


def skipping_timesteps(num_train_timesteps: int, ddim_timesteps: int) -> torch.Tensor:
    """(N,) int64 grid t_n = n·k − 1, n = 1 … N, k = T // N: the timesteps ``LCMScheduler`` samples from."""
    k = num_train_timesteps // ddim_timesteps
    return torch.arange(1, ddim_timesteps + 1) * k - 1


def boundary_scalings(t: torch.Tensor, *, timestep_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) timesteps → (c_skip, c_out), each (B,) float32: c_skip = σ²/((st)² + σ²), c_out = st/√((st)² + σ²)
    (LCM Eq. 9 with Song et al. 2023's parametrisation; at t = 0 c_skip = 1, c_out = 0, the boundary condition)."""
    scaled = t.float() * timestep_scaling
    denominator = scaled**2 + SIGMA_DATA**2
    return SIGMA_DATA**2 / denominator, scaled / denominator.sqrt()


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, torch.float32).reshape(-1, *([1] * (like.ndim - 1)))


def x0_and_noise(output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                 prediction: Prediction) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """A UNet's ε or v output at x_t → (x̂₀, ε̂), float32 (Ho et al. 2020, Eq. 15; Salimans & Ho 2022, §4)."""
    a = _per_sample(alphas_cumprod.to(torch.float32)[t.cpu().long()], x_t)  # (B, 1, 1, 1) ᾱ_t
    x_t, output = x_t.float(), output.float()
    if prediction is Prediction.EPSILON:
        return (x_t - (1 - a).sqrt() * output) / a.sqrt(), output
    if prediction is Prediction.V:
        return a.sqrt() * x_t - (1 - a).sqrt() * output, (1 - a).sqrt() * x_t + a.sqrt() * output
    raise ValueError(f"unknown prediction type {prediction}")


def consistency_function(output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, *,
                         prediction: Prediction, timestep_scaling: float) -> torch.Tensor:  # fmt: skip
    """f(x_t, t) = c_skip(t)·x_t + c_out(t)·x̂₀(x_t) (LCM Eq. 9): one step of ``LCMScheduler`` without its noise."""
    x0, _ = x0_and_noise(output, x_t, t, alphas_cumprod, prediction)
    c_skip, c_out = boundary_scalings(t, timestep_scaling=timestep_scaling)
    return _per_sample(c_skip, x_t) * x_t.float() + _per_sample(c_out, x_t) * x0


def ddim_step(x0: torch.Tensor, noise: torch.Tensor, s: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_s = √ᾱ_s·x̂₀ + √(1−ᾱ_s)·ε̂: the deterministic DDIM update to timestep s (Song et al. 2021, Eq. 12, η = 0)."""
    a = _per_sample(alphas_cumprod.to(torch.float32)[s.cpu().long()], x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def guided(cond: torch.Tensor, uncond: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """ε_c + ω·(ε_c − ε_u) per sample (LCM Eq. 8: classifier-free guidance with scale 1 + ω)."""
    return cond + _per_sample(omega, cond) * (cond - uncond)


def consistency_loss(student: torch.Tensor, target: torch.Tensor, *, kind: ConsistencyLoss, huber_c: float) -> torch.Tensor:
    """Mean over the batch of d(student, target): pseudo-Huber √(mean (a − b)² + c²) − c per sample, or the
    per-sample mean squared error; float32."""
    squared = (student.float() - target.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
    if kind is ConsistencyLoss.HUBER:
        return ((squared + huber_c**2).sqrt() - huber_c).mean()
    return squared.mean()


# --- the run ------------------------------------------------------------------------------------------------------


def student_model(teacher: ModelConfig, cfg: LCMRunConfig) -> ModelConfig:
    """The written model's config: the teacher's, with the guidance input for a full student."""
    if cfg.lora.rank:
        return teacher
    return replace(teacher, unet=replace(teacher.unet, guidance_embedding_dim=cfg.lcm.guidance_embedding_dim))


def check_distillation(cfg: LCMRunConfig, base: Bundle) -> None:
    if cfg.task is not Task.TEXT_TO_IMAGE or base.config.task is not Task.TEXT_TO_IMAGE or base.labels is not None:
        raise LdmError(f"consistency distillation takes a text-to-image, text-conditioned teacher; {cfg.bundle} is "
                       f"{base.config.task.value}, {base.config.conditioning.value}-conditioned")  # fmt: skip
    if base.config.unet.guidance_embedding_dim is not None:
        raise LdmError(f"{cfg.bundle} is a consistency-distilled student already; distil from its teacher")
    if cfg.train_text_encoder:
        raise LdmError("consistency distillation trains the UNet only; leave out --train-text-encoder")
    if base.config.schedule.num_train_timesteps % cfg.lcm.ddim_timesteps:
        raise LdmError(f"lcm.ddim_timesteps must divide the schedule's {base.config.schedule.num_train_timesteps} "
                       f"training timesteps, got {cfg.lcm.ddim_timesteps}; 50 is usual")  # fmt: skip


@dataclass
class Networks:
    """The student (trained, inside ``trainables``), the frozen teacher and the target network; for an LCM-LoRA the
    teacher is the student's UNet with its adapters off and the target is the student."""

    trainables: Trainables
    teacher: nn.Module | None  # None: the student's UNet with its adapters disabled
    target: nn.Module | None  # None: the student under a stop-gradient


def build_networks(cfg: LCMRunConfig, base: Bundle, accelerator: Accelerator) -> Networks:
    if cfg.lora.rank:
        return Networks(trainables=build_trainables(cfg, base, accelerator), teacher=None, target=None)
    teacher = base.unet.float().to(accelerator.device).eval().requires_grad_(False)
    student = with_guidance_input(teacher, cfg.lcm.guidance_embedding_dim)
    trainables = build_trainables(cfg, replace(base, unet=student), accelerator)
    target = copy.deepcopy(trainables.unet).eval().requires_grad_(False)
    return Networks(trainables=trainables, teacher=teacher, target=target)


def distillation_step(cfg: LCMRunConfig, base: Bundle, nets: Networks, conditioning: TextConditioning, cache, *,
                      accelerator: Accelerator) -> StepFn:  # fmt: skip
    """One micro-batch of Algorithm 1; every random draw from the global RNG, which checkpoints restore."""
    schedule, lcm, device, shard = cfg.model.schedule, cfg.lcm, accelerator.device, batch_shard(accelerator)
    ac = alphas_cumprod(schedule)  # (T,)
    grid = skipping_timesteps(schedule.num_train_timesteps, lcm.ddim_timesteps)  # (N,)
    k = schedule.num_train_timesteps // lcm.ddim_timesteps
    model = nets.trainables
    embeds = nets.target is not None  # the full student reads ω
    scalings = dict(prediction=schedule.prediction, timestep_scaling=lcm.timestep_scaling)

    empty_context: list[torch.Tensor] = []  # the empty prompt's hidden states, encoded once

    def unconditional(b: int) -> torch.Tensor:
        if not empty_context:
            empty_context.append(conditioning([""], cache)["context"])  # (1, L, D)
        return empty_context[0].expand(b, -1, -1)

    def teacher_output(x_t, t, context):
        if nets.teacher is not None:
            return nets.teacher(x_t, t, encoder_hidden_states=context).sample
        model.unet.disable_adapters()
        try:
            return model.unet(x_t, t, encoder_hidden_states=context).sample
        finally:
            model.unet.enable_adapters()

    def step_fn(batch: dict, step: int) -> dict[str, float]:
        with accelerator.accumulate(model.denoiser):
            # Every draw is made for the whole global batch; this process keeps its rows (as train_unet.py's step).
            x0 = latents_of(batch, base.vae, scaling=base.config.vae.scaling_factor, accelerator=accelerator,
                            shard=shard)  # fmt: skip
            b, everyone = len(x0), shard.global_count(len(x0))
            noise = shard.local(torch.randn(shard.global_shape(x0.shape))).to(device)
            t = grid[shard.local(torch.randint(0, len(grid), (everyone,)))].to(device)  # (B,) t_{n+k}
            s = (t - k).clamp(min=0)  # (B,) t_n
            omega = shard.local(lcm.guidance_min - 1 + (lcm.guidance_max - lcm.guidance_min) * torch.rand(everyone))
            w = guidance_embedding(omega, lcm.guidance_embedding_dim).to(device) if embeds else None  # (B, D_w)
            x_t = add_noise(x0, noise, t, ac)  # (B, C, h, w)
            context = conditioning(batch["caption"], cache)["context"]  # (B, L, D)
            student = model.denoiser(x_t, t, context=context, timestep_cond=w)
            f_student = consistency_function(student, x_t, t, ac, **scalings)
            with torch.no_grad(), accelerator.autocast():
                empty = unconditional(b)  # (B, L, D)
                both = teacher_output(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([empty, context]))
                uncond, cond = both.float().chunk(2)
                x0_hat, noise_hat = x0_and_noise(guided(cond, uncond, omega), x_t, t, ac, schedule.prediction)
                x_s = ddim_step(x0_hat, noise_hat, s, ac)  # (B, C, h, w) one teacher ODE step
                target_net = nets.target if nets.target is not None else accelerator.unwrap_model(model.denoiser).unet
                kwargs = {"timestep_cond": w} if embeds else {}
                target_out = target_net(x_s, s, encoder_hidden_states=context, **kwargs).sample
                f_target = consistency_function(target_out, x_s, s, ac, **scalings)
            loss = consistency_loss(f_student, f_target, kind=lcm.loss, huber_c=lcm.huber_c)
            backward_step(accelerator, loss, model.optimizer, model.lr_scheduler, params=model.params,
                          grad_clip=cfg.train.grad_clip)  # fmt: skip
        if nets.target is not None and accelerator.sync_gradients:
            update_target(nets.target, model.unet, decay=lcm.target_decay)
        return {"loss": float(loss.detach())}

    return step_fn


@torch.no_grad()
def update_target(target: nn.Module, student: nn.Module, *, decay: float) -> None:
    """θ⁻ ← μ·θ⁻ + (1 − μ)·θ, parameter by parameter (LCM Algorithm 1, last line)."""
    pairs = list(zip(target.parameters(), student.parameters(), strict=True))
    torch._foreach_lerp_([p for p, _ in pairs], [q.detach() for _, q in pairs], 1 - decay)


def run(cfg: LCMRunConfig, *, resume: str | None = None) -> RunResult:
    """Distil as ``cfg`` says, from the checkpoint ``resume`` names ('latest' or a file; None: from the start), and
    write ``OUT/bundle`` (the student) or ``OUT/lora.safetensors`` (the LCM-LoRA)."""
    cfg = with_model(cfg)
    return held_run(cfg.train, lambda accelerator: _run(cfg, accelerator, resume=resume))


def _run(cfg: LCMRunConfig, accelerator: Accelerator, *, resume: str | None) -> RunResult:
    """:func:`run` once the output folder is held."""
    out = Path(cfg.train.output_dir)
    resume_path = resolve_resume(resume, out)
    torch.manual_seed(cfg.train.seed)

    base = load_base(cfg, accelerator)
    check_distillation(cfg, base)
    data = training_data(cfg, base, accelerator)
    nets = build_networks(cfg, base, accelerator)
    model = nets.trainables
    state = model.state()
    if nets.target is not None:
        state.models["target"] = nets.target
    begin_run(accelerator, state, config=cfg, resume=resume_path, output_dir=out, name="train_lcm")

    conditioning = TextConditioning(base, trains_text=False, accelerator=accelerator)
    result_bundle = replace(base, config=student_model(base.config, cfg), unet=model.unet)
    validate = validation(cfg, result_bundle, model, conditioning, None, prompts=validation_prompts(cfg, data.report),
                          report=data.report, accelerator=accelerator)  # fmt: skip
    result = train_timed(
        accelerator, state, unet=model.unet, text_encoder=model.text_encoder, cfg=cfg.train, dataset=data.items,
        config=cfg, sample_fn=validate, ema_models=[(model.ema, model.unet)] if model.ema else [],
        batch_order=data.order, step_fn=distillation_step(cfg, base, nets, conditioning, data.cache,
                                                          accelerator=accelerator),
    )  # fmt: skip
    if not accelerator.is_main_process:
        return result
    finish(cfg, result_bundle, model, validate, result, accelerator=accelerator)
    how = "--sampler lcm --steps 4" + (" --cfg 1" if cfg.lora.rank else "")
    print(f"sample with: generate.py --model {result.bundle_dir or cfg.bundle} "
          f"{'--lora ' + str(result.lora_path) + ' ' if cfg.lora.rank else ''}{how}")  # fmt: skip
    return result
