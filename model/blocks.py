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
        b, c, t, h, w = x.shape
        flat = x.reshape(b, c, t, h * w)
        logits = torch.einsum("bctn,c->btn", flat, self.to_k.weight[0]) + self.to_k.bias
        context = torch.einsum("btn,bctn->btc", logits.softmax(dim=-1), flat)  # (b, t, c)
        gates = torch.sigmoid(self.out(F.leaky_relu(self.hidden(context), 0.1)))
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
        b, c, t, h, w = x.shape
        seq = x.permute(0, 3, 4, 2, 1).reshape(b * h * w, t, c)
        out, _ = self.gate_loop(seq)
        return x + out.view(b, h, w, t, c).permute(0, 4, 3, 1, 2)
