"""LFQ and FSQ: index conventions, round trips, the memory-bounded entropy, fp32 numerics."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from model.quantizers import FSQ, LFQ, _MeanCodeProbabilities, code_bits, code_bits_on_off


def direct_entropy_terms(x: torch.Tensor, inv_temperature: float = 100.0, scale: float = 1.0):
    """The textbook formulas over all 2**D codes: softmax(2 tau <x, code>)."""
    d = x.shape[-1]
    codebook = (code_bits(d) * 2 - 1) * scale  # (codes, d)
    logits = 2 * inv_temperature * torch.einsum("...d,cd->...c", x, codebook)
    log_probs = logits.log_softmax(dim=-1)
    probs = log_probs.exp()
    per_sample = -(probs * log_probs).sum(-1).mean()
    mean_probs = probs.flatten(0, -3).mean(0)  # (groups, codes)
    batch = -torch.xlogy(mean_probs, mean_probs).sum(-1).mean()
    return per_sample, batch


def test_lfq_golden_indices_msb_first():
    q = LFQ(dim=4, codebook_size=16, soft_clamp_input_value=None).eval()
    x = torch.tensor([[1.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, 1.0], [0.5, 0.5, -2.0, 0.1]])
    out = q(x.T[None, :, :, None])  # (1, 4, 3, 1)
    assert out.codes.flatten().tolist() == [8, 1, 13]
    assert torch.equal(out.quantized, torch.sign(x.T)[None, :, :, None])


@pytest.mark.parametrize("num_codebooks, spherical", [(1, False), (3, False), (2, True)])
def test_lfq_indices_round_trip(num_codebooks, spherical):
    torch.manual_seed(0)
    q = LFQ(dim=12, codebook_size=64, num_codebooks=num_codebooks, spherical=spherical).eval()
    x = torch.randn(2, 12, 3, 4, 5)
    out = q(x)
    expected_shape = (2, 3, 4, 5) if num_codebooks == 1 else (2, 3, 4, 5, num_codebooks)
    assert out.codes.shape == expected_shape and out.codes.dtype == torch.int64
    assert torch.allclose(q.indices_to_codes(out.codes), out.quantized, atol=1e-6)
    all_codes = torch.arange(64)[None, :, None, None]
    if num_codebooks > 1:
        all_codes = all_codes[..., None].expand(-1, -1, -1, -1, num_codebooks)
    raw = q.indices_to_codes(all_codes, project_out=False)
    assert raw.shape == (1, 6 * num_codebooks, 64, 1, 1)
    assert torch.equal(q.codes_to_indices(raw), all_codes)


@pytest.mark.parametrize("levels, num_codebooks", [((8, 5, 5, 5), 1), ((7, 6), 2), ((3, 4, 5), 1)])
def test_fsq_indices_round_trip_and_radix(levels, num_codebooks):
    torch.manual_seed(0)
    dim = len(levels) * num_codebooks
    q = FSQ(levels=levels, dim=dim, num_codebooks=num_codebooks)
    size = q.codebook_size
    all_codes = torch.arange(size)[None, :, None]
    if num_codebooks > 1:
        all_codes = all_codes[..., None].expand(-1, -1, -1, num_codebooks)
    latents = q.indices_to_codes(all_codes)
    assert latents.shape == (1, dim, size, 1)
    assert latents.abs().max() <= 1
    assert torch.equal(q.codes_to_indices(latents), all_codes)
    assert len(torch.unique(latents[0, :, :, 0].T, dim=0)) == size  # every index its own code
    # Dim 0 is the least significant digit: index 1 moves only channel 0 of each codebook.
    changed = (latents[0, :, 1, 0] != latents[0, :, 0, 0]).nonzero().flatten().tolist()
    assert changed == [i * len(levels) for i in range(num_codebooks)]
    out = q(torch.randn(2, dim, 3, 4) * 3)
    assert torch.equal(q.indices_to_codes(out.codes), out.quantized)


@pytest.mark.parametrize("spherical", [False, True])
def test_factorised_entropy_equals_direct_formula(spherical):
    torch.manual_seed(0)
    q = LFQ(dim=16, codebook_size=256, num_codebooks=2, spherical=spherical).train()
    for scale in (0.003, 0.03, 1.0):
        x = torch.randn(2, 16, 3, 2, 2) * scale
        out = q(x)
        pre = (torch.tanh(x / 10) * 10).flatten(2).transpose(1, 2).unflatten(-1, (2, 8))
        if spherical:
            pre = F.normalize(pre, dim=-1)
        per_sample, batch = direct_entropy_terms(pre, scale=8**-0.5 if spherical else 1.0)
        assert abs(out.breakdown.per_sample_entropy - per_sample) < 1e-5
        assert abs(out.breakdown.batch_entropy - batch) < 1e-5


def test_chunked_batch_probabilities_equal_direct_in_value_and_gradient():
    torch.manual_seed(0)
    z = (torch.randn(37, 2, 6, dtype=torch.float64) * 3).requires_grad_()
    bits = code_bits(6).double()
    weights = torch.randn(2, 64, dtype=torch.float64)
    direct = torch.exp(z @ bits.T - F.softplus(z).sum(-1, keepdim=True)).mean(0)
    (grad_direct,) = torch.autograd.grad((direct * weights).sum(), z)
    for block_rows in (1, 5, 37, 100):
        chunked = _MeanCodeProbabilities.apply(z, bits, code_bits_on_off(bits), block_rows)
        (grad_chunked,) = torch.autograd.grad((chunked * weights).sum(), z)
        assert torch.allclose(chunked, direct, atol=1e-12)
        assert torch.allclose(grad_chunked, grad_direct, atol=1e-12)
    small = (torch.randn(4, 1, 3, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: _MeanCodeProbabilities.apply(
            t, code_bits(3).double(), code_bits_on_off(code_bits(3).double()), 3
        ),
        (small,),
    )


class LargestTensor(TorchDispatchMode):
    """Records the largest memory any op's output holds, in elements of its storage (a view
    such as an `expand` holds none of its own: torch 2.11 shows one of (16, 18, 2**18))."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                held = t.untyped_storage().nbytes() // max(t.element_size(), 1)
                self.numel = max(self.numel, held)
        return out


def test_large_codebook_entropy_never_holds_all_probabilities():
    """18 bits and 256 tokens: the direct formula holds 256 x 2**18 probabilities at once (and
    several such tensors for autograd); the factorised one, in blocks of 2**22, never exceeds a
    block."""
    torch.manual_seed(0)
    q = LFQ(dim=18, codebook_size=2**18).train()
    q.probability_block_elements = 2**22
    x = torch.randn(1, 18, 1, 16, 16, requires_grad=True)
    with LargestTensor() as largest:
        out = q(x)
        out.aux_loss.backward()
    assert largest.numel <= max(2**22, 18 * 2**18)  # a block, or the (codes, bits) table
    assert largest.numel * 8 < 256 * 2**18
    assert torch.isfinite(out.aux_loss) and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert 0 < out.breakdown.batch_entropy <= 18 * 0.6932


def test_quantizers_run_in_fp32_under_autocast():
    torch.manual_seed(0)
    lfq = LFQ(dim=8, codebook_size=16, num_codebooks=2).train()
    fsq = FSQ(levels=(5, 5), dim=8, num_codebooks=2)
    x = torch.randn(2, 8, 3, 4, 4).bfloat16()
    for q in (lfq, fsq):
        reference = q(x.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = q(x)
        assert torch.equal(out.codes, reference.codes)
        assert out.aux_loss.dtype == torch.float32
        assert out.quantized.dtype == torch.bfloat16
    lfq.bfloat16()  # the engines cast every parameter; the math stays fp32
    out = lfq(x)
    assert out.aux_loss.dtype == torch.float32 and torch.isfinite(out.aux_loss)


def test_lfq_losses_and_straight_through():
    torch.manual_seed(0)
    q = LFQ(dim=8, codebook_size=256, commitment_loss_weight=1.0).train()
    x = torch.randn(2, 8, 2, 3, 3, requires_grad=True)
    out = q(x)
    pre = torch.tanh(x / 10) * 10
    assert torch.allclose(out.breakdown.commitment, F.mse_loss(pre, torch.sign(pre)))
    expected = 0.1 * (out.breakdown.per_sample_entropy - 2.5 * out.breakdown.batch_entropy) + (
        out.breakdown.commitment
    )
    assert torch.allclose(out.aux_loss, expected)
    out.quantized.sum().backward()  # straight-through: d quantized / d x = d soft_clamp / d x
    assert torch.allclose(x.grad, 1 - torch.tanh(x.detach() / 10) ** 2, atol=1e-6)
    q.eval()
    assert q(x).aux_loss == 0


@pytest.mark.parametrize("blocks", ["one block", "several blocks"])
def test_lfq_entropy_matmuls_are_ieee_fp32_when_tf32_is_enabled(blocks, monkeypatch):
    """LFQ's logits reach |4 000|: TF32 (10-bit mantissa) would move them by ~4. Whatever the
    caller enabled, the probability products run in IEEE fp32, forward and backward, and the
    caller's setting is back afterwards."""
    import model.quantizers as quantizers

    seen: list[str] = []

    def recording(fn):
        def wrapper(*args):
            seen.append(torch.backends.cuda.matmul.fp32_precision)
            seen.append(torch.backends.mkldnn.matmul.fp32_precision)
            return fn(*args)

        return wrapper

    monkeypatch.setattr(quantizers, "_probabilities", recording(quantizers._probabilities))
    monkeypatch.setattr(quantizers, "_rows_grad", recording(quantizers._rows_grad))
    saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.mkldnn.matmul.fp32_precision = "tf32"
    try:
        q = LFQ(dim=4, codebook_size=16).train()
        if blocks == "several blocks":
            q.probability_block_elements = 64 * 16
        x = torch.randn(2, 4, 3, 4, 4, requires_grad=True)
        q(x).aux_loss.backward()
        after = (
            torch.backends.cuda.matmul.fp32_precision,
            torch.backends.mkldnn.matmul.fp32_precision,
        )
    finally:
        torch.backends.cuda.matmul.fp32_precision = saved[0]
        torch.backends.mkldnn.matmul.fp32_precision = saved[1]
    assert len(seen) >= 4 and set(seen) == {"ieee"}, seen
    assert after == ("tf32", "tf32")
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_lfq_block_size_changes_neither_values_nor_gradients():
    """The device-chosen block (one block here) and small blocks give the same aux loss and
    input gradient within 1e-5."""
    results = []
    for block_elements in (None, 16 * 64, 4 * 64, 2 * 64):
        torch.manual_seed(0)
        q = LFQ(dim=6, codebook_size=64).train()
        q.probability_block_elements = block_elements
        x = torch.randn(2, 6, 3, 4, 4, generator=torch.Generator().manual_seed(1))
        x.requires_grad_()
        loss = q(x).aux_loss
        loss.backward()
        results.append((loss.detach(), x.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-5, atol=1e-5)


def test_probability_block_elements_by_device():
    from model.quantizers import (
        CPU_PROBABILITY_BLOCK_ELEMENTS,
        MAX_PROBABILITY_BLOCK_ELEMENTS,
        probability_block_elements,
    )

    assert probability_block_elements(torch.device("cpu")) == CPU_PROBABILITY_BLOCK_ELEMENTS
    if torch.cuda.is_available():
        chosen = probability_block_elements(torch.device("cuda"))
        assert CPU_PROBABILITY_BLOCK_ELEMENTS <= chosen <= MAX_PROBABILITY_BLOCK_ELEMENTS


def test_lfq_batch_entropy_is_accurate_at_training_logit_scales():
    """At inv_temperature 100 the bit logits reach |z| ~ 400: the batch entropy and its gradient
    match a float64 softmax over all codes of 2 tau <x, code> (the definition): the value to
    1e-7, the gradient to 1e-5 of its largest element. (Written as bits @ z - sum softplus(z),
    p lost ~1e-3 to cancellation in fp32: 1.4e-6 and 5e-4 here.)"""
    torch.manual_seed(0)
    q = LFQ(dim=10, codebook_size=1024, soft_clamp_input_value=None).train()
    q.probability_block_elements = 64 * 1024  # several blocks
    x = torch.randn(1, 10, 8, 8, 8, requires_grad=True)
    value = q(x).breakdown.batch_entropy
    value.backward()

    x64 = x.detach().double().requires_grad_()
    codes = q.bits.double() * 2 - 1  # (1024, 10) in {-1, 1}
    rows = x64.flatten(2).transpose(1, 2).flatten(0, 1)  # (512, 10)
    mean_probs = torch.softmax(2 * q.inv_temperature * rows @ codes.T, dim=-1).mean(0)
    expected = -(mean_probs * mean_probs.clamp_min(1e-300).log()).sum()
    expected.backward()
    assert abs(value.item() - expected.item()) <= 1e-7 * expected.item()
    error = (x.grad.double() - x64.grad).abs().max()
    assert error <= 1e-5 * x64.grad.abs().max(), error
