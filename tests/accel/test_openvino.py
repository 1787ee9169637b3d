"""ldm.accel.openvino (``--backend openvino``): OpenVINO's fp32 UNet against torch's, its caches, generate.py with it,
and the errors without the package."""

import importlib.util
import re
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from support import assert_rounding_close
from torch import nn

from ldm import accel
from ldm.cli import generate
from ldm.cli.common import run_cli
from ldm.errors import LdmError
from ldm.formats.bundle import load_bundle
from ldm.formats.pngmeta import parse_parameters, read_png_parameters
from ldm.models.presets import PRESETS
from ldm.models.unet import build_unet, guidance_embedding

NEEDS_OPENVINO = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason="openvino is not installed (pip install 'ldm[openvino]')")  # fmt: skip


def chain_terms(unet: nn.Module, context: int) -> int:
    """The products summed on the way to one output, every layer counted as if in one chain: each convolution's and
    linear's fan-in, and each attention's head width and keys. More than any one path through the UNet sums, so
    the tolerance it gives is an upper bound of fp32 rounding."""
    terms = sum(m.weight[0].numel() for m in unet.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    for m in unet.modules():
        if hasattr(m, "processor"):
            terms += m.inner_dim // m.heads + context + 1024  # q·k, then the weights over the keys (≤ 32² tokens)
    return terms


def micro_unet(**changes) -> nn.Module:
    torch.manual_seed(0)
    return build_unet(replace(PRESETS["micro"].unet, **changes)).eval()


def inputs(unet, batch: int, length: int = 77):
    c = unet.config
    torch.manual_seed(1)
    sample = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size)  # (B, C, h, w)
    return sample, torch.randn(batch, length, c.cross_attention_dim)  # (B, L, D)


@NEEDS_OPENVINO
@pytest.mark.slow  # a conversion: seconds
def test_fp32_unet_answers_as_torch_up_to_rounding(tmp_path):
    """Guided batches as the loop passes them (a 0-d int64 timestep), another batch and text length on the same
    conversion, and a python-number timestep: torch's outputs within fp32 rounding of the whole chain."""
    from ldm.accel.openvino import OpenVinoConfig, OpenVinoUNet

    unet = micro_unet()
    wrapped = OpenVinoUNet(unet, OpenVinoConfig(threads=1))
    assert (wrapped.config, wrapped.dtype, wrapped.device) == (unet.config, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        for batch, length, timestep in [(2, 77, torch.tensor(941)), (4, 154, torch.tensor(21)), (2, 77, 500.0)]:
            sample, context = inputs(unet, batch, length)
            expected = unet(sample, timestep, encoder_hidden_states=context).sample
            got = wrapped(sample, timestep, encoder_hidden_states=context).sample
            assert_rounding_close(got, expected, terms=chain_terms(unet, length))
    assert wrapped.conversions == 1  # one latent size: one trace; three shapes compiled
    assert wrapped.precision == "f32"


@NEEDS_OPENVINO
@pytest.mark.slow  # a conversion: seconds
def test_a_consistency_student_takes_its_guidance_input():
    from ldm.accel.openvino import OpenVinoConfig, OpenVinoUNet

    unet = micro_unet(guidance_embedding_dim=32)
    wrapped = OpenVinoUNet(unet, OpenVinoConfig(threads=1))
    sample, context = inputs(unet, 1)
    cond = guidance_embedding(torch.tensor([6.5]), 32)  # (1, 32)
    with torch.no_grad():
        expected = unet(sample, torch.tensor(759), encoder_hidden_states=context, timestep_cond=cond).sample
        got = wrapped(sample, torch.tensor(759), encoder_hidden_states=context, timestep_cond=cond).sample
    assert_rounding_close(got, expected, terms=chain_terms(unet, 77) + 32)
    with pytest.raises(LdmError, match="does not pass the UNet's added_cond_kwargs; use --backend torch"):
        wrapped(sample, torch.tensor(759), encoder_hidden_states=context, added_cond_kwargs={"text_embeds": cond})


@NEEDS_OPENVINO
@pytest.mark.slow  # a conversion: seconds
def test_converted_models_are_kept_on_disk_by_the_weights(tmp_path):
    from ldm.accel.openvino import OpenVinoConfig, OpenVinoUNet

    unet = micro_unet()
    sample, context = inputs(unet, 2)
    config = OpenVinoConfig(threads=1, cache_dir=tmp_path)
    first = OpenVinoUNet(unet, config)
    with torch.no_grad():
        expected = first(sample, torch.tensor(5), encoder_hidden_states=context).sample
        again = OpenVinoUNet(unet, config)  # a later process: reads the model, converts nothing
        assert torch.equal(again(sample, torch.tensor(5), encoder_hidden_states=context).sample, expected)
    assert (first.conversions, again.conversions) == (1, 0)
    assert len(list((tmp_path / "openvino").glob("*/unet.xml"))) == 1
    assert not list((tmp_path / "openvino").glob(".partial-*"))
    key = again._cache_path((), [sample, torch.zeros(2), context])
    with torch.no_grad():
        unet.conv_in.bias += 1  # other weights (a merged LoRA), another entry
    assert OpenVinoUNet(unet, config)._cache_path((), [sample, torch.zeros(2), context]) != key


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


@NEEDS_OPENVINO
@pytest.mark.slow  # a conversion and three runs of generate.py
def test_generate_with_openvino_makes_torchs_pixels_and_says_so(micro_bundle_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    common = ["red apple", "--seed", "3", "--steps", "4", "--model", micro_bundle_dir, "--quiet"]
    assert run_cli(generate.main, [str(a) for a in [*common, "--out", tmp_path / "torch"]]) == 0
    assert run_cli(generate.main, [str(a) for a in [*common, "--out", tmp_path / "ov", "--backend", "openvino"]]) == 0
    torch_png, ov_png = tmp_path / "torch" / "00000-3.png", tmp_path / "ov" / "00000-3.png"
    assert np.abs(pixels(ov_png) - pixels(torch_png)).max() <= 1
    assert parse_parameters(read_png_parameters(ov_png))[2]["Backend"] == "openvino"
    assert "Backend" not in parse_parameters(read_png_parameters(torch_png))[2]
    # --from-png takes the backend it records; --backend torch overrides it
    again = ["--from-png", ov_png, "--model", micro_bundle_dir, "--quiet", "--out", tmp_path / "again"]
    assert run_cli(generate.main, [str(a) for a in again]) == 0
    assert parse_parameters(read_png_parameters(tmp_path / "again" / "00000-3.png"))[2]["Backend"] == "openvino"
    assert run_cli(generate.main, [str(a) for a in [*again, "--backend", "torch"]]) == 0
    assert "Backend" not in parse_parameters(read_png_parameters(tmp_path / "again" / "00001-3.png"))[2]
    assert len(list((tmp_path / "cache" / "openvino").glob("*/unet.xml"))) == 1


def test_without_openvino_one_line_names_the_extra(micro_bundle_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    with pytest.raises(LdmError, match=re.escape("pip install 'ldm[openvino]'")) as error:
        accel.prepare(load_bundle(micro_bundle_dir), backend=accel.Backend.OPENVINO)
    assert "\n" not in str(error.value)
    argv = ["red apple", "--model", micro_bundle_dir, "--out", tmp_path, "--backend", "openvino", "--quiet"]
    assert run_cli(generate.main, [str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'ldm[openvino]'" in err and "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"fast": True}, "--fast speed up torch's UNet, which --backend openvino replaces"),
        ({"deep_cache": 2, "token_merging": 0.5}, "--deep-cache and --token-merging speed up torch's UNet"),
        ({"dtype": "bf16"}, "--backend openvino runs fp32 weights on the CPU, not --dtype bf16 on cpu"),
        ({"device": "cuda"}, "not --dtype fp32 on cuda"),
    ],
)
def test_what_does_not_combine_with_openvino(settings, message):
    with pytest.raises(LdmError, match=re.escape(message)) as error:
        accel.check(backend=accel.Backend.OPENVINO, **settings)
    assert "\n" not in str(error.value)


def test_a_garbled_recorded_backend_is_one_line(micro_bundle_dir, tmp_path, capsys):
    from ldm.formats.pngmeta import save_png

    png = tmp_path / "x.png"
    text = "red apple\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Backend: tpu"
    save_png(Image.new("RGB", (64, 64)), png, text)
    argv = ["--from-png", png, "--model", micro_bundle_dir, "--out", tmp_path / "out", "--quiet"]
    assert run_cli(generate.main, [str(a) for a in argv]) == 2
    assert "the recorded backend 'tpu' is not one of torch, openvino; pass --backend" in capsys.readouterr().err
