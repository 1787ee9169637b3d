"""ldm.accel.prepare, the one way in to the speed-ups: its checks, what it leaves alone, and what it can undo."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm import accel
from ldm.accel.deepcache import DeepCacheUNet
from ldm.accel.tome import TokenMergingProcessor
from ldm.errors import LdmError
from ldm.formats.bundle import load_bundle

ROOT = Path(__file__).resolve().parents[2]


def processors(unet) -> list:
    return [m.processor for m in unet.modules() if hasattr(m, "processor")]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"compile": True}, "--compile speeds up the fast path; add --fast"),
        ({"deep_cache": 1}, "N must be 0 (off) or 2 or more, not 1"),
        ({"token_merging": 1.0}, "R must be at least 0 (off) and below 1"),
        ({"token_merging": float("nan")}, "R must be at least 0"),
        ({"deep_cache": 2, "token_merging": 0.5}, "--token-merging and --deep-cache do not combine"),
        ({"fast": True, "dtype": "bf16"}, "--fast sets the UNet's precision itself and needs fp32 weights"),
    ],
)
def test_bad_settings_are_one_line_errors(settings, message):
    with pytest.raises(LdmError, match=re.escape(message)) as error:
        accel.check(**settings)
    assert "\n" not in str(error.value)


def test_nothing_asked_leaves_the_bundle_as_it_is(micro_bundle_dir):
    bundle = load_bundle(micro_bundle_dir)
    parts = (bundle.unet, bundle.vae, bundle.text_encoder)
    before = processors(bundle.unet)
    assert accel.prepare(bundle) is bundle
    assert (bundle.unet, bundle.vae, bundle.text_encoder) == parts
    assert processors(bundle.unet) == before


def test_prepare_checks_the_bundle_it_gets(micro_bundle_dir):
    bundle = load_bundle(micro_bundle_dir).to(dtype=torch.bfloat16)
    with pytest.raises(LdmError, match="needs fp32 weights, not --dtype bf16"):
        accel.prepare(bundle, fast=True)
    with pytest.raises(LdmError, match="do not combine"):
        accel.prepare(bundle, deep_cache=2, token_merging=0.5)


def test_the_approximations_are_put_on_and_taken_off_again(micro_bundle_dir):
    bundle = load_bundle(micro_bundle_dir)
    unet, before = bundle.unet, processors(bundle.unet)
    with accel.prepared(bundle, deep_cache=3) as prepared:
        assert prepared is bundle and isinstance(bundle.unet, DeepCacheUNet) and bundle.unet.interval == 3
    assert bundle.unet is unet
    with accel.prepared(bundle, token_merging=0.5):
        assert bundle.unet is unet and any(isinstance(p, TokenMergingProcessor) for p in processors(unet))
    assert processors(unet) == before
    accel.prepare(bundle, deep_cache=2)  # for good
    assert isinstance(bundle.unet, DeepCacheUNet) and bundle.unet.unet is unet


def test_short_fast_jobs_run_the_modules_and_long_ones_the_graphs(micro_bundle_dir):
    from ldm.accel.fast import GRAPH_MIN_CALLS
    from ldm.accel.graph import GraphUNet

    threads = torch.get_num_threads()  # the fast path sets the thread count; the tests after this keep theirs
    try:
        short = accel.prepare(load_bundle(micro_bundle_dir), fast=True, unet_calls=GRAPH_MIN_CALLS - 1)
        long = accel.prepare(load_bundle(micro_bundle_dir), fast=True, unet_calls=GRAPH_MIN_CALLS)
        reusing = accel.prepare(load_bundle(micro_bundle_dir), fast=True, deep_cache=2, unet_calls=1)
    finally:
        torch.set_num_threads(threads)
    assert not isinstance(short.unet, GraphUNet) and isinstance(long.unet, GraphUNet)
    assert isinstance(reusing.unet, DeepCacheUNet) and not reusing.unet.graph


def test_importing_the_speed_ups_is_cheap_and_the_loop_needs_none_of_them():
    code = (
        "import sys, ldm.accel; assert not {'torch', 'diffusers', 'ldm.accel.fast'} & set(sys.modules), sorted(sys.modules)\n"
        "import ldm.pipeline; assert [m for m in sys.modules if m.startswith('ldm.accel.')] == ['ldm.accel.checks']"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=300)
