"""FLOPs of a call, counted op by op with torch.utils.flop_counter's formulas."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


class FlopCount(TorchDispatchMode):
    """FLOPs of every op that torch.utils.flop_counter knows (convolutions, matmuls, attention).

    FlopCounterMode itself also tracks modules with backward hooks, which break
    autograd.grad(create_graph=True) in the gradient penalty; the op counts are the same.
    """

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.flops += count(*args, **kwargs, out_val=out)
        return out


def count_flops(fn) -> float:
    with FlopCount() as counter:
        fn()
    return float(counter.flops)
