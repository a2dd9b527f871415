"""Building blocks of the encoder and decoder: residual units, global-context squeeze-excite,
gated feed-forward, token shift and the gate-loop time mixer.

Video tensors are (B, C, T, H, W); images (B, C, H, W) where a block accepts both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.conv import CausalConv3d, Conv3DMod
from model.norm import AdaptiveRMSNorm, RMSNorm


def _linear_per_row(layer: nn.Linear, x: Tensor) -> Tensor:
    """layer(x) as a product and a sum over the last axis. A GEMM with few rows (here one per
    frame) rounds a row differently depending on the number of rows; this does not."""
    return (x.unsqueeze(-2) * layer.weight).sum(dim=-1) + layer.bias


class SqueezeExcite(nn.Module):
    """Global-context gating (GCNet, Cao et al. 2019): each frame is pooled with a learned
    spatial softmax, and the pooled vector gates the channels of that frame.

    Starts almost closed (bias -10), so a fresh residual unit is close to the identity.
    """

    def __init__(self, dim: int, *, dim_hidden_min: int = 16, init_bias: float = -10.0) -> None:
        super().__init__()
        dim_hidden = max(dim_hidden_min, dim // 2)
        self.to_k = nn.Linear(dim, 1)
        self.hidden = nn.Linear(dim, dim_hidden)
        self.out = nn.Linear(dim_hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.constant_(self.out.bias, init_bias)

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        # A 1x1 conv and a reduction over the innermost axis rather than einsum: einsum's
        # contraction plan (and so the rounding of a frame's result) changes with the number of
        # frames, which chunked encoding must not notice.
        logits = F.conv3d(x, self.to_k.weight.view(1, c, 1, 1, 1), self.to_k.bias)
        weights = logits.flatten(3).softmax(dim=-1)  # (b, 1, t, h*w)
        context = (x.flatten(3) * weights).sum(dim=-1).transpose(1, 2)  # (b, t, c)
        hidden = F.leaky_relu(_linear_per_row(self.hidden, context), 0.1)
        gates = torch.sigmoid(_linear_per_row(self.out, hidden))
        return x * gates.transpose(1, 2)[..., None, None]  # (b, c, t, 1, 1) gates


class ResidualUnit(nn.Module):
    """x + SE(ELU(conv1x1(ELU(causal_conv(x)))))."""

    def __init__(self, dim: int, kernel_size: tuple[int, int, int], pad_mode: str = "constant"):
        super().__init__()
        self.conv = CausalConv3d(dim, dim, kernel_size, pad_mode=pad_mode)
        self.conv_1x1 = nn.Conv3d(dim, dim, 1)
        self.squeeze_excite = SqueezeExcite(dim)

    def forward(self, x: Tensor) -> Tensor:
        out = F.elu(self.conv_1x1(F.elu(self.conv(x))))
        return x + self.squeeze_excite(out)


class ResidualStack(nn.Sequential):
    """`residual` (one unit) or `consecutive_residual` (n units)."""

    def __init__(self, dim: int, kernel_size: tuple[int, int, int], num_units: int = 1) -> None:
        super().__init__(*(ResidualUnit(dim, kernel_size) for _ in range(num_units)))


class CondResidualUnit(nn.Module):
    """Residual unit whose causal conv is modulated by the conditioning vector (StyleGAN2)."""

    def __init__(
        self,
        dim: int,
        kernel_size: tuple[int, int, int],
        *,
        dim_cond: int,
        pad_mode: str = "constant",
        demod: bool = True,
    ) -> None:
        super().__init__()
        kt, kh, kw = kernel_size
        if kh != kw:
            raise ValueError(f"cond_residual needs square spatial kernels, got {kernel_size}")
        self.to_cond = nn.Linear(dim_cond, dim)
        self.conv = Conv3DMod(
            dim, spatial_kernel=kh, time_kernel=kt, demod=demod, pad_mode=pad_mode
        )
        self.conv_1x1 = nn.Conv3d(dim, dim, 1)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        out = F.elu(self.conv(x, self.to_cond(cond)))
        return x + F.elu(self.conv_1x1(out))


class FeedForward(nn.Module):
    """Channel-first RMSNorm, then a GEGLU MLP as 1x1 convs (video or image input)."""

    def __init__(
        self, dim: int, *, dim_cond: int | None = None, mult: float = 4, images: bool = False
    ) -> None:
        super().__init__()
        conv = nn.Conv2d if images else nn.Conv3d
        dim_inner = int(dim * mult * 2 / 3)
        if dim_cond is None:
            self.norm: nn.Module = RMSNorm(dim, channel_first=True)
        else:
            self.norm = AdaptiveRMSNorm(dim, dim_cond=dim_cond, channel_first=True)
        self.proj_in = conv(dim, dim_inner * 2, 1)
        self.proj_out = conv(dim_inner, dim, 1)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        if isinstance(self.norm, AdaptiveRMSNorm):
            if cond is None:
                raise ValueError("this feed-forward is conditioned: cond must be given")
            x = self.norm(x, cond)
        else:
            x = self.norm(x)
        x, gate = self.proj_in(x).chunk(2, dim=1)
        return self.proj_out(F.gelu(gate) * x)


def token_shift(x: Tensor) -> Tensor:
    """Shifts the second half of the channels one frame into the future (RWKV token shift):
    each frame sees half of its own features and half of the previous frame's."""
    keep, shift = x.chunk(2, dim=1)
    shift = F.pad(shift, (0, 0, 0, 0, 1, -1))
    return torch.cat((keep, shift), dim=1)


class GateLoop(nn.Module):
    """Simplified GateLoop (Katsch 2023) over (rows, n, dim): h_t = a_t * h_{t-1} + kv_t,
    out_t = q_t * h_t, with data-controlled forget gates a_t = sigmoid(.)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkva = nn.Linear(dim, dim * 3, bias=False)

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        q, kv, a = self.to_qkva(self.norm(x)).chunk(3, dim=-1)
        a = a.sigmoid()
        # A sequential scan: the time axis is short (latent frames), so this is cheaper and
        # exact compared with a parallel scan, and it carries its state across chunks.
        hidden = []
        h = state if state is not None else torch.zeros_like(kv[:, 0])
        for i in range(x.shape[1]):
            h = torch.addcmul(kv[:, i], a[:, i], h)
            hidden.append(h)
        return q * torch.stack(hidden, dim=1), h


class GateLoopTime(nn.Module):
    """Residual gate loop along the frames of each pixel."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gate_loop = GateLoop(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.step(x)[0]

    def step(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The forward pass continued from `state` (the hidden state after the previous frames,
        (b*h*w, c)); returns the output and the state after the last frame. Chunked encoding
        (model/streaming.py) carries the state from one chunk to the next."""
        b, c, t, h, w = x.shape
        seq = x.permute(0, 3, 4, 2, 1).reshape(b * h * w, t, c)
        out, state = self.gate_loop(seq, state)
        return x + out.view(b, h, w, t, c).permute(0, 4, 3, 1, 2), state
