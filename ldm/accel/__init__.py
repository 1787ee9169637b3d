"""Optional speed-ups for sampling, each off unless asked for; :func:`prepare` is the one way in.

- ``fast`` (:mod:`ldm.accel.fast`): the same images up to rounding, faster on CPUs; ``compile`` hands its graphs to
  inductor.
- ``deep_cache`` (:mod:`ldm.accel.deepcache`): an approximation, the whole UNet on every N-th step only.
- ``token_merging`` (:mod:`ldm.accel.tome`): an approximation, fewer tokens in the finest self-attention.
- ``backend=Backend.OPENVINO`` (:mod:`ldm.accel.openvino`): the UNet run by OpenVINO's CPU runtime, an optional extra.

The sampling loop (:mod:`ldm.pipeline`) imports nothing from here: a prepared bundle's UNet keeps the UNet's call,
and a wrapper that keeps state across steps says so through :mod:`ldm.pipeline.denoiser`. The rules for the
settings (:func:`check`, in :mod:`ldm.accel.checks`) live apart from the heavy modules, so that importing this
package stays cheap; :func:`prepare` imports the module each speed-up needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ldm.accel.checks import Backend, check, check_interval, check_ratio

__all__ = ["Backend", "check", "check_interval", "check_ratio", "prepare", "prepared"]

if TYPE_CHECKING:
    from ldm.formats.bundle import Bundle


def prepare(
    bundle: Bundle, *, fast: bool = False, compile: bool = False, deep_cache: int = 0, token_merging: float = 0.0,
    unet_calls: int | None = None, backend: Backend = Backend.TORCH,
) -> Bundle:  # fmt: skip
    """``bundle`` made ready, in place, for sampling with the speed-ups asked for; returns it (untouched when none is).

    ``fast``: :func:`ldm.accel.fast.speed_up`, with ``compile`` and the deep-feature reuse folded in. ``unet_calls``:
    how many UNet calls the job will make (steps × batches), where known; tracing graphs pays on long jobs only
    (``ldm.accel.fast.GRAPH_MIN_CALLS``), so a shorter job runs the modules, unless ``compile`` asks for the graphs.
    None leaves that choice to the fast path. ``deep_cache`` without ``fast``: the UNet wrapped in
    :class:`ldm.accel.deepcache.DeepCacheUNet`. ``token_merging``: :func:`ldm.accel.tome.apply_token_merging`, last.
    ``backend``: OpenVINO runs the UNet in fp32 (:func:`ldm.accel.openvino.openvino_unet`), its converted models kept
    in the cache folder (``ldm.formats.single_file.cache_dir``); it takes none of the other speed-ups.

    The fast path changes the bundle for good (save the bundle it came from, not it); :func:`prepared` takes the
    approximations off again afterwards.
    """
    from ldm.runtime import DTYPES

    dtype = next((name for name, value in DTYPES.items() if value == bundle.unet.dtype), str(bundle.unet.dtype))
    check(fast=fast, compile=compile, deep_cache=deep_cache, token_merging=token_merging, dtype=dtype,
          backend=backend, device=bundle.unet.device.type)  # fmt: skip
    if backend is Backend.OPENVINO:
        from ldm.accel.openvino import OpenVinoConfig, openvino_unet
        from ldm.formats.single_file import cache_dir

        bundle.unet = openvino_unet(bundle.unet, OpenVinoConfig(cache_dir=cache_dir()))
        return bundle
    if (fast or deep_cache) and bundle.config.unet.guidance_embedding_dim is not None:
        # The traced graphs and the deep-feature reuse call the UNet without its guidance input.
        print("note: --fast and --deep-cache do not take a consistency-distilled UNet (it reads the guidance scale); "
              "it runs as it is, in few steps")  # fmt: skip
        fast = compile = False
        deep_cache = 0
    if fast:
        from ldm.accel.fast import GRAPH_MIN_CALLS, FastConfig, speed_up

        long_job = unet_calls is None or unet_calls >= GRAPH_MIN_CALLS
        graph = None if long_job or compile else False  # None: the fast path decides by the UNet and the device
        speed_up(bundle, FastConfig(compile=compile, graph=graph, deep_cache=deep_cache))
    elif deep_cache:
        from ldm.accel.deepcache import DeepCacheUNet

        bundle.unet = DeepCacheUNet(bundle.unet, interval=deep_cache)
    if token_merging:
        from ldm.accel.tome import apply_token_merging

        apply_token_merging(bundle.unet, token_merging)
    return bundle


@contextmanager
def prepared(
    bundle: Bundle, *, deep_cache: int = 0, token_merging: float = 0.0, backend: Backend = Backend.TORCH
) -> Iterator[Bundle]:  # fmt: skip
    """:func:`prepare` with the approximations (or the other backend) for the length of a ``with`` block; afterwards
    the bundle's UNet is the one it had, its attention as it was. For callers that go on using the bundle exactly
    (an evaluation, a test)."""
    unet = bundle.unet
    prepare(bundle, deep_cache=deep_cache, token_merging=token_merging, backend=backend)
    try:
        yield bundle
    finally:
        if token_merging:
            from ldm.accel.tome import remove_token_merging

            remove_token_merging(bundle.unet)
        bundle.unet = unet
