"""The fast sampling path (ldm.accel.fast) and prompt dedupe, on the micro bundle; speed is measured in bench/, not here."""

import numpy as np
import pytest
import torch
from cli_runs import pixels, run
from support import NEEDS_PACKING, PACKED_DTYPES, assert_rounding_close
from torch import nn

import ldm.accel.packed
import ldm.pipeline.text_to_image
from ldm.accel.fast import (
    PACK_MIN_FP32_LINEAR,
    FastConfig,
    MixedPrecisionUNet,
    PromptCache,
    attention_processors,
    bf16_copy,
    pack_weights,
    physical_cores,
    speed_up,
)
from ldm.accel.packed import PackedConv2d, PackedLinear, PackedPointwiseConv2d, can_pack
from ldm.accel.winograd import WINOGRAD_MIN_CHANNELS, WinogradConv2d
from ldm.formats.bundle import load_bundle
from ldm.formats.pngmeta import parse_parameters, read_png_parameters
from ldm.pipeline import Request, encode_prompts, generate, to_uint8
from ldm.pipeline.schedule import get_sampler


def request(prompts, *, steps=8, seeds=None):
    return Request(
        prompts=prompts, negative_prompts=["blurry"] * len(prompts), seeds=seeds or list(range(len(prompts))),
        steps=steps, guidance_scale=7.5, sampler=get_sampler("dpmpp_2m"), width=64, height=64,
    )  # fmt: skip


@pytest.fixture(scope="module")
def bundle(micro_bundle_dir):
    return load_bundle(micro_bundle_dir)


@pytest.fixture(scope="module")
def exact(bundle):
    return generate(bundle, request(["red apple", "cat face"]), progress=False)


THREADS = torch.get_num_threads()  # speed_up sets the thread count; keep the session's


@pytest.mark.parametrize(
    "config, tolerance",
    [
        # micro's UNet is far too small for bf16 to pay, so the default keeps fp32 (and channels_last).
        (FastConfig(threads=THREADS), 1e-5),
        # bf16 forced, fp32 at high noise. micro's 32-channel layers round the most, and 8 steps leave only one
        # in fp32: 3/255 here; the 2/255 goal holds for emoji-tiny and sd-v1 (bench/generation.py).
        (FastConfig(bf16=True, threads=THREADS), 6 / 255),
        # what a big UNet gets: modules with oneDNN's packed weights rather than traced graphs (bf16 ones packed
        # only where oneDNN has bf16 kernels: test_bf16_weights_stay_unpacked_without_bf16_kernels)
        pytest.param(FastConfig(graph=False, pack=True, threads=THREADS), 1e-5, marks=NEEDS_PACKING),
        pytest.param(FastConfig(bf16=True, graph=False, pack=True, threads=THREADS), 6 / 255, marks=NEEDS_PACKING),
    ],
    ids=["default", "bf16", "packed", "bf16-packed"],
)
def test_fast_path_within_tolerance_of_fp32(micro_bundle_dir, exact, config, tolerance):
    fast = speed_up(load_bundle(micro_bundle_dir), config)
    assert fast.vae.dtype == fast.text_encoder.model.dtype == fast.unet.dtype == torch.float32
    if config.pack:  # the VAE's weights packed along with the UNet's
        assert isinstance(fast.vae.decoder.conv_in, PackedConv2d)
    else:
        assert fast.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(fast.unet, MixedPrecisionUNet) == bool(config.bf16)
    if config.bf16:
        assert fast.unet.low_noise.dtype == torch.bfloat16 and fast.unet.high_noise.dtype == torch.float32
    if config.pack and config.bf16:
        packed = any(isinstance(m, PackedLinear) for m in fast.unet.low_noise.modules())
        assert packed == can_pack(torch.device("cpu"), torch.bfloat16)
    images = generate(fast, request(["red apple", "cat face"]), progress=False)
    assert images.dtype == torch.float32 and images.shape == exact.shape and images.is_contiguous()
    assert (images - exact).abs().max().item() <= tolerance


def test_mixed_precision_picks_by_timestep(micro_bundle_dir):
    """bf16 below the switch, the exact fp32 UNet from it on; bf16 in every step with fp32_from=1."""
    bundle = load_bundle(micro_bundle_dir)
    unet = bundle.unet
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    fast = speed_up(load_bundle(micro_bundle_dir), FastConfig(bf16=True, threads=THREADS)).unet
    with torch.no_grad():
        high, low = torch.tensor(900), torch.tensor(100)
        exact = unet(x, high, encoder_hidden_states=context).sample  # channels_last changes the rounding only
        torch.testing.assert_close(fast(x, high, encoder_hidden_states=context).sample, exact, atol=1e-5, rtol=0)
        approx = fast(x, low, encoder_hidden_states=context).sample
        exact = unet(x, low, encoder_hidden_states=context).sample
        assert approx.dtype == torch.float32 and 0 < (approx - exact).abs().max() < 0.1
    always = speed_up(load_bundle(micro_bundle_dir), FastConfig(bf16=True, fp32_from=1.0, threads=THREADS)).unet
    assert always.high_noise is None
    with pytest.raises(ValueError, match="fp32_from is a fraction"):
        FastConfig(fp32_from=850)


@NEEDS_PACKING
@pytest.mark.parametrize("dtype", PACKED_DTYPES)
def test_pack_weights_keeps_each_layers_results(dtype):
    """Each layer kind gets its packed form (1×1 convolutions a linear over the cells, wide fp32 3×3 ones Winograd's)
    and answers as before."""
    torch.manual_seed(0)
    big, wide = PACK_MIN_FP32_LINEAR // 64, WINOGRAD_MIN_CHANNELS  # just wide enough for Winograd
    layers = nn.ModuleDict({
        "conv": nn.Conv2d(8, 16, 3, padding=1), "pointwise": nn.Conv2d(8, 32, 1), "no_bias": nn.Conv2d(8, 4, 1, bias=False),
        "strided": nn.Conv2d(8, 8, 1, stride=2), "grouped": nn.Conv2d(8, 8, 1, groups=2),
        "small": nn.Linear(64, big - 1), "big": nn.Linear(64, big), "wide": nn.Conv2d(wide, wide, 3, padding=1),
    }).to(dtype).eval()  # fmt: skip
    x, rows = torch.randn(2, 8, 6, 6, dtype=dtype), torch.randn(3, 5, 64, dtype=dtype)
    cells = torch.randn(2, wide, 6, 6, dtype=dtype)
    inputs = {
        name: rows if isinstance(layer, nn.Linear) else cells if name == "wide" else x for name, layer in layers.items()
    }
    # products summed per output; Winograd's transforms add and halve terms on the way: counted as 4× the products
    terms = {name: 64 if isinstance(layer, nn.Linear) else layer.weight[0].numel() for name, layer in layers.items()}
    if dtype == torch.float32:
        terms["wide"] *= 4
    with torch.no_grad():
        expected = {name: layer(inputs[name]) for name, layer in layers.items()}
        packed = pack_weights(layers)
        kinds = {name: type(layer) for name, layer in packed.items()}
        assert kinds == {
            "conv": PackedConv2d, "pointwise": PackedPointwiseConv2d, "no_bias": PackedPointwiseConv2d,
            "strided": PackedConv2d, "grouped": PackedConv2d,
            "small": nn.Linear if dtype == torch.float32 else PackedLinear, "big": PackedLinear,
            "wide": WinogradConv2d if dtype == torch.float32 else PackedConv2d,  # bf16 would round twice as much
        }  # fmt: skip
        for name, layer in packed.items():
            value = inputs[name]
            for given in [value] if value.dim() == 3 else [value, value.contiguous(memory_format=torch.channels_last)]:
                got = layer(given)
                assert got.dtype == dtype
                assert_rounding_close(got, expected[name], terms=terms[name])
        got = packed.pointwise(x)  # answers channels_last, the layout its packed neighbours take and give
        assert got.is_contiguous(memory_format=torch.channels_last) and got.shape == (2, 32, 6, 6)


@NEEDS_PACKING
def test_bf16_weights_stay_unpacked_without_bf16_kernels(micro_bundle_dir, exact, monkeypatch):
    """Where oneDNN has no bf16 kernels (AVX2-only CPUs) the fast path packs the fp32 layers and leaves the bf16 ones
    as they are, rather than fail in oneDNN's packing: the same images, within the bf16 tolerance."""
    monkeypatch.setattr(ldm.accel.packed, "has_bf16_kernels", lambda: False)
    layers = nn.Sequential(nn.Conv2d(8, 8, 3), nn.Linear(8, 8))
    assert [type(m) for m in pack_weights(layers.to(torch.bfloat16))] == [nn.Conv2d, nn.Linear]
    assert [type(m) for m in pack_weights(layers.float())] == [PackedConv2d, nn.Linear]  # a small fp32 linear stays
    config = FastConfig(bf16=True, graph=False, pack=True, threads=THREADS)
    fast = speed_up(load_bundle(micro_bundle_dir), config)
    assert not any(isinstance(m, (PackedLinear, PackedConv2d)) for m in fast.unet.low_noise.modules())
    assert any(isinstance(m, PackedPointwiseConv2d) for m in fast.unet.high_noise.modules())
    assert isinstance(fast.vae.decoder.conv_in, PackedConv2d)
    images = generate(fast, request(["red apple", "cat face"]), progress=False)
    assert (images - exact).abs().max().item() <= 6 / 255


def test_bf16_copy(bundle):
    """Every weight cast once into a storage of its own (tied ones stay tied), 4-d ones channels_last; the fp32
    original untouched."""
    unet = bundle.unet
    before = {name: t.clone() for name, t in unet.state_dict().items()}
    low = bf16_copy(unet)
    copied = low.state_dict()
    assert copied.keys() == before.keys()
    for name, t in unet.state_dict().items():
        assert torch.equal(t, before[name]) and t.dtype == torch.float32
        assert copied[name].dtype == torch.bfloat16 and torch.equal(copied[name], t.to(torch.bfloat16)), name
        assert copied[name].data_ptr() != t.data_ptr()
        if t.dim() == 4:
            assert copied[name].is_contiguous(memory_format=torch.channels_last), name
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    twin = bf16_copy(tied)
    assert twin[0].weight is twin[1].weight and twin[0].weight.dtype == torch.bfloat16


def test_fast_path_keeps_sdpa_attention(micro_bundle_dir):
    fast = speed_up(load_bundle(micro_bundle_dir), FastConfig(bf16=True, threads=THREADS))
    assert attention_processors(fast.unet) == {"AttnProcessor2_0"}


def test_fast_path_needs_an_fp32_bundle(micro_bundle_dir):
    with pytest.raises(ValueError, match="starts from an fp32 bundle"):
        speed_up(load_bundle(micro_bundle_dir).to(dtype=torch.bfloat16))


def test_physical_cores():
    assert 1 <= physical_cores() <= (__import__("os").cpu_count() or 1)


def test_encode_prompts_encodes_each_distinct_prompt_once(bundle, monkeypatch):
    seen = []
    encoder = bundle.text_encoder

    def counting(ids):
        seen.append(len(ids))
        return type(encoder).forward(encoder, ids)

    monkeypatch.setattr(encoder, "forward", counting)
    prompts = ["red apple", "", "red apple", "cat face", ""]
    hidden = encode_prompts(bundle, prompts)
    assert seen == [3] and hidden.shape[0] == 5
    # a batch of 3 against 1 may sum in other orders. Each layer chains sums over its width (the query and key
    # projections, the output projection, the MLP's first), a head's width (the scores), the tokens (the weighted
    # sum) and the MLP's width (its second)
    text = bundle.config.text_encoder
    terms = text.layers * (3 * text.width + text.width // text.heads + hidden.shape[1] + text.mlp_width)
    for i, prompt in enumerate(prompts):
        assert_rounding_close(encode_prompts(bundle, [prompt]), hidden[i : i + 1], terms=terms)


def test_prompt_dedupe_gives_the_same_images(bundle, monkeypatch):
    prompts = ["red apple", "red apple", "cat face", "red apple"]
    deduped = generate(bundle, request(prompts, steps=4), progress=False)

    def one_by_one(bundle, prompts, **kwargs):  # the reference: every prompt encoded on its own, no sharing
        calls.append(len(prompts))
        return torch.cat([encode_prompts_once(bundle, [p], **kwargs) for p in prompts])

    calls, encode_prompts_once = [], ldm.pipeline.encode_prompts
    monkeypatch.setattr(ldm.pipeline.text_to_image, "encode_prompts", one_by_one)  # where generate looks it up
    separate = generate(bundle, request(prompts, steps=4), progress=False)
    assert calls  # the reference ran
    assert torch.equal(to_uint8(deduped), to_uint8(separate))
    assert (deduped - separate).abs().max().item() <= 1e-5


# --- generate.py --fast -----------------------------------------------------------------------------------------------


def test_cli_fast_flag(micro_bundle_dir, tmp_path):
    common = ["red apple", "--seed", "3", "--steps", "4", "--model", micro_bundle_dir, "--quiet"]
    assert run([*common, "--out", tmp_path / "exact"]) == 0
    assert run([*common, "--out", tmp_path / "fast", "--fast"]) == 0
    (exact,), (fast,) = (tmp_path / "exact").glob("0*.png"), (tmp_path / "fast").glob("0*.png")
    assert np.abs(pixels(fast) - pixels(exact)).max() <= 3  # 2/255 in floats, plus rounding to uint8
    settings = parse_parameters(read_png_parameters(fast))[2]
    assert settings["Fast"] == "on" and settings["Dtype"] == "fp32"
    assert "Fast" not in parse_parameters(read_png_parameters(exact))[2]
    # --from-png takes the fast path again (and --no-fast turns it off).
    assert run(["--from-png", fast, "--model", micro_bundle_dir, "--out", tmp_path / "again", "--quiet"]) == 0
    (again,) = (tmp_path / "again").glob("0*.png")
    assert np.array_equal(pixels(again), pixels(fast))
    assert parse_parameters(read_png_parameters(again))[2]["Fast"] == "on"
    assert (
        run(["--from-png", fast, "--no-fast", "--model", micro_bundle_dir, "--out", tmp_path / "off", "--quiet"]) == 0
    )
    (off,) = (tmp_path / "off").glob("0*.png")
    assert np.array_equal(pixels(off), pixels(exact))


@pytest.mark.parametrize(
    "flags, message",
    [(["--fast", "--dtype", "bf16"], "--fast sets the UNet's precision itself"), (["--compile"], "add --fast")],
)
def test_cli_fast_bad_flags(micro_bundle_dir, tmp_path, capsys, flags, message):
    assert run(["x", *flags, "--model", micro_bundle_dir, "--out", tmp_path, "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_cli_traces_the_unet_only_for_jobs_that_earn_it_back(micro_bundle_dir, tmp_path, monkeypatch):
    import ldm.accel.fast
    import ldm.accel.graph

    traced = []
    monkeypatch.setattr(ldm.accel.graph.TracedUNet, "__init__", counting(ldm.accel.graph.TracedUNet.__init__, traced))
    common = ["red apple", "--seed", "3", "--steps", "4", "--model", micro_bundle_dir, "--quiet", "--fast"]
    assert run([*common, "--out", tmp_path / "short"]) == 0
    assert traced == []  # 4 UNet calls: tracing would cost more than it saves
    monkeypatch.setattr(ldm.accel.fast, "GRAPH_MIN_CALLS", 4)
    assert run([*common, "--out", tmp_path / "long"]) == 0
    assert len(traced) == 1
    (short,), (long,) = (tmp_path / "short").glob("0*.png"), (tmp_path / "long").glob("0*.png")
    assert np.abs(pixels(short) - pixels(long)).max() <= 1


def counting(function, calls):
    def wrapper(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)

    return wrapper


@torch.no_grad()
def test_long_weighted_prompts_are_kept_across_batches_and_traced(micro_bundle_dir):
    """Two chunks of weighted text, against a short negative: encoded once per job, and the traced graphs (the
    default for micro on CPU) take the (2, 154, D) context as the exact path does."""
    fast = speed_up(load_bundle(micro_bundle_dir), FastConfig(threads=THREADS))
    req = Request(
        prompts=["(red:1.3) apple, [cat] face, " * 15], negative_prompts=["blurry"], seeds=[0], steps=2,
        guidance_scale=7.5, sampler=get_sampler("dpmpp_2m"), width=64, height=64,
    )  # fmt: skip
    first, second = generate(fast, req, progress=False), generate(fast, req, progress=False)
    assert fast.text_encoder.encoder_calls == 1 and torch.equal(first, second)
    torch.testing.assert_close(first, generate(load_bundle(micro_bundle_dir), req, progress=False), atol=1e-4, rtol=0)


@torch.no_grad()
def test_prompt_encodings_are_kept_across_batches(micro_bundle_dir):
    fast = speed_up(load_bundle(micro_bundle_dir), FastConfig(threads=torch.get_num_threads(), graph=False))
    cache = fast.text_encoder
    assert isinstance(cache, PromptCache)
    req = Request(
        prompts=["red apple"], negative_prompts=[""], seeds=[0], steps=2, guidance_scale=7.5,
        sampler=get_sampler("dpmpp_2m"), width=64, height=64,
    )  # fmt: skip
    first, second = generate(fast, req, progress=False), generate(fast, req, progress=False)
    assert cache.encoder_calls == 1 and torch.equal(first, second)
    torch.testing.assert_close(first, generate(load_bundle(micro_bundle_dir), req, progress=False), atol=1e-4, rtol=0)
    ids = torch.tensor([[1, 2, 3]])
    kept = cache(ids).hidden_states
    assert cache(ids).hidden_states is kept
    kept.mul_(2)  # a caller wrote into the kept tensor: encoded again
    assert cache(ids).hidden_states is not kept
    calls = cache.encoder_calls
    with torch.inference_mode():  # no version counters: not kept
        cache(torch.tensor([[1, 2, 3]]))
        cache(torch.tensor([[1, 2, 3]]))
    assert cache.encoder_calls == calls + 2
    calls = cache.encoder_calls
    before = cache(ids).hidden_states.clone()
    for p in cache.text_encoder.parameters():
        p.mul_(1.5)  # weights changed in place: encoded again, with the new weights
    assert not torch.equal(cache(ids).hidden_states, before) and cache.encoder_calls == calls + 1
