"""Feature networks for rFVD and rFID, from local files only (nothing is downloaded).

rFVD: the TorchScript I3D (Kinetics-400) that StyleGAN-V published and fvd-comparison checked
against the TensorFlow FVD reference (`i3d_torchscript.pt`, default
`$TORCH_HOME/hub/checkpoints/i3d_torchscript.pt`). It is called as
`detector(x, rescale=False, resize=False, return_features=True)` on x float32 (N, 3, T, 224, 224)
in [-1, 1] and returns (N, 400): the Kinetics-400 logits before the softmax, averaged over time
(TF-Hub's "RGB/inception_i3d/Mean:0", the FVD embedding). The preprocessing is the TF reference's
(google-research frechet_video_distance `preprocess`), done here rather than inside the network:
frames quantized to uint8 as a saved video would be, each frame resized to 224 × 224 by bilinear
interpolation (align_corners=False, no antialiasing), then 2·x/255 − 1. StyleGAN-V's training code
instead passes uint8 clips with `rescale=True, resize=True` and lets the network do the same two
steps. The I3D needs at least I3D_MIN_FRAMES frames: time is strided by 8 before an average pool
of 2 frames. The covariance divides by N, as StyleGAN-V's FeatureStats.

rFID: torch-fidelity's InceptionV3 (the 2015-12-05 TF graph of pytorch-fid and the FID paper),
pool features (2048-d) of every frame, weights `weights-inception-2015-12-05-6726825d.pth`
(default under `$TORCH_HOME/hub/checkpoints/`, where torch-fidelity caches it); it takes uint8
frames and resizes them to 299 itself. The covariance divides by N - 1, as torch-fidelity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

I3D_FILE = "i3d_torchscript.pt"
I3D_FEATURES = 400
I3D_SIZE = 224
I3D_MIN_FRAMES = 9
"""ceil(T / 8) >= 2 for the I3D's last temporal average pool (kernel 2 after strides 2, 2, 2)."""
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_FEATURES = 2048


@dataclass(frozen=True)
class FeatureNet:
    model: nn.Module | None
    note: str
    """Which weights were used, or 'unavailable: <why and the fix>'."""


def default_weights_path(file_name: str) -> str:
    """`$TORCH_HOME/hub/checkpoints/<file_name>` (torch.hub's cache)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", file_name)


def to_uint8(video: Tensor) -> Tensor:
    """[0, 1] -> uint8 in {0, ..., 255}, rounded (as the frames of a written video)."""
    return video.float().mul(255).round_().clamp_(0, 255).to(torch.uint8)


def i3d_input(video: Tensor) -> Tensor:
    """(B, C, T, H, W) in [0, 1] -> (B, 3, T, 224, 224) float in [-1, 1] (grey repeated to 3)."""
    b, c, t, h, w = video.shape
    frames = to_uint8(video).float().transpose(1, 2).reshape(b * t, c, h, w)
    if (h, w) != (I3D_SIZE, I3D_SIZE):
        frames = F.interpolate(
            frames, size=(I3D_SIZE, I3D_SIZE), mode="bilinear", align_corners=False
        )
    frames = frames.view(b, t, c, I3D_SIZE, I3D_SIZE).transpose(1, 2)
    if c == 1:
        frames = frames.expand(-1, 3, -1, -1, -1)
    return (2 * frames / 255 - 1).contiguous()


def i3d_features(model: nn.Module, video: Tensor) -> Tensor:
    """(B, C, T, H, W) in [0, 1] -> (B, 400) float32 features."""
    with torch.no_grad():
        out = model(i3d_input(video), rescale=False, resize=False, return_features=True)
    return out.float()


def load_i3d(device: torch.device, path: str | None = None) -> FeatureNet:
    """The TorchScript I3D from `path` (default: the torch hub cache's I3D_FILE), checked on a
    probe clip of I3D_MIN_FRAMES frames before any evaluation work."""
    path = path or default_weights_path(I3D_FILE)
    if not os.path.isfile(path):
        return FeatureNet(
            None,
            f"unavailable: no I3D at {path} (StyleGAN-V's TorchScript {I3D_FILE}; pass "
            "--i3d-weights PATH, or eval_i3d_weights in a training config, or put it there; "
            "nothing is downloaded)",
        )
    try:
        model = torch.jit.load(path, map_location=device).eval()
    except (RuntimeError, ValueError) as exc:
        return FeatureNet(None, f"unavailable: {path} is not a TorchScript file ({exc})")
    probe = torch.zeros(1, 3, I3D_MIN_FRAMES, I3D_SIZE, I3D_SIZE, device=device)
    try:
        with torch.no_grad():
            out = model(probe, rescale=False, resize=False, return_features=True)
    except Exception as exc:  # noqa: BLE001 - any failure of a foreign network is a reason
        return FeatureNet(
            None,
            f"unavailable: {path} fails on a (1, 3, {I3D_MIN_FRAMES}, 224, 224) probe called "
            f"with rescale=False, resize=False, return_features=True ({type(exc).__name__}: "
            f"{str(exc)[:200]})",
        )
    if not isinstance(out, Tensor) or tuple(out.shape) != (1, I3D_FEATURES):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        return FeatureNet(
            None, f"unavailable: {path} returns {shape} on a probe clip, not (1, {I3D_FEATURES})"
        )
    return FeatureNet(model, f"I3D (Kinetics-400, TorchScript) from {path}")


def load_inception(device: torch.device, path: str | None = None) -> FeatureNet:
    """torch-fidelity's InceptionV3 pool features from `path` (default: the torch hub cache's
    INCEPTION_FILE), if torch-fidelity is installed."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        return FeatureNet(
            None, "unavailable: torch-fidelity is not installed (pip install '.[fid]')"
        )
    path = path or default_weights_path(INCEPTION_FILE)
    if not os.path.isfile(path):
        return FeatureNet(
            None,
            f"unavailable: no InceptionV3 weights at {path} (torch-fidelity's {INCEPTION_FILE};"
            " pass --inception-weights PATH, or eval_inception_weights in a training config, or "
            "put it there; nothing is downloaded)",
        )
    try:
        model = FeatureExtractorInceptionV3(
            "inception-v3-compat", [str(INCEPTION_FEATURES)], feature_extractor_weights_path=path
        )
    except (RuntimeError, KeyError, ValueError, OSError) as exc:  # wrong keys, not a state dict
        return FeatureNet(
            None, f"unavailable: {path} is not InceptionV3 FID weights ({str(exc)[:200]})"
        )
    return FeatureNet(model.to(device), f"InceptionV3 (torch-fidelity, pool 2048) from {path}")


def inception_features(model: nn.Module, video: Tensor) -> Tensor:
    """(B, C, T, H, W) in [0, 1] -> (B * T, 2048) float32 features, one row per frame."""
    b, c, t, h, w = video.shape
    frames = to_uint8(video).transpose(1, 2).reshape(b * t, c, h, w)
    if c == 1:
        frames = frames.expand(-1, 3, -1, -1)
    with torch.no_grad():
        (out,) = model(frames.contiguous())
    return out.float()
