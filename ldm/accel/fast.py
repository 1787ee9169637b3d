"""The fast sampling path: the same loop (``ldm.pipeline.generate``) with the UNet prepared for speed.

What :func:`speed_up` does (measured with ``bench/``; numbers in BENCHMARKS.md):

- **bf16 UNet at low noise**, for a big UNet on hardware that computes bf16 natively (x86 AVX512-BF16 or AMX, CUDA
  GPUs): a bf16 copy of the UNet runs the steps with t < ``fp32_from``·T, the fp32 UNet the high-noise steps before
  them. Why those in fp32: a sampler step moves the latents by about (σ_next − σ)·ε̂, σ falls fastest in the first
  steps, and every later step carries what they did, so a bf16 error there costs the most. On random-weight sd-v1 at
  256×256 (20 steps DPM++ 2M, guidance 7.5) the max pixel error against fp32 was 2.7/255 with bf16 in every step,
  1.6/255 with the first 2 steps in fp32, 0.9/255 with the first 3. The default, t ≥ 850, takes DPM++ 2M's first 2
  of 20 (t = 941, 894): 1.4-1.6/255 against diffusers in BENCHMARKS.md. The latents, guidance
  and scheduler arithmetic, the text encoder and the VAE stay fp32. Small UNets stay fp32: emoji-tiny's (7M
  parameters) ran no faster in bf16, and its trained weights were far more sensitive (27/255 max with bf16).
- **Prepacked weights** (CPU, big UNets): convolutions and linears keep their weights in oneDNN's blocked layout
  instead of reordering them at every call, which for sd-v1's deep 1280-channel levels costs more than the
  arithmetic; 1×1 convolutions run as packed linears over the cells, since oneDNN's packed 1×1 convolution is
  15-40× slower than that on an AVX-512 CPU without AMX; fp32 3×3 convolutions with 256 channels or more run as
  Winograd F(2×2, 3×3) convolutions (``ldm.accel.winograd``), 2.25× fewer multiply-adds: sd-v1's fp32 UNet steps and its
  VAE decoder, whose weights are packed along with a packed UNet's. Rounding changes only (about 1e-6 in fp32;
  sd-v1's fp32 UNet and VAE with Winograd convolutions gave images 0.0007/255 from diffusers'). bf16 weights are
  packed only where oneDNN has bf16 kernels (``ldm.accel.cpu.has_bf16_kernels``) and stay unpacked elsewhere.
- **Traced graphs** (``ldm.accel.graph``), for a small UNet on CPU, where per-op overhead rather than arithmetic sets the
  pace: the UNet traced once per input shape into aten calls without the module tree, weights-only work folded,
  the cross-attention keys and values computed once per prompt, convolutions on tiny grids run as one matrix
  product. emoji-tiny's UNet: 12.7 against 25 ms per guided step at batch 1 (2 threads). Tracing takes about 2 s,
  so generate.py uses it only for jobs of ``GRAPH_MIN_CALLS`` UNet calls or more. Summation order changes in the
  rewritten convolutions only (about 1e-6 in fp32).
- **threads**: one per physical core, unless ``OMP_NUM_THREADS`` says otherwise.
- **channels_last VAE** (CPU): oneDNN's convolutions on the decoder's large grids run faster with the channels
  innermost; emoji-tiny's decode at batch 1 1.15× (1.03× at batch 4), sd-v1's at 256×256 1.10× (side by side;
  summation order only, about 1e-5).
- **Deep-feature reuse** (``deep_cache``, ``ldm.accel.deepcache``), only when asked for: an approximation that changes
  the images, with its speed and image change measured per model in BENCHMARKS.md.
- **Compiling** (inductor, weights frozen into the graph, C++ wrapper), only when asked for. With traced graphs
  each of them goes to inductor directly (no dynamo guards), with its attention spelled out and its 1×1
  convolutions as one product over all tokens, and inductor fuses the elementwise ops, normalisations and softmaxes
  between the matrix products: emoji-tiny's UNet at batch 2 ran in 9.9 ms against 15.7 traced and 20.2 as modules,
  at batch 8 in 14.6 against 23.3 and 28.1 (the three taking turns in one process, 2 threads, AMD EPYC:
  BENCHMARKS.md, run K). It costs 30-70 s per input shape on first use, about 20 s in later processes that find
  the graph in inductor's on-disk cache. Without graphs, torch.compile compiles the UNet module.

Attention already runs through ``F.scaled_dot_product_attention`` (diffusers' ``AttnProcessor2_0``);
:func:`attention_processors` reports what is in use. Text embeddings are computed once per distinct prompt on every
path (``ldm.pipeline.encode_prompts``); on the fast path once per job as well (:class:`PromptCache`): a job that
samples the same prompts batch after batch encodes them for the first batch only, and for plain prompts of one
chunk the traced graphs' cached cross-attention keys and values carry over with them (weighted or chunked prompts
are weighted and joined afresh each batch, elementwise work, and their keys and values computed once per batch).

A sped-up bundle is for sampling only: save the bundle it came from, not it.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

from ldm.accel.cpu import cpu_flags, has_native_bf16  # noqa: F401 - cpu_flags for bench/, which asks here
from ldm.accel.deepcache import DeepCacheUNet, check_interval
from ldm.accel.graph import GraphUNet, TraceCache, quiet_logger
from ldm.accel.packed import PackedConv2d, PackedLinear, PackedPointwiseConv2d, can_pack, is_pointwise
from ldm.accel.winograd import WinogradConv2d, can_winograd
from ldm.errors import LdmError
from ldm.formats.bundle import Bundle

# Below this the UNet's matmuls are too small for bf16 to pay: emoji-tiny's UNet (7M) ran slower in bf16 than in
# fp32 (per-call overhead dominates), sd-v1's (860M) about 3× faster. See BENCHMARKS.md.
BF16_MIN_PARAMETERS = 100_000_000
# Tracing a UNet into graphs (ldm.accel.graph) costs about 2 s on 2 cores and saves about 11 ms per call of emoji-tiny's
# UNet at batch 2 (6 ms at batch 8): it pays from a few hundred calls on (generate.py counts steps × batches).
GRAPH_MIN_CALLS = 200


@dataclass(frozen=True, kw_only=True)
class FastConfig:
    bf16: bool | None = None  # bf16 UNet at low noise; None = for a big UNet on hardware with native bf16
    fp32_from: float = 0.85  # steps at t ≥ fp32_from · T run in fp32 (1.0: none; 0.0: all, i.e. no bf16)
    pack: bool | None = None  # oneDNN-prepacked conv/linear weights; None = on CPUs with oneDNN, unless compile/graph
    compile: bool = False  # torch.compile the traced graphs, or the UNet(s) without graphs (inductor); slow to start
    graph: bool | None = None  # traced aten graphs (ldm.accel.graph); None = on CPU for UNets below BF16_MIN_PARAMETERS
    threads: int | None = None  # torch.set_num_threads; None = physical cores, unless OMP_NUM_THREADS is set
    # An approximation, off unless asked for: the whole UNet on every deep_cache-th step only, the steps between
    # reusing its deep features (ldm.accel.deepcache; with graph, both kinds of step traced, and compiled with compile).
    # 0 = off.
    deep_cache: int = 0

    def __post_init__(self):
        if not 0.0 <= self.fp32_from <= 1.0:
            raise ValueError(f"fp32_from is a fraction of the training timesteps, in [0, 1]; got {self.fp32_from}")
        check_interval(self.deep_cache)


@cache
def physical_cores() -> int:
    """Physical cores (hyper-threads share one core's FMA units, so more threads than cores do not help)."""
    try:
        pairs, physical = set(), "0"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "physical id":
                physical = value.strip()
            elif key.strip() == "core id":
                pairs.add((physical, value.strip()))
        if pairs:
            return len(pairs)
    except OSError:
        pass
    return os.cpu_count() or 1


def attention_processors(module: nn.Module) -> set[str]:
    """Class names of the attention processors in ``module`` (``AttnProcessor2_0`` = PyTorch SDPA)."""
    return {type(m.processor).__name__ for m in module.modules() if hasattr(m, "processor")}


# fp32 linears with fewer weights than this run faster unpacked, through MKL's sgemm (23 against 19 µs for
# 2×256 @ 256×128); bigger ones packed (1.15-1.8× for sd-v1's, 2.9× for its 1280×1280 time-embedding product)
PACK_MIN_FP32_LINEAR = 2**17


def pack_weights(module: nn.Module) -> nn.Module:
    """Replace, in place, every ``nn.Conv2d`` and ``nn.Linear`` of an inference-only ``module`` by its packed form.

    1×1 convolutions become packed linears over the cells (:class:`PackedPointwiseConv2d`), fp32 3×3 ones with
    many channels Winograd convolutions (:class:`ldm.accel.winograd.WinogradConv2d`; not bf16 ones, whose error its
    transforms about double); fp32 linears with fewer than ``PACK_MIN_FP32_LINEAR`` weights stay as they are, and so
    does every layer whose weights oneDNN cannot pack here (:func:`ldm.accel.packed.can_pack`: bf16 ones on a CPU
    without oneDNN's bf16 kernels), so that the fast path still runs there, unpacked.
    """
    for name, child in list(module.named_modules()):
        if type(child) not in (nn.Conv2d, nn.Linear) or not can_pack(child.weight.device, child.weight.dtype):
            continue
        if type(child) is nn.Conv2d:
            if is_pointwise(child):
                packed = PackedPointwiseConv2d(child.weight, child.bias)
            elif child.weight.dtype == torch.float32 and can_winograd(child):
                packed = WinogradConv2d(child)
            else:
                packed = PackedConv2d(child)
        elif type(child) is nn.Linear and (
            child.weight.dtype != torch.float32 or child.weight.numel() >= PACK_MIN_FP32_LINEAR
        ):
            packed = PackedLinear(child.weight, child.bias)
        else:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, attr, packed)
    return module


class MixedPrecisionUNet(nn.Module):
    """fp32 in, fp32 out: ``low_noise`` (bf16) for timesteps below ``fp32_from``, ``high_noise`` (fp32) from it on.

    Which one runs depends on the timestep only, so an image is the same at any batch size and in any order.
    """

    def __init__(self, *, low_noise: nn.Module, high_noise: nn.Module | None, fp32_from: float):
        super().__init__()
        self.low_noise, self.high_noise, self.fp32_from = low_noise, high_noise, fp32_from

    @property
    def config(self):
        return self.low_noise.config

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self.low_noise.device

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, **kwargs):
        if self.high_noise is not None and float(torch.as_tensor(timestep).max()) >= self.fp32_from:
            return self.high_noise(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)
        out = self.low_noise(
            sample.to(torch.bfloat16),
            timestep,
            encoder_hidden_states=encoder_hidden_states.to(torch.bfloat16),
            **kwargs,
        )
        return UNet2DConditionOutput(sample=out.sample.float())  # (B, C, h, w)


class PromptCache(nn.Module):
    """A text encoder that keeps its last ``size`` encodings by token ids: the same batch of prompts again (the next
    batch of a job) returns the same tensors without running the encoder. The ids are the prompts' chunks
    (``ldm.pipeline.prompts``) as ``encode_prompts`` hands them over, so it keeps long and weighted prompts too.

    An entry is used only while it can be trusted: the encoder's weights unchanged in place since (version counters,
    of the parameters it had when wrapped) and the returned tensors not written into. Inference-mode calls, whose
    tensors carry no version counter, run the encoder.
    """

    def __init__(self, text_encoder: nn.Module, *, size: int = 16):
        super().__init__()
        self.text_encoder = text_encoder
        # token ids → (encoding, ((each returned tensor, its version), ...)); emptied when the weights change
        self._entries = TraceCache(text_encoder, size=size)
        self.encoder_calls = 0  # how often the encoder ran, for tests

    def __getattr__(self, name: str):  # the wrapped encoder's attributes (config, model, dtype) show through
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("text_encoder"), name)

    def _encode(self, input_ids: torch.Tensor, **kwargs):
        self.encoder_calls += 1
        return self.text_encoder(input_ids, **kwargs)

    def _entry(self, input_ids: torch.Tensor, **kwargs) -> tuple:
        out = self._encode(input_ids, **kwargs)
        tensors = [v for v in vars(out).values() if isinstance(v, torch.Tensor)]
        return out, tuple((t, t._version) for t in tensors)

    def forward(self, input_ids: torch.Tensor, **kwargs):  # (B, L) → the encoder's output; kwargs: clip_skip, vectors
        if torch.is_inference_mode_enabled() or input_ids.is_inference():
            return self._encode(input_ids, **kwargs)
        key = (tuple(input_ids.shape), input_ids.cpu().numpy().tobytes(),
               tuple(sorted((k, _key(v)) for k, v in kwargs.items())))  # fmt: skip
        out, versions = self._entries.lookup(key, lambda: self._entry(input_ids, **kwargs))
        if any(t._version != v for t, v in versions):  # a caller wrote into what it was given
            self._entries[key] = self._entry(input_ids, **kwargs)
            out = self._entries[key][0]
        return out


def _key(value):
    """A keyword argument of the encoder as part of a cache key: a tensor (an embedding's vectors) by its contents."""
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), str(value.dtype), value.detach().float().cpu().numpy().tobytes())
    return value


def bf16_copy(module: nn.Module) -> nn.Module:
    """A bf16 copy of an fp32 ``module``, 4-d weights channels_last, made without a whole fp32 copy in between
    (for sd-v1's UNet that copy took 3.7 of the fast path's 11 s of set-up)."""

    def convert(t: torch.Tensor) -> torch.Tensor:
        layout = torch.channels_last if t.dim() == 4 else torch.contiguous_format
        return t.detach().to(torch.bfloat16, memory_format=layout) if t.is_floating_point() else t.detach().clone()

    memo = {id(p): nn.Parameter(convert(p), requires_grad=p.requires_grad) for p in module.parameters()}
    memo |= {id(b): convert(b) for b in module.buffers()}
    return copy.deepcopy(module, memo)  # the rest of the module tree copied, each tensor replaced by its cast


def speed_up(bundle: Bundle, config: FastConfig = FastConfig()) -> Bundle:
    """Prepare an fp32 ``bundle`` in place for fast sampling with ``ldm.pipeline.generate``; returns it.

    The UNet is prepared for speed and the text encoder keeps its encodings (:class:`PromptCache`); the VAE (once per
    batch) keeps its weights channels_last on the CPU, and packed with a packed UNet. See the module docstring.
    """
    unet = bundle.unet
    if unet.dtype != torch.float32 or bundle.vae.dtype != torch.float32:
        raise ValueError("the fast path starts from an fp32 bundle; load it without --dtype")
    device = unet.device
    if device.type == "cpu":
        threads = config.threads or (None if os.environ.get("OMP_NUM_THREADS") else physical_cores())
        if threads:
            torch.set_num_threads(threads)
    small = sum(p.numel() for p in unet.parameters()) < BF16_MIN_PARAMETERS
    bf16 = has_native_bf16(device) and not small if config.bf16 is None else config.bf16
    graph = device.type == "cpu" and small if config.graph is None else config.graph
    if config.deep_cache and config.compile and not graph:
        raise LdmError("the deep-feature reuse compiles as traced graphs, which the fast path uses for small UNets on "
                       "CPU only; drop --compile, or turn the reuse off with --deep-cache 0")  # fmt: skip
    # inductor packs weights itself, and the traced graphs choose per convolution
    pack = (can_pack(device) if config.pack is None else config.pack) and not config.compile and not graph

    def prepare(module: nn.Module) -> nn.Module:
        if pack:  # never with graph
            module = pack_weights(module)
        if config.deep_cache:
            return DeepCacheUNet(module, interval=config.deep_cache, graph=graph, compile=config.compile)
        if graph:
            return GraphUNet(module, compile=config.compile)
        return torch.compile(module, options={"freezing": True}) if config.compile else module

    if bf16 and config.fp32_from > 0:
        low_noise = bf16_copy(unet)
        fp32_from = config.fp32_from * bundle.config.schedule.num_train_timesteps
        bundle.unet = MixedPrecisionUNet(
            low_noise=prepare(low_noise),
            high_noise=prepare(unet) if config.fp32_from < 1 else None,
            fp32_from=fp32_from,
        )
    else:
        bundle.unet = prepare(unet)
    if bundle.vae.device.type == "cpu":
        with quiet_logger("diffusers"):  # its notice about casting with .to() (rather than from_pretrained), unfit here
            bundle.vae.to(memory_format=torch.channels_last)  # the decoder's convolutions then answer channels_last
        if pack:  # with a big UNet comes a big VAE: its 256-512-channel convolutions as Winograd ones
            pack_weights(bundle.vae)
    if not isinstance(bundle.text_encoder, PromptCache):
        bundle.text_encoder = PromptCache(bundle.text_encoder)
    return bundle
