"""Latent consistency distillation on micro: the objective against its formulas and diffusers' LCMScheduler, the
student against diffusers' latent-consistency pipeline, exact resume, the LCM-LoRA, and bad input."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train_unet import checkpoint_tensors, write_shapes

from ldm.cli import generate as generate_cli
from ldm.cli import train_lcm
from ldm.cli.common import run_cli
from ldm.errors import LdmError
from ldm.formats.bundle import load_bundle
from ldm.formats.diffusers import export_diffusers
from ldm.formats.pngmeta import read_png_parameters
from ldm.models.unet import guidance_embedding, with_guidance_input
from ldm.pipeline import Request, generate
from ldm.pipeline.schedule import Prediction, ScheduleConfig, build_scheduler, get_sampler
from ldm.train.lcm import (
    ConsistencyLoss,
    boundary_scalings,
    consistency_function,
    consistency_loss,
    ddim_step,
    guided,
    skipping_timesteps,
    x0_and_noise,
)
from ldm.train.objectives import add_noise, alphas_cumprod, training_target

pytestmark = pytest.mark.filterwarnings("ignore")
SCHEDULE = ScheduleConfig()


def lcm_scheduler(steps: int):
    scheduler = build_scheduler(SCHEDULE, get_sampler("lcm"))
    scheduler.set_timesteps(steps)
    return scheduler


# --- the objective -------------------------------------------------------------------------------------------------


def test_the_grid_and_scalings_are_the_samplers():
    grid = skipping_timesteps(1000, 50)
    assert grid[:3].tolist() == [19, 39, 59] and grid[-1] == 999
    assert set(lcm_scheduler(4).timesteps.tolist()) <= set(grid.tolist())  # sampling only visits the grid
    assert lcm_scheduler(50).timesteps.flip(0).tolist() == grid.tolist()
    scheduler = lcm_scheduler(4)
    t = torch.tensor([0, 19, 259, 999])
    c_skip, c_out = boundary_scalings(t, timestep_scaling=10.0)
    for i, step in enumerate(t.tolist()):
        ref_skip, ref_out = scheduler.get_scalings_for_boundary_condition_discrete(step)
        assert c_skip[i].item() == pytest.approx(ref_skip, rel=1e-6) and c_out[i].item() == pytest.approx(ref_out, rel=1e-6)
    assert c_skip[0] == 1 and c_out[0] == 0  # the boundary condition f(x, 0) = x


@pytest.mark.parametrize("prediction", [Prediction.EPSILON, Prediction.V])
def test_consistency_function_is_one_lcm_step(prediction):
    """f(x_t, t) = c_skip·x_t + c_out·x̂₀ is LCMScheduler's denoised output at its last (noise-free) step."""
    generator = torch.Generator().manual_seed(0)
    x_t, output = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    scheduler = build_scheduler(replace(SCHEDULE, prediction=prediction), get_sampler("lcm"))
    scheduler.set_timesteps(1)
    t = scheduler.timesteps[0]
    ref = scheduler.step(output, t, x_t).prev_sample
    ours = consistency_function(output, x_t, t.repeat(2), alphas_cumprod(SCHEDULE), prediction=prediction,
                                timestep_scaling=10.0)  # fmt: skip
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction", [Prediction.EPSILON, Prediction.V])
def test_x0_and_noise_invert_the_forward_process(prediction):
    generator = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    t, ac = torch.tensor([5, 500, 990]), alphas_cumprod(SCHEDULE)
    x_t = add_noise(x0, noise, t, ac)
    x0_hat, noise_hat = x0_and_noise(training_target(x0, noise, t, ac, prediction), x_t, t, ac, prediction)
    torch.testing.assert_close(x0_hat, x0, atol=2e-4, rtol=0)
    torch.testing.assert_close(noise_hat, noise, atol=2e-4, rtol=0)
    # one DDIM step to s lands on the forward process at s for the same (x0, noise)
    s = torch.tensor([0, 480, 970])
    torch.testing.assert_close(ddim_step(x0_hat, noise_hat, s, ac), add_noise(x0, noise, s, ac), atol=2e-4, rtol=0)


def test_guidance_and_losses_by_hand():
    cond, uncond = torch.full((2, 1, 2, 2), 3.0), torch.full((2, 1, 2, 2), 1.0)
    assert guided(cond, uncond, torch.tensor([0.0, 2.0])).flatten(1)[:, 0].tolist() == [3.0, 7.0]  # ε_c + ω(ε_c − ε_u)
    a, b = torch.zeros(2, 1, 2, 2), torch.tensor([1.0, 3.0]).reshape(2, 1, 1, 1).expand(2, 1, 2, 2)
    assert consistency_loss(a, b, kind=ConsistencyLoss.L2, huber_c=0.5).item() == pytest.approx((1 + 9) / 2)
    huber = ((1 + 0.25) ** 0.5 - 0.5 + (9 + 0.25) ** 0.5 - 0.5) / 2
    assert consistency_loss(a, b, kind=ConsistencyLoss.HUBER, huber_c=0.5).item() == pytest.approx(huber)


def test_guidance_embedding_is_diffusers():
    from diffusers import LatentConsistencyModelPipeline

    omega = torch.tensor([0.0, 1.5, 6.5, 14.0])
    reference = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, omega, embedding_dim=32)
    torch.testing.assert_close(guidance_embedding(omega, 32), reference, atol=1e-6, rtol=0)


def test_the_student_starts_as_its_teacher(micro_bundle_dir):
    teacher = load_bundle(micro_bundle_dir).unet
    student = with_guidance_input(teacher, 32)
    assert student.config.time_cond_proj_dim == 32 and teacher.config.time_cond_proj_dim is None
    generator = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        ref = teacher(x, 500, encoder_hidden_states=context).sample
        out = student(x, 500, encoder_hidden_states=context, timestep_cond=guidance_embedding(torch.tensor([2.0, 9.0]), 32)).sample
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


# --- runs ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("lcm-data") / "shapes")


def lcm_args(teacher, data, out, *extra):
    return ["--teacher", str(teacher), "--data", str(data), "--out", str(out), "--set", "train.batch_size=4",
            "--set", "train.log_every=1", "--set", "train.warmup_steps=0", "--set", "validation.steps=2",
            "--set", "train.lr=1e-3", "--set", "train.sample_every=100", "--set", "lcm.guidance_embedding_dim=32",
            "--set", "lcm.target_decay=0.5", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def student_dir(micro_bundle_dir, shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("lcm") / "student"
    assert run_cli(train_lcm.main, lcm_args(micro_bundle_dir, shapes, out, "--max-steps", "3")) == 0
    return out


def test_resume_is_exact(micro_bundle_dir, shapes, student_dir, tmp_path):
    """3 steps straight (the module's student run) = 2 steps, stop, resume to 3: the student, its optimizer and the
    target network bit for bit."""
    split = tmp_path / "split"
    assert run_cli(train_lcm.main, lcm_args(micro_bundle_dir, shapes, split, "--max-steps", "2")) == 0
    assert run_cli(train_lcm.main, lcm_args(micro_bundle_dir, shapes, split, "--max-steps", "3", "--resume", "latest")) == 0
    a = checkpoint_tensors(student_dir / "checkpoints" / "step-00000003.safetensors")
    b = checkpoint_tensors(split / "checkpoints" / "step-00000003.safetensors")
    assert a.keys() == b.keys()
    assert any(k.startswith("s.models.target.") for k in a) and any(k.startswith("s.optimizers.unet.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    teacher = load_bundle(micro_bundle_dir).unet.state_dict()
    target = {k.removeprefix("s.models.target."): v for k, v in a.items() if k.startswith("s.models.target.")}
    assert any(not torch.equal(teacher[k], target[k]) for k in teacher)  # the target network moved with the student


def test_the_student_bundle(student_dir, micro_bundle_dir):
    student = load_bundle(student_dir / "bundle")
    assert student.config.unet.guidance_embedding_dim == 32
    assert student.config.unet == replace(load_bundle(micro_bundle_dir).config.unet, guidance_embedding_dim=32)
    proj = student.unet.time_embedding.cond_proj.weight
    assert proj.abs().max() > 0  # the guidance input was trained


def one_step_by_hand(bundle, prompt, seed, guidance):
    """One consistency-function evaluation from the seed's noise at t = 999, decoded: what 1-step sampling must be."""
    from ldm.models.autoencoder import decode_latents
    from ldm.pipeline.text_to_image import encode_prompts

    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
    t = torch.tensor([999])
    w = guidance_embedding(torch.tensor([guidance - 1.0]), bundle.config.unet.guidance_embedding_dim)
    with torch.no_grad():
        out = bundle.unet(latents, t, encoder_hidden_states=encode_prompts(bundle, [prompt]), timestep_cond=w).sample
        x0 = consistency_function(out, latents, t, alphas_cumprod(bundle.config.schedule),
                                  prediction=bundle.config.schedule.prediction, timestep_scaling=10.0)  # fmt: skip
        return ((decode_latents(bundle.vae, x0, scaling_factor=bundle.config.vae.scaling_factor) + 1) / 2).clamp(0, 1)


def request(prompt, seed, *, steps, guidance=6.0):
    return Request(prompts=[prompt], negative_prompts=[""], seeds=[seed], steps=steps, guidance_scale=guidance,
                   sampler=get_sampler("lcm"), width=64, height=64)  # fmt: skip


def test_one_step_is_one_consistency_evaluation(student_dir):
    student = load_bundle(student_dir / "bundle")
    ours = generate(student, request("disc 1", 5, steps=1), progress=False)
    torch.testing.assert_close(ours, one_step_by_hand(student, "disc 1", 5, 6.0), atol=1e-5, rtol=0)
    # the guidance scale is the student's input: another scale, another image, at the cost of one call
    assert (generate(student, request("disc 1", 5, steps=1, guidance=2.0), progress=False) - ours).abs().max() > 1e-4


def test_the_student_samples_as_diffusers_latent_consistency_pipeline(student_dir, tmp_path):
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    student = load_bundle(student_dir / "bundle")
    folder = export_diffusers(student, tmp_path / "exported")
    pipe = LatentConsistencyModelPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                          feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=50)
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = ["disc 1", "square 2"], [3, 4]
    theirs = pipe(prompts, num_inference_steps=4, guidance_scale=6.0, height=64, width=64, output_type="np",
                  generator=[torch.Generator().manual_seed(s) for s in seeds]).images  # fmt: skip
    ours = generate(student, Request(prompts=prompts, negative_prompts=["", ""], seeds=seeds, steps=4,
                                     guidance_scale=6.0, sampler=get_sampler("lcm"), width=64, height=64),
                    progress=False)  # fmt: skip
    assert ours.std() > 0.01
    assert (ours - torch.from_numpy(theirs).permute(0, 3, 1, 2)).abs().max() <= 1e-4


def test_generate_records_and_repeats_lcm(student_dir, tmp_path):
    out = tmp_path / "out"
    argv = ["--model", student_dir / "bundle", "--sampler", "lcm", "--steps", "2", "--seed", "7", "--out", out,
            "--quiet", "disc 1"]  # fmt: skip
    assert run_cli(generate_cli.main, [str(a) for a in argv]) == 0
    (png,) = out.glob("*.png")
    params = read_png_parameters(png)
    assert "Sampler: LCM" in params and "Steps: 2" in params
    again = tmp_path / "again"
    repeat_argv = ["--from-png", str(png), "--model", str(student_dir / "bundle"), "--out", str(again), "--quiet"]
    assert run_cli(generate_cli.main, repeat_argv) == 0
    (repeat,) = again.glob("*.png")
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(repeat)))


def test_lcm_lora_at_scale_zero_is_the_teacher(micro_bundle_dir, shapes, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    assert run_cli(train_lcm.main, lcm_args(micro_bundle_dir, shapes, out, "--max-steps", "2", "--lora-rank", "4")) == 0
    lora = out / "lora.safetensors"
    assert lora.is_file() and not (out / "bundle").exists()

    def image(*extra):
        folder = tmp_path / f"img{len(list(tmp_path.iterdir()))}"
        argv = ["--model", micro_bundle_dir, "--sampler", "lcm", "--steps", "2", "--cfg", "1", "--seed", "1",
                "--out", folder, "--quiet", *extra, "disc 1"]  # fmt: skip
        assert run_cli(generate_cli.main, [str(a) for a in argv]) == 0
        return np.asarray(Image.open(next(Path(folder).glob("*.png"))))

    assert np.array_equal(image("--lora", f"{lora}:0"), image())
    assert not np.array_equal(image("--lora", f"{lora}:1"), image())


def test_bad_input(micro_bundle_dir, shapes, student_dir, tmp_path, capsys):
    assert run_cli(train_lcm.main, lcm_args(student_dir / "bundle", shapes, tmp_path / "again", "--max-steps", "1")) == 2
    assert "consistency-distilled student already" in capsys.readouterr().err
    assert run_cli(train_lcm.main, ["--data", str(shapes), "--out", str(tmp_path / "x")]) == 2
    assert "--teacher" in capsys.readouterr().err
    assert run_cli(train_lcm.main, lcm_args(micro_bundle_dir, shapes, tmp_path / "y", "--set", "lcm.guidance_min=0.5")) == 2
    assert "guidance_min" in capsys.readouterr().err
    with pytest.raises(LdmError, match="at most 50 steps"):
        generate(load_bundle(student_dir / "bundle"), request("x", 0, steps=51), progress=False)
