"""Deep-feature reuse across sampling steps (DeepCache, Ma et al. 2024): an approximation, only when asked for.

Between neighbouring sampling steps a UNet's deep, low-resolution features change little; its shallowest level, which
sees the sample at full latent resolution, changes most. :class:`DeepCacheUNet` runs the whole UNet on every
``interval``-th call of a sampling run and keeps the input of its last up block: all that the deeper levels
computed. The calls in between run the shallowest level only (``conv_in``, the first down block, the last up block and
the output layers) on that kept input. With ``interval`` 2 every other step costs the shallow part only.

The result differs from the exact sampler's: ``generate.py --deep-cache N`` records N in the PNG's parameters, and
BENCHMARKS.md gives the measured speed and the change in the images (PSNR against the exact ones) per model.

Each sampling run starts with a full call, so kept features never cross from one batch to the next:
``ldm.pipeline.generate`` says when a run starts (``DeepCacheUNet`` is a ``ldm.pipeline.denoiser.SamplingState``), and a call whose timestep is above the previous
call's, or whose shapes or dtype differ, starts one too (for callers that do not say). The shallow pass runs the first
down block whole, its downsampler included, whose output only the deeper levels read: one strided convolution more
than the least it could run, in exchange for calling diffusers' blocks as they are.
"""

from __future__ import annotations

import warnings

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

from ldm.accel.checks import check_interval
from ldm.accel.graph import TraceCache, TracedUNet, as_tensor, can_run_traced, input_key, mismatch
from ldm.errors import LdmError
from ldm.pipeline.denoiser import UNetWrapper


class DeepCacheUNet(UNetWrapper):
    """A UNet2DConditionModel whose calls between full ones reuse the deep features of the last full call.

    ``graph=True`` runs both kinds of call as traced graphs (``ldm.accel.graph``, the fast path's cure for a small UNet's
    per-op overhead): one pair per input shape, each checked against the modules when traced; a call the graphs
    cannot take (gradients on, a UNet in train mode) runs the modules. ``compile=True`` (with ``graph``) hands both
    graphs to inductor (``ldm.accel.graph.TracedUNet``).
    """

    def __init__(self, unet: nn.Module, *, interval: int, graph: bool = False, compile: bool = False):
        super().__init__(unet)
        check_interval(interval, off=False)
        check_supported(unet)
        if compile and not graph:
            raise ValueError("compile=True compiles the traced graphs: it needs graph=True")
        self.interval, self.graph, self.compile = interval, graph, compile
        self.full_calls = self.shallow_calls = 0  # what ran, for tests and benchmarks
        self.traces = TraceCache(unet)  # input key → (full, shallow) traced graphs | None
        self._deep: torch.Tensor | None = None  # (B, C, h, w) input of the last up block at the last full call
        self._kept = None  # the hook's catch during a full call
        self._since_full = 0
        self._last: tuple | None = None  # (timestep, shapes) of the previous call

    def start_sampling_run(self) -> None:
        """The next call begins a new sampling run: it runs in full."""
        self._last = None

    def _keep(self, module, args, kwargs) -> None:
        self._kept = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, return_dict: bool = True):
        t = float(torch.as_tensor(timestep).max())
        shapes = (sample.shape, encoder_hidden_states.shape, sample.dtype)
        new_run = self._last is None or t > self._last[0] or shapes != self._last[1]
        self._last = (t, shapes)
        traced = self._traced(sample, timestep, encoder_hidden_states) if self.graph else None
        if new_run or self._deep is None or self._since_full + 1 >= self.interval:
            if traced is not None:
                out, self._deep = traced[0](sample, as_tensor(timestep), encoder_hidden_states)
            else:
                out, self._deep = self._full(sample, timestep, encoder_hidden_states)
            self._since_full = 0
            self.full_calls += 1
        else:
            if traced is not None:
                out = traced[1](sample, as_tensor(timestep), encoder_hidden_states, self._deep)
            else:
                out = self._shallow(sample, timestep, encoder_hidden_states, self._deep)
            self._since_full += 1
            self.shallow_calls += 1
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    def _full(self, sample: torch.Tensor, timestep, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The UNet's own call, and the input of its last up block."""
        # The hook lives for this call only: wrapping a UNet again, or dropping the wrapper, leaves it as it was.
        self._kept = None
        hook = self.unet.up_blocks[-1].register_forward_pre_hook(self._keep, with_kwargs=True)
        try:
            out = self.unet(sample, timestep, encoder_hidden_states=context, return_dict=False)[0]
        finally:
            hook.remove()
        deep, self._kept = self._kept, None
        return out, deep

    def _traced(self, sample: torch.Tensor, timestep, context: torch.Tensor) -> tuple | None:
        """The (full, shallow) traced graphs for these inputs' shapes, traced and checked on first use; None when
        this call must run the modules."""
        if not can_run_traced(self.unet, context):
            return None
        timestep = as_tensor(timestep)
        return self.traces.lookup(input_key(sample, timestep, context), lambda: self._trace(sample, timestep, context))

    def _trace(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> tuple | None:
        out, deep = self._full(sample, timestep, context)
        try:
            # plain functions: the tracer counts a bound method's self among the inputs
            full = TracedUNet(self.unet, sample, timestep, context, call=lambda s, t, c: self._full(s, t, c),
                              compile=self.compile)  # fmt: skip
            shallow = TracedUNet(self.unet, sample, timestep, context, deep,
                                 call=lambda s, t, c, d: self._shallow(s, t, c, d), compile=self.compile)  # fmt: skip
            traced_out, traced_deep = full(sample, timestep, context)
            traced_shallow = shallow(sample, timestep, context, deep)
        except Exception as error:  # noqa: BLE001 - an op or hook the tracer cannot take; the modules can
            warnings.warn(f"could not trace the UNet ({type(error).__name__}: {error}); running its modules")
            return None
        reference = self._shallow(sample, timestep, context, deep)
        checks = [(traced_out, out), (traced_deep, deep), (traced_shallow, reference)]
        if problems := [p for p in (mismatch(a, b) for a, b in checks) if p]:
            warnings.warn(f"the traced deep-cache graphs are {problems[0]}; running the UNet's modules")
            return None
        return full, shallow

    def _shallow(self, sample: torch.Tensor, timestep, context: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        """The shallowest level on the kept deep features: the same calls as the UNet's forward at that level."""
        unet = self.unet
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)  # (B, E)
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        hidden = unet.conv_in(sample)  # (B, C0, h, w)
        first, last = unet.down_blocks[0], unet.up_blocks[-1]
        if getattr(first, "has_cross_attention", False):
            _, skips = first(hidden_states=hidden, temb=emb, encoder_hidden_states=context)
        else:
            _, skips = first(hidden_states=hidden, temb=emb)
        # The last up block takes the first len(last.resnets) skip connections: conv_in's output and the first down
        # block's resnet outputs (its downsampler's output feeds the deeper levels only).
        skips = ((hidden,) + tuple(skips))[: len(last.resnets)]
        if getattr(last, "has_cross_attention", False):
            hidden = last(hidden_states=deep, temb=emb, res_hidden_states_tuple=skips,
                          encoder_hidden_states=context)  # fmt: skip
        else:
            hidden = last(hidden_states=deep, temb=emb, res_hidden_states_tuple=skips)
        if unet.conv_norm_out is not None:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden)  # (B, C, h, w)


def check_supported(unet: nn.Module) -> None:
    """The plain text-to-image UNets this project builds; refuses what the shallow pass would silently skip."""
    cfg = getattr(unet, "config", None)
    if cfg is None or not hasattr(unet, "up_blocks") or len(unet.up_blocks) < 2:
        raise LdmError(
            "deep-cache needs a UNet of two or more levels (a diffusers UNet2DConditionModel); drop --deep-cache"
        )
    extras = {
        "class_embed_type": cfg.class_embed_type, "addition_embed_type": cfg.addition_embed_type,
        "encoder_hid_dim_type": cfg.encoder_hid_dim_type, "time_cond_proj_dim": cfg.time_cond_proj_dim,
    }  # fmt: skip
    used = [name for name, value in extras.items() if value is not None]
    if used or cfg.center_input_sample:
        raise LdmError(
            f"deep-cache supports plain text-to-image UNets, and this one uses {used or 'center_input_sample'}; "
            "drop --deep-cache"
        )
