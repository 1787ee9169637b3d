"""The UNet run by OpenVINO's CPU runtime (``generate.py --backend openvino``), an optional extra: ``ldm[openvino]``.

:func:`openvino_unet` wraps a bundle's fp32 UNet in :class:`OpenVinoUNet`, which the sampling loop calls as it calls the
UNet. On its first call for a kind of input the UNet is converted (``openvino.convert_model``, a trace of the module
with those inputs) and kept; for each input shape the converted model is compiled for the CPU and kept too. A
conversion is per latent size, since the trace fixes the UNet's size-dependent choices (its upsampling sizes); batch
and text length stay free in it, and each shape compiles on its own (static shapes run faster).

Precision (:class:`Precision`): ``F32`` asks the runtime for fp32 arithmetic, the same images as torch's up to rounding;
``DEFAULT`` leaves it to the runtime, which picks bf16 on CPUs with native bf16 (AVX-512 BF16, AMX) and fp32 on the
others, an approximation there. What each costs and gains, per model and CPU: BENCHMARKS.md.

Converted models are kept on disk too, under ``<cache>/openvino/`` (``ldm.formats.single_file.cache_dir``), keyed by the
sha256 of the UNet's weights as they are in memory (a merged LoRA included), the inputs, and the versions of OpenVINO
and diffusers: a later process skips the conversion. The VAE stays in torch: OpenVINO decoded emoji-tiny's latents no
faster than torch does.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

from ldm.errors import LdmError
from ldm.io import weights_sha256
from ldm.pipeline.denoiser import UNetWrapper

INSTALL = "pip install 'ldm[openvino]'"
# The UNet's keyword inputs the wrapper passes on: an upscaler's noise levels, a consistency student's guidance input.
INPUTS = ("class_labels", "timestep_cond")


class Precision(Enum):
    F32 = "f32"  # fp32 arithmetic: torch's images up to rounding
    DEFAULT = "default"  # the runtime's choice for the CPU: bf16 where it computes bf16 natively, else fp32


@dataclass(frozen=True, kw_only=True)
class OpenVinoConfig:
    precision: Precision = Precision.F32
    threads: int | None = None  # OpenVINO's inference threads; None: torch's thread count (one per core on --fast)
    cache_dir: Path | None = None  # where converted models are kept on disk; None: in memory only


def import_openvino():
    """The ``openvino`` package, or the one-line error that says how to install it."""
    try:
        import openvino
    except ImportError:
        raise LdmError(f"--backend openvino needs the OpenVINO runtime, which is not installed; {INSTALL}") from None
    return openvino


class _Call(nn.Module):
    """The UNet with positional inputs and a tensor out: what ``openvino.convert_model`` traces."""

    def __init__(self, unet: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.unet, self.names = unet, names

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        kwargs = dict(zip(self.names, extra))
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False, **kwargs)[0]


class OpenVinoUNet(UNetWrapper):
    """A UNet run by OpenVINO: ``(sample, timestep, encoder_hidden_states=…, **kwargs).sample`` as the UNet's call,
    fp32 tensors in and out on the CPU. ``kwargs``: the UNet's ``class_labels`` and ``timestep_cond``, nothing else.

    ``unet`` stays the torch module (its config and a fallback for callers that want it); its weights must not change
    while this wraps it: the converted models hold a copy.
    """

    def __init__(self, unet: nn.Module, config: OpenVinoConfig = OpenVinoConfig()):
        super().__init__(unet)
        if unet.dtype != torch.float32 or unet.device.type != "cpu":
            raise LdmError(f"--backend openvino runs fp32 weights on the CPU; got {unet.dtype} on {unet.device}: drop "
                           "--dtype and --device")  # fmt: skip
        self.ov = import_openvino()
        self.settings = config
        self.core = self.ov.Core()
        self._converted: dict[tuple, object] = {}  # (input names, latent size) → the converted model
        self._compiled: dict[tuple, object] = {}  # (input names, every input's shape) → the compiled model
        self._weights: str | None = None  # weights_sha256 of the UNet, once asked for
        self.conversions = 0  # models converted by tracing in this process (not read from the disk cache), for tests

    @property
    def precision(self) -> str:
        """The precision the runtime computes in, as it reports it ("f32", "bf16"), once a model is compiled."""
        compiled = next(iter(self._compiled.values()), None)
        return compiled.get_property("INFERENCE_PRECISION_HINT").to_string() if compiled is not None else ""

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, **kwargs):
        unknown = sorted(k for k, v in kwargs.items() if k not in INPUTS and v is not None)
        if unknown:
            raise LdmError(f"--backend openvino does not pass the UNet's {', '.join(unknown)}; use --backend torch")
        batch = sample.shape[0]
        timestep = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(batch)  # (B,)
        extra = {k: v for k, v in kwargs.items() if v is not None}
        names = tuple(k for k in INPUTS if k in extra)
        inputs = [sample.float(), timestep, encoder_hidden_states.float(), *(torch.as_tensor(extra[k]) for k in names)]
        inputs = [x.detach().cpu().contiguous() for x in inputs]
        compiled = self._compile(names, inputs)
        out = compiled([x.numpy() for x in inputs])[0]  # (B, C, h, w), a copy of the runtime's buffer
        return UNet2DConditionOutput(sample=torch.from_numpy(out).to(sample.device))

    def _compile(self, names: tuple[str, ...], inputs: list[torch.Tensor]):
        key = (names, *(tuple(x.shape) for x in inputs))
        if key not in self._compiled:
            model = self._convert(names, inputs).clone()
            model.reshape({i: list(x.shape) for i, x in enumerate(inputs)})
            properties = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": self.settings.threads or
                          torch.get_num_threads()}  # fmt: skip
            if self.settings.precision is Precision.F32:
                properties["INFERENCE_PRECISION_HINT"] = "f32"
            self._compiled[key] = self.core.compile_model(model, "CPU", properties)
        return self._compiled[key]

    def _convert(self, names: tuple[str, ...], inputs: list[torch.Tensor]):
        key = (names, tuple(inputs[0].shape[2:]))
        if key in self._converted:
            return self._converted[key]
        path = self._cache_path(names, inputs)
        if path is not None and path.is_file():
            self._converted[key] = self.core.read_model(path)
            return self._converted[key]
        print(f"converting the UNet for OpenVINO at latent size {'×'.join(map(str, key[1]))} (once"
              f"{', then cached on disk' if path else ''})", file=sys.stderr)  # fmt: skip
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the trace's notes on the UNet's shape checks, fixed for one size
            model = self.ov.convert_model(_Call(self.unet, names), example_input=tuple(inputs))
        for port, name in zip(model.inputs, ("sample", "timestep", "encoder_hidden_states", *names)):
            port.get_tensor().set_names({name})
        self.conversions += 1
        self._converted[key] = model
        if path is not None:
            self._save(model, path)
        return model

    def _cache_path(self, names: tuple[str, ...], inputs: list[torch.Tensor]) -> Path | None:
        if self.settings.cache_dir is None:
            return None
        import diffusers

        if self._weights is None:
            self._weights = weights_sha256(self.unet)
        signature = [self._weights, self.ov.get_version(), diffusers.__version__, *names,
                     *(f"{x.dtype}:{x.dim()}" for x in inputs), "x".join(map(str, inputs[0].shape[2:]))]  # fmt: skip
        key = hashlib.sha256("\n".join(signature).encode()).hexdigest()[:24]
        return self.settings.cache_dir / "openvino" / key / "unet.xml"

    def _save(self, model, path: Path) -> None:
        """The converted model into ``path``'s folder, whole or not at all; a folder that cannot be written only
        costs the conversion next time."""
        try:
            path.parent.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=path.parent.parent))
        except OSError:
            return
        try:
            self.ov.save_model(model, staging / path.name, compress_to_fp16=False)  # fp16 weights would round them
            os.replace(staging, path.parent)
        except OSError:  # another process got there first, or the disk is full
            shutil.rmtree(staging, ignore_errors=True)


def openvino_unet(unet: nn.Module, config: OpenVinoConfig = OpenVinoConfig()) -> OpenVinoUNet:
    """``unet`` to be run by OpenVINO (see the module docstring); the same UNet back if it already is."""
    return unet if isinstance(unet, OpenVinoUNet) else OpenVinoUNet(unet, config)
