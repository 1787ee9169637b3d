"""Deep-feature reuse across sampling steps (ldm.accel.deepcache), on the micro bundle and tiny diffusers UNets."""

import numpy as np
import pytest
import torch
from cli_runs import pixels, run
from diffusers import UNet2DConditionModel
from support import NEEDS_PACKING

import ldm.accel.fast
import ldm.accel.packed
from ldm.accel.deepcache import DeepCacheUNet
from ldm.accel.fast import FastConfig, MixedPrecisionUNet, speed_up
from ldm.accel.graph import COMPILE_OPTIONS, TracedUNet
from ldm.errors import LdmError
from ldm.formats.bundle import load_bundle
from ldm.formats.pngmeta import parse_parameters, read_png_parameters
from ldm.pipeline import Request, generate
from ldm.pipeline.denoiser import start_sampling_run
from ldm.pipeline.schedule import get_sampler


def tiny_unet(**overrides) -> UNet2DConditionModel:
    torch.manual_seed(0)
    config = {
        "sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (16, 32, 32),
        "layers_per_block": 2, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 8,
        "attention_head_dim": 4, "norm_num_groups": 8,
    }  # fmt: skip
    return UNet2DConditionModel(**(config | overrides)).eval()


def inputs(batch=2, *, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 5, 8, generator=g)


@pytest.mark.parametrize(
    "first_cross, activation", [(True, None), (False, "silu")], ids=["cross-attention-ends", "plain-ends-silu"]
)
@torch.no_grad()
def test_shallow_call_on_the_same_input_equals_the_full_unet(first_cross, activation):
    # Right after a full call, a shallow call on the same sample and timestep has exactly the deep features it
    # would compute: it must give the UNet's own output. This checks which skips feed the last up block.
    types = ("CrossAttnDownBlock2D", "DownBlock2D") if first_cross else ("DownBlock2D", "CrossAttnDownBlock2D")
    ups = ("UpBlock2D", "CrossAttnUpBlock2D") if first_cross else ("CrossAttnUpBlock2D", "UpBlock2D")
    unet = tiny_unet(
        block_out_channels=(16, 32), down_block_types=types, up_block_types=ups, time_embedding_act_fn=activation
    )
    assert (unet.time_embed_act is None) == (activation is None)
    sample, context = inputs()
    t = torch.tensor(500)
    reference = unet(sample, t, encoder_hidden_states=context).sample
    cached = DeepCacheUNet(unet, interval=3)
    full = cached(sample, t, encoder_hidden_states=context).sample
    shallow = cached(sample, t, encoder_hidden_states=context).sample
    assert (cached.full_calls, cached.shallow_calls) == (1, 1)
    assert torch.equal(full, reference)
    torch.testing.assert_close(shallow, reference, rtol=1e-5, atol=1e-5)
    # and at a later step the shallow call is an approximation: close to the exact output, not equal to it
    later, exact = sample * 0.9, unet(sample * 0.9, torch.tensor(450), encoder_hidden_states=context).sample
    approx = cached(later, torch.tensor(450), encoder_hidden_states=context).sample
    assert not torch.allclose(approx, exact, atol=1e-5)
    assert (approx - exact).abs().mean() < (exact - reference).abs().mean()
    assert (cached.full_calls, cached.shallow_calls) == (1, 2)
    # the shallow pass embeds its own timestep: on the same kept features, another timestep gives another output
    assert not torch.allclose(cached._shallow(sample, torch.tensor(100), context, cached._deep), shallow, atol=1e-4)


@torch.no_grad()
def test_wrapping_leaves_no_hook_behind():
    """The hook that keeps the deep features lives for a full call only: wrapping a UNet again, or dropping the
    wrapper, leaves the UNet as it was (a hook per wrap, never removed, kept every old wrapper alive)."""
    unet = tiny_unet()
    sample, context = inputs()
    hooks = unet.up_blocks[-1]._forward_pre_hooks
    plain = unet(sample, torch.tensor(900), encoder_hidden_states=context).sample
    for _ in range(3):
        cached = DeepCacheUNet(unet, interval=2)
        cached(sample, torch.tensor(900), encoder_hidden_states=context)
        assert cached._deep is not None and not hooks
    assert torch.equal(unet(sample, torch.tensor(900), encoder_hidden_states=context).sample, plain)


@torch.no_grad()
def test_full_calls_follow_the_interval_and_restart_with_each_run():
    cached = DeepCacheUNet(tiny_unet(), interval=3)
    sample, context = inputs()

    def run(timesteps, x=sample, ctx=context):
        pattern = []
        for t in timesteps:
            before = cached.full_calls
            cached(x, torch.tensor(t), encoder_hidden_states=ctx)
            pattern.append("F" if cached.full_calls > before else "s")
        return "".join(pattern)

    assert run([900, 800, 700, 600, 500, 400, 300]) == "FssFssF"
    assert run([900, 700]) == "Fs"  # a new run: the timestep went up
    start_sampling_run(cached)  # a new run as ldm.pipeline.generate announces it: the timestep alone could not tell (1 step)
    assert run([600, 500]) == "Fs"
    x, ctx = inputs(batch=3)
    assert run([400, 300], x=x, ctx=ctx) == "Fs"  # a new batch shape mid-run
    longer = torch.randn(3, 7, 8)
    assert run([200, 100], x=x, ctx=longer) == "Fs"  # a new prompt length
    start_sampling_run(torch.nn.ModuleDict({"low": cached}))  # the pipeline reaches wrappers inside wrappers
    assert run([40], x=x, ctx=longer) == "F"


@torch.no_grad()
def test_single_step_runs_do_not_share_features(micro_bundle_dir):
    bundle = load_bundle(micro_bundle_dir)
    bundle.unet = DeepCacheUNet(bundle.unet, interval=2)

    def req(seed):
        return Request(
            prompts=["red apple"], negative_prompts=[""], seeds=[seed], steps=1, guidance_scale=7.5,
            sampler=get_sampler("dpmpp_2m"), width=64, height=64,
        )  # fmt: skip
    generate(bundle, req(0), progress=False)
    second = generate(bundle, req(1), progress=False)
    assert (bundle.unet.full_calls, bundle.unet.shallow_calls) == (2, 0)
    assert torch.equal(second, generate(load_bundle(micro_bundle_dir), req(1), progress=False))


def test_refuses_what_it_cannot_reproduce():
    with pytest.raises(LdmError, match="N must be 2 or more, not 1"):
        DeepCacheUNet(tiny_unet(), interval=1)
    with pytest.raises(LdmError, match=r"uses \['class_embed_type'\]; drop --deep-cache"):
        DeepCacheUNet(tiny_unet(class_embed_type="timestep"), interval=2)
    with pytest.raises(LdmError, match="two or more levels"):
        DeepCacheUNet(torch.nn.Linear(2, 2), interval=2)
    for bad in (1, -2):
        with pytest.raises(LdmError, match=f"N must be 0 \\(off\\) or 2 or more, not {bad}"):
            FastConfig(deep_cache=bad)
    with pytest.raises(ValueError, match="needs graph=True"):
        DeepCacheUNet(tiny_unet(), interval=2, compile=True)


def test_compiled_reuse_needs_the_graphs(micro_bundle_dir, monkeypatch):
    threads, message = torch.get_num_threads(), "drop --compile, or turn the reuse off with --deep-cache 0"
    with pytest.raises(LdmError, match=message):  # graphs turned off
        speed_up(load_bundle(micro_bundle_dir), FastConfig(deep_cache=2, compile=True, graph=False, threads=threads))
    monkeypatch.setattr(ldm.accel.fast, "BF16_MIN_PARAMETERS", 0)  # the micro UNet counts as big: no graphs
    with pytest.raises(LdmError, match=message):
        speed_up(load_bundle(micro_bundle_dir), FastConfig(deep_cache=2, compile=True, threads=threads))


@torch.no_grad()
def test_fast_path_traces_both_kinds_of_call(micro_bundle_dir):
    # With graphs the full and the shallow call run as traced graphs, within the graphs' tolerance of the modules.
    threads = torch.get_num_threads()
    req = Request(
        prompts=["red apple", "cat face"], negative_prompts=["", ""], seeds=[0, 1], steps=6, guidance_scale=7.5,
        sampler=get_sampler("dpmpp_2m"), width=64, height=64,
    )  # fmt: skip
    eager = load_bundle(micro_bundle_dir)
    eager.unet = DeepCacheUNet(eager.unet, interval=2)
    fast = speed_up(load_bundle(micro_bundle_dir), FastConfig(deep_cache=2, graph=True, threads=threads))
    assert isinstance(fast.unet, DeepCacheUNet) and fast.unet.graph
    expected, images = generate(eager, req, progress=False), generate(fast, req, progress=False)
    (pair,) = fast.unet.traces.values()
    assert pair is not None and all(isinstance(g, TracedUNet) for g in pair)
    assert (fast.unet.full_calls, fast.unet.shallow_calls) == (3, 3)
    assert (images - expected).abs().max() < 1e-4
    assert not torch.equal(images, generate(load_bundle(micro_bundle_dir), req, progress=False))  # still approximate
    # bf16: one DeepCacheUNet per UNet copy
    mixed = speed_up(load_bundle(micro_bundle_dir), FastConfig(deep_cache=3, bf16=True, threads=threads)).unet
    assert isinstance(mixed, MixedPrecisionUNet)
    assert isinstance(mixed.low_noise, DeepCacheUNet) and isinstance(mixed.high_noise, DeepCacheUNet)
    assert mixed.low_noise.interval == 3 and mixed.low_noise.dtype == torch.bfloat16


@torch.no_grad()
def test_fast_path_compiles_both_kinds_of_call(micro_bundle_dir, monkeypatch):
    # inductor itself is checked once, in test_graph.py (minutes on a small CPU): here a stand-in that runs the
    # graph it is given shows that both the full and the shallow graph go to it, with the options compiling uses
    compiled_with = []

    def compile_stand_in(graph, inputs, **options):
        compiled_with.append(options)
        return lambda *args: graph(*args)

    monkeypatch.setattr("torch._inductor.compile", compile_stand_in)
    threads = torch.get_num_threads()
    req = Request(
        prompts=["red apple"], negative_prompts=[""], seeds=[0], steps=4, guidance_scale=7.5,
        sampler=get_sampler("dpmpp_2m"), width=64, height=64,
    )  # fmt: skip
    traced = speed_up(load_bundle(micro_bundle_dir), FastConfig(deep_cache=2, graph=True, threads=threads))
    compiled = speed_up(load_bundle(micro_bundle_dir), FastConfig(deep_cache=2, compile=True, threads=threads))
    assert compiled.unet.graph and compiled.unet.compile
    images = generate(compiled, req, progress=False)
    (pair,) = compiled.unet.traces.values()
    assert all(g.compiled for g in pair) and compiled_with == [{"options": COMPILE_OPTIONS}] * 2
    assert (compiled.unet.full_calls, compiled.unet.shallow_calls) == (2, 2)
    # the graphs made for inductor spell attention out: the same images up to summation order
    assert (images - generate(traced, req, progress=False)).abs().max() < 1e-4


@torch.no_grad()
def test_generation_reuses_every_other_step(micro_bundle_dir):
    bundle = load_bundle(micro_bundle_dir)
    req = Request(
        prompts=["red apple", "cat face"], negative_prompts=["", ""], seeds=[0, 1], steps=10, guidance_scale=7.5,
        sampler=get_sampler("dpmpp_2m"), width=64, height=64,
    )  # fmt: skip
    exact = generate(bundle, req, progress=False)
    bundle.unet = DeepCacheUNet(bundle.unet, interval=2)
    approx = generate(bundle, req, progress=False)
    assert (bundle.unet.full_calls, bundle.unet.shallow_calls) == (5, 5)
    assert approx.shape == exact.shape and torch.isfinite(approx).all()
    assert 0 < (approx - exact).abs().max() < 1


@NEEDS_PACKING
def test_reuse_on_packed_modules(micro_bundle_dir):
    """A big UNet's route (modules with packed weights, no graphs): the same images as on plain modules, up to the
    summation order."""
    req = Request(
        prompts=["red apple", "cat face"], negative_prompts=["", ""], seeds=[0, 1], steps=6, guidance_scale=7.5,
        sampler=get_sampler("dpmpp_2m"), width=64, height=64,
    )  # fmt: skip
    threads = torch.get_num_threads()
    images = {}
    for pack in (False, True):
        config = FastConfig(deep_cache=2, graph=False, pack=pack, threads=threads)
        fast = speed_up(load_bundle(micro_bundle_dir), config)
        assert any(type(m) is ldm.accel.packed.PackedPointwiseConv2d for m in fast.unet.modules()) == pack
        images[pack] = generate(fast, req, progress=False)
        assert (fast.unet.full_calls, fast.unet.shallow_calls) == (3, 3)
    torch.testing.assert_close(images[True], images[False], atol=1e-5, rtol=0)


# --- generate.py --deep-cache ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fast", [[], ["--fast"]], ids=["fp32", "fast"])
def test_cli_deep_cache_is_recorded_and_reproduced(micro_bundle_dir, tmp_path, fast):
    common = ["red apple", "--seed", "3", "--steps", "6", "--model", micro_bundle_dir, "--quiet", *fast]
    assert run([*common, "--out", tmp_path / "exact"]) == 0
    assert run([*common, "--out", tmp_path / "cached", "--deep-cache", "3"]) == 0
    (exact,), (cached,) = (tmp_path / "exact").glob("0*.png"), (tmp_path / "cached").glob("0*.png")
    assert not np.array_equal(pixels(cached), pixels(exact))
    assert parse_parameters(read_png_parameters(cached))[2]["Deep cache"] == "3"
    assert "Deep cache" not in parse_parameters(read_png_parameters(exact))[2]
    # --from-png reuses the deep features again; --deep-cache 0 turns it off
    assert run(["--from-png", cached, "--model", micro_bundle_dir, "--out", tmp_path / "again", "--quiet"]) == 0
    (again,) = (tmp_path / "again").glob("0*.png")
    assert np.array_equal(pixels(again), pixels(cached))
    off = ["--from-png", cached, "--deep-cache", "0", "--model", micro_bundle_dir, "--out", tmp_path / "off", "--quiet"]
    assert run(off) == 0
    (off,) = (tmp_path / "off").glob("0*.png")
    assert np.array_equal(pixels(off), pixels(exact))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--deep-cache", "1"], "N must be 0 (off) or 2 or more, not 1"),
        (["--deep-cache", "-1", "--fast", "--compile"], "N must be 0 (off) or 2 or more, not -1"),
    ],
)
def test_cli_deep_cache_bad_flags(micro_bundle_dir, tmp_path, capsys, flags, message):
    assert run(["x", *flags, "--model", micro_bundle_dir, "--out", tmp_path, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
