"""The training math of ldm.train.objectives against diffusers' schedulers and the papers' formulas."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from ldm.pipeline.schedule import BetaSchedule, Prediction, ScheduleConfig
from ldm.train.objectives import (
    add_noise,
    alphas_cumprod,
    drop_captions,
    min_snr_weights,
    offset_noise,
    snr,
    timestep_bucket_edges,
    training_target,
    weighted_mse,
)


@pytest.mark.parametrize("beta_schedule", list(BetaSchedule))
@pytest.mark.parametrize("steps", [1000, 17])
def test_alphas_cumprod_matches_diffusers(beta_schedule, steps):
    schedule = ScheduleConfig(num_train_timesteps=steps, beta_schedule=beta_schedule, beta_start=0.0001, beta_end=0.02)
    reference = DDPMScheduler(
        num_train_timesteps=steps, beta_schedule=beta_schedule.value, beta_start=0.0001, beta_end=0.02
    ).alphas_cumprod
    ours = alphas_cumprod(schedule)
    assert ours.dtype == torch.float32 and ours.shape == (steps,)
    assert torch.equal(ours, reference)


def test_sd_default_schedule_matches_diffusers_add_noise():
    schedule = ScheduleConfig()  # scaled_linear 0.00085 … 0.012, as SD
    ac = alphas_cumprod(schedule)
    reference = DDPMScheduler.from_config(schedule.diffusers_config())
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(add_noise(x0, noise, t, ac), reference.add_noise(x0, noise, t), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        training_target(x0, noise, t, ac, Prediction.V), reference.get_velocity(x0, noise, t), rtol=0, atol=1e-6
    )


def test_targets_equal_their_formulas():
    ac = torch.tensor([0.99, 0.75, 0.5, 0.01])
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    t = torch.tensor([3, 0, 2, 1])
    x_t = add_noise(x0, noise, t, ac)
    eps = training_target(x0, noise, t, ac, Prediction.EPSILON)
    v = training_target(x0, noise, t, ac, Prediction.V)
    for i, ti in enumerate(t.tolist()):
        a = ac[ti].item()
        torch.testing.assert_close(x_t[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i])
        torch.testing.assert_close(v[i], math.sqrt(a) * noise[i] - math.sqrt(1 - a) * x0[i])
    assert torch.equal(eps, noise)
    # v-prediction identities (Salimans & Ho 2022): x₀ = √ᾱ·x_t − √(1−ᾱ)·v and ε = √(1−ᾱ)·x_t + √ᾱ·v.
    a = ac[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(a.sqrt() * x_t - (1 - a).sqrt() * v, x0, atol=1e-6, rtol=0)
    torch.testing.assert_close((1 - a).sqrt() * x_t + a.sqrt() * v, noise, atol=1e-6, rtol=0)


def test_min_snr_weights_equal_the_paper():
    ac = torch.tensor([0.9, 0.8, 0.5, 0.1])  # SNR 9, 4, 1, 1/9
    t = torch.arange(4)
    torch.testing.assert_close(snr(t, ac), torch.tensor([9.0, 4.0, 1.0, 1 / 9]))
    eps = min_snr_weights(t, ac, gamma=5.0, prediction=Prediction.EPSILON)
    v = min_snr_weights(t, ac, gamma=5.0, prediction=Prediction.V)
    torch.testing.assert_close(eps, torch.tensor([5 / 9, 1.0, 1.0, 1.0]))  # min(SNR, γ) / SNR
    torch.testing.assert_close(
        v, torch.tensor([5 / 10, 4 / 5, 1 / 2, (1 / 9) / (1 / 9 + 1)])
    )  # min(SNR, γ) / (SNR + 1)
    assert torch.equal(min_snr_weights(t, ac, gamma=0, prediction=Prediction.V), torch.ones(4))  # off
    zero_snr = torch.tensor([0.5, 0.0])  # ᾱ = 0 at the last step (zero terminal SNR): the limit, not NaN
    assert min_snr_weights(torch.tensor([1]), zero_snr, gamma=5.0, prediction=Prediction.EPSILON).item() == 1.0


def test_min_snr_on_a_real_schedule():
    ac = alphas_cumprod(ScheduleConfig())
    t = torch.arange(0, 1000, 37)
    s = ac[t] / (1 - ac[t])
    for prediction, denominator in ((Prediction.EPSILON, s), (Prediction.V, s + 1)):
        expected = torch.minimum(s, torch.tensor(5.0)) / denominator
        torch.testing.assert_close(min_snr_weights(t, ac, gamma=5.0, prediction=prediction), expected)


def test_caption_dropout_rate_and_determinism():
    captions = [f"caption {i}" for i in range(10_000)]
    dropped = drop_captions(captions, 0.1, torch.Generator().manual_seed(0))
    n = sum(c == "" for c in dropped)
    bound = 4 * math.sqrt(10_000 * 0.1 * 0.9)  # 4 σ of the binomial: fails by chance about once in 15 000 seeds
    assert abs(n - 1000) < bound, n
    assert all(d in ("", c) for d, c in zip(dropped, captions))
    assert drop_captions(captions, 0.1, torch.Generator().manual_seed(0)) == dropped  # same generator, same drops
    assert drop_captions(captions, 0.1, torch.Generator().manual_seed(1)) != dropped
    assert drop_captions(captions[:50], 0.0, torch.Generator()) == captions[:50]
    assert drop_captions(captions[:50], 1.0, torch.Generator()) == [""] * 50
    with pytest.raises(ValueError, match="rate must be in"):
        drop_captions(captions, 1.5)


def test_offset_noise():
    plain = offset_noise((2, 4, 8, 8), strength=0.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(plain, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)))
    offset = offset_noise((2, 4, 8, 8), strength=0.5, generator=torch.Generator().manual_seed(3))
    shift = offset - plain  # constant over each (sample, channel) plane
    assert shift.abs().amax() > 0.01
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift), rtol=0, atol=1e-6)
    assert torch.equal(offset, offset_noise((2, 4, 8, 8), strength=0.5, generator=torch.Generator().manual_seed(3)))


def test_weighted_mse_and_timestep_buckets():
    pred, target = torch.zeros(2, 1, 2, 2), torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)])
    assert weighted_mse(pred, target).item() == pytest.approx((1 + 4) / 2)
    assert weighted_mse(pred, target, torch.tensor([2.0, 0.5])).item() == pytest.approx((2 + 2) / 2)
    assert timestep_bucket_edges(1000, 5) == [(0, 200), (200, 400), (400, 600), (600, 800), (800, 1000)]
    assert timestep_bucket_edges(3, 5) == [(0, 1), (1, 2), (2, 3)]
