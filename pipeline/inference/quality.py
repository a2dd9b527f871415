"""Reconstruction quality and codebook statistics: PSNR, SSIM, LPIPS (when its weights are on
disk), codebook usage and perplexity.

Frames are float in [0, 1]: real frames as decoded, reconstructions clamped. Clips are
(B, C, T, H, W); the per-clip scores average over frames (and channels for SSIM).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
PSNR_MAX_DB = 100.0
"""PSNR of identical clips (MSE 0) is reported as this instead of infinity."""
LPIPS_TRUNK_FILE = "alexnet-owt-7be5be79.pth"
"""torchvision's AlexNet ImageNet weights, under the torch hub cache's checkpoints folder."""


def to_unit_range(video: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1], clamped, fp32."""
    return video.float().add(1.0).mul_(0.5).clamp_(0.0, 1.0)


def psnr_per_clip(real: Tensor, recon: Tensor) -> Tensor:
    """(B, ...) clips in [0, 1] -> (B,) PSNR in dB over every pixel of the clip."""
    mse = (real.float() - recon.float()).pow(2).flatten(1).mean(dim=1)
    floor = 10 ** (-PSNR_MAX_DB / 10)
    return -10 * torch.log10(mse.clamp(min=floor))


def psnr_frame_mean(real: Tensor, recon: Tensor) -> Tensor:
    """(B, C, T, H, W) clips in [0, 1] -> (B,) mean over frames of each frame's PSNR (dB): the
    convention of VidTok's evaluation, never below `psnr_per_clip` (Jensen)."""
    mse = (real.float() - recon.float()).pow(2).mean(dim=(1, 3, 4))  # (b, t)
    floor = 10 ** (-PSNR_MAX_DB / 10)
    return (-10 * torch.log10(mse.clamp(min=floor))).mean(dim=1)


def _gaussian_window(size: int, sigma: float, device: torch.device) -> Tensor:
    x = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
    window = torch.exp(-(x**2) / (2 * sigma**2))
    return window / window.sum()


def ssim_per_frame(real: Tensor, recon: Tensor) -> Tensor:
    """(N, C, H, W) frames in [0, 1] -> (N,) SSIM (Wang et al. 2004): 11-tap Gaussian window,
    sigma 1.5, K1 = 0.01, K2 = 0.03, population covariances, the mean of the SSIM map over the
    positions where the window fits (as scikit-image's `structural_similarity` with
    `gaussian_weights=True`) and over channels. Frames smaller than 11 px use the largest odd
    window that fits."""
    real, recon = real.float(), recon.float()
    channels, height, width = real.shape[1:]
    size = min(SSIM_WINDOW, height - 1 + height % 2, width - 1 + width % 2)
    window = _gaussian_window(size, SSIM_SIGMA, real.device)
    rows = window.view(1, 1, size, 1).expand(channels, 1, size, 1)
    cols = window.view(1, 1, 1, size).expand(channels, 1, 1, size)

    def blur(x: Tensor) -> Tensor:  # separable Gaussian, valid positions only
        return F.conv2d(F.conv2d(x, rows, groups=channels), cols, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = blur(real), blur(recon)
    var_x = blur(real * real) - mu_x**2
    var_y = blur(recon * recon) - mu_y**2
    cov = blur(real * recon) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return ssim_map.flatten(1).mean(dim=1)


def ssim_per_clip(real: Tensor, recon: Tensor) -> Tensor:
    """(B, C, T, H, W) clips in [0, 1] -> (B,) SSIM averaged over frames."""
    b, c, t, h, w = real.shape
    frames = lambda v: v.transpose(1, 2).reshape(b * t, c, h, w)  # noqa: E731
    return ssim_per_frame(frames(real), frames(recon)).view(b, t).mean(dim=1)


class CodeHistogram:
    """Counts of every code over an evaluation, per codebook; summed across ranks."""

    def __init__(self, codebook_size: int, num_codebooks: int, device: torch.device) -> None:
        self.codebook_size = codebook_size
        self.counts = torch.zeros(num_codebooks, codebook_size, dtype=torch.int64, device=device)

    def add(self, codes: Tensor) -> None:
        """codes (B, t, h, w) or (B, t, h, w, num_codebooks), on any device: counted where the
        histogram lives, in one scatter and without a host sync (`bincount` reads the maximum
        back to the host on CUDA)."""
        num_codebooks = self.counts.shape[0]
        per_codebook = codes.detach().reshape(-1, num_codebooks).to(self.counts.device)
        offsets = torch.arange(num_codebooks, device=self.counts.device) * self.codebook_size
        flat = (per_codebook.long() + offsets).reshape(-1)  # codebook i's codes at i * size
        ones = torch.ones((), dtype=self.counts.dtype, device=self.counts.device)
        self.counts.view(-1).index_add_(0, flat, ones.expand(flat.numel()))

    def usage(self) -> float:
        """Share of the codebook's entries used at least once (mean over codebooks)."""
        return float((self.counts > 0).double().mean(dim=1).mean())

    def perplexity(self) -> float:
        """exp(entropy) of the empirical code distribution, in codes (mean over codebooks): the
        number of equally used codes that would give the same entropy."""
        counts = self.counts.double()
        probs = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
        entropy = -(probs * probs.clamp(min=1e-300).log()).sum(dim=1)
        return float(entropy.exp().mean())


@dataclass(frozen=True)
class LpipsStatus:
    model: nn.Module | None
    note: str
    """Which weights were used, or why LPIPS is unavailable."""


def load_lpips(device: torch.device, trunk_weights: str | None = None) -> LpipsStatus:
    """LPIPS (AlexNet, v0.1) if the `lpips` package and AlexNet's ImageNet weights are on disk;
    never downloads. `trunk_weights` defaults to the torch hub cache's LPIPS_TRUNK_FILE."""
    try:
        import lpips
    except ImportError:
        return LpipsStatus(None, "unavailable: the lpips package is not installed")
    except RuntimeError as exc:  # lpips imports torchvision: one built for another torch
        return LpipsStatus(None, f"unavailable: importing lpips failed ({exc})")
    path = trunk_weights or os.path.join(torch.hub.get_dir(), "checkpoints", LPIPS_TRUNK_FILE)
    if not os.path.isfile(path):
        return LpipsStatus(
            None,
            f"unavailable: no AlexNet ImageNet weights at {path} (torchvision's "
            f"{LPIPS_TRUNK_FILE}; pass --lpips-weights; nothing is downloaded)",
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecated `pretrained` argument
        model = lpips.LPIPS(net="alex", version="0.1", pnet_rand=True, verbose=False)
    trunk = torch.load(path, map_location="cpu", weights_only=True)
    features = {k.removeprefix("features."): v for k, v in trunk.items() if "features." in k}
    slices = {}  # the lpips slices keep torchvision's layer indices as module names
    for slice_name, block in model.net.named_children():
        for index, _ in block.named_children():
            slices[index] = slice_name
    state = {f"{slices[k.split('.')[0]]}.{k}": v for k, v in features.items()}
    missing, unexpected = model.net.load_state_dict(state, strict=False)
    if missing or unexpected:
        return LpipsStatus(None, f"unavailable: {path} is not AlexNet ({missing[:4]})")
    return LpipsStatus(model.to(device).eval(), f"AlexNet v0.1 with trunk weights {path}")


def lpips_per_clip(model: nn.Module, real: Tensor, recon: Tensor) -> Tensor:
    """(B, C, T, H, W) in [0, 1] -> (B,) LPIPS averaged over frames (3-channel clips)."""
    b, c, t, h, w = real.shape
    frames = lambda v: v.transpose(1, 2).reshape(b * t, c, h, w) * 2 - 1  # noqa: E731
    with torch.no_grad():
        distance = model(frames(real), frames(recon))  # (b*t, 1, 1, 1)
    return distance.view(b, t).mean(dim=1).float()


def finite_mean(total: float, count: int) -> float:
    return total / count if count else math.nan
