"""Token merging in the UNet's self-attention (after ToMe for Stable Diffusion, Bolya and Hoffman 2023): an
approximation, only when asked for.

Neighbouring latent cells often carry nearly the same features, so a self-attention over all of them repeats work.
Before each self-attention at the finest levels, :func:`merge_tokens` splits the tokens into one *destination* per
2×2 block of cells (which of the four changes with the timestep) and the other *sources*, pairs every source with
its most similar destination (cosine similarity of the attention's input), and averages the ``ratio``·N
best-matched sources into their destinations. The attention (its projections included) runs on the remaining
tokens; afterwards every merged source takes its destination's output. With ``ratio`` 0.5 the finest levels'
self-attention sees half the tokens: a quarter of its score matrix.

The result differs from the exact sampler's: ``generate.py --token-merging R`` records R in the PNG's parameters,
and BENCHMARKS.md gives the measured speed and the change in the images per model. Cross-attention, the
feed-forward layers and the convolutions are left as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from ldm.accel.checks import check_ratio
from ldm.accel.graph import TraceCache
from ldm.errors import LdmError

# The choice of destination in each 2×2 block: a hash of (block row, block column, timestep) computed with tensor ops,
# so that it also holds in traced graphs (ldm.accel.graph), where the timestep is a tensor. Odd multipliers, then a
# multiply-xorshift mix whose high bits pick one of four: the low bits alone would repeat every 4 blocks and steps.
_HASH = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F)


def partition(height: int, width: int, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sources, destinations): token positions of a height×width grid, one destination per whole 2×2 block.

    Which cell of its block is the destination depends on the block and the timestep only: the same for every image
    of a batch and in every run, different from step to step. Cells outside whole blocks (an odd side's last row or
    column) are sources.
    """
    device = timestep.device
    bh, bw = height // 2, width // 2
    block_y = torch.arange(bh, device=device).view(-1, 1)
    block_x = torch.arange(bw, device=device).view(1, -1)
    t = timestep.reshape(-1)[:1].to(torch.int64)  # the batch shares a timestep
    h = (block_y * _HASH[0]) ^ (block_x * _HASH[1]) ^ (t * _HASH[2])
    h = (((h ^ (h >> 15)) & 0xFFFFFFFF) * _HASH[3]) & 0xFFFFFFFF  # below 2^62 before the mask: no overflow
    pick = (h >> 29) & 3  # (bh, bw) in 0…3
    cells = ((2 * block_y + pick // 2) * width + 2 * block_x + pick % 2).flatten()
    is_destination = torch.zeros(height * width, dtype=torch.int64, device=device).index_put(
        (cells,), torch.ones_like(cells)
    )
    order = torch.argsort(is_destination, stable=True)  # sources first, then destinations, each ascending
    sources = height * width - bh * bw
    return order[:sources], order[sources:]


def merge_tokens(x: torch.Tensor, sources: torch.Tensor, destinations: torch.Tensor, merged: int):
    """x (B, N, C) → (B, N − merged, C) and the function that spreads an output (B, N − merged, C') back to N tokens.

    The ``merged`` sources most similar to a destination are averaged into it (bipartite soft matching); the other
    sources are kept as they are, before the destinations.
    """
    b, _, c = x.shape
    metric = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    scores = metric[:, sources] @ metric[:, destinations].transpose(1, 2)  # (B, S, D)
    best, match = scores.max(dim=-1)  # each source's most similar destination
    ranked = best.argsort(dim=-1, descending=True)
    moved, kept = ranked[:, :merged], ranked[:, merged:]  # (B, r), (B, S − r): indices into the sources
    into = match.gather(1, moved)  # (B, r): the destination each moved source joins

    def rows(index: torch.Tensor, width: int) -> torch.Tensor:
        return index.unsqueeze(-1).expand(-1, -1, width)

    src, dst = x[:, sources], x[:, destinations]
    dst = dst.scatter_reduce(1, rows(into, c), src.gather(1, rows(moved, c)), reduce="mean", include_self=True)
    out = torch.cat([src.gather(1, rows(kept, c)), dst], dim=1)

    back = torch.argsort(torch.cat([sources, destinations]))  # token position → its row in [sources; destinations]

    def unmerge(y: torch.Tensor) -> torch.Tensor:  # out of place throughout: traced graphs keep their rewrites
        width = y.shape[-1]
        kept_y, dst_y = y[:, : kept.shape[1]], y[:, kept.shape[1] :]
        src_y = y.new_zeros(b, sources.numel(), width).scatter(1, rows(kept, width), kept_y)
        src_y = src_y.scatter(1, rows(moved, width), dst_y.gather(1, rows(into, width)))
        return torch.cat([src_y, dst_y], dim=1)[:, back]

    return out, unmerge


class _Step:
    """What the UNet's current call is: its latent grid and timestep (set by a forward pre-hook)."""

    def __init__(self):
        self.grid: tuple[int, int] | None = None
        self.timestep: torch.Tensor | None = None
        self.partitions: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # this call's, by level grid
        self.handle = None  # the hook's, to remove it

    def hook(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        self.grid = tuple(sample.shape[-2:])
        self.timestep = torch.as_tensor(timestep, device=sample.device)
        self.partitions = {}

    def partition(self, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`partition` of a level's grid at this call's timestep, made once per call for all its attentions."""
        if grid not in self.partitions:
            self.partitions[grid] = partition(*grid, self.timestep)
        return self.partitions[grid]


class TokenMergingProcessor:
    """An attention processor that merges tokens around the one it wraps (a self-attention's) at fine levels."""

    def __init__(self, inner, step: _Step, *, ratio: float, max_downsample: int):
        self.inner, self.step, self.ratio, self.max_downsample = inner, step, ratio, max_downsample

    def level_grid(self, tokens: int) -> tuple[int, int] | None:
        """The grid of a level whose token count is ``tokens``, if it is one of the merged levels."""
        if self.step.grid is None:
            return None
        height, width = self.step.grid
        factor = 1
        while factor <= self.max_downsample:
            if height * width == tokens:
                return height, width
            height, width, factor = -(-height // 2), -(-width // 2), factor * 2  # a stride-2 downsampler's grid
        return None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        grid = (
            None
            if encoder_hidden_states is not None or hidden_states.dim() != 3
            else self.level_grid(hidden_states.shape[1])
        )
        if grid is None or attention_mask is not None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        sources, destinations = self.step.partition(grid)
        merged = min(int(hidden_states.shape[1] * self.ratio), sources.numel())
        if merged == 0:
            return self.inner(attn, hidden_states, None, None, temb, **kwargs)
        x, unmerge = merge_tokens(hidden_states, sources, destinations, merged)
        return unmerge(self.inner(attn, x, None, None, temb, **kwargs))


def unets(module: nn.Module) -> list[nn.Module]:
    """The diffusers UNets in ``module`` (itself, or inside the fast path's wrappers)."""
    from diffusers import UNet2DConditionModel

    return [m for m in module.modules() if isinstance(m, UNet2DConditionModel)]


def apply_token_merging(unet: nn.Module, ratio: float, *, max_downsample: int = 1) -> nn.Module:
    """Merge tokens in the self-attention of every transformer block whose level is downsampled at most
    ``max_downsample``× (1: the finest level only), in place, in each UNet within ``unet``; returns ``unet``.

    ``ratio`` 0 leaves it as it is. Apply it after ``ldm.accel.fast.speed_up`` (its copies and wrappers keep the UNets it
    finds; graphs it already traced are dropped, to be traced again with the merging); not with ``ldm.accel.deepcache``,
    whose shallow calls skip the UNet's forward.
    """
    check_ratio(ratio)
    if max_downsample < 1 or max_downsample & (max_downsample - 1):
        raise ValueError(f"max_downsample is a power of 2 (1, 2, 4, …), not {max_downsample}")
    if ratio == 0:
        return unet
    found = unets(unet)
    if not found:
        raise LdmError("token merging needs a diffusers UNet2DConditionModel; this model has none")
    if any(isinstance(getattr(m, "processor", None), TokenMergingProcessor) for m in unet.modules()):
        raise LdmError("token merging is already applied to this UNet")
    forget_traces(unet)
    for model in found:
        step = _Step()
        step.handle = model.register_forward_pre_hook(step.hook, with_kwargs=True)
        for name, module in model.named_modules():
            if name.endswith(".attn1") and not getattr(module, "is_cross_attention", True):
                processor = TokenMergingProcessor(module.processor, step, ratio=ratio, max_downsample=max_downsample)
                module.set_processor(processor)
    return unet


def forget_traces(unet: nn.Module) -> None:
    """Drop the graphs the fast path traced from ``unet`` (``ldm.accel.graph``): they hold the attention as it was."""
    for module in unet.modules():
        traces = getattr(module, "traces", None)
        if isinstance(traces, TraceCache):
            traces.clear()


def remove_token_merging(unet: nn.Module) -> nn.Module:
    """Undo :func:`apply_token_merging`, in place: the self-attentions' own processors back, the hooks gone."""
    forget_traces(unet)
    for model in unets(unet):
        for module in model.modules():
            processor = getattr(module, "processor", None)
            if isinstance(processor, TokenMergingProcessor):
                if processor.step.handle is not None:
                    processor.step.handle.remove()
                    processor.step.handle = None
                module.set_processor(processor.inner)
    return unet
