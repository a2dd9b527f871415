"""The Fréchet distance between two feature sets (FID, FVD), in float64.

    d² = ‖μ_r − μ_f‖² + Tr(Σ_r + Σ_f − 2 (Σ_r Σ_f)^½)

Tr((Σ_r Σ_f)^½) is the sum of the square roots of the eigenvalues of Σ_r Σ_f, which are those of
the symmetric PSD matrix Σ_r^½ Σ_f Σ_r^½; computing them with `eigh` gives the trace that
`scipy.linalg.sqrtm(Σ_r @ Σ_f)` gives (StyleGAN-V, pytorch-fid, torch-fidelity) without complex
round-off or a scipy dependency. With fewer samples than features + 1 the covariances are singular:
the distance is still defined, but biased and not comparable with published numbers, so the result
carries a warning instead of hiding it. `FeatureMoments` accumulates the float64 count, sum and sum
of outer products instead of the features (as StyleGAN-V's FeatureStats), for evaluations too large
to keep every feature and for one all-reduce across ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pipeline.distributed.collectives import all_reduce_max, all_reduce_sum

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrechetResult:
    value: float
    num_real: int
    num_fake: int
    warning: str = ""
    """Empty, or why the value is not comparable (singular covariance, too few samples)."""


def mean_and_covariance(features: Tensor, unbiased: bool) -> tuple[Tensor, Tensor]:
    """(N, D) -> mean (D,) and covariance (D, D) in float64; `unbiased` divides by N - 1
    (numpy's np.cov: pytorch-fid, torch-fidelity), else by N (StyleGAN-V's FVD)."""
    x = features.detach().to("cpu", torch.float64)
    mean = x.mean(dim=0)
    centered = x - mean
    denominator = max(x.shape[0] - 1, 1) if unbiased else max(x.shape[0], 1)
    return mean, centered.T @ centered / denominator


def _psd_sqrt(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


class FeatureMoments:
    """Running count, sum and sum of outer products of (N, D) features in float64: the
    covariance without keeping the features, and summed across ranks with one all-reduce."""

    def __init__(self, width: int, device: torch.device | str = "cpu") -> None:
        self.width = width
        self.packed = torch.zeros(1 + width + width * width, dtype=torch.float64, device=device)
        """[count, sum (D), sum of x xᵀ (D·D)]: one tensor for the all-reduce."""

    def add(self, features: Tensor) -> None:
        x = features.detach().to(self.packed.device, torch.float64)
        if x.ndim != 2 or x.shape[1] != self.width:
            raise ValueError(f"expected (N, {self.width}) features, got {tuple(x.shape)}")
        d = self.width
        self.packed[0] += x.shape[0]
        self.packed[1 : 1 + d] += x.sum(dim=0)
        self.packed[1 + d :] += (x.T @ x).reshape(-1)

    @property
    def count(self) -> int:
        return int(self.packed[0])

    def mean_and_covariance(self, unbiased: bool) -> tuple[Tensor, Tensor]:
        """As `mean_and_covariance` of the features added."""
        d, n = self.width, max(self.count, 1)
        packed = self.packed.cpu()
        mean = packed[1 : 1 + d] / n
        scatter = packed[1 + d :].view(d, d) - n * torch.outer(mean, mean)
        return mean, scatter / (max(n - 1, 1) if unbiased else n)


def frechet_from_moments(
    real: FeatureMoments, fake: FeatureMoments, *, unbiased: bool = True
) -> FrechetResult:
    """`frechet_distance` of the features accumulated in `real` and `fake`."""
    mu_r, sigma_r = real.mean_and_covariance(unbiased)
    mu_f, sigma_f = fake.mean_and_covariance(unbiased)
    return _frechet(mu_r, sigma_r, mu_f, sigma_f, real.count, fake.count)


def frechet_distance(
    real: Tensor | np.ndarray, fake: Tensor | np.ndarray, *, unbiased: bool = True
) -> FrechetResult:
    """The Fréchet distance of two (N, D) feature sets, in float64.

    Args:
        real, fake: features, one row per sample (the counts may differ).
        unbiased: covariance over N - 1 (FID's convention) or N (StyleGAN-V's FVD).

    Returns:
        The distance, with a warning when a set has fewer than D + 1 samples (its covariance is
        singular) or fewer than 2.
    """
    real, fake = torch.as_tensor(real), torch.as_tensor(fake)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"expected two (N, D) feature sets, got {tuple(real.shape)}, {tuple(fake.shape)}"
        )
    mu_r, sigma_r = mean_and_covariance(real, unbiased)
    mu_f, sigma_f = mean_and_covariance(fake, unbiased)
    return _frechet(mu_r, sigma_r, mu_f, sigma_f, real.shape[0], fake.shape[0])


def _frechet(
    mu_r: Tensor, sigma_r: Tensor, mu_f: Tensor, sigma_f: Tensor, num_real: int, num_fake: int
) -> FrechetResult:
    width = mu_r.shape[0]
    root_r = _psd_sqrt(sigma_r)
    eigenvalues = torch.linalg.eigvalsh(root_r @ sigma_f @ root_r)
    trace_sqrt = eigenvalues.clamp(min=0).sqrt().sum()
    value = (mu_r - mu_f).square().sum() + sigma_r.trace() + sigma_f.trace() - 2 * trace_sqrt
    fewest = min(num_real, num_fake)
    warning = ""
    if fewest < 2:
        warning = f"{fewest} sample(s): no covariance, the distance compares means only"
    elif fewest < width + 1:
        warning = (
            f"{fewest} samples for {width}-d features: the covariance is singular (rank <= "
            f"{fewest - 1} < {width}), so the distance is biased and not comparable with "
            f"published numbers; use at least {width + 1} (thousands in the literature)"
        )
    return FrechetResult(float(value), num_real, num_fake, warning)


class FeatureSets:
    """One rank's feature moments of real and reconstructed clips for one Fréchet metric
    (moments rather than features: O(D²) memory however many clips or frames, and one
    all-reduce across ranks whatever each rank's count)."""

    def __init__(
        self,
        model: torch.nn.Module | None,
        extract: Callable[[torch.nn.Module, Tensor], Tensor],
        width: int,
        min_frames: int,
        device: torch.device,
    ) -> None:
        self.model, self.extract, self.min_frames = model, extract, min_frames
        self.real = FeatureMoments(width, device)
        self.recon = FeatureMoments(width, device)
        self.shortest = 0  # frames of the shortest clip seen below min_frames, 0 if none

    def add(self, real: Tensor, recon: Tensor) -> None:
        """(B, C, T, H, W) clips in [0, 1]."""
        if self.model is None:
            return
        frames = real.shape[2]
        if frames < self.min_frames:
            self.shortest = frames if not self.shortest else min(self.shortest, frames)
            return
        self.real.add(self.extract(self.model, real))
        self.recon.add(self.extract(self.model, recon))

    def distance(self, *, unbiased: bool, note: str, unit: str) -> tuple[float | None, str]:
        """Collective when a model is set (every rank has one or none): the distance over every
        rank's features and the note for the summary."""
        if self.model is None:
            return None, note or "not requested"
        short = self.real.packed.new_tensor([self.shortest])
        all_reduce_max(short)  # any too-short clip on any rank disables the metric everywhere
        if int(short):
            return None, (
                f"unavailable: clips of {int(short)} frame(s); the I3D needs at least "
                f"{self.min_frames} (pass --num-frames 17)"
            )
        all_reduce_sum(self.real.packed)
        all_reduce_sum(self.recon.packed)
        if self.real.count < 2:
            return None, f"unavailable: {self.real.count} {unit} evaluated, at least 2 are needed"
        result = frechet_from_moments(self.real, self.recon, unbiased=unbiased)
        if result.warning:
            logger.warning("Fréchet distance on %d %s: %s", result.num_real, unit, result.warning)
        parts = [
            note,
            f"on {result.num_real} {unit}",
            result.warning and f"warning: {result.warning}",
        ]
        return result.value, "; ".join(p for p in parts if p)
