"""The sampling loop against an independent implementation: diffusers' own StableDiffusionPipeline."""

from dataclasses import replace

import pytest
import torch

from ldm.errors import LdmError
from ldm.formats.bundle import load_bundle
from ldm.formats.diffusers import export_diffusers
from ldm.pipeline import Request, check_settings, generate
from ldm.pipeline.schedule import SAMPLERS, get_sampler

PROMPTS = ["red apple", "cat face with tears of joy"]
NEGATIVE = ["blurry", ""]
SEEDS = [11, 12]


@pytest.fixture(scope="module")
def bundle(micro_bundle_dir):
    return load_bundle(micro_bundle_dir)


@pytest.fixture(scope="module")
def reference(micro_diffusers_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(micro_diffusers_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_reference(pipe, sampler_name, *, steps, guidance):
    sampler = get_sampler(sampler_name)
    pipe.scheduler = sampler.scheduler.from_config(pipe.scheduler.config, **dict(sampler.options))
    out = pipe(
        PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=guidance,
        generator=[torch.Generator().manual_seed(s) for s in SEEDS], height=64, width=64, output_type="np",
    )  # fmt: skip
    return torch.from_numpy(out.images).permute(0, 3, 1, 2)  # (B, 3, H, W) in [0, 1]


@pytest.mark.parametrize("sampler_name", list(SAMPLERS))
@pytest.mark.parametrize("guidance", [7.5, 1.0], ids=["cfg", "no-cfg"])
def test_matches_diffusers(bundle, reference, micro_diffusers_dir, sampler_name, guidance):
    from diffusers import DDIMScheduler

    # The exported scheduler config, not the previous test's sampler (its options would leak in).
    reference.scheduler = DDIMScheduler.from_pretrained(micro_diffusers_dir / "scheduler")
    request = Request(
        prompts=PROMPTS, negative_prompts=NEGATIVE, seeds=SEEDS, steps=6, guidance_scale=guidance,
        sampler=get_sampler(sampler_name), width=64, height=64,
    )  # fmt: skip
    ours = generate(bundle, request, progress=False)
    theirs = run_reference(reference, sampler_name, steps=6, guidance=guidance)
    assert ours.shape == theirs.shape == (2, 3, 64, 64)
    assert ours.std() > 0.01  # a real image, not a constant
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_each_image_depends_on_its_own_seed_only(bundle):
    def run(prompts, seeds):
        request = Request(
            prompts=prompts, negative_prompts=[""] * len(prompts), seeds=seeds, steps=4, guidance_scale=5.0,
            sampler=get_sampler("euler_a"), width=64, height=64,
        )  # fmt: skip
        return generate(bundle, request, progress=False)

    batch = run(["red apple", "pizza", "rocket"], [1, 2, 3])
    alone = run(["pizza"], [2])
    torch.testing.assert_close(batch[1:2], alone, atol=1e-5, rtol=0)
    assert (batch[0] - batch[1]).abs().max() > 1e-3  # different seeds and prompts, different images


def test_non_square_sizes(bundle):
    request = Request(
        prompts=["x"], negative_prompts=[""], seeds=[0], steps=2, guidance_scale=3.0,
        sampler=get_sampler("ddim"), width=96, height=32,
    )  # fmt: skip
    assert generate(bundle, request, progress=False).shape == (1, 3, 32, 96)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "steps must be a positive number, got 0"),
        ({"width": 65}, "width must be a positive multiple of 8 .* got 65; try 64"),
        ({"height": 0}, "height must be a positive multiple of 8"),
        ({"width": 66, "factor": 4}, "width must be a positive multiple of 4 .* got 66; try 64"),
        ({"height": 0, "factor": None}, "height must be a positive number of pixels, got 0"),
        ({"guidance_scale": -1.0}, "guidance scale must be a finite number ≥ 0, got -1.0"),
        ({"guidance_scale": float("nan")}, "guidance scale must be a finite number ≥ 0, got nan"),
        ({"guidance_scale": float("inf")}, "guidance scale must be a finite number ≥ 0, got inf"),
        ({"steps": 1001, "train_timesteps": 1000}, "steps must be at most 1000"),
        ({"width": 16392}, "width must be at most 16384 pixels"),
    ],
)
def test_bad_settings(kwargs, message):
    settings = {"steps": 10, "width": 64, "height": 64, "guidance_scale": 7.5, "factor": 8} | kwargs
    with pytest.raises(LdmError, match=message):
        check_settings(**settings)


def test_sizes_are_multiples_of_the_factor_given():
    check_settings(steps=1, width=36, height=44, guidance_scale=1.0, factor=4)
    check_settings(steps=1, width=65, height=3, guidance_scale=1.0, factor=None)  # no model yet: positive is enough


def test_a_vae_of_factor_4_samples_as_diffusers_does(micro_f4_bundle_dir, tmp_path):
    """Latents of (H/4, W/4), decoded back to (H, W): the same numbers as diffusers' pipeline, which reads its VAE's
    factor from the config too (though its own size check insists on multiples of 8)."""
    from diffusers import StableDiffusionPipeline

    bundle = load_bundle(micro_f4_bundle_dir)
    assert bundle.config.vae.downsampling_factor == 4 and bundle.config.default_size == 32
    export_diffusers(bundle, tmp_path / "diffusers")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "diffusers", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 4
    sampler = get_sampler("euler")
    pipe.scheduler = sampler.scheduler.from_config(pipe.scheduler.config, **dict(sampler.options))
    out = pipe(PROMPTS[:1], negative_prompt=NEGATIVE[:1], num_inference_steps=3, guidance_scale=5.0,
               generator=[torch.Generator().manual_seed(SEEDS[0])], height=24, width=40, output_type="np")  # fmt: skip
    theirs = torch.from_numpy(out.images).permute(0, 3, 1, 2)  # (1, 3, 24, 40) from (1, 4, 6, 10) latents
    request = Request(
        prompts=PROMPTS[:1], negative_prompts=NEGATIVE[:1], seeds=SEEDS[:1], steps=3, guidance_scale=5.0,
        sampler=sampler, width=40, height=24,
    )  # fmt: skip
    ours = generate(bundle, request, progress=False)
    assert ours.shape == theirs.shape == (1, 3, 24, 40) and ours.std() > 0.01
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert generate(bundle, replace(request, width=44, height=36), progress=False).shape == (1, 3, 36, 44)
    odd = Request(prompts=["x"], negative_prompts=[""], seeds=[0], steps=1, guidance_scale=1.0, sampler=sampler,
                  width=42, height=36)  # a Request has no model; generate checks its sizes against the VAE  # fmt: skip
    with pytest.raises(LdmError, match="width must be a positive multiple of 4 .* got 42; try 40"):
        generate(bundle, odd, progress=False)


def test_sampler_lookup():
    assert get_sampler("Euler a") is get_sampler("euler_a")
    assert get_sampler("DPM++ 2M Karras").name == "dpmpp_2m_karras"
    with pytest.raises(LdmError, match="unknown sampler 'euler_b'; choose one of: ddpm, ddim"):
        get_sampler("euler_b")


def test_clip_skip_matches_diffusers(bundle, reference, micro_diffusers_dir):
    """A1111's Clip skip N is diffusers' clip_skip N − 1: the N-th layer's hidden states from the end, through the
    final layer norm. diffusers 0.42's own clip_skip reaches for transformers 4's ``text_model``, so the embeddings
    are made by that definition from transformers' hidden states and given to the pipeline."""
    from diffusers import DDIMScheduler

    def embeddings(prompts):
        tok = reference.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        out = reference.text_encoder(tok.input_ids, output_hidden_states=True)
        encoder = getattr(reference.text_encoder, "text_model", reference.text_encoder)
        return encoder.final_layer_norm(out.hidden_states[-2])

    reference.scheduler = DDIMScheduler.from_pretrained(micro_diffusers_dir / "scheduler")
    sampler = get_sampler("ddim")
    request = Request(prompts=PROMPTS, negative_prompts=NEGATIVE, seeds=SEEDS, steps=4, guidance_scale=7.5,
                      sampler=sampler, width=64, height=64, clip_skip=2)  # fmt: skip
    ours = generate(bundle, request, progress=False)
    with torch.no_grad():
        cond, uncond = embeddings(PROMPTS), embeddings(NEGATIVE)
    out = reference(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=4, guidance_scale=7.5,
                    generator=[torch.Generator().manual_seed(s) for s in SEEDS], height=64, width=64, output_type="np")
    theirs = torch.from_numpy(out.images).permute(0, 3, 1, 2)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert not torch.equal(ours, generate(bundle, replace(request, clip_skip=1), progress=False))
