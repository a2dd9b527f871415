"""Running one encoder/decoder layer on consecutive time chunks of its input, with the same
result as one call on the whole sequence, bit for bit.

Each layer kind carries what its causal dependence on the past needs:

- layers with a finite causal reach (causal convs, residual units, conditioned residual units,
  the strided time downsampler) keep the last few input frames and are fed them again in front of
  the next chunk; the outputs that belong to those frames are dropped. The layer's own forward
  runs unchanged, so its padding applies exactly where the whole-video call applies it (the first
  chunk);
- per-frame layers (space attention, linear space attention, spatial resampling, time upsampling,
  norms) keep nothing;
- the gate loop carries its hidden state (`GateLoopTime.step`);
- causal time attention (`attend_time`) keeps its attention input for the whole sequence and
  runs the attention at the whole sequence's length for every chunk, the frames not yet seen
  left at zero (causal masking makes them invisible); its token shifts carry one frame and its
  feed-forward runs on the chunk. Memory grows with the sequence for this layer kind (its input,
  queries, keys and values at latent resolution), and its attention compute per chunk is that
  of the whole sequence: the price of bit-identical results, because
  `scaled_dot_product_attention` rounds a row differently when the query or key length changes.

Bit-identical also needs every convolution of a chunk to run on the kernel the whole-video call
would pick: on CPU, PyTorch chooses oneDNN or its native kernel from the input size, and the two
round differently. The size rule (`ConvParams::use_mkldnn` in PyTorch's
aten/src/ATen/native/Convolution.cpp) reads the time length in one clause only: with batch 1,
one group and kernels at most 3 wide in space, oneDNN is picked once N*C*T*H exceeds 20480
elements (the input's first four sizes); a batch of 2 or more gets oneDNN whatever its length.
`onednn_picks` restates that rule from public facts (sizes, `torch.backends.mkldnn`,
`torch.get_num_threads`). A chunk, shorter than the whole, can only differ by falling below the
limit while the whole is above it; `WholeLengthConvs` then runs that chunk's conv through the
public `torch.conv3d` as two overlapping time windows stacked in the batch (the first half of
the output frames from one, the rest from the other: the kernel's reach in extra frames), or,
for a conv with time padding, on the chunk with zero frames appended up to the limit (at most
20480 / (N*C*H) + 1 frames, whatever the video's length), their outputs dropped. Both rest on
oneDNN giving one output frame the same bits whatever the time length and the batch size
(checked by tests/test_streaming.py on every test config). No private torch API is used. The
tests also check the restated rule against the kernel the profiler sees run, so a PyTorch
release that changes the rule fails there; chunked results would then still agree with the
whole video's to rounding, not bit for bit. On CUDA the cuDNN algorithm is chosen per shape too
and cannot be forced, so there results agree to rounding.

Legend: b batch, c channels, t frames (of the layer's own time resolution), h/w grid.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from model.blocks import CondResidualUnit, GateLoopTime, ResidualStack, ResidualUnit
from model.conv import CausalConv3d
from model.layers import SpaceMixingBlock, TimeMixingBlock
from model.norm import ChannelLayerNorm
from model.sampling import SpatialDownsample2x, SpatialUpsample2x, TimeDownsample2x, TimeUpsample2x

# PyTorch's CPU convolution picks oneDNN for a batch-1 fp32 input with one group and kernels at
# most 3 wide in space only above this many elements in the input's first four sizes (N*C*T*H).
ONEDNN_MIN_ELEMENTS = 20480


def _triple(value: int | tuple[int, ...] | list[int]) -> list[int]:
    return [value] * 3 if isinstance(value, int) else list(value)


def _conv3d_args(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return input, weight, bias, stride, padding, dilation, groups


def onednn_picks(
    shape: torch.Size | tuple[int, ...],
    weight: Tensor,
    stride: list[int],
    dilation: list[int],
    groups: int,
) -> bool:
    """Whether PyTorch's CPU `conv3d` of a plain (strided, not oneDNN-layout) fp32 input of
    `shape` runs on oneDNN rather than its native kernel: `ConvParams::use_mkldnn` restated."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    n, c, t, h = shape[:4]
    kh, kw = weight.shape[-2:]
    strided, dilated = any(s != 1 for s in stride), any(d != 1 for d in dilation)
    # For 1x1 kernels on one thread PyTorch keeps its own kernel.
    if not (strided or dilated or n >= 16 or kh != 1 or kw != 1 or torch.get_num_threads() > 1):
        return False
    return groups > 1 or (kh > 3 and kw > 3) or n > 1 or n * c * t * h > ONEDNN_MIN_ELEMENTS


def conv3d_on_backend_for(extra_frames: int, *args, **kwargs) -> Tensor:
    """conv3d computed by the kernel PyTorch would pick for an input `extra_frames` longer in
    time (the whole-video call); every output frame is then bit-identical to that call's."""
    x, weight, bias, stride, padding, dilation, groups = _conv3d_args(*args, **kwargs)
    plain = torch.conv3d
    if (
        extra_frames <= 0
        or x.device.type != "cpu"
        or x.dtype != torch.float32
        or x.layout != torch.strided
        or isinstance(padding, str)
    ):
        return plain(*args, **kwargs)
    stride, padding, dilation = _triple(stride), _triple(padding), _triple(dilation)
    whole_shape = (*x.shape[:2], x.shape[2] + extra_frames, *x.shape[3:])
    # The rule is monotonic in the time length: only a whole on oneDNN and a shorter input on
    # the native kernel differ.
    if not onednn_picks(whole_shape, weight, stride, dilation, groups) or onednn_picks(
        x.shape, weight, stride, dilation, groups
    ):
        return plain(*args, **kwargs)
    if padding[0]:
        return _on_onednn_padded(x, weight, bias, stride, padding, dilation, groups)
    return _on_onednn_as_pair(x, weight, bias, stride, padding, dilation, groups)


def _on_onednn_as_pair(x: Tensor, weight: Tensor, bias, stride, padding, dilation, groups):
    """A batch-1 conv3d without time padding, run on oneDNN (which a batch of 2 always gets) as
    two overlapping time windows stacked in the batch: the first half of the output frames from
    one, the rest from the other. Costs the kernel's reach in frames more than the plain call."""
    t, step = x.shape[2], stride[0]
    reach = dilation[0] * (weight.shape[2] - 1)
    out_frames = (t - reach - 1) // step + 1
    first = (out_frames + 1) // 2  # output frames from the first window (the second: the rest)
    length = (first - 1) * step + reach + 1  # input frames of either window
    if first * step + length > t:  # the second window runs past the end: zero frames there
        x = F.pad(x, (0, 0, 0, 0, 0, first * step + length - t))
    pair = torch.cat((x[:, :, :length], x[:, :, first * step : first * step + length]), dim=0)
    out = torch.conv3d(pair, weight, bias, stride, padding, dilation, groups)
    return torch.cat((out[:1], out[1:, :, : out_frames - first]), dim=2)


def _on_onednn_padded(x: Tensor, weight: Tensor, bias, stride, padding, dilation, groups):
    """A batch-1 conv3d run on oneDNN: zero frames after the input bring it over oneDNN's size
    limit (a number of frames that does not grow with the video); their outputs are dropped."""
    n, c, t, h = x.shape[:4]
    frames = ONEDNN_MIN_ELEMENTS // (n * c * h) + 1
    reach = dilation[0] * (weight.shape[2] - 1)
    out_frames = (t + 2 * padding[0] - reach - 1) // stride[0] + 1
    padded = F.pad(x, (0, 0, 0, 0, 0, frames - t))
    out = torch.conv3d(padded, weight, bias, stride, padding, dilation, groups)
    return out[:, :, :out_frames].contiguous()


class WholeLengthConvs(TorchFunctionMode):
    """While active, every `conv3d` runs on the kernel the whole-sequence call would use, given
    how many frames shorter than it the current call's input is (`whole_length`)."""

    def __init__(self) -> None:
        super().__init__()
        self.extra_frames = 0

    @contextmanager
    def whole_length(self, whole_frames: int, chunk_frames: int) -> Iterator[None]:
        previous, self.extra_frames = self.extra_frames, whole_frames - chunk_frames
        try:
            yield
        finally:
            self.extra_frames = previous

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv3d and self.extra_frames:
            return conv3d_on_backend_for(self.extra_frames, *args, **kwargs)
        return func(*args, **kwargs)


class ChunkedLayer(ABC):
    """One layer run chunk by chunk. `whole_frames` is the length of the layer's input for the
    whole sequence (at the layer's time resolution); chunks must add up to at most that."""

    def __init__(self, module: nn.Module, whole_frames: int, takes_cond: bool = False) -> None:
        self.module = module
        self.whole_frames = whole_frames
        self.takes_cond = takes_cond
        self.frames_done = 0

    def _call(self, x: Tensor, cond: Tensor | None) -> Tensor:
        return self.module(x, cond) if self.takes_cond else self.module(x)

    def __call__(self, x: Tensor, cond: Tensor | None, convs: WholeLengthConvs) -> Tensor:
        num_frames = x.shape[2]
        if self.frames_done + num_frames > self.whole_frames:
            raise ValueError(
                f"chunks add up to {self.frames_done + num_frames} frames at this layer, more "
                f"than the {self.whole_frames} the whole sequence was announced to have"
            )
        out = self.forward(x, cond, convs)
        self.frames_done += num_frames
        return out

    @abstractmethod
    def forward(self, x: Tensor, cond: Tensor | None, convs: WholeLengthConvs) -> Tensor:
        """The layer's output for this chunk, given what earlier chunks left behind."""


class OverlappedLayer(ChunkedLayer):
    """A layer whose output frame depends on at most `history` earlier input frames: the last
    `history` input frames are kept and fed again before the next chunk. With a time stride s,
    `history` is a multiple of s and history / s leading outputs are dropped."""

    def __init__(
        self,
        module: nn.Module,
        whole_frames: int,
        takes_cond: bool = False,
        *,
        history: int,
        time_stride: int = 1,
    ) -> None:
        super().__init__(module, whole_frames, takes_cond)
        assert history % time_stride == 0, (history, time_stride)
        self.history = history
        self.time_stride = time_stride
        self.cache: Tensor | None = None

    def forward(self, x: Tensor, cond: Tensor | None, convs: WholeLengthConvs) -> Tensor:
        if x.shape[2] % self.time_stride:
            raise ValueError(
                f"a chunk of {x.shape[2]} frames reached a layer that halves time: every chunk "
                f"must hold a multiple of {self.time_stride} frames here"
            )
        # Contiguous, like the whole call's input: with one frame per chunk, reshapes inside the
        # previous layer can return views, and some kernels round differently on those.
        fed = x.contiguous() if self.cache is None else torch.cat((self.cache, x), dim=2)
        # While the cache still holds everything since the start, the layer's own padding is
        # the whole-video padding; later the dropped outputs absorb it.
        with convs.whole_length(self.whole_frames, fed.shape[2]):
            out = self._call(fed, cond)
        if self.history:
            self.cache = fed[:, :, -self.history :].clone()  # a copy: `fed` can be freed
        return out[:, :, (fed.shape[2] - x.shape[2]) // self.time_stride :]


class GateLoopLayer(ChunkedLayer):
    """`gateloop_time`: the recurrence's hidden state is carried from chunk to chunk."""

    def __init__(self, module: GateLoopTime, whole_frames: int) -> None:
        super().__init__(module, whole_frames)
        self.state: Tensor | None = None

    def forward(self, x: Tensor, cond: Tensor | None, convs: WholeLengthConvs) -> Tensor:
        with convs.whole_length(self.whole_frames, x.shape[2]):
            out, self.state = self.module.step(x.contiguous(), self.state)  # as OverlappedLayer
        return out


def token_shift_continued(x: Tensor, previous: Tensor | None) -> tuple[Tensor, Tensor]:
    """`token_shift` of a chunk, given the shifted half of the previous chunk's last frame
    (None: the start, zeros); returns the result and this chunk's last shifted-half frame."""
    keep, shift = x.chunk(2, dim=1)
    before = torch.zeros_like(shift[:, :, :1]) if previous is None else previous
    shifted = torch.cat((before, shift[:, :, :-1]), dim=2)
    return torch.cat((keep, shifted), dim=1), shift[:, :, -1:].clone()


class TimeMixingLayer(ChunkedLayer):
    """`attend_time` (`TimeMixingBlock`): x + attn(shift(x)), then x + ff(shift(x)).

    The token shifts carry one frame. The attention keeps its input for the whole sequence
    (frames not seen yet stay zero) and runs at the whole length for every chunk: causal masking
    never lets a row read a later frame, so the chunk's rows equal the whole call's, bit for bit.
    This layer's memory and compute per chunk therefore grow with the sequence.
    """

    def __init__(self, module: TimeMixingBlock, whole_frames: int, takes_cond: bool) -> None:
        super().__init__(module, whole_frames, takes_cond)
        self.attn_inputs: Tensor | None = None
        self.last_frames: list[Tensor | None] = [None, None]  # before attn, before ff

    def forward(self, x: Tensor, cond: Tensor | None, convs: WholeLengthConvs) -> Tensor:
        block, start, end = self.module, self.frames_done, self.frames_done + x.shape[2]
        shifted, self.last_frames[0] = token_shift_continued(x, self.last_frames[0])
        if self.attn_inputs is None:
            b, c, _, h, w = x.shape
            self.attn_inputs = x.new_zeros(b, c, self.whole_frames, h, w)  # (b, c, T, h, w)
        self.attn_inputs[:, :, start:end] = shifted
        x = x + block.attn(self.attn_inputs, cond)[:, :, start:end]
        shifted, self.last_frames[1] = token_shift_continued(x, self.last_frames[1])
        with convs.whole_length(self.whole_frames, x.shape[2]):
            return x + block.ff(shifted, cond)


# Per-frame layers: nothing crosses a frame boundary.
_PER_FRAME = (
    SpaceMixingBlock,
    SpatialDownsample2x,
    SpatialUpsample2x,
    TimeUpsample2x,
    ChannelLayerNorm,
    nn.Identity,
)


def _history(module: nn.Module) -> int | None:
    """Earlier input frames one output frame of a finite-reach layer reads (None: not one)."""
    if isinstance(module, CausalConv3d):
        if module.conv.stride[0] != 1:
            return None
        return module.time_pad
    if isinstance(module, ResidualUnit):
        return _history(module.conv)
    if isinstance(module, ResidualStack):
        reaches = [_history(unit) for unit in module]
        return None if None in reaches else sum(reaches)
    if isinstance(module, CondResidualUnit):
        return module.conv.time_pad[0]
    return None


def chunked_layer(module: nn.Module, whole_frames: int, takes_cond: bool = False) -> ChunkedLayer:
    """The chunk runner for one encoder/decoder layer; ValueError for a layer kind that cannot
    be run in chunks."""
    kind = type(module)
    if kind in _PER_FRAME:
        return OverlappedLayer(module, whole_frames, takes_cond, history=0)
    if kind is TimeMixingBlock:
        return TimeMixingLayer(module, whole_frames, takes_cond)
    if kind is GateLoopTime:
        return GateLoopLayer(module, whole_frames)
    if kind is TimeDownsample2x:
        # Causal reach: the conv's padding, plus two frames for the (optional) causal blur;
        # rounded up to a whole frame pair, so the stride-2 windows keep their alignment.
        reach = module.time_pad + (2 if module.blur is not None else 0)
        return OverlappedLayer(module, whole_frames, history=reach + reach % 2, time_stride=2)
    history = _history(module)
    if history is None:
        raise ValueError(
            f"{kind.__name__} cannot be run in chunks: chunked encoding and decoding support "
            "the layer kinds of model/layers.py (causal convs, residual units, space and time "
            "attention, gate loops, space and time resampling)"
        )
    return OverlappedLayer(module, whole_frames, takes_cond, history=history)
