"""Attention over space (per frame) and over time (per pixel, causal), and linear attention.

Softmax attention runs on `scaled_dot_product_attention`, which picks a fused kernel where one
exists (flash on GPU, a blocked kernel on CPU) instead of materialising the (n x n) score matrix.
Each attention layer owns a few learned "memory" key/value pairs that every query can attend to,
so a query always has somewhere to put its attention mass.

Legend: b batch, c channels, t/h/w video grid, n sequence, d head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.norm import AdaptiveRMSNorm, RMSNorm


def _prenorm(dim: int, dim_cond: int | None) -> nn.Module:
    return RMSNorm(dim) if dim_cond is None else AdaptiveRMSNorm(dim, dim_cond=dim_cond)


def _apply_norm(norm: nn.Module, x: Tensor, cond: Tensor | None) -> Tensor:
    if isinstance(norm, AdaptiveRMSNorm):
        if cond is None:
            raise ValueError("this layer is conditioned: cond must be given")
        return norm(x, cond)
    return norm(x)


class Attention(nn.Module):
    """Multi-head softmax attention over (rows, n, dim) with memory key/values."""

    def __init__(
        self,
        dim: int,
        *,
        dim_cond: int | None = None,
        causal: bool = False,
        dim_head: int = 32,
        heads: int = 8,
        dropout: float = 0.0,
        num_memory_kv: int = 4,
    ) -> None:
        super().__init__()
        if num_memory_kv < 1:
            raise ValueError(f"num_memory_kv must be >= 1, got {num_memory_kv}")
        self.heads, self.dim_head = heads, dim_head
        self.causal = causal
        self.dropout = dropout
        self.norm = _prenorm(dim, dim_cond)
        self.to_qkv = nn.Linear(dim, dim_head * heads * 3, bias=False)
        self.mem_kv = nn.Parameter(torch.randn(2, heads, num_memory_kv, dim_head))
        self.to_out = nn.Linear(dim_head * heads, dim, bias=False)

    def _causal_mask(self, seq_len: int, device: torch.device) -> Tensor:
        # True = may attend. Memory slots are always visible; real keys only up to the query.
        num_mem = self.mem_kv.shape[2]
        rows = torch.arange(seq_len, device=device)[:, None]
        cols = torch.arange(num_mem + seq_len, device=device)[None, :]
        return (cols < num_mem) | (cols - num_mem <= rows)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        rows, seq_len, _ = x.shape
        x = _apply_norm(self.norm, x, cond)
        qkv = self.to_qkv(x).view(rows, seq_len, 3, self.heads, self.dim_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (rows, heads, n, d)
        mem_k, mem_v = (m.to(q.dtype).expand(rows, -1, -1, -1) for m in self.mem_kv)
        k = torch.cat((mem_k, k), dim=2)
        v = torch.cat((mem_v, v), dim=2)
        mask = self._causal_mask(seq_len, x.device) if self.causal else None
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        out = out.transpose(1, 2).reshape(rows, seq_len, -1)
        return self.to_out(out)


class SpaceAttention(Attention):
    """Attention among the h*w positions of each frame."""

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        b, c, t, h, w = x.shape
        # contiguous for every t: with t = 1, reshape returns a strided view, on which norms and
        # matmuls round differently, and a frame's result would depend on the video's length.
        seq = x.permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c).contiguous()  # (b t) (h w) c
        out = super().forward(seq, cond)
        return out.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)  # (b, c, t, h, w)


class TimeAttention(Attention):
    """Causal attention along the frames of each pixel."""

    def __init__(self, dim: int, **kwargs) -> None:
        super().__init__(dim, causal=True, **kwargs)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        b, c, t, h, w = x.shape
        seq = x.permute(0, 3, 4, 2, 1).reshape(b * h * w, t, c)  # (b h w) t c
        out = super().forward(seq, cond)
        return out.view(b, h, w, t, c).permute(0, 4, 3, 1, 2)  # (b, c, t, h, w)


def taylor_feature_map(x: Tensor) -> Tensor:
    """phi(x) = [1, x, vec(x x^T) / sqrt(2)], so that phi(q).phi(k) = 1 + q.k + (q.k)^2 / 2,
    the second-order Taylor expansion of exp(q.k), as in Based (Arora et al., 2024)."""
    ones = x.new_ones(*x.shape[:-1], 1)
    second = (x[..., :, None] * x[..., None, :]).flatten(-2) * (0.5**0.5)
    return torch.cat((ones, x, second), dim=-1)


class LinearAttention(nn.Module):
    """Non-causal linear attention with the Taylor feature map, over (rows, n, dim).

    Cost is linear in n: keys and values are summarised into a (1 + d + d^2) x d state.
    """

    def __init__(
        self,
        dim: int,
        *,
        dim_cond: int | None = None,
        dim_head: int = 8,
        heads: int = 16,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.heads, self.dim_head, self.eps = heads, dim_head, eps
        self.norm = _prenorm(dim, dim_cond)
        self.to_q = nn.Linear(dim, dim_head * heads, bias=False)
        self.to_kv = nn.Linear(dim, dim_head * heads * 2, bias=False)
        self.to_out = nn.Linear(dim_head * heads, dim, bias=False)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        rows, seq_len, _ = x.shape
        x = _apply_norm(self.norm, x, cond)
        q = self.to_q(x).view(rows, seq_len, self.heads, self.dim_head).transpose(1, 2)
        kv = self.to_kv(x).view(rows, seq_len, 2, self.heads, self.dim_head)
        k, v = kv.permute(2, 0, 3, 1, 4)  # each (rows, heads, n, d)
        q = taylor_feature_map(q * self.dim_head**-0.5)
        k = taylor_feature_map(k)
        state = k.transpose(-1, -2) @ v  # (rows, heads, 1+d+d^2, d)
        normaliser = q @ k.sum(dim=2, keepdim=True).transpose(-1, -2)  # (rows, heads, n, 1)
        out = (q @ state) / normaliser.clamp(min=self.eps)
        out = out.transpose(1, 2).reshape(rows, seq_len, -1)
        return self.to_out(out)


class LinearSpaceAttention(LinearAttention):
    """Linear attention among the h*w positions of each frame; accepts videos or images."""

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        is_image = x.ndim == 4
        if is_image:
            x = x.unsqueeze(2)
        b, c, t, h, w = x.shape
        seq = x.permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c).contiguous()  # as SpaceAttention
        out = super().forward(seq, cond)
        out = out.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)
        return out.squeeze(2) if is_image else out
