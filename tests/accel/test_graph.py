"""Traced UNet graphs (ldm.accel.graph): the rewritten graphs against the UNet they came from; speed is measured in bench/."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from support import assert_rounding_close
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import ldm.accel.graph
import ldm.accel.packed
from ldm.accel.fast import FastConfig, MixedPrecisionUNet, speed_up
from ldm.accel.graph import (
    GraphUNet,
    TracedUNet,
    decompose_attention,
    eliminate_common,
    fold_constants,
    merge_linears,
    rewrite_convolutions,
    split_prompt,
)
from ldm.formats.bundle import load_bundle

aten = torch.ops.aten


@pytest.fixture(scope="module")
def unet(micro_bundle_dir):
    return load_bundle(micro_bundle_dir).unet.eval()


def inputs(batch, *, seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, size, size, generator=g)  # (B, 4, h, w)
    context = torch.randn(batch, 77, 32, generator=g)  # (B, L, D)
    return sample, context


def exact(unet, sample, t, context):
    with torch.no_grad():
        return unet(sample, t, encoder_hidden_states=context).sample


def test_graph_matches_the_unet_at_each_shape_and_timestep(unet):
    graph = GraphUNet(unet)
    with torch.no_grad():
        for batch, size in ((2, 8), (4, 8), (2, 4)):
            sample, context = inputs(batch, size=size)
            for t in (torch.tensor(999), torch.tensor(10), 500, 500.0):
                out = graph(sample, t, encoder_hidden_states=context).sample
                torch.testing.assert_close(out, exact(unet, sample, t, context), atol=1e-5, rtol=0)
    assert len(graph.traces) == 3 * 2  # three shapes × (int64 from a tensor or a Python int, float64 from a float)
    stats = [traced.stats for traced in graph.traces.values()]
    assert all(s.folded > 0 and s.prompt_cached > 0 and s.nodes_left < s.nodes_traced for s in stats)
    assert all(s.pointwise_convs > 0 and s.packed_convs + s.dense_convs > 0 for s in stats)
    # each self-attention's q, k, v as one product (2 fewer each), the resnets' time projections as one
    assert all(s.common > 0 and s.linears_merged >= 2 * 2 for s in stats)
    assert stats[-1].dense_convs > 0  # a 4×4 latent: the 64-channel level's grid is 2×2


def test_prompt_values_are_computed_once_per_context_tensor(unet, monkeypatch):
    graph = GraphUNet(unet)
    sample, context = inputs(2)
    with torch.no_grad():
        graph(sample, torch.tensor(900), encoder_hidden_states=context)
        (traced,) = graph.traces.values()
        calls = []
        prompt = traced.prompt
        monkeypatch.setattr(traced, "prompt", lambda c: calls.append(1) or prompt(c))
        for t in (800, 700, 600):  # a sampling loop: same context tensor every step
            graph(sample, torch.tensor(t), encoder_hidden_states=context)
        assert calls == []
        other = torch.randn_like(context)  # another prompt
        torch.testing.assert_close(
            graph(sample, torch.tensor(600), encoder_hidden_states=other).sample,
            exact(unet, sample, torch.tensor(600), other), atol=1e-5, rtol=0,
        )  # fmt: skip
        context.mul_(2)  # changed in place: the cache must notice
        torch.testing.assert_close(
            graph(sample, torch.tensor(600), encoder_hidden_states=context).sample,
            exact(unet, sample, torch.tensor(600), context), atol=1e-5, rtol=0,
        )  # fmt: skip
    assert len(calls) == 2


def test_gradients_and_extra_arguments_run_the_unet_itself(unet):
    graph = GraphUNet(unet)
    sample, context = inputs(2)
    out = graph(sample, torch.tensor(500), encoder_hidden_states=context).sample
    assert out.requires_grad and not graph.traces
    with torch.no_grad():
        graph(sample, torch.tensor(500), encoder_hidden_states=context, cross_attention_kwargs={"scale": 1.0})
        graph(sample, torch.tensor(500), context, None)  # class_labels, positionally
    assert not graph.traces


def test_inference_mode_runs_the_unet_itself(unet):
    graph = GraphUNet(unet)
    sample, context = inputs(2)
    with torch.inference_mode():  # its tensors have no version counter for the prompt cache
        out = graph(sample, torch.tensor(500), encoder_hidden_states=context).sample
    assert not graph.traces
    assert torch.equal(out, exact(unet, sample, torch.tensor(500), context))


def test_changed_weights_are_traced_again(micro_bundle_dir):
    unet = load_bundle(micro_bundle_dir).unet.eval()
    graph = GraphUNet(unet)
    sample, context = inputs(2)
    with torch.no_grad():
        graph(sample, torch.tensor(500), encoder_hidden_states=context)
        (old,) = graph.traces.values()
        state = {k: v * 1.5 if v.dtype.is_floating_point else v for k, v in unet.state_dict().items()}
        unet.load_state_dict(state)  # in place: folded constants and dense matrices of the old trace are stale
        out = graph(sample, torch.tensor(500), encoder_hidden_states=context).sample
    (new,) = graph.traces.values()  # the stale trace is gone, not kept beside the new one
    assert new is not old
    torch.testing.assert_close(out, exact(unet, sample, torch.tensor(500), context), atol=1e-4, rtol=1e-5)


def test_a_unet_that_cannot_be_traced_still_runs(unet, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("unsupported op")

    monkeypatch.setattr(ldm.accel.graph.TracedUNet, "__init__", fail)
    graph = GraphUNet(unet)
    sample, context = inputs(2)
    with pytest.warns(UserWarning, match=r"could not trace the UNet \(RuntimeError: unsupported op\)"), torch.no_grad():
        out = graph(sample, torch.tensor(500), encoder_hidden_states=context).sample
    assert torch.equal(out, exact(unet, sample, torch.tensor(500), context))


def test_a_graph_that_strays_is_not_used(unet, monkeypatch):
    monkeypatch.setitem(ldm.accel.graph.TOLERANCE, torch.float32, -1.0)  # nothing can pass
    graph = GraphUNet(unet)
    sample, context = inputs(2)
    with pytest.warns(UserWarning, match="running the UNet itself"), torch.no_grad():
        out = graph(sample, torch.tensor(500), encoder_hidden_states=context).sample
    assert torch.equal(out, exact(unet, sample, torch.tensor(500), context))
    assert list(graph.traces.values()) == [None]


@pytest.mark.slow
def test_compiled_graph_matches_the_unet(cxx_compiler):
    # inductor's time goes with the graph's node count, so the one real compile of the suite is of a one-level
    # UNet (about half micro's nodes): attention, resnets, the time embedding and the skip all still in it
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16,), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        mid_block_type="UNetMidBlock2D", cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    ).eval()  # fmt: skip
    graph = GraphUNet(unet, compile=True)
    sample, context = inputs(2)
    with torch.no_grad():
        for t in (torch.tensor(900), torch.tensor(20)):  # one shape: compiled once, on the first call
            out = graph(sample, t, encoder_hidden_states=context).sample
            torch.testing.assert_close(out, exact(unet, sample, t, context), atol=1e-4, rtol=0)
    (traced,) = graph.traces.values()
    assert traced.compiled and traced.main is not traced.graph
    assert traced.stats.attention_decomposed > 0  # inductor gets the attention spelled out


def test_a_graph_that_cannot_compile_runs_uncompiled(unet, monkeypatch):
    def no_compiler(graph, inputs, **options):
        raise RuntimeError("no C++ compiler found\nlong details")

    monkeypatch.setattr("torch._inductor.compile", no_compiler)
    graph = GraphUNet(unet, compile=True)
    sample, context = inputs(2)
    message = r"inductor could not compile the traced UNet graph \(RuntimeError: no C\+\+ compiler found\); running"
    with pytest.warns(UserWarning, match=message), torch.no_grad():
        out = graph(sample, torch.tensor(500), encoder_hidden_states=context).sample
    (traced,) = graph.traces.values()
    assert not traced.compiled and traced.main is traced.graph
    torch.testing.assert_close(out, exact(unet, sample, torch.tensor(500), context), atol=1e-5, rtol=0)


def test_compiled_code_gets_extra_inputs_only_in_the_layout_it_was_compiled_for(monkeypatch):
    compiled_calls = []

    def compile_stand_in(graph, inputs, **options):  # runs the graph, and counts
        return lambda *args: compiled_calls.append(1) or graph(*args)

    monkeypatch.setattr("torch._inductor.compile", compile_stand_in)
    sample, context, extra = torch.randn(2, 4, 3, 3), torch.randn(2, 5, 4), torch.randn(2, 4, 3, 3)
    t = torch.tensor(1)
    traced = TracedUNet(
        nn.Identity(), sample, t, context, extra, call=lambda s, t, c, d: s * d + c.mean(), compile=True
    )
    assert traced.compiled
    with torch.no_grad():
        compiled_calls.clear()
        out = traced(sample, t, context, extra)
        assert compiled_calls == [1]
        transposed = extra.transpose(2, 3).contiguous().transpose(2, 3)  # the same values in other strides
        assert torch.equal(traced(sample, t, context, transposed), out)
        assert compiled_calls == [1]  # the uncompiled graph ran


class Convs(nn.Module):
    """One convolution of each kind the rewrite handles, and one it leaves alone."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.small = nn.Conv2d(16, 16, 3, padding=1)  # 2×2 grid: dense matrix
        self.down = nn.Conv2d(16, 16, 3, stride=2, padding=1)  # 2×2 → 1×1: dense
        self.pointwise = nn.Conv2d(16, 8, 1)  # batched matmul
        self.large = nn.Conv2d(8, 8, 3, padding=1)  # 32×32 grid: oneDNN
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)  # left as it is
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3

    def forward(self, x, y):  # x: (B, 16, 2, 2), y: (B, 8, 32, 32)
        a = self.small(x)
        b = self.down(a)
        c = self.pointwise(a)
        return a, b, c, self.grouped(self.large(y))


# The sums behind each of Convs' outputs, chained: a (small), b (down after small), c (pointwise after small), the
# grouped convolution after the large one.
CONVS_TERMS = (16 * 9, 2 * 16 * 9, 16 * 9 + 16, 8 * 9 + 4 * 9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens", [False, True])
def test_rewritten_convolutions_match_conv2d(tokens, dtype):
    """Each rewrite answers as the convolution; the large one is packed where oneDNN packs the dtype (bf16: where it
    has bf16 kernels), else left as it is."""
    module = Convs().eval().to(dtype)
    x, y = torch.randn(3, 16, 2, 2, dtype=dtype), torch.randn(3, 8, 32, 32, dtype=dtype)
    with torch.no_grad():
        gm = make_fx(module)(x, y)
        counts = rewrite_convolutions(gm, tokens=tokens)
        expected, got = module(x, y), gm(x, y)
    products = {n.target for n in gm.graph.nodes} & {aten.baddbmm.default, aten.bmm.default, aten.addmm.default}
    assert (aten.baddbmm.default in products or aten.bmm.default in products) != tokens  # the 1×1: batched or not
    dense, pointwise, packed = counts
    assert (dense, pointwise) == (2, 1) and packed == ldm.accel.packed.can_pack(torch.device("cpu"), dtype)
    assert sum(n.target is aten.convolution.default for n in gm.graph.nodes) == 2 - packed
    for e, g, terms in zip(expected, got, CONVS_TERMS, strict=True):
        assert g.shape == e.shape and g.is_contiguous()
        assert_rounding_close(g, e, terms=terms)


def test_bf16_convolutions_stay_unpacked_without_bf16_kernels(monkeypatch):
    """Where oneDNN has no bf16 kernels the rewrite leaves a bf16 convolution as traced rather than pack it (which
    oneDNN would refuse), and still makes the others matrix products."""
    monkeypatch.setattr(ldm.accel.packed, "has_bf16_kernels", lambda: False)
    module = Convs().eval().to(torch.bfloat16)
    x, y = torch.randn(3, 16, 2, 2, dtype=torch.bfloat16), torch.randn(3, 8, 32, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        gm = make_fx(module)(x, y)
        assert rewrite_convolutions(gm) == (2, 1, 0)
        for e, g, terms in zip(module(x, y), gm(x, y), CONVS_TERMS, strict=True):
            assert_rounding_close(g, e, terms=terms)


def attention(x, causal):
    """diffusers' layout: (B, L, H·D) → heads as a transposed view → attention → back to (B, L, H·D)."""
    b, length, _ = x.shape
    q, k, v = (y.view(b, length, 2, 8).transpose(1, 2) for y in (x, x.flip(1), x * 2))  # (B, H, L, D)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).reshape(b, length, 16)


def test_decomposed_attention_matches_the_kernel():
    x = torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(0))
    # Rounding only: the scores sum over a head's 8 channels, the output over the 10 keys, and each output is a
    # weighted mean of the values (x * 2), so their largest sets the scale.
    terms, scale = 8 + 10, 2 * x.abs().max().item()
    with torch.no_grad():
        gm = make_fx(lambda x: attention(x, False))(x)
        kernel = aten._scaled_dot_product_flash_attention_for_cpu.default
        assert [n.target for n in gm.graph.nodes].count(kernel) == 1  # what torch calls on CPU: what is looked for
        # the traced graph takes the kernel's output back to (B, L, H·D) as a view, which only its strides allow
        assert aten.view.default in [n.target for n in gm.graph.nodes]
        assert decompose_attention(gm) == 1
        assert kernel not in [n.target for n in gm.graph.nodes]
        assert_rounding_close(gm(x), attention(x, False), terms=terms, scale=scale)
        with pytest.raises(AssertionError, match="more than rounding explains"):  # yet inputs 1e-4 off are caught
            assert_rounding_close(gm(x * (1 + 1e-4)), attention(x, False), terms=terms, scale=scale)

        causal = make_fx(lambda x: attention(x, True))(x)
        assert decompose_attention(causal) == 0  # masked attention stays the kernel's
        assert_rounding_close(causal(x), attention(x, True), terms=terms, scale=scale)


def test_fold_constants_and_split_prompt():
    w, table = torch.randn(8, 4), torch.arange(8.0)

    def f(x, context):  # x: (B, 8), context: (B, 4)
        keys = context @ w.t() * 2  # context and constants only
        return x * keys + torch.exp(table / 8)  # the exp of a constant folds

    x, context = torch.randn(2, 8), torch.randn(2, 4)
    gm = make_fx(f)(x, context)
    assert fold_constants(gm) >= 2  # w.t() and exp(table / 8)
    prompt, moved = split_prompt(gm, [n for n in gm.graph.nodes if n.op == "placeholder"][1])
    assert moved >= 2
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"][-1] == "prompt_0"
    torch.testing.assert_close(gm(x, *prompt(context)), f(x, context))


def test_shared_inputs_are_computed_once_and_their_products_merged():
    wq, wk, wv, wt = (torch.randn(n, 6) for n in (6, 6, 3, 5))
    bt = torch.randn(5)

    def f(x, emb):  # x: (B, L, 6) tokens, emb: (B, 6)
        q, k, v = F.linear(x, wq), F.linear(x, wk), F.linear(x, wv)  # three views of x, three products
        a, b = F.linear(F.silu(emb), wt, bt), F.linear(F.silu(emb), wt.flip(0), bt)  # silu(emb) twice
        scores = (q @ k.transpose(1, 2)).softmax(-1)
        return scores @ v, a * b

    x, emb = torch.randn(2, 4, 6), torch.randn(2, 6)
    gm = make_fx(f)(x, emb)
    fold_constants(gm)
    def count(*targets):
        return sum(n.target in targets for n in gm.graph.nodes)
    assert count(aten.silu.default) == 2
    assert eliminate_common(gm) >= 3  # the second SiLU, two of the three views of x
    assert count(aten.silu.default) == 1
    assert merge_linears(gm) == 3  # q, k, v → one; the two projections of silu(emb) → one
    assert count(aten.mm.default, aten.addmm.default) == 2
    for got, want in zip(gm(x, emb), f(x, emb), strict=True):  # wider products sum in another order
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    other = torch.randn(2, 4, 6), torch.randn(2, 6)  # fresh values: not the traced ones again
    for got, want in zip(gm(*other), f(*other), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_merging_products_takes_chains_and_leaves_views_that_join_columns():
    g = torch.Generator().manual_seed(0)
    a, b, c, d = (torch.randn(n, 6, generator=g) for n in (6, 6, 6, 5))
    bias = torch.randn(6, generator=g)

    def chain(x):  # x: (3, 6); h and the plain product of x share it, h's two products share h
        h = F.linear(x, a, bias)
        return F.linear(h, b) * F.linear(h, c), F.linear(x, d) * 2

    def joined(x):  # a view that joins a product's rows and columns cannot take a column block
        return F.linear(x, a).reshape(-1), F.linear(x, d) * 2

    x = torch.randn(3, 6, generator=g)
    for f, merged in ((chain, 2), (joined, 0)):
        gm = make_fx(f)(x)
        fold_constants(gm)
        assert merge_linears(gm) == merged
        for got, want in zip(gm(x), f(x), strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_common_calls_keep_their_scalar_types():
    gm = make_fx(lambda t: (t * 1, t * 1.0, t * True))(torch.arange(3))
    assert eliminate_common(gm) == 0  # equal in Python, not to aten: int64, float32 and int64 results
    assert [y.dtype for y in gm(torch.arange(3))] == [torch.int64, torch.float32, torch.int64]


def test_fast_path_uses_graphs_for_small_unets_on_cpu(micro_bundle_dir):
    threads = torch.get_num_threads()
    fast = speed_up(load_bundle(micro_bundle_dir), FastConfig(threads=threads))
    assert isinstance(fast.unet, GraphUNet)
    plain = speed_up(load_bundle(micro_bundle_dir), FastConfig(threads=threads, graph=False))
    assert not isinstance(plain.unet, GraphUNet)
    mixed = speed_up(load_bundle(micro_bundle_dir), FastConfig(threads=threads, bf16=True))
    assert isinstance(mixed.unet, MixedPrecisionUNet) and isinstance(mixed.unet.low_noise, GraphUNet)
    compiled = speed_up(load_bundle(micro_bundle_dir), FastConfig(threads=threads, compile=True))
    assert isinstance(compiled.unet, GraphUNet) and compiled.unet.compile  # compile: the traced graphs
    plain_compiled = speed_up(load_bundle(micro_bundle_dir), FastConfig(threads=threads, compile=True, graph=False))
    assert not isinstance(plain_compiled.unet, GraphUNet)  # without graphs: the UNet module


def test_dense_matrix_is_the_convolution():
    weight = torch.randn(5, 3, 3, 3)
    x = torch.randn(4, 3, 3, 2)
    matrix = ldm.accel.graph._dense_matrix(weight, [2, 1], [1, 1], (3, 3, 2))
    expected = F.conv2d(x, weight, None, [2, 1], [1, 1])
    assert_rounding_close((x.flatten(1) @ matrix).view(expected.shape), expected, terms=3 * 3 * 3)
