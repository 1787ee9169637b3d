"""The training side of the diffusion schedule: forward noising, targets and loss weights, as pure functions.

Notation of Ho et al. 2020 (DDPM): β_t for t = 0 … T-1, α_t = 1 − β_t, ᾱ_t = ∏_{s≤t} α_s. The forward process
q(x_t | x₀) = N(√ᾱ_t·x₀, (1−ᾱ_t)·I) (Eq. 4) is sampled in one step, x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε. The UNet predicts
ε (Eq. 14) or v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀ (Salimans & Ho 2022, §4), as :class:`~ldm.pipeline.schedule.Prediction` says.

Every function takes ``alphas_cumprod`` (T,) from :func:`alphas_cumprod`, which equals diffusers' schedulers' own, so
a UNet trained here samples correctly with any of :data:`ldm.pipeline.schedule.SAMPLERS`. Randomness comes only from the
generator passed in (None: the global torch RNG, which training checkpoints restore).
"""

from __future__ import annotations

import math

import torch

from ldm.pipeline.schedule import BetaSchedule, Prediction, ScheduleConfig


def betas(schedule: ScheduleConfig) -> torch.Tensor:
    """(T,) float32 β_t, computed exactly as diffusers' ``DDPMScheduler`` does for each :class:`BetaSchedule`.

    linear: β linear in t (Ho et al. 2020, §4); scaled_linear: √β linear in t (Rombach et al. 2022);
    squaredcos_cap_v2: β_t = min(1 − ᾱ(t+1)/ᾱ(t), 0.999) with ᾱ(t) = cos²((t/T + 0.008)/1.008 · π/2)
    (Nichol & Dhariwal 2021, Eq. 17).
    """
    n = schedule.num_train_timesteps
    if schedule.beta_schedule is BetaSchedule.LINEAR:
        return torch.linspace(schedule.beta_start, schedule.beta_end, n, dtype=torch.float32)
    if schedule.beta_schedule is BetaSchedule.SCALED_LINEAR:
        return torch.linspace(schedule.beta_start**0.5, schedule.beta_end**0.5, n, dtype=torch.float32) ** 2
    if schedule.beta_schedule is BetaSchedule.COSINE:

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        values = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        return torch.tensor(values, dtype=torch.float32)
    raise ValueError(f"unknown beta schedule {schedule.beta_schedule}")


def alphas_cumprod(schedule: ScheduleConfig) -> torch.Tensor:
    """(T,) float32 ᾱ_t = ∏_{s≤t} (1 − β_s) (Ho et al. 2020, §2)."""
    return torch.cumprod(1.0 - betas(schedule), dim=0)


def _per_sample(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] (B,) as a float32 (B, 1, 1, …) broadcastable against ``like``."""
    out = values.to(like.device, torch.float32)[t.to(like.device).long()]
    return out.reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε (Ho et al. 2020, Eq. 4); (B, C, h, w) each, t (B,) integer timesteps.

    Computed in float32 and returned in ``x0``'s dtype.
    """
    a = _per_sample(alphas_cumprod, t, x0)  # (B, 1, 1, 1)
    return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)


def training_target(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, prediction: Prediction
) -> torch.Tensor:
    """What the UNet is trained to output at x_t: ε (Ho et al. 2020, Eq. 14), or v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀
    (Salimans & Ho 2022, §4 / Appendix D). (B, C, h, w) in ``x0``'s dtype."""
    if prediction is Prediction.EPSILON:
        return noise.to(x0.dtype)
    if prediction is Prediction.V:
        a = _per_sample(alphas_cumprod, t, x0)
        return (a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()).to(x0.dtype)
    raise ValueError(f"unknown prediction type {prediction}")


def snr(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """(B,) signal-to-noise ratio SNR(t) = ᾱ_t / (1 − ᾱ_t) (Kingma et al. 2021, Eq. 1), float32."""
    a = alphas_cumprod.to(torch.float32)[t.cpu().long()].to(t.device)
    return a / (1 - a)


def min_snr_weights(
    t: torch.Tensor, alphas_cumprod: torch.Tensor, *, gamma: float, prediction: Prediction
) -> torch.Tensor:
    """(B,) per-sample loss weights of Min-SNR-γ (Hang et al. 2023, Eq. 8 and §3.4).

    The weight min(SNR, γ) on the x₀ loss, carried over to the prediction actually trained:
    ε-prediction min(SNR, γ)/SNR, v-prediction min(SNR, γ)/(SNR + 1). ``gamma`` ≤ 0 turns weighting off (all 1).
    """
    s = snr(t, alphas_cumprod)
    if gamma <= 0:
        return torch.ones_like(s)
    clipped = torch.clamp(s, max=gamma)
    if prediction is Prediction.EPSILON:
        return torch.where(s > 0, clipped / s.clamp(min=torch.finfo(s.dtype).tiny), 1.0)  # → 1 as SNR → 0
    if prediction is Prediction.V:
        return clipped / (s + 1)
    raise ValueError(f"unknown prediction type {prediction}")


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of w_i · mean-squared error of sample i (Ho et al. 2020, Eq. 14 with weights); float32."""
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device, torch.float32)
    return per_sample.mean()


def prior_preservation_loss(
    prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None, *, prior: torch.Tensor,
    prior_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """DreamBooth's loss (Ruiz et al. 2023, Eq. 2): the instance term plus ``prior_weight`` (λ) times the class-prior
    term, each the :func:`weighted_mse` of its own samples (so Min-SNR weights and the v target apply to both).

    ``prior`` (B,) bool marks the class samples of the batch; ``weights`` (B,) or None. Returns (loss, instance term,
    prior term), float32 scalars; a term with no samples is 0.
    """
    prior = prior.to(prediction.device, torch.bool)
    terms = []
    for rows in (~prior, prior):
        if not rows.any():
            terms.append(prediction.new_zeros((), dtype=torch.float32))
            continue
        w = weights.to(prediction.device)[rows] if weights is not None else None
        terms.append(weighted_mse(prediction[rows], target[rows], w))
    instance, class_prior = terms
    return instance + prior_weight * class_prior, instance, class_prior


def offset_noise(
    shape: tuple[int, ...] | torch.Size, *, strength: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, C, h, w) Gaussian noise plus ``strength``·N(0, 1) constant per (B, C): "offset noise" (Guttenberg 2023).

    It lets the model change an image's mean brightness, which plain ε-noise barely perturbs. Drawn on the CPU from
    ``generator`` (None: the global RNG): the noise first, the offsets second, so strength 0 equals plain noise.
    """
    noise = torch.randn(shape, generator=generator)
    if strength:
        noise = noise + strength * torch.randn(shape[0], shape[1], *([1] * (len(shape) - 2)), generator=generator)
    return noise


def sample_timesteps(batch: int, num_train_timesteps: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) int64 timesteps uniform over 0 … T−1 (Ho et al. 2020, Algorithm 1), on the CPU."""
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator)


def drop_captions(captions: list[str], rate: float, generator: torch.Generator | None = None) -> list[str]:
    """``captions`` with each replaced by '' with probability ``rate``: the unconditional samples classifier-free
    guidance needs (Ho & Salimans 2022, Algorithm 1). One uniform number is drawn per caption from ``generator``."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"caption dropout rate must be in [0, 1], got {rate}")
    drop = torch.rand(len(captions), generator=generator) < rate
    return ["" if d else c for c, d in zip(captions, drop.tolist())]


def timestep_bucket_edges(num_train_timesteps: int, buckets: int) -> list[tuple[int, int]]:
    """``buckets`` contiguous [lo, hi) ranges covering 0 … T−1, for losses reported per timestep range."""
    edges = [round(i * num_train_timesteps / buckets) for i in range(buckets + 1)]
    return [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]
