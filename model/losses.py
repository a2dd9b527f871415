"""GAN and perceptual losses: hinge and non-saturating losses, gradient penalty, LeCAM
regularisation, adaptive adversarial weight, and the VGG16 perceptual loss.

The VGG16 is frozen, always in eval mode (no dropout in the loss), and held outside the module
tree: it is never in a state dict, never handed to an optimizer, never cast or partitioned by a
training engine. Its ImageNet weights are read from a local file or the torch hub cache; nothing
is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VGG16_CHECKPOINT_NAME = "vgg16-397923af.pth"  # torchvision's IMAGENET1K_V1 file name
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def hinge_discr_loss(fake_logits: Tensor, real_logits: Tensor) -> Tensor:
    return (F.relu(1 + fake_logits) + F.relu(1 - real_logits)).mean()


def hinge_gen_loss(fake_logits: Tensor) -> Tensor:
    return -fake_logits.mean()


def non_saturating_discr_loss(fake_logits: Tensor, real_logits: Tensor) -> Tensor:
    """-log sigmoid(D(real)) - log(1 - sigmoid(D(fake))), i.e. softplus(-real) + softplus(fake)."""
    return (F.softplus(-real_logits) + F.softplus(fake_logits)).mean()


def non_saturating_gen_loss(fake_logits: Tensor) -> Tensor:
    """-log sigmoid(D(fake)) = softplus(-D(fake)) (Goodfellow et al. 2014): its gradient does
    not vanish when the discriminator confidently rejects the fakes."""
    return F.softplus(-fake_logits).mean()


GEN_LOSSES = {"hinge": hinge_gen_loss, "non_saturating": non_saturating_gen_loss}
DISCR_LOSSES = {"hinge": hinge_discr_loss, "non_saturating": non_saturating_discr_loss}


def lecam_regularizer(
    real_logits: Tensor, fake_logits: Tensor, ema_real: Tensor, ema_fake: Tensor
) -> Tensor:
    """LeCAM (Tseng et al. 2021): mean(relu(D(real) - ema_fake)^2) + mean(relu(ema_real -
    D(fake))^2), with `ema_real` / `ema_fake` the moving averages of the discriminator's mean
    logits (the form of the authors' code; the paper writes the squares without the relu).
    Anchoring the logits to each other's averages keeps the discriminator from separating real
    and fake without bound when data are scarce."""
    return (
        F.relu(real_logits - ema_fake).pow(2).mean() + F.relu(ema_real - fake_logits).pow(2).mean()
    )


def gradient_penalty(inputs: Tensor, logits: Tensor) -> Tensor:
    """E ||d logits / d inputs||^2 (R1-style; needs `inputs.requires_grad`)."""
    (grads,) = torch.autograd.grad(
        outputs=logits, inputs=inputs, grad_outputs=torch.ones_like(logits), create_graph=True
    )
    return grads.float().flatten(1).norm(2, dim=1).pow(2).mean()


def adaptive_adversarial_weight(
    perceptual_grad_norm: Tensor, adversarial_grad_norm: Tensor, *, max_weight: float = 1e3
) -> Tensor:
    """Scales the adversarial loss so its gradient at the last decoder layer matches the
    perceptual loss's (VQGAN, Esser et al. 2021): keeps the GAN from dominating early training."""
    weight = perceptual_grad_norm / adversarial_grad_norm.clamp(min=1e-3)
    weight = weight.clamp(max=max_weight)
    return torch.where(torch.isfinite(weight), weight, torch.ones_like(weight))


class VGGWeightsNotFoundError(FileNotFoundError):
    pass


def vgg16_cache_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_CHECKPOINT_NAME


def load_vgg16(weights: str | Path | None = None) -> nn.Module:
    """torchvision VGG16 with ImageNet weights from `weights` or the torch hub cache."""
    try:  # only here: training without the perceptual loss needs no torchvision
        import torchvision
    except (ImportError, RuntimeError) as error:  # a build for another torch raises RuntimeError
        raise ImportError(
            f"The perceptual loss needs torchvision built for this torch ({torch.__version__}), "
            f"and importing it failed: {error}. Install the matching torchvision, or pass "
            "vgg=<an nn.Module>, or set perceptual_loss_weight=0."
        ) from error

    path = Path(weights) if weights is not None else vgg16_cache_path()
    if not path.is_file():
        raise VGGWeightsNotFoundError(
            f"The perceptual loss needs ImageNet VGG16 weights, and none were found at {path} "
            "(nothing is downloaded). Provide them in one of these ways:\n"
            f"  - put torchvision's {VGG16_CHECKPOINT_NAME} at {vgg16_cache_path()} (on a machine "
            'with internet: python -c "import torchvision; '
            "torchvision.models.vgg16(weights='IMAGENET1K_V1')\" writes it to the torch cache),\n"
            "  - pass vgg_weights='/path/to/vgg16.pth' (a torchvision VGG16 state dict),\n"
            "  - pass vgg=<an nn.Module> mapping (B, 3, H, W) frames to features,\n"
            "  - or set perceptual_loss_weight=0 to train without the perceptual loss."
        )
    # Built on the meta device and filled by assignment: no random initialisation, so loading
    # neither costs time nor draws from the global RNG (which would shift a run's randomness).
    with torch.device("meta"):
        vgg = torchvision.models.vgg16(weights=None)
    vgg.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), assign=True)
    return vgg


def vgg16_fc7_features(vgg: nn.Module) -> nn.Module:
    """VGG16 up to fc7 + ReLU: the features magvit2-pytorch's perceptual loss compares."""
    return nn.Sequential(vgg.features, vgg.avgpool, nn.Flatten(1), *list(vgg.classifier)[:5])


class PerceptualLoss(nn.Module):
    """MSE between VGG16 fc7 features of real and reconstructed frames.

    Frames in [-1, 1] are mapped to ImageNet statistics first (the reference feeds raw [-1, 1]
    pixels to a network trained on normalised [0, 1] images). The network is loaded on first use,
    so a tokenizer built for inference never needs VGG weights; call `load()` to fail early.
    """

    def __init__(self, *, weights: str | Path | None = None, network: nn.Module | None = None):
        super().__init__()
        self.weights = weights
        self.register_buffer(
            "mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._holder: list[nn.Module] = []  # a list keeps the network out of the module tree
        if network is not None:
            self.set_network(network)

    def set_network(self, network: nn.Module) -> None:
        """Use `network` (frames -> features) instead of loading VGG16."""
        network.eval().requires_grad_(False)
        self._holder[:] = [network]

    def load(self) -> nn.Module:
        if not self._holder:
            self.set_network(vgg16_fc7_features(load_vgg16(self.weights)))
        return self._holder[0]

    def features(self, frames: Tensor) -> Tensor:
        if min(frames.shape[-2:]) < 32:
            raise ValueError(
                f"the VGG16 perceptual loss needs frames of at least 32x32 (five 2x poolings), got "
                f"{frames.shape[-2]}x{frames.shape[-1]}; set perceptual_loss_weight=0 for smaller"
            )
        network = self.load()
        if frames.shape[1] == 1:
            frames = frames.expand(-1, 3, -1, -1)
        elif frames.shape[1] == 4:
            frames = frames[:, :3]
        network.to(device=frames.device, dtype=frames.dtype)
        frames = ((frames + 1) / 2 - self.mean.to(frames.dtype)) / self.std.to(frames.dtype)
        return network(frames)

    def forward(self, real: Tensor, fake: Tensor) -> Tensor:
        with torch.no_grad():
            real_features = self.features(real)
        return F.mse_loss(self.features(fake).float(), real_features.float())
