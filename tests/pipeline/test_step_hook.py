"""generate()'s on_step hook: called once per step with the latents, changes nothing, and StopSampling ends early."""

import pytest
import torch

from ldm.formats.bundle import load_bundle
from ldm.models.autoencoder import decode_latents
from ldm.pipeline import Request, StopSampling, generate
from ldm.pipeline.schedule import get_sampler


@pytest.fixture(scope="module")
def bundle(micro_bundle_dir):
    return load_bundle(micro_bundle_dir)


def request(steps: int) -> Request:
    return Request(prompts=["red apple"], negative_prompts=[""], seeds=[4], steps=steps, guidance_scale=5.0,
                   sampler=get_sampler("euler_a"), width=32, height=32)  # fmt: skip


def test_the_hook_sees_every_step_and_changes_nothing(bundle):
    calls = []
    hooked = generate(bundle, request(5), progress=False,
                      on_step=lambda done, total, latents: calls.append((done, total, latents.shape)))  # fmt: skip
    assert torch.equal(hooked, generate(bundle, request(5), progress=False))
    assert [(d, t) for d, t, _ in calls] == [(k, 5) for k in range(1, 6)]
    assert calls[0][2] == (1, bundle.config.vae.latent_channels, 4, 4)


def test_stop_sampling_decodes_the_latents_of_that_step(bundle):
    kept = {}

    def stop_at_two(done, total, latents):
        if done == 2:
            kept["latents"] = latents.clone()
            raise StopSampling

    stopped = generate(bundle, request(6), progress=False, on_step=stop_at_two)
    decoded = decode_latents(bundle.vae, kept["latents"], scaling_factor=bundle.config.vae.scaling_factor)
    assert torch.equal(stopped, ((decoded + 1) / 2).clamp(0, 1).float())
    assert not torch.equal(stopped, generate(bundle, request(6), progress=False))
