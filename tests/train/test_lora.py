"""LoRA training with train_unet.py --lora-rank: only adapters train, diffusers loads the file, scale 0 is the base."""

import sys

import pytest
import torch
from safetensors import safe_open
from test_train_unet import args, checkpoint_tensors, write_shapes

from ldm.cli import train_unet
from ldm.errors import LdmError
from ldm.formats.bundle import load_bundle
from ldm.pipeline import Request, generate
from ldm.pipeline.schedule import get_sampler
from ldm.train.lora import add_lora, apply_lora
from ldm.train.unet import run

PROMPT, SEED = "disc 1", 7
NO_PEFT = "LoRA needs the optional package peft: pip install -e '.[test,lora]'"


def request(steps=3):
    return Request(prompts=[PROMPT], negative_prompts=[""], seeds=[SEED], steps=steps, guidance_scale=5.0,
                   sampler=get_sampler("ddim"), width=64, height=64)  # fmt: skip


@pytest.fixture(scope="module")
def lora_run(micro_bundle_dir, tmp_path_factory):
    pytest.importorskip("peft", reason=NO_PEFT)  # every test that trains or applies a LoRA skips without it
    root = tmp_path_factory.mktemp("lora")
    data = write_shapes(root / "data")
    argv = args(micro_bundle_dir, data, root / "run", "--max-steps", "3", "--lora-rank", "4", "--train-text-encoder",
                "--set", "train.lr=3e-2", "--set", "train.ema_decay=0.5",
                "--set", "lora.merge_bundle=true")  # fmt: skip
    cfg = train_unet.resolve_config(train_unet.build_parser().parse_args(argv))
    return run(cfg), root / "run"


def test_only_lora_parameters_change(lora_run, micro_bundle_dir):
    result, out = lora_run
    base = load_bundle(micro_bundle_dir)
    for trained, original in ((result.unet, base.unet), (result.text_encoder.model, base.text_encoder.model)):
        reference = original.state_dict()
        state = trained.state_dict()
        plain = {k.replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k}
        assert plain.keys() == reference.keys()
        for key, value in plain.items():
            assert torch.equal(value.cpu(), reference[key]), key  # base weights bit-identical
        assert any("lora_B" in k and v.abs().max() > 0 for k, v in state.items())  # the adapters did train

    # lora.merge_bundle: a bundle with the adapters merged in, as apply_lora makes it.
    merged, applied = load_bundle(out / "bundle"), apply_lora(load_bundle(micro_bundle_dir), out / "lora.safetensors")
    sa, sb = merged.unet.state_dict(), applied.unet.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], base.unet.state_dict()[k]) for k in sa)
    assert merged.name == "micro"  # the base bundle's name, not the output folder's
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(".lora" in k for k in keys)
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("text_encoder.") for k in keys)
    assert {k.split(".lora")[0].rsplit(".", 1)[-1] for k in keys if k.startswith("unet.")} == {
        "to_q",
        "to_k",
        "to_v",
        "0",
    }
    assert (out / "lora.safetensors").stat().st_size < (micro_bundle_dir / "unet.safetensors").stat().st_size / 2
    checkpoint = checkpoint_tensors(out / "checkpoints" / "step-00000003.safetensors")
    model_keys = [k for k in checkpoint if k.startswith("s.models.")]
    assert model_keys and all("lora_" in k for k in model_keys)  # checkpoints keep the adapters only


def test_diffusers_loads_the_lora_file(lora_run, micro_bundle_dir, micro_diffusers_dir):
    from diffusers import StableDiffusionPipeline

    _, out = lora_run
    pipe = StableDiffusionPipeline.from_pretrained(micro_diffusers_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out / "lora.safetensors"))
    theirs = pipe([PROMPT], negative_prompt=[""], num_inference_steps=3, guidance_scale=5.0, height=64, width=64,
                  generator=[torch.Generator().manual_seed(SEED)], output_type="np").images  # fmt: skip
    theirs = torch.from_numpy(theirs).permute(0, 3, 1, 2)
    ours = generate(
        apply_lora(load_bundle(micro_bundle_dir), out / "lora.safetensors", scale=1.0), request(), progress=False
    )
    base = generate(load_bundle(micro_bundle_dir), request(), progress=False)
    assert (ours - base).abs().max() > 1e-3  # the LoRA changes the pictures …
    assert (ours - theirs).abs().max() <= 1e-4  # … exactly as diffusers applies it


def test_scale_zero_reproduces_the_base_model_exactly(lora_run, micro_bundle_dir):
    _, out = lora_run
    base = load_bundle(micro_bundle_dir)
    zero = apply_lora(load_bundle(micro_bundle_dir), out / "lora.safetensors", scale=0.0)
    sa, sb = base.unet.state_dict(), zero.unet.state_dict()
    assert sa.keys() == sb.keys()  # merged modules are plain again
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(generate(zero, request(), progress=False), generate(base, request(), progress=False))
    half = apply_lora(load_bundle(micro_bundle_dir), out / "lora.safetensors", scale=0.5)
    key = next(k for k in sa if k.endswith("attn1.to_q.weight"))
    assert not torch.equal(half.unet.state_dict()[key], sa[key])


def test_apply_lora_refuses_what_it_cannot_apply(lora_run, micro_bundle_dir, tmp_path):
    from safetensors.torch import save_file

    _, out = lora_run
    with pytest.raises(LdmError, match="LoRA file .* not found"):
        apply_lora(load_bundle(micro_bundle_dir), tmp_path / "nope.safetensors")
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    key = next(k for k in tensors if k.startswith("unet.") and ".lora.down." in k)
    tensors[key] = torch.zeros(4, 3)  # a LoRA for some other model
    save_file(tensors, str(tmp_path / "other.safetensors"), metadata=meta)
    with pytest.raises(LdmError, match="cannot apply LoRA"):
        apply_lora(load_bundle(micro_bundle_dir), tmp_path / "other.safetensors")


def test_generate_applies_lora_and_records_it(lora_run, micro_bundle_dir, tmp_path):
    import numpy as np
    from PIL import Image

    from ldm.cli import generate
    from ldm.cli.common import run_cli
    from ldm.formats.pngmeta import parse_parameters, read_png_parameters

    _, out = lora_run
    common = ["red disc", "--seed", "3", "--steps", "2", "--model", str(micro_bundle_dir), "--quiet"]

    def make(folder, *extra):
        assert run_cli(generate.main, [*common, "--out", str(tmp_path / folder), *extra]) == 0
        (png,) = (tmp_path / folder).glob("0*.png")
        return png, np.asarray(Image.open(png))

    _, base = make("base")
    _, zero = make("zero", "--lora", str(out / "lora.safetensors"), "--lora-scale", "0")
    png, full = make("full", "--lora", str(out / "lora.safetensors"), "--lora-scale", "1")
    assert np.array_equal(base, zero)
    assert not np.array_equal(base, full)
    settings = parse_parameters(read_png_parameters(png))[2]
    assert settings["Lora"] == "lora.safetensors" and settings["Lora scale"] == "1.0"


def test_without_peft_lora_says_what_to_install(micro_bundle_dir, tmp_path, monkeypatch):
    """Runs with or without peft: where it is missing, a one-line LdmError that names the install, no traceback."""
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft fails as where it is not installed
    file = tmp_path / "lora.safetensors"
    calls = (
        lambda: add_lora(torch.nn.Linear(2, 2), rank=4, alpha=4, targets=("to_q",)),
        lambda: apply_lora(load_bundle(micro_bundle_dir), file),
    )
    for call in calls:
        with pytest.raises(LdmError, match=r"LoRA needs peft; install it with `pip install -e \.\[lora\]`") as err:
            call()
        assert "\n" not in str(err.value) and err.value.__cause__ is None


def test_a_peft_older_than_transformers_accepts_is_named(monkeypatch):
    """transformers refuses a peft below its MIN_PEFT_VERSION deep inside a call: said up front, in one line."""
    peft = pytest.importorskip("peft", reason=NO_PEFT)
    pytest.importorskip("transformers.integrations.peft")
    import transformers.integrations.peft as integration

    monkeypatch.setattr(integration, "MIN_PEFT_VERSION", "999.0", raising=False)
    with pytest.raises(LdmError, match=rf"LoRA needs peft >= 999.0 with transformers .*, and peft {peft.__version__}"):
        add_lora(torch.nn.Linear(2, 2), rank=4, alpha=4, targets=("to_q",))


def test_a_pickled_lora_is_refused_as_a_pickle(micro_bundle_dir, tmp_path):
    """diffusers would unpickle (weights_only) anything but safetensors: refused first, for what it is."""
    pytest.importorskip("peft", reason=NO_PEFT)
    pickled = tmp_path / "lora.ckpt"
    torch.save({"unet.x": torch.zeros(1)}, pickled)
    with pytest.raises(LdmError, match=r"is not a safetensors file .*pickle files \(\.ckpt, \.pt, \.bin\) are refused"):
        apply_lora(load_bundle(micro_bundle_dir), pickled)
