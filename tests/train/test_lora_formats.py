"""LoRA files as the community shares them: kohya's format written beside diffusers', both read, LoCon convolutions,
several LoRAs merged at once, and one-line errors for keys that fit neither format or no layer."""

import pytest
import test_lora
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_lora import NO_PEFT, PROMPT, SEED, request

from ldm.errors import LdmError
from ldm.formats.bundle import load_bundle
from ldm.pipeline import generate
from ldm.train.lora import KOHYA_NAME, LoraFormat, apply_lora, apply_loras, lora_format, lora_hash

lora_run = test_lora.lora_run  # the trained LoRA of test_lora.py (a module fixture), in both formats


def tensors_of(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def weights(bundle):
    return bundle.unet.state_dict() | {f"te.{k}": v for k, v in bundle.text_encoder.model.state_dict().items()}


def test_the_kohya_twin_has_kohya_keys_and_merges_the_same(lora_run, micro_bundle_dir):
    _, out = lora_run
    kohya = tensors_of(out / KOHYA_NAME)
    assert lora_format(list(kohya), out / KOHYA_NAME) is LoraFormat.KOHYA
    assert lora_format(list(tensors_of(out / "lora.safetensors")), out) is LoraFormat.DIFFUSERS
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in kohya)
    kinds = {k.rsplit(".", 2)[-2] if k.endswith(".weight") else "alpha" for k in kohya}
    assert kinds == {"lora_down", "lora_up", "alpha"}
    assert all(v.ndim == 0 and float(v) == 4.0 for k, v in kohya.items() if k.endswith(".alpha"))  # alpha = rank here
    ours = weights(apply_lora(load_bundle(micro_bundle_dir), out / "lora.safetensors", scale=0.7))
    theirs = weights(apply_lora(load_bundle(micro_bundle_dir), out / KOHYA_NAME, scale=0.7))
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)


def test_diffusers_loads_our_kohya_file_to_the_same_pixels(lora_run, micro_bundle_dir, micro_diffusers_dir):
    """The oracle: diffusers' own kohya converter and loader, on the exported micro bundle, against our --lora."""
    from diffusers import StableDiffusionPipeline

    _, out = lora_run
    pipe = StableDiffusionPipeline.from_pretrained(micro_diffusers_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out / KOHYA_NAME))
    theirs = pipe([PROMPT], negative_prompt=[""], num_inference_steps=3, guidance_scale=5.0, height=64, width=64,
                  generator=[torch.Generator().manual_seed(SEED)], output_type="np").images  # fmt: skip
    theirs = torch.from_numpy(theirs).permute(0, 3, 1, 2)
    ours = generate(apply_lora(load_bundle(micro_bundle_dir), out / KOHYA_NAME), request(), progress=False)
    base = generate(load_bundle(micro_bundle_dir), request(), progress=False)
    assert (ours - base).abs().max() > 1e-3
    assert (ours - theirs).abs().max() <= 1e-4


def locon_file(bundle, path, *, alpha=2.0, rank=4):
    """A kohya LoCon file by hand: a 3×3 conv (conv1), a 1×1 conv (conv_shortcut where there is one), a linear."""
    torch.manual_seed(0)
    modules = dict(bundle.unet.named_modules())
    ends = ("resnets.0.conv1", "conv_shortcut", "attn2.to_v")
    names = [next(n for n in modules if n.endswith(end)) for end in ends]
    tensors = {}
    for name in names:
        weight = modules[name].weight  # (out, in, kh, kw) or (out, in)
        key = "lora_unet_" + name.replace(".", "_")
        down_shape = (rank, *weight.shape[1:])
        up_shape = (weight.shape[0], rank, *([1, 1] if weight.ndim == 4 else []))
        tensors |= {f"{key}.lora_down.weight": torch.randn(down_shape), f"{key}.lora_up.weight": torch.randn(up_shape),
                    f"{key}.alpha": torch.tensor(alpha)}  # fmt: skip
    save_file(tensors, str(path))
    return names, tensors


def test_locon_convolution_adapters_merge_as_kohya_defines_them(micro_bundle_dir, tmp_path):
    pytest.importorskip("peft", reason=NO_PEFT)
    base = load_bundle(micro_bundle_dir)
    names, tensors = locon_file(base, tmp_path / "locon.safetensors")
    assert any(dict(base.unet.named_modules())[n].weight.ndim == 4 for n in names)
    merged = apply_lora(load_bundle(micro_bundle_dir), tmp_path / "locon.safetensors", scale=0.5)
    before, after = base.unet.state_dict(), merged.unet.state_dict()
    for name in names:
        key = "lora_unet_" + name.replace(".", "_")
        down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(before[f"{name}.weight"].shape)  # W + s·(α/r)·up·down
        expected = before[f"{name}.weight"] + 0.5 * (2.0 / 4) * delta
        assert torch.allclose(after[f"{name}.weight"], expected, atol=1e-5), name
    untouched = [k for k in before if not any(k.startswith(n + ".") for n in names)]
    assert all(torch.equal(before[k], after[k]) for k in untouched)


def test_several_loras_each_at_its_own_scale(lora_run, micro_bundle_dir, tmp_path):
    _, out = lora_run
    base = load_bundle(micro_bundle_dir)
    locon_file(base, tmp_path / "locon.safetensors")
    one = weights(apply_lora(load_bundle(micro_bundle_dir), out / "lora.safetensors", scale=0.8))
    zero_other = weights(apply_loras(load_bundle(micro_bundle_dir), [(out / "lora.safetensors", 0.8),
                                                                      (tmp_path / "locon.safetensors", 0.0)]))  # fmt: skip
    assert all(torch.equal(one[k], zero_other[k]) for k in one)  # scale 0 on one = without it
    both = weights(apply_loras(load_bundle(micro_bundle_dir), [(out / KOHYA_NAME, 0.8),
                                                                (tmp_path / "locon.safetensors", 0.5)]))  # fmt: skip
    only_locon = weights(apply_lora(load_bundle(micro_bundle_dir), tmp_path / "locon.safetensors", scale=0.5))
    plain = weights(base)
    for k in plain:  # the two deltas add up
        assert torch.allclose(both[k] - plain[k], (one[k] - plain[k]) + (only_locon[k] - plain[k]), atol=1e-5), k


KEY_ERRORS = [
    ("lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a",
     r"unknown key lora_unet_down_blocks_0_resnets_0_conv1\.hada_w1_a; ldm reads kohya keys .*LoHa, LoKr and DoRA "
     r"are not read.*convert"),
    ("lora_unet_no_such_layer.lora_down.weight",
     r"key lora_unet_no_such_layer\.lora_down\.weight names no layer of micro's UNet; .*use one trained on micro"),
    ("unet.no.such.layer.lora.down.weight",
     r"key unet\.no\.such\.layer\.lora\.down\.weight names no layer of micro's UNet"),
    ("model.diffusion_model.x.weight", r"unknown key model\.diffusion_model\.x\.weight; ldm reads"),
]  # fmt: skip


@pytest.mark.parametrize(("key", "message"), KEY_ERRORS)
def test_keys_that_fit_nothing_are_one_line_errors(micro_bundle_dir, tmp_path, key, message):
    pytest.importorskip("peft", reason=NO_PEFT)
    save_file({key: torch.zeros(4, 8), key.replace("down", "up"): torch.zeros(8, 4)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(LdmError, match=message) as err:
        apply_lora(load_bundle(micro_bundle_dir), tmp_path / "x.safetensors")
    assert "\n" not in str(err.value)


def test_lora_hash_is_autov2(tmp_path):
    import hashlib

    (tmp_path / "a.safetensors").write_bytes(b"abc")
    assert lora_hash(tmp_path / "a.safetensors") == hashlib.sha256(b"abc").hexdigest()[:10]
