import open_clip
import torch

from ldm.models.text_encoder import (
    Activation,
    TextEncoder,
    TextEncoderConfig,
    fit_state_dict,
    state_dict_from_open_clip,
)
from ldm.models.tokenizer import build_tokenizer, tokenize


def test_interface_shapes():
    cfg = TextEncoderConfig(width=32, layers=2, heads=2, mlp_width=64)
    encoder = TextEncoder(cfg).eval()
    ids = torch.randint(0, 49406, (3, 77))
    out = encoder(ids)
    assert out.hidden_states.shape == (3, 77, 32)
    assert out.pooled.shape == (3, 32)


def test_open_clip_tower_converts_exactly():
    """An open_clip text tower, stored as a CLIPTextModel, computes the same text features."""
    torch.manual_seed(0)
    text_cfg = open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=4, layers=2)
    vision_cfg = open_clip.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32)
    reference = open_clip.CLIP(embed_dim=48, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=True).eval()
    # open_clip starts positional embeddings and layer norms at constants; perturb them so a dropped tensor shows.
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.02)

    cfg = TextEncoderConfig(width=64, layers=2, heads=4, mlp_width=256, activation=Activation.QUICK_GELU)
    ours = TextEncoder(cfg).eval()
    ours.model.load_state_dict(fit_state_dict(ours.model, state_dict_from_open_clip(reference)), strict=True)

    ids = tokenize(build_tokenizer(), ["red apple", "a cat face with tears of joy", ""], context_length=77, pad_id=0)
    with torch.no_grad():
        expected = reference.encode_text(ids)  # (B, 48): pooled state at the end token, projected
        got = ours(ids).pooled @ reference.text_projection
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fit_state_dict_accepts_both_transformers_layouts():
    encoder = TextEncoder(TextEncoderConfig(width=32, layers=1, heads=2, mlp_width=64))
    state = encoder.model.state_dict()
    legacy = {"text_model." + k.removeprefix("text_model."): v for k, v in state.items()}
    legacy["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    assert fit_state_dict(encoder.model, legacy).keys() == state.keys()
