"""img2img, inpainting and upscaling in the sampling loop, against diffusers' img2img and inpainting pipelines on the
same weights, seeds and sampler."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.errors import LdmError
from ldm.formats.bundle import create_bundle, load_bundle
from ldm.formats.diffusers import export_diffusers
from ldm.images import to_uint8, uint8_to_unit
from ldm.models.presets import PRESETS, Task
from ldm.pipeline import Request, generate
from ldm.pipeline.modes import Fill, latent_mask, strength_steps
from ldm.pipeline.schedule import SAMPLERS, get_sampler

PROMPTS = ["red apple", "cat face"]
NEGATIVE = ["blurry", ""]
SEEDS = [3, 4]
TOLERANCE = 1e-4  # max |Δ| in [0, 1] pixels, as the text-to-image parity test


@pytest.fixture(scope="module")
def bundle(micro_bundle_dir):
    return load_bundle(micro_bundle_dir)


@pytest.fixture(scope="module")
def inpaint_bundle():
    """A randomly initialised dedicated inpainting model (2·C + 1 input channels)."""
    return create_bundle(PRESETS["micro"].for_task(Task.INPAINT), seed=1, name="micro-inpaint")


def pictures(n: int = 2, size: int = 64) -> torch.Tensor:
    """(n, 3, size, size) uint8: smooth, different pictures (gradients and a disc)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = []
    for k in range(n):
        disc = ((x - 0.3 - 0.2 * k) ** 2 + (y - 0.5) ** 2 < 0.06).float()
        images.append(torch.stack([x, y * (1 - disc), 0.5 * disc + 0.3 * k]))
    return to_uint8(torch.stack(images))


def square_mask(n: int = 2, size: int = 64, lo: int = 16, hi: int = 48) -> torch.Tensor:
    """(n, 1, size, size) binary: a centre square, aligned to the 8-pixel latent cells."""
    mask = torch.zeros(n, 1, size, size)
    mask[..., lo:hi, lo:hi] = 1
    return mask


def request(**kwargs) -> Request:
    base = dict(prompts=PROMPTS, negative_prompts=NEGATIVE, seeds=SEEDS, steps=6, guidance_scale=7.5,
                sampler=get_sampler("dpmpp_2m"), width=64, height=64)  # fmt: skip
    return Request(**(base | kwargs))


def as_pil(pixels: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]


def mask_pil(mask: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray((m[0] * 255).to(torch.uint8).numpy(), mode="L") for m in mask]


def run_diffusers(pipe, sampler_name: str, **kwargs) -> torch.Tensor:
    sampler = get_sampler(sampler_name)
    pipe.scheduler = sampler.scheduler.from_config(pipe.scheduler.config, **dict(sampler.options))
    pipe.set_progress_bar_config(disable=True)
    if "strength" not in kwargs:  # the img2img pipeline takes its size from the image
        kwargs |= dict(height=64, width=64)
    out = pipe(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=7.5,
               generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="np", **kwargs)  # fmt: skip
    return torch.from_numpy(np.asarray(out.images)).permute(0, 3, 1, 2)  # (B, 3, H, W) in [0, 1]


@pytest.fixture(scope="module")
def diffusers_pipe(micro_diffusers_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(micro_diffusers_dir, local_files_only=True)


@pytest.mark.parametrize("sampler_name", ["dpmpp_2m", "ddim", "euler", "lms"])
@pytest.mark.parametrize("strength", [0.5, 0.8])
def test_img2img_matches_diffusers(bundle, diffusers_pipe, sampler_name, strength):
    from diffusers import StableDiffusionImg2ImgPipeline

    pixels = pictures()
    ours = generate(bundle, request(image=uint8_to_unit(pixels), strength=strength,
                                    sampler=get_sampler(sampler_name)), progress=False)  # fmt: skip
    pipe = StableDiffusionImg2ImgPipeline(**diffusers_pipe.components)
    theirs = run_diffusers(pipe, sampler_name, image=as_pil(pixels), strength=strength)
    assert ours.shape == theirs.shape == (2, 3, 64, 64)
    assert (ours - theirs).abs().max().item() <= TOLERANCE


def test_img2img_at_strength_1_ignores_the_image(bundle):
    plain = generate(bundle, request(), progress=False)
    for pixels in (pictures(), 255 - pictures()):
        at_one = generate(bundle, request(image=uint8_to_unit(pixels), strength=1.0), progress=False)
        torch.testing.assert_close(at_one, plain, rtol=0, atol=0)


def test_img2img_at_strength_0_is_the_vae_round_trip(bundle):
    pixels = uint8_to_unit(pictures())
    ours = generate(bundle, request(image=pixels, strength=0.0), progress=False)
    scaling = bundle.config.vae.scaling_factor
    expected = []
    for i, seed in enumerate(SEEDS):
        posterior = bundle.vae.encode(pixels[i : i + 1] * 2 - 1).latent_dist
        latents = posterior.sample(generator=torch.Generator().manual_seed(seed)) * scaling
        expected.append((bundle.vae.decode(latents / scaling).sample / 2 + 0.5).clamp(0, 1))
    torch.testing.assert_close(ours, torch.cat(expected), atol=1e-5, rtol=0)
    assert strength_steps(6, 0.1) == 0  # a strength too small for one step runs none, as strength 0


def test_lower_strength_stays_closer_to_the_image(bundle):
    pixels = uint8_to_unit(pictures())
    kept = generate(bundle, request(image=pixels, strength=0.0), progress=False)  # all the random VAE can keep
    far = [(generate(bundle, request(image=pixels, strength=s), progress=False) - kept).abs().mean() for s in (0.3, 1.0)]
    assert far[0] < far[1]


@pytest.mark.parametrize("sampler_name", ["dpmpp_2m", "ddim"])
def test_inpainting_with_a_text_to_image_model_matches_diffusers(bundle, diffusers_pipe, sampler_name):
    from diffusers import StableDiffusionInpaintPipeline

    pixels, mask = pictures(), square_mask()
    ours = generate(bundle, request(image=uint8_to_unit(pixels), mask=mask, sampler=get_sampler(sampler_name)),
                    progress=False)  # fmt: skip
    pipe = StableDiffusionInpaintPipeline(**diffusers_pipe.components)
    theirs = run_diffusers(pipe, sampler_name, image=as_pil(pixels), mask_image=mask_pil(mask))
    inside = mask.expand_as(ours) > 0
    assert (ours - theirs)[inside].abs().max().item() <= TOLERANCE  # diffusers does not composite the known pixels
    assert torch.equal(to_uint8(ours)[~inside], pixels[~inside])


def test_a_dedicated_inpainting_model_matches_diffusers(inpaint_bundle, tmp_path):
    from diffusers import StableDiffusionInpaintPipeline

    export_diffusers(inpaint_bundle, tmp_path / "inpaint")
    pipe = StableDiffusionInpaintPipeline.from_pretrained(tmp_path / "inpaint", local_files_only=True)
    assert pipe.unet.config.in_channels == 2 * 4 + 1
    pixels, mask = pictures(), square_mask()
    ours = generate(inpaint_bundle, request(image=uint8_to_unit(pixels), mask=mask), progress=False)
    theirs = run_diffusers(pipe, "dpmpp_2m", image=as_pil(pixels), mask_image=mask_pil(mask))
    inside = mask.expand_as(ours) > 0
    assert (ours - theirs)[inside].abs().max().item() <= TOLERANCE
    assert torch.equal(to_uint8(ours)[~inside], pixels[~inside])


@pytest.mark.parametrize("fill", list(Fill))
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpainting_keeps_every_unmasked_pixel_and_changes_the_masked_ones(bundle, fill, strength):
    pixels = pictures()
    mask = square_mask(lo=13, hi=37)  # not aligned to the latent cells: every touched cell is repainted
    out = to_uint8(generate(bundle, request(image=uint8_to_unit(pixels), mask=mask, fill=fill, strength=strength),
                            progress=False))  # fmt: skip
    inside = mask.expand_as(pixels) > 0
    assert torch.equal(out[~inside], pixels[~inside])
    assert (out[inside].int() - pixels[inside].int()).abs().float().mean() > 2


def test_a_soft_mask_blends_and_leaves_its_zero_pixels(bundle):
    pixels = pictures()
    mask = square_mask()
    mask[..., 12:16, 16:48] = 0.3  # a soft edge, under half white: blended, but its latent cells are kept
    out = to_uint8(generate(bundle, request(image=uint8_to_unit(pixels), mask=mask), progress=False))
    zero = mask.expand_as(pixels) == 0
    assert torch.equal(out[zero], pixels[zero])
    assert torch.equal(latent_mask(mask, 8), latent_mask(square_mask(), 8))


def test_latent_mask_repaints_every_cell_a_stroke_touches():
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 30:32, :] = 1  # a 2-pixel stroke that nearest-neighbour downsampling would miss
    cells = latent_mask(mask, 8)
    assert cells.shape == (1, 1, 8, 8) and cells[0, 0, 3].eq(1).all() and cells.sum() == 8


def test_fill_changes_what_the_masked_region_starts_from(bundle):
    pixels, mask = uint8_to_unit(pictures()), square_mask()
    outs = [generate(bundle, request(image=pixels, mask=mask, fill=f, strength=0.5), progress=False) for f in Fill]
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_each_inpainted_image_depends_on_its_own_seed_only(inpaint_bundle):
    pixels, mask = uint8_to_unit(pictures()), square_mask()
    batch = generate(inpaint_bundle, request(image=pixels, mask=mask), progress=False)
    alone = generate(inpaint_bundle, request(image=pixels[1:], mask=mask[1:], prompts=PROMPTS[1:],
                                             negative_prompts=NEGATIVE[1:], seeds=SEEDS[1:]), progress=False)  # fmt: skip
    torch.testing.assert_close(batch[1:], alone, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def upscaler():
    return create_bundle(PRESETS["micro"].for_task(Task.UPSCALE, upscale_factor=2), seed=2, name="micro-upscale")


def test_an_upscaler_doubles_the_size_and_reads_its_noise_level(upscaler):
    low = uint8_to_unit(pictures(size=64))
    with torch.no_grad():  # a random class embedding is zero at init in training; here it must matter
        upscaler.unet.class_embedding.weight.normal_()
    outs = [generate(upscaler, request(low_res=low, width=128, height=128, noise_level=level), progress=False)
            for level in (0, 200)]  # fmt: skip
    assert outs[0].shape == (2, 3, 128, 128)
    assert not torch.equal(outs[0], outs[1])


@pytest.mark.parametrize(
    "model, kwargs, message",
    [
        ("bundle", dict(strength=1.5), r"strength must be in \[0, 1\]"),
        ("bundle", dict(strength=-0.1), r"strength must be in \[0, 1\]"),
        ("bundle", dict(mask=torch.zeros(2, 1, 64, 64)), "the mask has no white pixel"),
        ("bundle", dict(low_res=torch.zeros(2, 3, 32, 32)), "not an upscaler"),
        ("upscaler", dict(), "this model is an upscaler"),
        ("upscaler", dict(low_res=torch.zeros(2, 3, 64, 64), width=128, height=128, noise_level=1000), "noise level"),
        ("upscaler", dict(low_res=torch.zeros(2, 3, 48, 48), width=128, height=128), "needs 64×64"),
        ("inpaint_bundle", dict(), "this model is an inpainting model"),
    ],
)
def test_bad_image_inputs(request_fixture, model, kwargs, message):
    bundle = request_fixture.getfixturevalue(model)
    kwargs = {"image": uint8_to_unit(pictures())} | kwargs if "strength" in kwargs or "mask" in kwargs else kwargs
    with pytest.raises(LdmError, match=message):
        generate(bundle, request(**kwargs), progress=False)


@pytest.fixture
def request_fixture(request):
    return request


def test_an_upscaler_refuses_diffusers_export(upscaler, tmp_path):
    with pytest.raises(LdmError, match="no diffusers pipeline of its layout"):
        export_diffusers(upscaler, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_modes_keep_the_request_frozen():
    r = request()
    with pytest.raises(Exception):
        r.strength = 0.5  # type: ignore[misc]
    assert replace(r, strength=0.5).strength == 0.5


@pytest.mark.parametrize("sampler_name", sorted(SAMPLERS))
def test_every_sampler_runs_img2img_and_inpainting(bundle, sampler_name):
    pixels, mask = pictures(), square_mask()
    sampler = get_sampler(sampler_name)
    half = generate(bundle, request(image=uint8_to_unit(pixels), strength=0.5, sampler=sampler), progress=False)
    assert half.shape == (2, 3, 64, 64) and torch.isfinite(half).all()
    assert not torch.equal(half, generate(bundle, request(sampler=sampler), progress=False))
    painted = to_uint8(generate(bundle, request(image=uint8_to_unit(pixels), mask=mask, sampler=sampler),
                                progress=False))  # fmt: skip
    inside = mask.expand_as(pixels) > 0
    assert torch.equal(painted[~inside], pixels[~inside])
