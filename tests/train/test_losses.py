import math

import pytest
import torch
import torchvision
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ldm.errors import LdmError
from ldm.io import save_tensors
from ldm.models.autoencoder import build_autoencoder
from ldm.models.presets import PRESETS
from ldm.train.losses import (
    VGG16_TAP_CHANNELS,
    DiscriminatorConfig,
    DiscriminatorNorm,
    PatchDiscriminator,
    PerceptualLoss,
    Reconstruction,
    VAELoss,
    VAELossConfig,
    adaptive_weight,
    gaussian_kl,
    generator_adv_loss,
    hinge_d_loss,
    kl_loss,
    nll_loss,
    perceptual_unavailable_message,
    reconstruction_loss,
)

NEVER = 10**9  # a disc_start the test never reaches
SIDE = 32  # 32×32 images: 4×4 latents in the micro VAE, 2×2 at VGG's relu5_3, 2×2 discriminator logits


@pytest.fixture(scope="module")
def vgg_tensors():
    """A randomly initialised torchvision vgg16().features state dict, keyed as in a whole vgg16 state dict."""
    torch.manual_seed(0)
    features = torchvision.models.vgg16(weights=None).features
    return {f"features.{k}": v for k, v in features.state_dict().items()}


@pytest.fixture(scope="module")
def vgg_file(vgg_tensors, tmp_path_factory):
    return save_tensors(tmp_path_factory.mktemp("vgg") / "vgg16.safetensors", vgg_tensors)


@pytest.fixture(scope="module")
def perceptual(vgg_file):
    return PerceptualLoss.from_file(vgg_file)


@pytest.fixture
def vae():
    torch.manual_seed(0)
    return build_autoencoder(PRESETS["micro"].vae)


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.rand(2, 3, SIDE, SIDE) * 2 - 1


def _generator_step(vae, vae_loss, x, *, step):
    """One fresh forward of the VAE and the generator loss, backward; the decoder's last-layer gradient."""
    vae.zero_grad(set_to_none=True)
    posterior = vae.encode(x).latent_dist
    x_hat = vae.decode(posterior.mode()).sample
    total, logs = vae_loss.generator_loss(x, x_hat, posterior, step=step, last_layer=vae.decoder.conv_out.weight)
    total.backward(retain_graph=True)  # the tests differentiate x_hat again
    return vae.decoder.conv_out.weight.grad.clone(), x_hat, logs


# --- the perceptual and adversarial terms reach the decoder ---------------------------------------------------


def test_perceptual_term_alone_trains_the_decoder(vae, images, perceptual):
    with_p = VAELoss(VAELossConfig(kl_weight=0.0, perceptual_weight=1.0, disc_start=NEVER), perceptual=perceptual)
    without = VAELoss(VAELossConfig(kl_weight=0.0, perceptual_weight=0.0, disc_start=NEVER), perceptual=perceptual)
    grad_p, x_hat, logs = _generator_step(vae, with_p, images, step=0)
    grad_0, _, logs_0 = _generator_step(vae, without, images, step=0)
    assert "perceptual" in logs and "perceptual" not in logs_0
    perceptual_grad = grad_p - grad_0  # the perceptual term's share only
    assert perceptual_grad.abs().sum() > 0

    # ... and it is exactly the gradient of the perceptual term as documented: (B,) broadcast to every pixel,
    # summed over pixels, mean over batch.
    b, c, h, w = images.shape
    (expected,) = torch.autograd.grad(perceptual(images, x_hat).sum() * c * h * w / b, vae.decoder.conv_out.weight)
    torch.testing.assert_close(perceptual_grad, expected, rtol=1e-3, atol=1e-6 * expected.abs().max().item())

    # the backbone is a frozen instrument: no gradient, never trainable, stays in eval mode
    with_p.train()
    assert not perceptual.training and not perceptual.features.training
    for p in perceptual.parameters():
        assert not p.requires_grad and p.grad is None
    assert with_p.generator_parameters() == []


def test_adversarial_term_alone_trains_the_decoder(vae, images):
    torch.manual_seed(2)
    vae_loss = VAELoss(VAELossConfig(kl_weight=0.0, disc_start=5, disc_channels=8))
    grad_gan, x_hat, logs = _generator_step(vae, vae_loss, images, step=5)
    grad_rec, _, logs_rec = _generator_step(vae, vae_loss, images, step=4)
    assert "g_adv" in logs and "g_adv" not in logs_rec
    assert logs["d_weight"] > 0
    adversarial_grad = grad_gan - grad_rec
    assert adversarial_grad.abs().sum() > 0

    # it is disc_weight · λ · ∇(−mean D(x̂)), λ detached
    (g_grad,) = torch.autograd.grad(generator_adv_loss(vae_loss.discriminator(x_hat)), vae.decoder.conv_out.weight)
    expected = vae_loss.config.disc_weight * logs["d_weight"] * g_grad
    torch.testing.assert_close(adversarial_grad, expected, rtol=1e-3, atol=1e-6 * expected.abs().max().item())

    # the generator step leaves nothing in the discriminator, and leaves it trainable for its own step
    vae_loss.discriminator.zero_grad(set_to_none=True)
    _generator_step(vae, vae_loss, images, step=5)
    for p in vae_loss.discriminator_parameters():
        assert p.requires_grad and p.grad is None


def test_generator_loss_without_grad_for_validation(vae, images):
    vae_loss = VAELoss(VAELossConfig(disc_start=0, disc_channels=8))
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        x_hat = vae.decode(posterior.mode()).sample
        total, logs = vae_loss.generator_loss(images, x_hat, posterior, step=1, last_layer=vae.decoder.conv_out.weight)
    assert logs["d_weight"] == 0.0
    assert total.item() == pytest.approx(logs["nll"] + vae_loss.config.kl_weight * logs["kl"], rel=1e-6)


# --- the perceptual distance ----------------------------------------------------------------------------------


def test_perceptual_distance_properties(perceptual, images):
    y = images.flip(-1).clone().requires_grad_(True)
    d = perceptual(images, y)
    assert d.shape == (2,) and (d > 0).all()
    assert perceptual(images, images).abs().max() == 0
    d.sum().backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_lin_weights_bare_keys_and_save_roundtrip(perceptual, vgg_tensors, tmp_path, images):
    # bare vgg16().features keys ("0.weight") load too; lin weights, 1-D or (1, C, 1, 1), weigh the channels:
    # all 2 doubles the uniform distance
    bare = {k.removeprefix("features."): v for k, v in vgg_tensors.items()}
    lin = {f"lin{i}.weight": torch.full((c,), 2.0) for i, c in enumerate(VGG16_TAP_CHANNELS)}
    lin["lin4.weight"] = lin["lin4.weight"].view(1, -1, 1, 1)
    weighted = PerceptualLoss.from_file(save_tensors(tmp_path / "lpips.safetensors", {**bare, **lin}))
    y = images.roll(3, -1)
    torch.testing.assert_close(weighted(images, y), 2 * perceptual(images, y))
    again = PerceptualLoss.from_file(weighted.save(tmp_path / "saved.safetensors"))
    torch.testing.assert_close(again(images, y), weighted(images, y))


def test_bad_weights_file_is_a_clear_error(tmp_path, vgg_tensors):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file")
    wrong_keys = save_tensors(tmp_path / "resnet.safetensors", {"conv1.weight": torch.zeros(64, 3, 7, 7)})
    missing = save_tensors(
        tmp_path / "half.safetensors", {k: v for k, v in vgg_tensors.items() if not k.startswith("features.28")}
    )
    wrong_shape = save_tensors(
        tmp_path / "shape.safetensors", {**vgg_tensors, "features.0.weight": torch.zeros(64, 1, 3, 3)}
    )
    cases = {
        tmp_path / "nope.safetensors": "no such file",
        tmp_path: "not a file",
        garbage: "not a readable safetensors file",
        wrong_keys: "unexpected keys 'conv1.weight'",
        missing: "missing VGG16 keys 'features.28.weight'",
        wrong_shape: "'features.0.weight' has shape (64, 1, 3, 3), VGG16 needs (64, 3, 3, 3)",
    }
    for path, problem in cases.items():
        with pytest.raises(LdmError) as info:
            PerceptualLoss.from_file(path)
        message = str(info.value)
        assert problem in message and str(path) in message, message
        assert "--set loss.perceptual_weights=FILE" in message and "\n" not in message
    with pytest.raises(LdmError, match="no such file"):
        VAELoss(VAELossConfig(perceptual_weights=str(tmp_path / "nope.safetensors")))


def test_perceptual_off_message():
    assert perceptual_unavailable_message() == (
        "perceptual loss off: no backbone weights given (--set loss.perceptual_weights=FILE, a VGG16 safetensors "
        "file); training uses L1/L2 + KL only"
    )
    # The override the message names reaches the field that train_vae.py reads.
    from ldm.cli.train_vae import build_parser, resolve_config
    from ldm.train.vae import VAERunConfig

    cfg = resolve_config(build_parser().parse_args(
        ["--preset", "micro", "--data", "d", "--out", "o", "--set", "loss.perceptual_weights=vgg.safetensors"]))
    assert isinstance(cfg, VAERunConfig) and cfg.loss.perceptual_weights == "vgg.safetensors"
    assert VAELoss(VAELossConfig(disc_channels=8)).perceptual is None


# --- the pure losses on hand cases ----------------------------------------------------------------------------


def test_adaptive_weight_hand_case():
    layer = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0]]))
    y = layer(torch.tensor([[3.0, 4.0]]))  # y = 11
    rec = 0.5 * y.square().sum()  # ∂/∂W = y·x = [33, 44], norm 55
    g = -y.sum()  # ∂/∂W = −x = [−3, −4], norm 5
    weight = adaptive_weight(rec, g, layer.weight)
    assert weight.item() == pytest.approx(55 / (5 + 1e-4), rel=1e-6)
    assert not weight.requires_grad
    assert adaptive_weight(rec, g, layer.weight, eps=0.0).item() == pytest.approx(11.0)
    assert adaptive_weight(rec, g, layer.weight, max_weight=3.0).item() == 3.0
    (rec + weight * g).backward()  # the graph was retained
    torch.testing.assert_close(layer.weight.grad, torch.tensor([[33.0, 44.0]]) - weight * torch.tensor([[3.0, 4.0]]))


def test_hinge_losses_hand_cases():
    real = torch.tensor([2.0, 0.5]).view(2, 1, 1, 1)  # relu(1 − real) = [0, 0.5]: mean 0.25
    fake = torch.tensor([-3.0, 0.0]).view(2, 1, 1, 1)  # relu(1 + fake) = [0, 1]: mean 0.5
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    assert hinge_d_loss(torch.full((2, 1, 3, 3), 5.0), torch.full((2, 1, 3, 3), -5.0)).item() == 0.0
    assert generator_adv_loss(torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)).item() == pytest.approx(-2.0)


def _posterior(mean: torch.Tensor, logvar: torch.Tensor) -> DiagonalGaussianDistribution:
    return DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))


def test_kl_hand_cases():
    zeros = torch.zeros(2, 4, 3, 3)
    assert kl_loss(_posterior(zeros, zeros)).item() == 0.0  # N(0, 1) vs N(0, 1)
    # μ = 1, σ = 1 on 36 dims per sample: ½ · 36 · 1 = 18 per sample, mean over batch 18
    assert kl_loss(_posterior(zeros + 1, zeros)).item() == pytest.approx(18.0)
    # μ = 0.5, σ² = 2: ½ (0.25 + 2 − 1 − ln 2) per dim
    posterior = _posterior(zeros + 0.5, zeros + math.log(2.0))
    assert kl_loss(posterior).item() == pytest.approx(36 * 0.5 * (0.25 + 2 - 1 - math.log(2.0)), rel=1e-6)
    torch.testing.assert_close(kl_loss(posterior), posterior.kl().mean())  # diffusers' per-sample sums, averaged
    # per-sample values differ: sum over latent dims, mean over batch
    mean = torch.cat([zeros[:1], zeros[:1] + 2])
    assert gaussian_kl(mean, zeros).tolist() == pytest.approx([0.0, 72.0])
    assert kl_loss(_posterior(mean, zeros)).item() == pytest.approx(36.0)


def test_reconstruction_hand_cases():
    x = torch.zeros(2, 1, 1, 2)
    x_hat = torch.tensor([1.0, -3.0, 2.0, 0.0]).view(2, 1, 1, 2)
    assert reconstruction_loss(x, x_hat, Reconstruction.L1).flatten().tolist() == [1.0, 3.0, 2.0, 0.0]
    assert reconstruction_loss(x, x_hat, Reconstruction.L2).flatten().tolist() == [1.0, 9.0, 4.0, 0.0]
    assert reconstruction_loss(x, x_hat, Reconstruction.L1, per_sample=True).tolist() == [2.0, 1.0]
    with pytest.raises(ValueError):
        reconstruction_loss(x, x_hat[:1])


def test_learned_logvar():
    rec = torch.full((2, 1, 2, 2), 3.0)
    s = torch.tensor(0.5)
    assert nll_loss(rec, s).item() == pytest.approx(4 * (3 / math.exp(0.5) + 0.5))  # Σ over 4 pixels, mean over 2

    vae_loss = VAELoss(VAELossConfig(learn_logvar=True, logvar_init=0.5, kl_weight=0.0, disc_start=NEVER))
    assert vae_loss.generator_parameters() == [vae_loss.logvar] and vae_loss.logvar.requires_grad
    x = torch.zeros(2, 1, 2, 2)
    x_hat = rec.clone().requires_grad_(True)
    posterior = _posterior(torch.zeros(2, 1, 1, 1), torch.zeros(2, 1, 1, 1))
    total, logs = vae_loss.generator_loss(x, x_hat, posterior, step=0, last_layer=x_hat)
    assert total.item() == pytest.approx(4 * (3 / math.exp(0.5) + 0.5)) and logs["logvar"] == 0.5
    total.backward()
    # ∂/∂s Σ (rec·e^{−s} + s) / B = 4 · (1 − 3·e^{−0.5})
    assert vae_loss.logvar.grad.item() == pytest.approx(4 * (1 - 3 * math.exp(-0.5)), rel=1e-6)

    fixed = VAELoss(VAELossConfig(disc_channels=8))
    assert fixed.generator_parameters() == [] and not fixed.logvar.requires_grad
    assert "logvar" not in dict(fixed.named_parameters())


# --- the discriminator ----------------------------------------------------------------------------------------


def test_discriminator_loss_is_zero_and_skips_forward_before_start(vae, images):
    vae_loss = VAELoss(VAELossConfig(disc_start=10, disc_channels=8))
    calls = []
    vae_loss.discriminator.register_forward_hook(lambda *_: calls.append(1))
    x_hat = images.flip(-2).requires_grad_(True)

    loss, logs = vae_loss.discriminator_loss(images, x_hat, step=9)
    assert loss.item() == 0.0 and logs["d_loss"] == 0.0 and not loss.requires_grad
    _generator_step(vae, vae_loss, images, step=9)
    assert calls == [] and not vae_loss.adversarial_active(9)

    loss, logs = vae_loss.discriminator_loss(images, x_hat, step=10)
    assert calls and loss.item() > 0
    loss.backward()
    assert x_hat.grad is None  # the fake is detached for the discriminator step
    assert all(p.grad is not None for p in vae_loss.discriminator_parameters())


def test_patch_discriminator_shape_norm_and_init():
    torch.manual_seed(3)
    disc = PatchDiscriminator(DiscriminatorConfig(channels=64, n_layers=3))
    a, b = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    logits = disc(torch.cat([a, b]))
    assert logits.shape == (2, 1, 6, 6)  # 64 / 2³ − 2
    # per-sample normalisation: a sample's logits do not depend on the rest of the batch (accumulation-safe)
    torch.testing.assert_close(logits[:1], disc(a), rtol=1e-4, atol=1e-5)
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2)] * 3 + [(1, 1)] * 2 and all(c.kernel_size == (4, 4) for c in convs)
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in disc.modules()) == 3
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in disc.modules())
    weights = torch.cat([c.weight.flatten() for c in convs])
    assert weights.mean().abs() < 2e-3 and weights.std().item() == pytest.approx(0.02, rel=0.05)

    plain = PatchDiscriminator(DiscriminatorConfig(channels=8, n_layers=2, norm=DiscriminatorNorm.NONE))
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in plain.modules())
    assert plain(a).shape == (1, 1, 14, 14)  # 64 / 2² − 2


def test_trainable_state_roundtrip():
    torch.manual_seed(4)
    cfg = VAELossConfig(learn_logvar=True, logvar_init=0.25, disc_channels=8)
    a, b = VAELoss(cfg), VAELoss(cfg)
    with torch.no_grad():
        a.logvar.fill_(1.5)
    state = a.trainable_state_dict()
    assert all(k.startswith("discriminator.") or k == "logvar" for k in state)
    b.load_trainable_state_dict(state)
    assert b.logvar.item() == 1.5
    for (name, p), q in zip(a.discriminator.state_dict().items(), b.discriminator.state_dict().values()):
        assert torch.equal(p, q), name


def test_config_rejects_negative_weights():
    with pytest.raises(ValueError, match="kl_weight"):
        VAELossConfig(kl_weight=-1.0)
    with pytest.raises(ValueError, match="disc_start"):
        VAELossConfig(disc_start=-1)
