"""Token merging in the UNet's self-attention (ldm.accel.tome): the partition, merging and spreading back, the UNet hook-up
and the CLI; what it changes in real images is measured in bench/token_merging.py."""

import numpy as np
import pytest
import torch
from cli_runs import pixels, run

from ldm.accel.fast import FastConfig, speed_up
from ldm.accel.graph import GraphUNet
from ldm.accel.tome import (
    TokenMergingProcessor,
    apply_token_merging,
    check_ratio,
    merge_tokens,
    partition,
    remove_token_merging,
)
from ldm.errors import LdmError
from ldm.formats.bundle import load_bundle
from ldm.formats.pngmeta import parse_parameters, read_png_parameters
from ldm.pipeline import Request, generate
from ldm.pipeline.schedule import get_sampler

THREADS = torch.get_num_threads()  # speed_up sets the thread count; keep the session's


@pytest.mark.parametrize("height, width", [(4, 4), (5, 6), (8, 3)])
def test_partition_has_one_destination_per_whole_block(height, width):
    sources, destinations = partition(height, width, torch.tensor(941.0))
    assert sorted(torch.cat([sources, destinations]).tolist()) == list(range(height * width))
    assert destinations.numel() == (height // 2) * (width // 2)
    blocks = {(int(d) // width // 2, int(d) % width // 2) for d in destinations}
    assert len(blocks) == destinations.numel()  # each destination in a block of its own
    assert all(int(d) // width < height // 2 * 2 and int(d) % width < width // 2 * 2 for d in destinations)


def picks(destinations: torch.Tensor, width: int) -> torch.Tensor:
    """Which cell of its 2×2 block each destination is (0…3), block by block."""
    rows, cols = destinations // width, destinations % width
    order = torch.argsort((rows // 2) * width + cols // 2)
    return ((rows % 2) * 2 + cols % 2)[order]


def test_partition_depends_on_the_timestep_only_and_varies():
    first = partition(16, 16, torch.tensor(941.0))[1]
    assert torch.equal(first, partition(16, 16, torch.tensor([941.0, 941.0]))[1])  # a batch's shared timestep
    # the timesteps of 20 and of 10 leading-spaced steps (951, 901, … 1 and 901, 801, … 1): a new choice nearly every step
    for steps in (20, 10):
        timesteps = range(1000 - 1000 // steps + 1, 0, -(1000 // steps))
        distinct = {tuple(partition(16, 16, torch.tensor(float(t)))[1].tolist()) for t in timesteps}
        assert len(distinct) >= steps - 1
    # within a grid: each cell of a block picked about as often, and no pattern repeating every few blocks
    pick = picks(partition(64, 64, torch.tensor(501.0))[1], 64).view(32, 32)
    assert all(200 < int((pick == k).sum()) < 312 for k in range(4))  # of 1024 blocks, 256 each on average
    for period in (2, 4, 8):
        assert not torch.equal(pick[:, period:], pick[:, :-period]) and not torch.equal(pick[period:], pick[:-period])


def test_merging_traces_without_in_place_ops():
    """Traced graphs (ldm.accel.graph) fold and merge only graphs that mutate nothing."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def merged_and_back(x, t):
        y, unmerge = merge_tokens(x, *partition(4, 6, t), 5)
        return unmerge(y * 2)

    graph = make_fx(merged_and_back)(torch.randn(2, 24, 8), torch.tensor(7.0))
    targets = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    mutating = [t for t in targets if getattr(t, "_schema", None) is not None and t._schema.is_mutable]
    assert targets and not mutating


def test_merging_nothing_is_the_identity():
    x = torch.randn(2, 30, 8)
    merged, unmerge = merge_tokens(x, *partition(5, 6, torch.tensor(1.0)), 0)
    assert merged.shape == x.shape
    assert torch.equal(unmerge(merged), x)


def test_merged_tokens_average_into_their_destination_and_take_its_output():
    """Two blocks of four cells; the sources of the first block copy its destination exactly (similarity 1), so
    those are the ones merged; the destination then holds their mean, and spreading back gives each its output."""
    sources, destinations = partition(2, 4, torch.tensor(7.0))
    x = torch.randn(1, 8, 6)
    d0 = int(destinations[0])
    block0 = [p for p in range(8) if p % 4 < 2]  # the first block's cells: columns 0 and 1
    for p in block0:
        x[0, p] = x[0, d0] * (1 + 0.1 * p)  # parallel to the destination: cosine similarity 1
    merged, unmerge = merge_tokens(x, sources, destinations, 3)
    assert merged.shape == (1, 5, 6)
    torch.testing.assert_close(merged[0, -2], x[0, block0].mean(0))  # the first destination: the mean of its block
    spread = unmerge(merged)
    for p in block0:
        torch.testing.assert_close(spread[0, p], merged[0, -2])
    others = [p for p in range(8) if p not in block0]
    torch.testing.assert_close(spread[0, others], x[0, others])  # the other block untouched


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_ratio(ratio):
    with pytest.raises(LdmError, match="R must be at least 0 \\(off\\) and below 1"):
        check_ratio(ratio)


def request(steps=4):
    return Request(
        prompts=["red apple", "cat face"], negative_prompts=["", ""], seeds=[0, 1], steps=steps, guidance_scale=7.5,
        sampler=get_sampler("dpmpp_2m"), width=64, height=64,
    )  # fmt: skip


class Spy:
    """An attention processor that notes how many tokens its attention got, then runs the one it wraps."""

    def __init__(self, inner, name, seen):
        self.inner, self.name, self.seen = inner, name, seen

    def __call__(self, attn, hidden_states, *args, **kwargs):
        self.seen[self.name] = hidden_states.shape[1]
        return self.inner(attn, hidden_states, *args, **kwargs)


def test_only_the_finest_self_attention_sees_fewer_tokens(micro_bundle_dir):
    """micro's UNet has two levels, 8×8 (64 tokens: the first down block, the last up block) and 4×4 (16)."""
    bundle = load_bundle(micro_bundle_dir)
    apply_token_merging(bundle.unet, 0.5)
    seen = {}
    for name, module in bundle.unet.named_modules():
        if isinstance(getattr(module, "processor", None), TokenMergingProcessor):
            module.processor.inner = Spy(module.processor.inner, name, seen)
        elif hasattr(module, "processor"):
            module.set_processor(Spy(module.processor, name, seen))
    with torch.no_grad():
        bundle.unet(torch.randn(2, 4, 8, 8), torch.tensor(500), encoder_hidden_states=torch.randn(2, 77, 32))
    fine = {n for n in seen if n.endswith("attn1") and n.startswith(("down_blocks.0.", "up_blocks.1."))}
    assert len(fine) == 3  # one transformer block per layer: 1 down, 2 up
    assert {seen[n] for n in fine} == {32}  # half of 64 merged
    assert {t for n, t in seen.items() if n.endswith("attn1") and n not in fine} == {16}  # coarser: untouched
    assert {t for n, t in seen.items() if n.endswith("attn2")} == {64, 16}  # cross-attention untouched


@pytest.mark.parametrize("max_downsample, coarse", [(1, 25), (2, 13)])
def test_odd_latent_and_coarser_levels(micro_bundle_dir, max_downsample, coarse):
    """A 9×9 latent: the finest level's 81 tokens lose 40 (of its 65 sources); the 5×5 level (stride-2 with padding
    1 rounds up) loses 12 of 25 when it is merged too."""
    bundle = load_bundle(micro_bundle_dir)
    apply_token_merging(bundle.unet, 0.5, max_downsample=max_downsample)
    seen = {}
    for name, module in bundle.unet.named_modules():
        if isinstance(getattr(module, "processor", None), TokenMergingProcessor):
            module.processor.inner = Spy(module.processor.inner, name, seen)
    with torch.no_grad():
        out = bundle.unet(torch.randn(2, 4, 9, 9), torch.tensor(500), encoder_hidden_states=torch.randn(2, 77, 32))
    assert out.sample.shape == (2, 4, 9, 9)
    fine = {n for n in seen if n.startswith(("down_blocks.0.", "up_blocks.1."))}
    assert {seen[n] for n in fine} == {41} and {t for n, t in seen.items() if n not in fine} == {coarse}


def test_ratio_zero_changes_nothing_and_a_ratio_changes_the_images(micro_bundle_dir):
    exact = generate(load_bundle(micro_bundle_dir), request(), progress=False)
    off = load_bundle(micro_bundle_dir)
    apply_token_merging(off.unet, 0.0)
    assert torch.equal(generate(off, request(), progress=False), exact)
    merged = load_bundle(micro_bundle_dir)
    apply_token_merging(merged.unet, 0.5)
    images = generate(merged, request(), progress=False)
    assert images.shape == exact.shape and not torch.allclose(images, exact, atol=1e-3)
    assert torch.equal(generate(merged, request(), progress=False), images)  # reproducible
    with pytest.raises(LdmError, match="already applied"):
        apply_token_merging(merged.unet, 0.5)
    remove_token_merging(merged.unet)
    assert torch.equal(generate(merged, request(), progress=False), exact)
    assert not merged.unet._forward_pre_hooks


@pytest.mark.parametrize("graph", [False, True], ids=["modules", "traced"])
def test_fast_path_merges_as_the_plain_unet(micro_bundle_dir, graph):
    """Applied after speed_up (traced graphs included, where the partition is traced from the timestep tensor)."""
    plain = load_bundle(micro_bundle_dir)
    apply_token_merging(plain.unet, 0.5)
    expected = generate(plain, request(), progress=False)
    fast = speed_up(load_bundle(micro_bundle_dir), FastConfig(graph=graph, threads=THREADS))
    apply_token_merging(fast.unet, 0.5)
    assert isinstance(fast.unet, GraphUNet) == graph
    torch.testing.assert_close(generate(fast, request(), progress=False), expected, rtol=0, atol=1e-4)
    if graph:
        assert fast.unet.traces and all(t is not None for t in fast.unet.traces.values())  # it did run traced
    # taken off again, the traced graphs too: the fast path's exact images
    exact = generate(
        speed_up(load_bundle(micro_bundle_dir), FastConfig(graph=graph, threads=THREADS)), request(), progress=False
    )
    remove_token_merging(fast.unet)
    torch.testing.assert_close(generate(fast, request(), progress=False), exact, rtol=0, atol=1e-5)


def test_cli_token_merging_is_recorded_and_reproduced(micro_bundle_dir, tmp_path):
    common = ["red apple", "--seed", "3", "--steps", "6", "--model", micro_bundle_dir, "--quiet"]
    assert run([*common, "--out", tmp_path / "exact"]) == 0
    assert run([*common, "--out", tmp_path / "merged", "--token-merging", "0.5"]) == 0
    (exact,), (merged,) = (tmp_path / "exact").glob("0*.png"), (tmp_path / "merged").glob("0*.png")
    assert not np.array_equal(pixels(merged), pixels(exact))
    assert parse_parameters(read_png_parameters(merged))[2]["Token merging ratio"] == "0.5"
    assert "Token merging ratio" not in parse_parameters(read_png_parameters(exact))[2]
    assert run(["--from-png", merged, "--model", micro_bundle_dir, "--out", tmp_path / "again", "--quiet"]) == 0
    (again,) = (tmp_path / "again").glob("0*.png")
    assert np.array_equal(pixels(again), pixels(merged))
    off = ["--from-png", merged, "--token-merging", "0", "--model", micro_bundle_dir, "--out", tmp_path / "off"]
    assert run([*off, "--quiet"]) == 0
    (off,) = (tmp_path / "off").glob("0*.png")
    assert np.array_equal(pixels(off), pixels(exact))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--token-merging", "1"], "R must be at least 0 (off) and below 1, e.g. 0.5, not 1.0"),
        (["--token-merging", "0.5", "--deep-cache", "2"], "--token-merging and --deep-cache do not combine"),
    ],
)
def test_cli_token_merging_bad_flags(micro_bundle_dir, tmp_path, capsys, flags, message):
    assert run(["x", *flags, "--model", micro_bundle_dir, "--out", tmp_path, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.png"))
