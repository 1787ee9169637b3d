"""Traced UNet graphs: the fast path's cure for per-op overhead in small UNets on CPU.

A small UNet spends most of a sampling step walking diffusers' module tree rather than computing: emoji-tiny's UNet
(7M parameters on an 8×8 latent) makes about 1,200 aten calls for 0.44 GFLOP per guided step, each wrapped in
Python. :class:`GraphUNet` traces the UNet once per input shape into an aten-level FX graph
(``torch.fx.experimental.proxy_tensor.make_fx``: the same aten calls in the same order, with the modules gone) and
rewrites it:

- **constant folding**: whatever depends on the weights alone (transposed linear weights, the sinusoid frequency
  table) is computed once;
- **prompt caching**: what depends on the text embeddings alone (the keys and values of every cross-attention) is
  computed once per embeddings tensor and reused by every step that passes the same tensor, as the sampling loop
  does;
- **shared work once**: calls repeated with the same arguments (every resnet's SiLU of the time embedding) are
  made once, and the products of one input with several weight matrices (a self-attention's query, key and value;
  the resnets' time-embedding projections) become one product with the matrices side by side: 5 % faster at
  batch 2, compiled or not, no change at batch 8 (side by side);
- **small convolutions as matrix products**: a 3×3 convolution on a grid of a few cells is a fixed linear map, and
  one ``addmm`` with its dense matrix is several times faster there than oneDNN's convolution; a 1×1 convolution is
  a batched matmul (compiled: one product over all tokens); the others keep oneDNN with prepacked weights
  (``ldm.accel.packed.PackedConv2d``).

Only the convolutions and the merged products change the arithmetic (their summation order: about 1e-6 relative in
fp32); everything else is the traced calls themselves. The graph is specialised to the shapes, strides, dtypes and
device it was traced with; another shape is traced anew (about 2 s on 2 cores), a change of the UNet's weights in
place drops every trace, and calls the graph cannot take (gradients or inference mode on, extra arguments, a UNet
in train mode) run the UNet itself.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import operator
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import make_fx

from ldm.accel.packed import can_pack, pack_convolution
from ldm.pipeline.denoiser import UNetWrapper

aten = torch.ops.aten

# A convolution whose dense matrix (inputs × outputs of one image) has at most this many entries runs as one addmm.
# Measured at batch 2 and 8, 2 threads (fp32): a 3×3 convolution 256 → 128 channels on a 2×2 grid (1024×512, 2 MiB)
# took 51 µs as an addmm against 134-154 µs in oneDNN with packed weights, 128 → 128 (1 MiB) 21 against 84-98 µs;
# a 4 MiB matrix (stride 2, 4×4 → 2×2) was slower than oneDNN, 16 MiB ones 5-10× slower.
DENSE_CONV_MAX_ENTRIES = 1024 * 512
# How far a rewritten graph may stray from the UNet it was traced from, relative to the output's size: in fp32 the
# rewritten convolutions differ in summation order only (about 1e-6).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
MAX_TRACES = 8  # shapes kept per GraphUNet (batch sizes, resolutions); the least recently used goes first
# Compiling a traced graph (``compile=True``): inductor (torch.compile's compiler) with the weights frozen in as
# constants, and its C++ wrapper, which calls the kernels without a Python line per call.
# Its pattern matcher is off: it would fuse the attention that compiled graphs spell out (decompose_attention) back
# into torch's CPU attention kernel; no other of its patterns was missed (timed side by side).
COMPILE_OPTIONS = {"freezing": True, "cpp_wrapper": True, "pattern_matcher": False}


@dataclass(frozen=True)
class GraphStats:
    """What the rewrites did to one traced graph (for tests and the benchmark's notes)."""

    nodes_traced: int
    nodes_left: int
    folded: int
    identities: int
    common: int
    prompt_cached: int
    linears_merged: int
    dense_convs: int
    pointwise_convs: int
    packed_convs: int
    attention_decomposed: int


def _is_mutating(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def _constant(gm: fx.GraphModule, node: fx.Node):
    return functools.reduce(getattr, node.target.split("."), gm)


def _add_constant(gm: fx.GraphModule, before: fx.Node, prefix: str, value) -> fx.Node:
    name = f"{prefix}_{before.name}"  # one constant of each kind per node
    if isinstance(value, torch.Tensor) and value.layout == torch.strided:
        gm.register_buffer(name, value)
    else:  # oneDNN's packed weights are opaque tensors that cannot be buffers
        setattr(gm, name, value)
    with gm.graph.inserting_before(before), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node with no underlying reference")
        return gm.graph.get_attr(name)


def fold_constants(gm: fx.GraphModule) -> int:
    """Replace every computation of constants alone by its result; returns how many results were stored."""
    if any(_is_mutating(n) for n in gm.graph.nodes):
        return 0  # an in-place op could write into a folded tensor
    values: dict[fx.Node, object] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            values[node] = _constant(gm, node)
        elif node.op == "call_function" and all(a in values for a in node.all_input_nodes):
            if torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ()):
                continue  # random ops stay random
            if not node.all_input_nodes and node.target is not aten.arange.start:
                continue  # creation ops other than arange stay in the graph
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: values[a])
            values[node] = node.target(*args, **kwargs)
    folded = 0
    for node in list(gm.graph.nodes):
        computed = node.op == "call_function" and isinstance(values.get(node), torch.Tensor)
        if computed and any(user not in values for user in node.users):  # a boundary of the constant part
            stored = _add_constant(gm, node, "_folded", values[node])
            stored.meta = dict(node.meta)
            node.replace_all_uses_with(stored)
            folded += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return folded


def drop_identities(gm: fx.GraphModule) -> int:
    """Remove multiplications and divisions by 1 (diffusers' default output scale factors); returns how many."""
    if any(_is_mutating(n) for n in gm.graph.nodes):
        return 0  # an in-place op on the result would then write into the operand
    dropped = 0
    for node in list(gm.graph.nodes):
        if node.target in (aten.mul.Tensor, aten.div.Tensor) and len(node.args) == 2 and not node.kwargs:
            x, one = node.args
            if isinstance(x, fx.Node) and isinstance(one, (int, float)) and one == 1 and "val" in x.meta:
                before, after = x.meta["val"], node.meta.get("val")
                same = after is not None and (before.dtype, before.shape) == (after.dtype, after.shape)
                if same and before.stride() == after.stride():
                    node.replace_all_uses_with(x)
                    gm.graph.erase_node(node)
                    dropped += 1
    gm.recompile()
    return dropped


def eliminate_common(gm: fx.GraphModule) -> int:
    """Compute each distinct call once: a call with the same op and the same arguments as an earlier one is replaced
    by it (diffusers' resnets each apply SiLU to the same time embedding; each linear layer views its input anew).
    Returns how many calls went."""
    if any(_is_mutating(n) for n in gm.graph.nodes):
        return 0  # a write could make two equal-looking calls differ
    seen: dict[tuple, fx.Node] = {}
    removed = 0
    for node in list(gm.graph.nodes):
        seeded = torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ())
        if node.op != "call_function" or node.is_impure() or seeded:
            continue
        try:
            key = (node.target, _hashable(node.args), _hashable(node.kwargs))
            hash(key)
        except TypeError:
            continue
        if (first := seen.setdefault(key, node)) is not node:
            node.replace_all_uses_with(first)
            gm.graph.erase_node(node)
            removed += 1
    gm.recompile()
    return removed


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return type(value).__name__, tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return "dict", tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, torch.Tensor):
        raise TypeError("tensor arguments are compared by identity only")
    if isinstance(value, (bool, int, float)):  # 1, 1.0 and True are equal in Python, not to aten (nor 0.0 and -0.0)
        return type(value).__name__, repr(value)
    return value


def merge_linears(gm: fx.GraphModule) -> int:
    """Products of one input with several constant matrices → one product with the matrices side by side, sliced.

    The query, key and value projections of a self-attention read the same normalised tokens, and every resnet's
    time-embedding projection reads the same activated embedding: each group becomes one ``addmm`` (or ``mm``)
    whose column blocks the former results view. Wider matrices use the cores better than several narrow ones,
    and the call count falls. Returns how many products went. Run :func:`eliminate_common` first: it makes the
    shared inputs one node; and run it after the passes that read the traced strides (``node.meta["val"]``): the
    views it leaves have none, and the nodes after them keep the traced ones, which their inputs no longer have.
    """
    graph = gm.graph
    if any(_is_mutating(n) for n in graph.nodes):
        return 0  # a write between two of the products would reach only the later ones
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        if (operands := _operands(node)) is None:
            continue
        x, weight, bias = operands
        if weight.op != "get_attr" or (bias is not None and bias.op != "get_attr"):
            continue
        w = _constant(gm, weight)
        b = None if bias is None else _constant(gm, bias)
        if w.dim() != 2 or (b is not None and (b.dim() != 1 or b.shape[0] != w.shape[1])):
            continue  # a bias other than one value per column (the dense convolutions') stays as it is
        groups.setdefault(x, []).append(node)
    merged = 0
    for nodes in groups.values():
        if len(nodes) < 2:
            continue
        weights = [_constant(gm, _operands(n)[1]) for n in nodes]
        if len({(w.dtype, w.device, w.shape[0]) for w in weights}) != 1:
            continue
        if not all(_takes_columns(user, w.shape[1]) for n, w in zip(nodes, weights, strict=True) for user in n.users):
            continue
        first = nodes[0]
        x = _operands(first)[0]  # read now: an earlier merge may have replaced the product it was by a slice
        matrix = _add_constant(gm, first, "_merged", torch.cat(weights, dim=1).contiguous())
        shift = None
        biases = [_operands(n)[2] for n in nodes]
        if any(b is not None for b in biases):  # a product without bias gets zeros in its columns
            shift = torch.cat([
                w.new_zeros(w.shape[1]) if b is None else _constant(gm, b) for b, w in zip(biases, weights, strict=True)
            ])  # fmt: skip
            shift = _add_constant(gm, first, "_merged_bias", shift)
        with graph.inserting_before(first):
            y = _product(graph, x, matrix, shift)
            start = 0
            for node, w in zip(nodes, weights, strict=True):
                part = graph.call_function(aten.slice.Tensor, (y, 1, start, start + w.shape[1]))
                node.replace_all_uses_with(part)
                start += w.shape[1]
        for node in nodes:  # after the insertions, which are placed relative to the first of them
            graph.erase_node(node)
        merged += len(nodes) - 1
    graph.eliminate_dead_code()
    gm.recompile()
    return merged


def _operands(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None] | None:
    """(rows, matrix, shift or None) of an ``mm`` or a plain ``addmm`` call (no beta or alpha); None otherwise."""
    if node.target is aten.mm.default and not node.kwargs:
        return *node.args, None
    if node.target is aten.addmm.default and not node.kwargs and len(node.args) == 3:
        shift, rows, matrix = node.args
        return rows, matrix, shift
    return None


def _product(graph: fx.Graph, rows: fx.Node, matrix: fx.Node, shift: fx.Node | None = None) -> fx.Node:
    """rows @ matrix (+ shift): one ``mm``, or one ``addmm`` with the shift."""
    if shift is None:
        return graph.call_function(aten.mm.default, (rows, matrix))
    return graph.call_function(aten.addmm.default, (shift, rows, matrix))


def _takes_columns(user: fx.Node, width: int) -> bool:
    """Whether ``user`` works on a column block of a wider product (a (M, width) view with row stride > width) as
    on the product itself: not a graph output (callers may want it contiguous), and a view only where it splits the
    rows and the columns without joining them."""
    if user.op == "output":
        return False
    if user.target in (aten.view.default, aten._unsafe_view.default):
        shape, tail = list(user.args[1]), 1
        while shape and tail < width:
            tail *= shape.pop()
        return tail == width
    return True


def decompose_attention(gm: fx.GraphModule) -> int:
    """Spell out torch's CPU attention kernel as softmax(q·kᵀ·scale)·v, for a graph that inductor compiles; returns
    how many calls were replaced.

    On emoji-tiny's 4-77 token sequences the kernel's blocking costs more than the arithmetic (about 160 µs a call
    for under 3 MFLOP); spelled out, inductor fuses the scale and softmax into one loop between two MKL batched
    matmuls, and the compiled UNet ran 6-7 % faster at batch 2 and 8 (side by side). Calls with dropout, a mask or
    causal masking, and any whose log-sum-exp output is used, stay as they are. The result keeps the kernel's
    output strides.
    """
    graph, replaced = gm.graph, 0
    for node in list(graph.nodes):
        if node.target is not aten._scaled_dot_product_flash_attention_for_cpu.default or "val" not in node.meta:
            continue
        q, k, v, *flags = node.args
        dropout, causal = (list(flags) + [0.0, False])[:2]
        if dropout or causal or node.kwargs.get("attn_mask") is not None:
            continue
        if not all(u.target is operator.getitem and (u.args[1] == 0 or not u.users) for u in node.users):
            continue  # the log-sum-exp is used
        depth = q.meta["val"].shape[-1]
        scale = node.kwargs.get("scale") or depth**-0.5
        strides = node.meta["val"][0].stride()
        order = sorted(range(len(strides)), key=lambda d: -strides[d])  # the output's dims, outermost first
        with graph.inserting_before(node):
            scores = graph.call_function(aten.matmul.default, (q, graph.call_function(aten.transpose.int, (k, -2, -1))))
            scores = graph.call_function(aten.mul.Tensor, (scores, scale))
            weights = graph.call_function(aten._softmax.default, (scores, -1, False))
            out = graph.call_function(aten.matmul.default, (weights, v))
            out = graph.call_function(aten.permute.default, (out, order))
            out = graph.call_function(aten.clone.default, (out,), {"memory_format": torch.contiguous_format})
            out = graph.call_function(aten.permute.default, (out, [order.index(d) for d in range(len(order))]))
        for user in list(node.users):
            if user.args[1] == 0:
                user.replace_all_uses_with(out)
            graph.erase_node(user)
        graph.erase_node(node)
        replaced += 1
    gm.recompile()
    return replaced


def split_prompt(gm: fx.GraphModule, placeholder: fx.Node) -> tuple[fx.GraphModule | None, int]:
    """Move what depends on ``placeholder`` (and constants) alone into a graph of its own.

    Returns that graph (its input: the placeholder's value; its outputs: the values the rest of ``gm`` reads, which
    become new placeholders of ``gm`` at the end of its inputs) and how many nodes moved; (None, 0) when nothing can.
    """
    own = {placeholder}
    for node in gm.graph.nodes:
        if node.op == "call_function" and not _is_mutating(node) and node.all_input_nodes:
            inputs = node.all_input_nodes
            if any(a in own for a in inputs) and all(a in own or a.op == "get_attr" for a in inputs):
                own.add(node)
    moved = [n for n in gm.graph.nodes if n in own and n is not placeholder]
    if not moved or any(_is_mutating(u) for n in own for u in n.users):
        return None, 0
    boundary = [n for n in gm.graph.nodes if n in own and n is not placeholder and any(u not in own for u in n.users)]
    prompt = fx.Graph()
    env = {placeholder: prompt.placeholder(placeholder.name)}
    for node in gm.graph.nodes:
        if node in own and node is not placeholder:
            for arg in node.all_input_nodes:
                if arg.op == "get_attr" and arg not in env:
                    env[arg] = prompt.get_attr(arg.target)
            env[node] = prompt.node_copy(node, lambda a: env[a])
    prompt.output(tuple(env[n] for n in boundary))
    prompt_gm = fx.GraphModule(gm, prompt)

    last_input = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    for k, node in enumerate(boundary):
        with gm.graph.inserting_after(last_input):
            new = gm.graph.placeholder(f"prompt_{k}")
        new.meta = dict(node.meta)
        last_input = new
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user not in own)
    for node in reversed(moved):
        if not node.users:
            gm.graph.erase_node(node)
    if not placeholder.users:
        gm.graph.erase_node(placeholder)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return prompt_gm, len(moved)


def _dense_matrix(weight: torch.Tensor, stride, padding, in_shape) -> torch.Tensor:
    """The convolution as a matrix: (C·H·W, Co·Ho·Wo) for inputs of shape (C, H, W)."""
    c, h, w = in_shape
    basis = torch.eye(c * h * w, dtype=weight.dtype, device=weight.device).view(c * h * w, c, h, w)
    return torch.nn.functional.conv2d(basis, weight, None, stride, padding).flatten(1).contiguous()


def rewrite_convolutions(
    gm: fx.GraphModule, *, dense_max_entries: int = DENSE_CONV_MAX_ENTRIES, tokens: bool = False
) -> tuple[int, int, int]:
    """Small convolutions → addmm with a dense matrix (at most ``dense_max_entries``; 0: none), 1×1 → batched
    matmul (``tokens``: one product over every image's every cell, the channels last, for a graph that inductor
    compiles: it fuses the transposes into the neighbouring kernels, where the batched matmul of the few cells of a
    low-resolution level is slow), the rest → prepacked oneDNN.

    Returns the counts (dense, pointwise, packed). Each replacement produces the traced output's shape and strides.
    """
    counts = [0, 0, 0]
    graph = gm.graph
    for node in list(graph.nodes):
        if node.target is not aten.convolution.default:
            continue
        x, weight, bias, stride, padding, dilation, transposed, _, groups = node.args
        if weight.op != "get_attr" or (bias is not None and bias.op != "get_attr"):
            continue
        if transposed or groups != 1 or list(dilation) != [1, 1] or "val" not in x.meta:
            continue
        w, b = _constant(gm, weight), None if bias is None else _constant(gm, bias)
        if w.device.type != "cpu":  # CUDA convolutions may run in TF32 where matmuls do not: keep them as traced
            continue
        pack = can_pack(w.device, w.dtype)  # bf16: where oneDNN has bf16 kernels
        batch, *in_shape = x.meta["val"].shape
        out = node.meta["val"]
        _, *out_shape = out.shape
        if not out.is_contiguous() or not x.meta["val"].is_contiguous():
            continue
        n_in, n_out = in_shape[0] * in_shape[1] * in_shape[2], out_shape[0] * out_shape[1] * out_shape[2]
        pointwise = w.shape[2:] == (1, 1) and list(stride) == [1, 1] and list(padding) == [0, 0]
        with graph.inserting_before(node):
            if pointwise and tokens:  # (B·H·W, C) @ (C, Co) → (B, H, W, Co) → (B, Co, H, W)
                rows = graph.call_function(aten.permute.default, (x, [0, 2, 3, 1]))
                rows = graph.call_function(aten.clone.default, (rows,), {"memory_format": torch.contiguous_format})
                rows = graph.call_function(aten.view.default, (rows, [-1, in_shape[0]]))
                matrix = _add_constant(gm, node, "_pointwise", w.flatten(1).t().contiguous())
                shift = None if b is None else _add_constant(gm, node, "_bias", b)
                y = _product(graph, rows, matrix, shift)
                y = graph.call_function(aten.view.default, (y, [batch, *out_shape[1:], out_shape[0]]))
                y = graph.call_function(aten.permute.default, (y, [0, 3, 1, 2]))
                y = graph.call_function(aten.clone.default, (y,), {"memory_format": torch.contiguous_format})
                counts[1] += 1
            elif pointwise:  # (Co, C) @ (B, C, H·W) → (B, Co, H·W)
                flat = graph.call_function(aten.view.default, (x, [batch, in_shape[0], -1]))
                matrix = _add_constant(gm, node, "_pointwise", w.flatten(1).expand(batch, -1, -1))
                if b is None:
                    y = graph.call_function(aten.bmm.default, (matrix, flat))
                else:
                    shift = _add_constant(
                        gm, node, "_bias", b.view(1, -1, 1).expand(batch, -1, in_shape[1] * in_shape[2])
                    )
                    y = graph.call_function(aten.baddbmm.default, (shift, matrix, flat))
                y = graph.call_function(aten.view.default, (y, [batch, *out_shape]))
                counts[1] += 1
            elif n_in * n_out <= dense_max_entries:  # (B, C·H·W) @ (C·H·W, Co·Ho·Wo)
                flat = graph.call_function(aten.view.default, (x, [batch, n_in]))
                matrix = _add_constant(gm, node, "_dense", _dense_matrix(w, stride, padding, in_shape))
                shift = None
                if b is not None:  # one value per output cell
                    shift = b.view(-1, 1).expand(-1, n_out // b.numel()).reshape(1, n_out)
                    shift = _add_constant(gm, node, "_bias", shift)
                y = _product(graph, flat, matrix, shift)
                y = graph.call_function(aten.view.default, (y, [batch, *out_shape]))
                counts[0] += 1
            elif pack:  # oneDNN may answer in channels_last: then a copy gives back the traced layout
                args, packed = pack_convolution(w, padding=padding, stride=stride, dilation=dilation, groups=groups,
                                                input_size=x.meta["val"].shape)
                conv, tail = torch.ops.mkldnn._convolution_pointwise, ("none", [], "")
                contiguous = conv(
                    torch.zeros(x.meta["val"].shape, dtype=w.dtype), packed, b, *args, *tail
                ).is_contiguous()
                y = graph.call_function(conv, (x, _add_constant(gm, node, "_packed", packed), bias, *args, *tail))
                if not contiguous:
                    y = graph.call_function(aten.clone.default, (y,), {"memory_format": torch.contiguous_format})
                counts[2] += 1
            else:
                continue
        y.meta = dict(node.meta)
        node.replace_all_uses_with(y)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    gm.recompile()
    return tuple(counts)


@contextlib.contextmanager
def quiet_logger(name: str):
    """Only errors from logger ``name`` (and its children, e.g. "diffusers") inside the block."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class TracedUNet:
    """One traced and rewritten UNet call for fixed shapes: ``prompt`` (text embeddings → cached values) + ``main``.

    ``call(sample, timestep, context, *extra)`` is what is traced: by default the UNet's own call; another function of
    the UNet (a part of its forward, several outputs) works alike, with the ``extra`` tensors as further inputs.
    ``compile=True`` hands the rewritten main graph to inductor (``COMPILE_OPTIONS``), which fuses its
    elementwise ops and normalisations into C++ kernels; it compiles when the trace is made (tens of seconds on 2
    cores, less when its on-disk cache has the graph).
    """

    def __init__(
        self, unet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
        *extra: torch.Tensor, call=None, compile: bool = False,
    ):  # fmt: skip
        if call is None:

            def call(sample, timestep, context):
                return unet(sample, timestep, encoder_hidden_states=context, return_dict=False)[0]

        with torch.no_grad():
            gm = make_fx(call)(sample, timestep, context, *extra)
            traced = len(gm.graph.nodes)
            folded = fold_constants(gm)
            dropped = drop_identities(gm)
            common = eliminate_common(gm)
            context_node = [n for n in gm.graph.nodes if n.op == "placeholder"][2]
            self.prompt, moved = split_prompt(gm, context_node)
            # Compiled, the dense matrices did not pay (emoji-tiny's UNet at batch 2 ran 9 % faster without them),
            # and the 1×1 convolutions ran faster as one product over all tokens (1.05× at batch 2, 1.10× at 8)
            dense, pointwise, packed = rewrite_convolutions(
                gm, dense_max_entries=0 if compile else DENSE_CONV_MAX_ENTRIES, tokens=compile
            )
            attention = decompose_attention(gm) if compile else 0
            merged = merge_linears(gm)  # last: its column views leave the traced strides behind
        self.graph = self.main = gm
        self.takes_context = context_node in gm.graph.nodes
        self.compiled = False
        self.stats = GraphStats(
            nodes_traced=traced, nodes_left=len(gm.graph.nodes), folded=folded, identities=dropped, common=common,
            prompt_cached=moved, linears_merged=merged, dense_convs=dense, pointwise_convs=pointwise,
            packed_convs=packed, attention_decomposed=attention,
        )  # fmt: skip
        # (weak reference to the context tensor, its version, the prompt graph's outputs for it): replaced as a whole.
        # A write that bypasses the version counter (``context.data``, through NumPy) is not seen: pass a new tensor.
        self._prompt_cache: tuple = (lambda: None, -1, ())
        if compile:
            self._compile(sample, timestep, context, *extra)

    def _compile(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, *extra: torch.Tensor):
        """Compile the main graph now with inductor, for these inputs; where it cannot (no C++ compiler, an op it does
        not take), warn and keep the graph uncompiled.

        The graph goes to inductor directly rather than through ``torch.compile``: it is already one aten graph for
        fixed shapes, and dynamo's guards over its inputs and constants cost about 1 ms of a 10-20 ms call (the
        compiled graph ran 8-10 % faster without them, side by side). What the guards would check is the key the
        trace is kept under (:func:`input_key`) for the call's sample, timestep and context; the ``extra`` inputs
        are checked at each call, and others than these run the uncompiled graph. That graph, also what a failed
        compile leaves, has the rewrites made for inductor (attention spelled out, 1×1 convolutions over all tokens,
        no dense-matrix convolutions): the same values, a little slower than an uncompiled trace.
        """
        inputs = self._inputs(sample, timestep, context, *extra)
        for node in self.graph.graph.nodes:  # make_fx's per-tensor fake values would clash with inductor's fake mode
            node.meta.pop("val", None)
            node.meta.pop("tensor_meta", None)
        try:
            import torch._inductor

            with torch.no_grad(), quiet_logger("torch.utils.cpp_extension"):  # its notice that CUDA is absent
                main = torch._inductor.compile(self.graph, list(inputs), options=COMPILE_OPTIONS)
                main(*inputs)
        except Exception as error:  # noqa: BLE001 - any compiler failure leaves a working graph
            first = (str(error).strip().splitlines() or [""])[0]
            warnings.warn(f"inductor could not compile the traced UNet graph ({type(error).__name__}: {first}); "
                          "running it uncompiled")  # fmt: skip
        else:
            self.main, self.compiled = main, True
            self._extra_key = input_key(*extra)

    def _inputs(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, *extra: torch.Tensor):
        """The main graph's inputs: the call's, and the prompt graph's outputs for ``context`` (cached)."""
        cached = ()
        if self.prompt is not None:
            source, version, cached = self._prompt_cache
            if source() is not context or version != context._version:
                cached = tuple(self.prompt(context))
                self._prompt_cache = (weakref.ref(context), context._version, cached)
        return (sample, timestep) + ((context,) if self.takes_context else ()) + extra + cached

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, *extra: torch.Tensor):
        main = self.main
        if extra and self.compiled and input_key(*extra) != self._extra_key:
            main = self.graph  # compiled code assumes the strides it was compiled for; the graph takes any
        return main(*self._inputs(sample, timestep, context, *extra))


def can_run_traced(unet: nn.Module, context: torch.Tensor) -> bool:
    """Whether a call may run a traced graph: no gradients, no inference mode (inference tensors carry no version
    counter, which the prompt cache needs), the UNet in eval mode."""
    return not (unet.training or torch.is_grad_enabled() or torch.is_inference_mode_enabled() or context.is_inference())


def input_key(*inputs: torch.Tensor) -> tuple:
    """What a trace is specialised to: every input's shape, strides, dtype and device."""
    return tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in inputs)


def as_tensor(timestep) -> torch.Tensor:
    """A timestep as the tensor diffusers' UNet would make of it (int64 for integers, float64 for floats)."""
    if isinstance(timestep, torch.Tensor):
        return timestep
    return torch.tensor(timestep, dtype=torch.float64 if isinstance(timestep, float) else torch.int64)


class TraceCache(OrderedDict):
    """What was computed from one module's weights, by key: traced graphs by input key (:func:`input_key`; None where
    tracing failed), or a text encoder's outputs (``ldm.accel.fast.PromptCache``). The least recently used entry goes past
    ``size``, and all go when the module's weights change in place, since the entries hold values of the old ones
    (folded constants, dense matrices, encodings). The weights are the parameters the module had when the cache was
    made: a parameter replaced by another tensor object is not seen (wrap the module anew then)."""

    def __init__(self, module: nn.Module, *, size: int = MAX_TRACES):
        super().__init__()
        self.size = size
        # The parameters are listed once: walking the module tree at every call cost 0.6 ms of a 14 ms UNet call.
        self._weight_tensors = tuple(module.parameters())
        self._weights = self._version()

    def _version(self) -> int:
        """Grows with every in-place change of a weight (load_state_dict, an optimizer step): traces of older
        weights hold stale folded constants."""
        return sum(p._version for p in self._weight_tensors)

    def lookup(self, key: tuple, make):
        """The entry for ``key``, made by ``make()`` when there is none."""
        weights = self._version()
        if weights != self._weights:
            self.clear()
            self._weights = weights
        if key not in self:
            self[key] = make()
            if len(self) > self.size:
                self.popitem(last=False)
        self.move_to_end(key)
        return self[key]


class GraphUNet(UNetWrapper):
    """A UNet for sampling that runs traced graphs (see the module docstring); same call as the UNet it wraps."""

    def __init__(self, unet: nn.Module, *, compile: bool = False):
        super().__init__(unet)
        self.compile = compile  # compile each traced graph with inductor (TracedUNet)
        self.traces = TraceCache(unet)  # input key → TracedUNet | None

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, *args, **kwargs):
        return_dict = kwargs.pop("return_dict", True)
        eager = args or any(v is not None for v in kwargs.values())
        if eager or not can_run_traced(self.unet, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)
        timestep = as_tensor(timestep)
        key = input_key(sample, timestep, encoder_hidden_states)
        traced = self.traces.lookup(key, lambda: self._trace(sample, timestep, encoder_hidden_states))
        if traced is None:  # the graph did not match the UNet for these inputs
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=return_dict)
        out = traced(sample, timestep, encoder_hidden_states)  # (B, C, h, w)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    def _trace(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> TracedUNet | None:
        """Trace and rewrite for these inputs' shapes, then check the graph against the UNet on them."""
        try:
            traced = TracedUNet(self.unet, sample, timestep, context, compile=self.compile)
            result = traced(sample, timestep, context)
        except Exception as error:  # noqa: BLE001 - an op or hook the tracer cannot take; the UNet itself can
            warnings.warn(f"could not trace the UNet ({type(error).__name__}: {error}); running the UNet itself")
            return None
        reference = self.unet(sample, timestep, encoder_hidden_states=context).sample
        if problem := mismatch(result, reference):
            warnings.warn(f"the traced UNet graph is {problem}; running the UNet itself")
            return None
        return traced


def mismatch(result: torch.Tensor, reference: torch.Tensor) -> str | None:
    """How a traced graph's output strays from the module's beyond ``TOLERANCE`` (None: within it)."""
    error = (result - reference).abs().max().item()
    bound = TOLERANCE.get(reference.dtype, 1e-2) * max(1.0, reference.abs().max().item())
    return None if error <= bound else f"off by {error:.3g} (more than {bound:.3g})"  # NaN is off too
