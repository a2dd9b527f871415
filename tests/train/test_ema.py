"""The generator EMA: warm-up of the decay, today's fixed decay, and its state across a resume."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.train.ema import COUNTER_KEY, EMA, warmup_updates


def _jumped(module: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)


def _run(warmup: bool, steps: int, decay: float = 0.999) -> tuple[EMA, nn.Module]:
    """Weights w0 = 0 at construction, jumping to w1 = 1 before the first update and staying:
    the average is then 1 - (the product of the decays used), the weight left on w0."""
    module = nn.Linear(3, 2)
    _jumped(module, 0.0)
    ema = EMA(module, decay, warmup=warmup)
    _jumped(module, 1.0)
    for step in range(1, steps + 1):
        ema.update(module, step)
    return ema, module


def _w0_share(ema: EMA) -> float:
    return 1.0 - ema.shadow["weight"].mean().item()


def test_warmup_matches_the_product_of_its_decays_after_150_steps():
    ema, _ = _run(warmup=True, steps=150)
    closed_form = math.factorial(9) / math.prod(range(151, 160))  # prod (1+t)/(10+t), t < 150
    assert closed_form == pytest.approx(7.0359e-15, rel=1e-4)
    # fp32 shadow: the share of w0 is below fp32 resolution around 1, so the average is w1
    assert _w0_share(ema) == pytest.approx(closed_form, abs=1e-7)
    assert ema.num_updates == 150
    assert ema.current_decay() == pytest.approx(151 / 160)


def test_warmup_share_of_w0_after_a_few_steps_is_the_product():
    """Where fp32 can resolve it: after 3 updates w0 keeps (1/10)(2/11)(3/12)."""
    ema, _ = _run(warmup=True, steps=3)
    assert _w0_share(ema) == pytest.approx(1 / 10 * 2 / 11 * 3 / 12, rel=1e-4)


def test_without_warmup_the_decay_is_fixed_from_the_first_step():
    ema, _ = _run(warmup=False, steps=150)
    assert _w0_share(ema) == pytest.approx(0.999**150, rel=1e-4)  # 0.86
    assert ema.current_decay() == 0.999


def test_warmup_reaches_the_full_decay_and_stays_there():
    for decay in (0.999, 0.99, 0.95):
        t = warmup_updates(decay)
        ema = EMA(nn.Linear(1, 1), decay)
        ema.num_updates = t - 1
        assert ema.current_decay() < decay
        ema.num_updates = t
        assert ema.current_decay() == decay
        ema.num_updates = 10 * t
        assert ema.current_decay() == decay
    assert warmup_updates(0.999) == 8990


def test_before_start_step_the_average_follows_and_the_warmup_waits():
    module = nn.Linear(2, 2)
    ema = EMA(module, 0.99, start_step=5)
    _jumped(module, 2.0)
    ema.update(module, 4)
    assert torch.equal(ema.shadow["weight"], torch.full((2, 2), 2.0))
    assert ema.num_updates == 0
    ema.update(module, 5)
    assert ema.num_updates == 1


def test_state_dict_round_trip_keeps_the_average_and_the_counter():
    ema, module = _run(warmup=True, steps=7)
    state = ema.state_dict()
    assert int(state[COUNTER_KEY]) == 7
    restored = EMA(module, 0.999)
    restored.load_state_dict(state)
    assert restored.num_updates == 7
    assert all(torch.equal(restored.shadow[k], ema.shadow[k]) for k in ema.shadow)
    # the two go on identically
    _jumped(module, 3.0)
    ema.update(module, 8)
    restored.update(module, 8)
    assert torch.equal(restored.shadow["weight"], ema.shadow["weight"])


def test_a_state_without_the_counter_loads_as_warmed_up():
    """ema.pt written before the warm-up: the run averaged at the full decay and goes on so."""
    ema, module = _run(warmup=False, steps=4)
    old = {k: v for k, v in ema.state_dict().items() if k != COUNTER_KEY}
    restored = EMA(module, 0.999)
    restored.load_state_dict(old)
    assert restored.num_updates == warmup_updates(0.999)
    assert restored.current_decay() == 0.999
    assert torch.equal(restored.shadow["bias"], ema.shadow["bias"])


def test_a_state_missing_weights_is_refused():
    ema, module = _run(warmup=True, steps=1)
    state = ema.state_dict()
    del state["bias"]
    with pytest.raises(ValueError, match="bias"):
        EMA(module, 0.999).load_state_dict(state)


def test_the_export_view_ignores_the_counter():
    ema, module = _run(warmup=True, steps=2)
    assert set(ema.state_dict_for(module)) == set(module.state_dict())


def test_warmup_is_the_default_of_the_config_and_the_launch_configs():
    from trainrun import CONFIG

    from pipeline.train.config import load_config

    for name in ("tiny_cpu", "demo_cpu", "base_128", "base_256"):
        assert load_config(CONFIG.parent / f"{name}.yaml").ema_warmup, name
    assert not load_config(CONFIG, ["ema_warmup=false"]).ema_warmup


def test_update_is_one_foreach_lerp_not_a_kernel_per_tensor():
    """The update is one foreach lerp over all tensors (the per-tensor loop called a cast and a
    lerp per tensor), with the same values as the per-tensor rule. On CUDA that op is a fused
    multi-tensor kernel; on CPU it loops over the tensors inside, as the lerps under it show."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    module = nn.Sequential(*[nn.Linear(4, 4) for _ in range(6)])
    ema = EMA(module, decay=0.9, warmup=False)
    expected = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ema.update(module, step=1)
    names = [event.name for event in prof.events()]
    assert names.count("aten::_foreach_lerp_") == 1
    assert names.count("aten::lerp_") in (0, 12)  # 12: the CPU fallback, under the foreach op
    for name, tensor in module.state_dict().items():
        expected[name].lerp_(tensor, 0.1)
        torch.testing.assert_close(ema.shadow[name], expected[name], rtol=0, atol=0)
