"""Lookup-free (LFQ, MAGVIT-v2) and finite-scalar (FSQ) quantization.

Both quantize channel-first latents (B, D, t, h, w) into codes (B, t, h, w) — or (B, t, h, w, c)
with c > 1 codebooks — and back. Quantization and its losses always run in fp32 (autocast off):
the sign and rounding decisions and the entropy terms are too sensitive for bf16/fp16.

Index conventions (magvit2-pytorch / vector-quantize-pytorch compatible):
- LFQ: bit d of a code is (x_d > 0); channel 0 is the most significant bit.
- FSQ: mixed radix over the levels with dim 0 the least significant digit.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import TokenizerConfig
from model.precision import ieee_fp32

# The (rows x codes) block of probabilities the chunked batch entropy holds at once. On CPUs
# 2**24 elements (64 MiB; about 200 MiB of temporaries) ran 0.74x the time of 2**22 and as fast
# as 2**26 (benchmarks/bench_lfq_entropy.py, 10 240 rows x 2**18 codes). On GPUs each block
# costs a handful of kernel launches whatever its size, so the block grows with the free memory:
# at 2**18 codes, 2**22 elements (16 rows) meant ~640 blocks each way per micro-step.
CPU_PROBABILITY_BLOCK_ELEMENTS = 1 << 24
MAX_PROBABILITY_BLOCK_ELEMENTS = 1 << 28  # 1 GiB of fp32 probabilities
_BLOCK_TEMPORARIES = 4  # fp32 (rows, codes) tensors alive at once: logits, probs, weighted, grad
_FREE_MEMORY_SHARE = 16  # a block takes at most 1/16 of the device's free memory


@functools.cache
def probability_block_elements(device: torch.device) -> int:
    """How many (row, code) probabilities the batch entropy computes per block on `device`.
    Read once per device and process (the free memory at the first training forward): no
    driver query on every forward, and the same block, so the same rounding, all run long."""
    if device.type != "cuda":
        return CPU_PROBABILITY_BLOCK_ELEMENTS
    free_bytes, _ = torch.cuda.mem_get_info(device)
    budget = free_bytes // (_FREE_MEMORY_SHARE * _BLOCK_TEMPORARIES * 4)
    return int(min(MAX_PROBABILITY_BLOCK_ELEMENTS, max(CPU_PROBABILITY_BLOCK_ELEMENTS, budget)))


class QuantizerLossBreakdown(NamedTuple):
    per_sample_entropy: Tensor
    batch_entropy: Tensor
    commitment: Tensor


class QuantizerOutput(NamedTuple):
    quantized: Tensor
    """(B, D, ...) quantized latents, straight-through gradients in training."""
    codes: Tensor
    """(B, ...) integer indices, or (B, ..., num_codebooks)."""
    aux_loss: Tensor
    """Scalar: weighted entropy and commitment losses (0 for FSQ)."""
    breakdown: QuantizerLossBreakdown | None


def _activation(name: str) -> nn.Module:
    return {
        "identity": nn.Identity,
        "tanh": nn.Tanh,
        "silu": nn.SiLU,
        "elu": nn.ELU,
        "gelu": nn.GELU,
    }[name]()


def entropy(probs: Tensor) -> Tensor:
    """-sum p log p over the last dim; 0 log 0 = 0 with a finite gradient (unused codes of a
    large codebook underflow to exactly 0)."""
    return -(probs * probs.clamp(min=torch.finfo(probs.dtype).tiny).log()).sum(dim=-1)


def fp32_linear(layer: nn.Module, x: Tensor) -> Tensor:
    """Applies a Linear (or Identity) in fp32 even when the module was cast to bf16/fp16, as
    DeepSpeed's bf16/fp16 engines do to every parameter."""
    if isinstance(layer, nn.Linear):
        return F.linear(
            x, layer.weight.float(), layer.bias.float() if layer.bias is not None else None
        )
    return x


def binary_entropy_from_logits(z: Tensor) -> Tensor:
    """H(sigmoid(z)) in nats, exact and stable for any z: softplus(z) - z * sigmoid(z)."""
    return F.softplus(z) - z * torch.sigmoid(z)


class _MeanCodeProbabilities(torch.autograd.Function):
    """Mean over rows of p(code | row) for all 2**D codes, with p factorised over bits:
    log p(c | z) = sum_d (bit_cd * z_d - softplus(z_d)), where z_d is the logit of bit d.

    The (rows x 2**D) probability matrix is built and reduced one block of rows at a time, in the
    forward pass and again in the backward pass, so memory is O(block + 2**D) instead of
    O(rows x 2**D) — the difference between fitting and not fitting an 18-bit codebook.
    """

    @staticmethod
    def forward(ctx, z: Tensor, bits: Tensor, on_off: Tensor, block_rows: int) -> Tensor:
        with ieee_fp32(z.device.type):
            return _MeanCodeProbabilities._forward(ctx, z, bits, on_off, block_rows)

    @staticmethod
    def _forward(ctx, z: Tensor, bits: Tensor, on_off: Tensor, block_rows: int) -> Tensor:
        # z: (rows, groups, D) logits; bits: (codes, D) in {0, 1}; on_off: (2D, codes) the bits
        # and their complements; returns (groups, codes)
        log_sigmoids = _log_sigmoids(z)
        if z.shape[0] <= block_rows:  # one block: keep it for backward instead of recomputing
            probs = _probabilities(log_sigmoids, on_off)
            ctx.save_for_backward(z, bits, on_off, probs)
            return probs.mean(dim=0)
        total = z.new_zeros(z.shape[1], bits.shape[0])
        for start in range(0, z.shape[0], block_rows):
            total += _probabilities(log_sigmoids[start : start + block_rows], on_off).sum(dim=0)
        ctx.save_for_backward(z, bits, on_off)
        ctx.block_rows = block_rows
        return total / z.shape[0]

    @staticmethod
    def backward(ctx, grad_mean: Tensor):
        with ieee_fp32(grad_mean.device.type):
            return _MeanCodeProbabilities._backward(ctx, grad_mean)

    @staticmethod
    def _backward(ctx, grad_mean: Tensor):
        z, bits, on_off, *kept = ctx.saved_tensors
        # d p(c)/d z_d = p(c) * (bit_cd - sigmoid(z_d))
        sigmoids = torch.sigmoid(z)
        if kept:
            return _rows_grad(kept[0] * grad_mean, bits, sigmoids) / z.shape[0], None, None, None
        grad_z, log_sigmoids = torch.empty_like(z), _log_sigmoids(z)
        for start in range(0, z.shape[0], ctx.block_rows):
            rows = slice(start, start + ctx.block_rows)
            weighted = _probabilities(log_sigmoids[rows], on_off).mul_(grad_mean)
            grad_z[rows] = _rows_grad(weighted, bits, sigmoids[rows])
        return grad_z / z.shape[0], None, None, None


def _rows_grad(weighted: Tensor, bits: Tensor, sigmoids: Tensor) -> Tensor:
    """sum_c weighted_c * (bit_cd - sigmoid(z_d)), for weighted = p(c | z) * dL/dmean_p(c)."""
    return weighted @ bits - weighted.sum(-1, keepdim=True) * sigmoids  # (n, groups, D)


def _log_sigmoids(z: Tensor) -> Tensor:
    """(rows, groups, 2D): log sigmoid(z_d), then log sigmoid(-z_d)."""
    return torch.cat((F.logsigmoid(z), F.logsigmoid(-z)), dim=-1)


def _probabilities(log_sigmoids: Tensor, on_off: Tensor) -> Tensor:
    """p(c | z) of every code for a block of rows: (n, groups, 2D), (2D, codes) ->
    (n, groups, codes)."""
    # log p(c | z) = sum_d log sigmoid(+-z_d): terms <= 0, near 0 for the likely codes, so fp32
    # keeps them to ~1e-7. The same number written as bits @ z - sum_d softplus(z_d) is a
    # difference of two large ones (|z| ~ 400 at inv_temperature 100): fp32 kept p only to ~1e-3,
    # by an amount that changed with the matmul's blocking (the block size, the device).
    return (log_sigmoids @ on_off).exp_()


def code_bits_on_off(bits: Tensor) -> Tensor:
    """(2D, codes): each code's bits, then their complements, from `code_bits` (codes, D), laid
    out for the batch entropy's matmul (made once: a transposed view was copied every block)."""
    return torch.cat((bits, 1 - bits), dim=-1).T.contiguous()


def code_bits(num_bits: int, device: torch.device | None = None) -> Tensor:
    """(2**num_bits, num_bits) float matrix of each code's bits, most significant first."""
    weights = 2 ** torch.arange(num_bits - 1, -1, -1, device=device)
    return ((torch.arange(2**num_bits, device=device)[:, None] & weights) != 0).float()


class LFQ(nn.Module):
    """Lookup-free quantization: each of D = log2(codebook_size) channels becomes one bit.

    Training adds an entropy loss (confident bits per sample, all codes used across the batch)
    and a commitment loss. With inverse temperature tau, p(code | x) = softmax(2 tau <x, code>)
    over codes in {-s, s}^D, which factorises into independent bits with logits 4 tau s x_d.
    """

    def __init__(
        self,
        *,
        dim: int,
        codebook_size: int,
        num_codebooks: int = 1,
        entropy_loss_weight: float = 0.1,
        commitment_loss_weight: float = 1.0,
        diversity_gamma: float = 2.5,
        soft_clamp_input_value: float | None = 10.0,
        spherical: bool = False,
        straight_through_activation: str = "identity",
        inv_temperature: float = 100.0,
    ) -> None:
        super().__init__()
        self.codebook_dim = int(math.log2(codebook_size))
        self.codebook_size = codebook_size
        self.num_codebooks = num_codebooks
        self.dim = dim
        total_bits = self.codebook_dim * num_codebooks
        self.has_projections = dim != total_bits
        self.project_in = nn.Linear(dim, total_bits) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(total_bits, dim) if self.has_projections else nn.Identity()
        self.entropy_loss_weight = entropy_loss_weight
        self.commitment_loss_weight = commitment_loss_weight
        self.diversity_gamma = diversity_gamma
        self.soft_clamp_input_value = soft_clamp_input_value
        self.spherical = spherical
        # BSQ (spherical): codes live on the unit sphere, +-1/sqrt(D) per bit.
        self.code_scale = self.codebook_dim**-0.5 if spherical else 1.0
        self.activation = _activation(straight_through_activation)
        self.inv_temperature = inv_temperature
        self.register_buffer("bits", code_bits(self.codebook_dim), persistent=False)
        self.register_buffer("bits_on_off", code_bits_on_off(self.bits), persistent=False)
        self.register_buffer(
            "bit_weights", 2 ** torch.arange(self.codebook_dim - 1, -1, -1), persistent=False
        )
        # Averages the batch code distribution across data-parallel ranks; set by the trainer
        # (it must be differentiable, e.g. torch.distributed.nn.all_reduce / world size).
        self.batch_probs_reducer: Callable[[Tensor], Tensor] | None = None
        self.probability_block_elements: int | None = None
        """Probabilities per block of the batch entropy; None: `probability_block_elements`
        of the device. Values and gradients do not depend on it (up to float rounding)."""

    @property
    def num_channels_out(self) -> int:
        return self.dim

    def forward(self, x: Tensor) -> QuantizerOutput:
        # x: (b, dim, *grid) -> rows (b, n, dim)
        grid = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)
        orig_dtype = x.dtype
        with ieee_fp32(x.device.type):
            x = fp32_linear(self.project_in, x.float())
            if self.soft_clamp_input_value is not None:
                x = torch.tanh(x / self.soft_clamp_input_value) * self.soft_clamp_input_value
            x = x.unflatten(-1, (self.num_codebooks, self.codebook_dim))  # (b, n, c, d)
            if self.spherical:
                x = F.normalize(x, dim=-1)
            original = x
            quantized = torch.where(x > 0, self.code_scale, -self.code_scale)
            codes = ((x > 0).long() * self.bit_weights).sum(dim=-1)  # (b, n, c)
            if self.training:
                x = self.activation(x)
                x = x + (quantized - x).detach()
                breakdown = self._losses(original, quantized)
                aux_loss = (
                    self.entropy_loss_weight
                    * (
                        breakdown.per_sample_entropy
                        - self.diversity_gamma * breakdown.batch_entropy
                    )
                    + self.commitment_loss_weight * breakdown.commitment
                )
            else:
                x = quantized
                zero = x.new_zeros(())
                breakdown = QuantizerLossBreakdown(zero, zero, zero)
                aux_loss = zero
            out = fp32_linear(self.project_out, x.flatten(-2))
        out = out.to(orig_dtype).transpose(1, 2).unflatten(2, grid)  # (b, dim, *grid)
        codes = codes.unflatten(1, grid)
        if self.num_codebooks == 1:
            codes = codes.squeeze(-1)
        return QuantizerOutput(out, codes, aux_loss, breakdown)

    def _losses(self, x: Tensor, quantized: Tensor) -> QuantizerLossBreakdown:
        # Bit logits of p(code | x) = softmax(2 tau <x, code>), code in {-s, s}^D.
        z = (4 * self.inv_temperature * self.code_scale) * x  # (b, n, c, d)
        per_sample_entropy = binary_entropy_from_logits(z).sum(dim=-1).mean()
        rows = z.flatten(0, 1)  # (b n, c, d)
        block_elements = self.probability_block_elements or probability_block_elements(z.device)
        block_rows = max(1, block_elements // (self.codebook_size * self.num_codebooks))
        bits, on_off = self.bits.float(), self.bits_on_off.float()
        mean_probs = _MeanCodeProbabilities.apply(rows, bits, on_off, block_rows)  # (c, codes)
        if self.batch_probs_reducer is not None:
            mean_probs = self.batch_probs_reducer(mean_probs)
        batch_entropy = entropy(mean_probs).mean()
        commitment = F.mse_loss(x, quantized.detach())
        return QuantizerLossBreakdown(per_sample_entropy, batch_entropy, commitment)

    def indices_to_codes(self, indices: Tensor, project_out: bool = True) -> Tensor:
        """(b, *grid) or (b, *grid, c) indices -> quantized latents (b, dim, *grid), or the raw
        code vectors (b, c*d, *grid) with project_out=False."""
        if self.num_codebooks == 1:
            indices = indices[..., None]
        bits = (indices[..., None] & self.bit_weights) != 0  # (b, *grid, c, d)
        values = torch.where(bits, self.code_scale, -self.code_scale).float().flatten(-2)
        if project_out:
            values = fp32_linear(self.project_out, values)
        return values.movedim(-1, 1)

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """Raw code vectors (b, c*d, *grid) -> indices (b, *grid) or (b, *grid, c)."""
        bits = codes.movedim(1, -1).unflatten(-1, (self.num_codebooks, self.codebook_dim)) > 0
        indices = (bits.long() * self.bit_weights).sum(dim=-1)
        return indices.squeeze(-1) if self.num_codebooks == 1 else indices


class FSQ(nn.Module):
    """Finite scalar quantization (Mentzer et al. 2023): each channel is bounded with tanh and
    rounded to one of `levels[i]` values, with straight-through gradients."""

    def __init__(self, *, levels: tuple[int, ...], dim: int, num_codebooks: int = 1) -> None:
        super().__init__()
        self.codebook_dim = len(levels)
        self.num_codebooks = num_codebooks
        self.codebook_size = math.prod(levels)
        self.dim = dim
        total = self.codebook_dim * num_codebooks
        self.has_projections = dim != total
        self.project_in = nn.Linear(dim, total) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(total, dim) if self.has_projections else nn.Identity()
        levels_t = torch.tensor(levels, dtype=torch.int64)
        basis = torch.cumprod(torch.tensor([1, *levels[:-1]], dtype=torch.int64), dim=0)
        self.register_buffer("levels", levels_t, persistent=False)
        self.register_buffer("basis", basis, persistent=False)

    def bound(self, z: Tensor, eps: float = 1e-3) -> Tensor:
        """Maps z into [-half_l, half_l], shifted for even level counts so that rounding gives
        exactly `levels` values."""
        half_l = (self.levels - 1) * (1 + eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def forward(self, x: Tensor) -> QuantizerOutput:
        grid = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)  # (b, n, dim)
        orig_dtype = x.dtype
        with ieee_fp32(x.device.type):
            z = fp32_linear(self.project_in, x.float())
            z = z.unflatten(-1, (self.num_codebooks, self.codebook_dim))
            bounded = self.bound(z)
            rounded = bounded + (bounded.round() - bounded).detach()  # straight-through round
            half_width = self.levels // 2
            quantized = rounded / half_width
            codes = self._digits_to_indices(rounded.detach().round().long())
            out = fp32_linear(self.project_out, quantized.flatten(-2))
        out = out.to(orig_dtype).transpose(1, 2).unflatten(2, grid)
        codes = codes.unflatten(1, grid)
        if self.num_codebooks == 1:
            codes = codes.squeeze(-1)
        return QuantizerOutput(out, codes, out.new_zeros((), dtype=torch.float32), None)

    def _digits_to_indices(self, centred_digits: Tensor) -> Tensor:
        # (..., d) integers in [-(L // 2), L - 1 - L // 2] -> mixed-radix index (...)
        return ((centred_digits + self.levels // 2) * self.basis).sum(dim=-1)

    def indices_to_codes(self, indices: Tensor, project_out: bool = True) -> Tensor:
        """(b, *grid) or (b, *grid, c) indices -> quantized latents (b, dim, *grid), or the raw
        code vectors (b, c*d, *grid) with project_out=False."""
        if self.num_codebooks == 1:
            indices = indices[..., None]
        digits = (indices[..., None].long() // self.basis) % self.levels  # (b, *grid, c, d)
        half_width = self.levels // 2
        values = ((digits - half_width) / half_width).float().flatten(-2)
        if project_out:
            values = fp32_linear(self.project_out, values)
        return values.movedim(-1, 1)

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """Raw code vectors (b, c*d, *grid) -> indices (b, *grid) or (b, *grid, c)."""
        values = codes.movedim(1, -1).unflatten(-1, (self.num_codebooks, self.codebook_dim))
        digits = (values.float() * (self.levels // 2)).round().long()
        indices = self._digits_to_indices(digits)
        return indices.squeeze(-1) if self.num_codebooks == 1 else indices


def build_quantizer(config: TokenizerConfig) -> LFQ | FSQ:
    dim = config.latent_dim
    if config.use_fsq:
        assert config.fsq_levels is not None
        return FSQ(levels=config.fsq_levels, dim=dim, num_codebooks=config.num_codebooks)
    assert config.codebook_size is not None
    return LFQ(
        dim=dim,
        codebook_size=config.codebook_size,
        num_codebooks=config.num_codebooks,
        entropy_loss_weight=config.lfq_entropy_loss_weight,
        commitment_loss_weight=config.lfq_commitment_loss_weight,
        diversity_gamma=config.lfq_diversity_gamma,
        soft_clamp_input_value=config.lfq_soft_clamp_input_value,
        spherical=config.lfq_spherical,
        straight_through_activation=config.lfq_activation,
    )
