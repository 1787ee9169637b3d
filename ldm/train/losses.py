"""The KL-autoencoder training losses (Rombach et al. 2022, §3 and App. G; Esser et al. 2021, §3.1).

The autoencoder is trained with a pixel reconstruction loss, a small KL pull of the posterior towards N(0, I),
optionally a perceptual (LPIPS-style, Zhang et al. 2018) distance, and — from step ``disc_start`` on — a patch
discriminator (Isola et al. 2017) with hinge losses, whose generator term is balanced against the reconstruction
term by the adaptive weight of Esser et al. 2021, eq. 7.

Every loss below is a pure function of tensors; :class:`VAELoss` owns the few learned or loaded pieces (the
perceptual backbone, the discriminator, the optional learned log-variance) and puts the terms together.

Shapes: images are (B, C, H, W) in [-1, 1]; discriminator logits are (B, 1, h, w).
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from torchvision.models.vgg import cfgs as _vgg_cfgs
from torchvision.models.vgg import make_layers as _vgg_make_layers

from ldm.errors import LdmError
from ldm.io import load_tensors, save_tensors

PERCEPTUAL_FLAG = "--set loss.perceptual_weights=FILE"  # how train_vae.py is given the backbone

# ---------------------------------------------------------------------------------------------------------------
# Reconstruction and KL
# ---------------------------------------------------------------------------------------------------------------


class Reconstruction(enum.Enum):
    """The pixel distance: L1 (as the LDM autoencoders are trained) or squared L2."""

    L1 = "l1"
    L2 = "l2"


def reconstruction_loss(
    x: torch.Tensor, x_hat: torch.Tensor, kind: Reconstruction = Reconstruction.L1, *, per_sample: bool = False
) -> torch.Tensor:
    """Pixel reconstruction error |x − x̂| (L1) or (x − x̂)² (L2) (Rombach et al. 2022, App. G).

    Returns the elementwise map (B, C, H, W), or with ``per_sample`` its mean over C, H, W: (B,).
    """
    if x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat differ in shape: {tuple(x.shape)} vs {tuple(x_hat.shape)}")
    diff = x_hat - x  # (B, C, H, W)
    rec = diff.abs() if kind is Reconstruction.L1 else diff.square()
    return rec.flatten(1).mean(1) if per_sample else rec


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) of a diagonal Gaussian, summed over all non-batch dims: (B,).

    Closed form of Kingma & Welling 2014, App. B: ½ Σ (μ² + σ² − 1 − log σ²).
    """
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)  # (B, c, h, w)
    return kl.flatten(1).sum(1)


def kl_loss(posterior) -> torch.Tensor:
    """The KL term of the KL-regularised autoencoder (Rombach et al. 2022, §3).

    Summed over latent dims, averaged over the batch: a scalar. ``posterior`` is diffusers' ``DiagonalGaussianDistribution`` (``vae.encode(x).latent_dist``), whose ``logvar`` is
    already clamped to [-30, 20]; its ``kl()`` is the same per-sample sum. A deterministic posterior gives 0.
    """
    if getattr(posterior, "deterministic", False):
        return posterior.mean.new_zeros(())
    return gaussian_kl(posterior.mean, posterior.logvar).mean()


def nll_loss(rec_map: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Reconstruction as a negative log-likelihood with one global learned log-scale s (Rombach et al. 2022 code).

    rec / exp(s) + s, i.e. a Laplace (for L1) or Gaussian (for L2) NLL up to constants and factors of 2, **summed**
    over C, H, W and **averaged** over the batch: a scalar. With s = 0 it is just Σ_pixels rec / B.
    ``rec_map`` is (B, C, H, W); ``logvar`` is a scalar tensor.
    """
    nll = rec_map / logvar.exp() + logvar  # (B, C, H, W)
    return nll.sum() / rec_map.shape[0]


# ---------------------------------------------------------------------------------------------------------------
# Perceptual distance (LPIPS-style, on VGG16)
# ---------------------------------------------------------------------------------------------------------------

# Inputs in [-1, 1] become (x − shift) / scale: the ImageNet statistics re-expressed for [-1, 1] (Zhang et al. 2018).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
# Indices into torchvision's vgg16().features of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, and their widths.
VGG16_TAPS = (3, 8, 15, 22, 29)
VGG16_TAP_CHANNELS = (64, 128, 256, 512, 512)


def perceptual_unavailable_message() -> str:
    """The sentence to print when training runs without the perceptual loss."""
    return (
        f"perceptual loss off: no backbone weights given ({PERCEPTUAL_FLAG}, a VGG16 safetensors file); "
        "training uses L1/L2 + KL only"
    )


def _weights_error(path: Path, problem: str) -> LdmError:
    return LdmError(
        f"perceptual weights {path}: {problem}; pass {PERCEPTUAL_FLAG} with a safetensors file of torchvision vgg16 "
        "'features.*' weights (optionally with LPIPS 'lin0.weight' … 'lin4.weight'), or leave it unset to train "
        "without the perceptual loss"
    )


class PerceptualLoss(nn.Module):
    """LPIPS-style perceptual distance (Zhang et al. 2018, eq. 1) on a frozen VGG16 feature backbone.

    For each tap l (after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3): unit-normalise the features along channels,
    take the squared difference, weight channels with the 1×1 "lin" layer w_l (as the released LPIPS lin layers do,
    i.e. on the squared difference; eq. 1 with w ← √w), average over space; sum over the taps: (B,).
    Without lin weights every channel weighs 1 (LPIPS's uncalibrated "baseline" variant).

    The backbone is frozen (no parameter here requires grad, and it stays in eval mode) but the distance is
    differentiable in its inputs: never call it under ``torch.no_grad()`` for the generator step.

    ``PerceptualLoss()`` has a *random* backbone, which measures nothing useful; use :meth:`from_file`.
    """

    def __init__(self):
        super().__init__()
        # The layout of torchvision's vgg16().features, so its state-dict keys load as they are; through relu5_3.
        features = _vgg_make_layers(_vgg_cfgs["D"])[: VGG16_TAPS[-1] + 1]
        for layer in features:
            if isinstance(layer, nn.ReLU):
                layer.inplace = False  # the tapped activations are read again later
        self.features = features
        for i, channels in enumerate(VGG16_TAP_CHANNELS):
            lin = nn.Conv2d(channels, 1, 1, bias=False)
            nn.init.ones_(lin.weight)
            self.add_module(f"lin{i}", lin)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:
        """Stays in eval mode whatever its parent does: the backbone is a fixed measuring instrument."""
        return super().train(False)

    def tapped_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) in [-1, 1] → the five channel-normalised feature maps (B, C_l, H_l, W_l)."""
        h = (x - self.shift) / self.scale
        taps = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in VGG16_TAPS:
                taps.append(h / (torch.linalg.vector_norm(h, dim=1, keepdim=True) + 1e-10))
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Distance between two (B, 3, H, W) batches in [-1, 1]: (B,)."""
        if x.shape != y.shape:
            raise ValueError(f"perceptual loss inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        total = x.new_zeros(x.shape[0], dtype=torch.float32)
        for i, (fx, fy) in enumerate(zip(self.tapped_features(x), self.tapped_features(y))):
            lin: nn.Conv2d = getattr(self, f"lin{i}")
            d = lin((fx - fy).square())  # (B, 1, H_l, W_l)
            total = total + d.float().mean((1, 2, 3))
        return total

    @classmethod
    def from_file(cls, path: str | Path) -> PerceptualLoss:
        """Load the backbone (and optionally the lin weights) from a safetensors file the user gives.

        Keys: torchvision vgg16's ``features.N.weight`` / ``features.N.bias`` (a whole vgg16 state dict works:
        ``classifier.*`` is ignored; bare ``N.weight`` from ``vgg16().features.state_dict()`` works too), and
        optionally ``lin0.weight`` … ``lin4.weight`` of shape (1, C_l, 1, 1) or (C_l,). Anything missing, extra or
        misshapen is an :class:`LdmError` that names it.
        """
        path = Path(path)
        if not path.is_file():
            raise _weights_error(path, "no such file" if not path.exists() else "not a file")
        try:
            tensors = load_tensors(path)
        except (SafetensorError, OSError, ValueError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise _weights_error(path, f"not a readable safetensors file ({reason})") from None

        module = cls()
        expected = module.state_dict()  # features.N.{weight,bias}, lin{i}.weight
        state: dict[str, torch.Tensor] = {}
        unexpected = []
        for key, value in tensors.items():
            if key.startswith("classifier."):
                continue
            name = key if key.startswith(("features.", "lin")) else f"features.{key}"
            if name not in expected:
                unexpected.append(key)
                continue
            if name.startswith("lin") and value.dim() == 1:
                value = value.view(1, -1, 1, 1)
            state[name] = value
        if unexpected:
            raise _weights_error(path, f"unexpected keys {_few(unexpected)} (not VGG16 features)")
        missing = [k for k in expected if k.startswith("features.") and k not in state]
        if missing:
            raise _weights_error(path, f"missing VGG16 keys {_few(missing)}")
        for name, value in state.items():
            if value.shape != expected[name].shape:
                raise _weights_error(
                    path, f"'{name}' has shape {tuple(value.shape)}, VGG16 needs {tuple(expected[name].shape)}"
                )
            if not value.is_floating_point() or not torch.isfinite(value).all():
                raise _weights_error(path, f"'{name}' is not finite floating-point data")
        module.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        return module

    def save(self, path: str | Path) -> Path:
        """Write the weights in the format :meth:`from_file` reads."""
        return save_tensors(path, self.state_dict())


def _few(keys: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(repr(k) for k in list(keys)[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


# ---------------------------------------------------------------------------------------------------------------
# Patch discriminator and adversarial losses
# ---------------------------------------------------------------------------------------------------------------


class DiscriminatorNorm(enum.Enum):
    """Normalisation inside the discriminator.

    GROUP (the default) normalises each sample on its own: the loss of a sample does not depend on what else is in
    the batch, so gradient accumulation over micro-batches equals one big batch, there are no running statistics to
    drift (BatchNorm's would be updated even by the generator step's fake-only forward) or to keep in a checkpoint,
    and train and eval behave alike. BatchNorm, which pix2pix and taming use, has none of these properties.
    """

    GROUP = "group"
    NONE = "none"


@dataclass(frozen=True, kw_only=True)
class DiscriminatorConfig:
    in_channels: int = 3
    channels: int = 64
    n_layers: int = 3  # stride-2 convs, first included; 3 gives the 70×70 receptive field of Isola et al.
    norm: DiscriminatorNorm = DiscriminatorNorm.GROUP

    def __post_init__(self):
        if self.in_channels < 1 or self.channels < 1 or self.n_layers < 1:
            raise ValueError("discriminator in_channels, channels and n_layers must be at least 1")


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017, §3.2.2 and App. 6.1.2): one real/fake logit per image patch.

    4×4 convs: n_layers with stride 2 (channels ×2 each, capped at 8×), one with stride 1, and a stride-1 conv to a
    single logit channel; LeakyReLU(0.2); no normalisation on the first conv. (B, 3, H, W) → (B, 1, h, w) logits,
    h = H / 2^n_layers − 2. Convs are initialised N(0, 0.02), norms' scales N(1, 0.02), biases 0.
    """

    def __init__(self, config: DiscriminatorConfig = DiscriminatorConfig()):
        super().__init__()
        self.config = config
        norm = config.norm is not DiscriminatorNorm.NONE

        def block(c_in: int, c_out: int, stride: int, normalise: bool) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 4, stride, 1, bias=not normalise)]
            if normalise:
                layers.append(nn.GroupNorm(math.gcd(32, c_out), c_out))
            return [*layers, nn.LeakyReLU(0.2)]

        widths = [config.channels * min(2**n, 8) for n in range(config.n_layers + 1)]
        layers = block(config.in_channels, widths[0], 2, False)
        for n in range(1, config.n_layers):
            layers += block(widths[n - 1], widths[n], 2, norm)
        layers += block(widths[config.n_layers - 1], widths[config.n_layers], 1, norm)
        layers.append(nn.Conv2d(widths[config.n_layers], 1, 4, 1, 1))
        self.layers = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # (B, 1, h, w)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss (Lim & Ye 2017; as used by Esser et al. 2021), halved as in their code.

    ½ · (mean(relu(1 − D(x))) + mean(relu(1 + D(x̂)))): a scalar; means over batch and patches.
    """
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adv_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN (Lim & Ye 2017; Esser et al. 2021): −mean(D(x̂)), over batch and patches."""
    return -logits_fake.mean()


def adaptive_weight(
    rec_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer_weight: torch.Tensor,
    *,
    max_weight: float = 1e4,
    eps: float = 1e-4,
    average: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Adaptive GAN weight λ = ‖∇_{G_L} L_rec‖ / (‖∇_{G_L} L_GAN‖ + δ) (Esser et al. 2021, eq. 7).

    Clamped to [0, max_weight] and detached. G_L is the decoder's last layer (``vae.decoder.conv_out.weight``). Both gradients are taken with
    ``retain_graph=True``, so the caller can still backpropagate the total loss. ``average`` (several processes: the
    mean across them) turns each process's gradients into the global batch's before the norms. Returns a scalar.
    """
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)
    if average is not None:
        rec_grad, g_grad = average(rec_grad), average(g_grad)
    weight = torch.linalg.vector_norm(rec_grad) / (torch.linalg.vector_norm(g_grad) + eps)
    return weight.clamp(0.0, max_weight).detach()


@contextlib.contextmanager
def _no_param_grads(module: nn.Module) -> Iterator[None]:
    """Gradients flow through ``module`` to its input but not into its parameters (restored afterwards)."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


# ---------------------------------------------------------------------------------------------------------------
# The whole autoencoder loss
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class VAELossConfig:
    reconstruction: Reconstruction = Reconstruction.L1
    kl_weight: float = 1e-6  # relative to the per-sample pixel *sum* of the reconstruction term, as in LDM
    perceptual_weight: float = 1.0  # used only when perceptual_weights is given
    perceptual_weights: str | None = None  # VGG16 safetensors file; None: no perceptual term
    disc_weight: float = 0.5
    disc_start: int = 50001  # first step at which the GAN terms are on
    disc_channels: int = 64
    disc_layers: int = 3
    disc_norm: DiscriminatorNorm = DiscriminatorNorm.GROUP
    learn_logvar: bool = False
    logvar_init: float = 0.0

    def __post_init__(self):
        for name in ("kl_weight", "perceptual_weight", "disc_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if self.disc_start < 0:
            raise ValueError(f"disc_start must be ≥ 0, got {self.disc_start}")

    @property
    def discriminator(self) -> DiscriminatorConfig:
        return DiscriminatorConfig(channels=self.disc_channels, n_layers=self.disc_layers, norm=self.disc_norm)


class VAELoss(nn.Module):
    """The autoencoder objective of Rombach et al. 2022 (App. G), after Esser et al. 2021.

    Generator (autoencoder) step::

        rec_map = |x − x̂| or (x − x̂)²                       (B, C, H, W)
                  + perceptual_weight · LPIPS(x, x̂)           (B,) broadcast onto every pixel, as in LDM
        nll     = Σ_{C,H,W} (rec_map / e^s + s) / B          sum over pixels, mean over batch; s = 0 unless learned
        total   = nll + kl_weight · KL                        KL: sum over latent dims, mean over batch
                  + [step ≥ disc_start] λ · disc_weight · (−mean D(x̂))   mean over batch, patches

    Discriminator step: ½ hinge on D(x) and D(x̂.detach()) from ``disc_start`` on; before, a constant 0.

    Optimisers: the autoencoder's parameters plus :meth:`generator_parameters` (the log-variance, if learned);
    :meth:`discriminator_parameters` for the discriminator. The generator step leaves no gradient in the
    discriminator, and nothing here ever gives the perceptual backbone a gradient.
    For checkpoints use :meth:`trainable_state_dict` (the backbone is the user's file and is not saved again).
    """

    def __init__(self, config: VAELossConfig = VAELossConfig(), *, perceptual: PerceptualLoss | None = None):
        super().__init__()
        self.config = config
        if perceptual is None and config.perceptual_weights is not None:
            perceptual = PerceptualLoss.from_file(config.perceptual_weights)
        self.perceptual = perceptual
        self.discriminator = PatchDiscriminator(config.discriminator)
        logvar = torch.tensor(float(config.logvar_init))
        if config.learn_logvar:
            self.logvar = nn.Parameter(logvar)
        else:
            self.register_buffer("logvar", logvar, persistent=False)

    @property
    def uses_perceptual(self) -> bool:
        return self.perceptual is not None and self.config.perceptual_weight > 0

    def adversarial_active(self, step: int) -> bool:
        """Whether the GAN terms are on at this step; before, skip the discriminator's backward and optimiser step."""
        return step >= self.config.disc_start

    def generator_parameters(self) -> list[nn.Parameter]:
        """Loss parameters trained alongside the autoencoder: the log-variance, if learned."""
        return [self.logvar] if self.config.learn_logvar else []

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return list(self.discriminator.parameters())

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint needs to resume: the discriminator and the learned log-variance."""
        state = {f"discriminator.{k}": v for k, v in self.discriminator.state_dict().items()}
        if self.config.learn_logvar:
            state["logvar"] = self.logvar.detach()
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        prefix = "discriminator."
        self.discriminator.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
        if self.config.learn_logvar:
            with torch.no_grad():
                self.logvar.copy_(state["logvar"])

    def generator_loss(
        self, x: torch.Tensor, x_hat: torch.Tensor, posterior, *, step: int, last_layer: torch.Tensor,
        average: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
        """The autoencoder's loss (see the class docstring for what is summed and what is averaged).

        ``x`` (B, C, H, W) the input, ``x_hat`` its reconstruction (with graph), ``posterior`` the encoder's
        ``latent_dist``, ``last_layer`` the weight of the decoder's last conv (``vae.decoder.conv_out.weight``).
        Where no gradient can be taken (under ``torch.no_grad()``, e.g. validation) the adaptive weight is 0.
        ``average``: see :func:`adaptive_weight` (several processes).
        Returns the scalar total and float logs.
        """
        rec = reconstruction_loss(x, x_hat, self.config.reconstruction)  # (B, C, H, W)
        logs = {"rec": rec.detach().mean().item()}
        if self.uses_perceptual:
            p = self.perceptual(x, x_hat)  # (B,)
            rec = rec + self.config.perceptual_weight * p.view(-1, 1, 1, 1).to(rec.dtype)
            logs["perceptual"] = p.detach().mean().item()
        nll = nll_loss(rec, self.logvar)  # scalar
        kl = kl_loss(posterior)  # scalar
        total = nll + self.config.kl_weight * kl
        logs |= {"nll": nll.item(), "kl": kl.item(), "logvar": self.logvar.item()}
        if self.adversarial_active(step):
            with _no_param_grads(self.discriminator):
                logits_fake = self.discriminator(x_hat)  # (B, 1, h, w)
            g_loss = generator_adv_loss(logits_fake)
            if torch.is_grad_enabled() and nll.requires_grad and g_loss.requires_grad:
                weight = adaptive_weight(nll, g_loss, last_layer, average=average)
            else:
                weight = g_loss.new_zeros(()).detach()
            total = total + self.config.disc_weight * weight * g_loss
            logs |= {"g_adv": g_loss.item(), "d_weight": weight.item()}
        logs["total"] = total.item()
        return total, logs

    def discriminator_loss(
        self, x: torch.Tensor, x_hat: torch.Tensor, *, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """½ hinge loss of the discriminator on real ``x`` and detached ``x_hat``: a scalar.

        Before ``disc_start`` it is a constant 0 with no graph and the discriminator is not run: skip its backward.
        """
        if not self.adversarial_active(step):
            return x.new_zeros((), dtype=torch.float32), {"d_loss": 0.0}
        logits = self.discriminator(torch.cat([x.detach(), x_hat.detach()]))  # (2B, 1, h, w); per-sample norm
        logits_real, logits_fake = logits.chunk(2)
        loss = hinge_d_loss(logits_real, logits_fake)
        return loss, {
            "d_loss": loss.item(),
            "logits_real": logits_real.detach().mean().item(),
            "logits_fake": logits_fake.detach().mean().item(),
        }
