"""Training health alarms: a collapsed discriminator, a collapsed codebook, a diverging
reconstruction loss.

`HealthMonitor` is pure: the trainer feeds it the window means it logs (already averaged over
ranks), so every rank reaches the same verdict without a collective of its own. An alarm starts
after `*_windows` consecutive bad windows and clears at the first good one; the trainer warns
once at each of those two events and logs `health/alarm_<name>` (0 or 1) at every log step. A
window without the alarm's measurement (the discriminator before it starts, codebook statistics
between their windows) leaves that alarm as it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

DISCRIMINATOR_COLLAPSE = "discriminator_collapse"
CODEBOOK_COLLAPSE = "codebook_collapse"
RECON_DIVERGENCE = "recon_divergence"
ALARMS = (DISCRIMINATOR_COLLAPSE, CODEBOOK_COLLAPSE, RECON_DIVERGENCE)


@dataclass(frozen=True, kw_only=True)
class HealthConfig:
    """Thresholds of the alarms (the `health:` section); the defaults stay quiet on a healthy
    run of launch/configs/tiny_cpu.yaml."""

    discriminator_collapse: bool = True
    """Alarm when the discriminator wins outright (its loss near 0, or real and fake logits far
    apart): the generator then gets no useful adversarial gradient."""
    discriminator_loss_below: float = 0.05
    """A window is bad when the mean `loss/discriminator_hinge` is below this (it starts near 2)."""
    discriminator_logit_gap_above: float = 5.0
    """... or when mean real minus mean fake logit exceeds this."""
    discriminator_windows: int = 3
    """Consecutive bad log windows before the alarm starts."""
    codebook_collapse: bool = True
    """Alarm when few codes are in use (counted over `codebook_stats_window` steps)."""
    codebook_usage_below: float = 0.05
    """A codebook window is bad when `codebook/usage` (share of codes seen) is below this ..."""
    codebook_perplexity_fraction_below: float = 0.01
    """... or `codebook/perplexity_fraction` (perplexity / codebook size) is below this."""
    codebook_windows: int = 2
    """Consecutive bad codebook windows before the alarm starts."""
    recon_divergence: bool = True
    """Alarm when `loss/recon` diverges: non-finite, or above `recon_factor` x its best window
    mean so far."""
    recon_factor: float = 5.0
    """A window is bad when its mean exceeds this multiple of the lowest earlier window mean."""
    recon_warmup_steps: int = 100
    """Windows logged at or before this step neither set the best nor count (early losses fall
    fast and the GAN's start shakes them)."""
    recon_windows: int = 3
    """Consecutive bad log windows before the alarm starts."""

    def __post_init__(self) -> None:
        for name in ("discriminator_windows", "codebook_windows", "recon_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"health.{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "discriminator_loss_below",
            "discriminator_logit_gap_above",
            "codebook_usage_below",
            "codebook_perplexity_fraction_below",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"health.{name} must be a finite number >= 0, got {value}")
        if not (math.isfinite(self.recon_factor) and self.recon_factor > 1):
            raise ValueError(f"health.recon_factor must be > 1, got {self.recon_factor}")
        if self.recon_warmup_steps < 0:
            raise ValueError(
                f"health.recon_warmup_steps must be >= 0, got {self.recon_warmup_steps}"
            )

    def enabled(self, alarm: str) -> bool:
        return getattr(self, alarm)

    def windows(self, alarm: str) -> int:
        return {
            DISCRIMINATOR_COLLAPSE: self.discriminator_windows,
            CODEBOOK_COLLAPSE: self.codebook_windows,
            RECON_DIVERGENCE: self.recon_windows,
        }[alarm]


@dataclass(frozen=True)
class HealthEvent:
    """An alarm that started (`active`) or cleared at `step`; `detail` says what was measured."""

    alarm: str
    active: bool
    step: int
    detail: str

    def message(self) -> str:
        state = "ALARM" if self.active else "cleared"
        return f"health {state} at step {self.step}: {self.alarm} ({self.detail})"


@dataclass(frozen=True)
class HealthUpdate:
    events: list[HealthEvent]
    scalars: dict[str, float]
    """`health/alarm_<name>` (0/1) of every enabled alarm, plus this window's measurements."""


@dataclass
class _AlarmState:
    active: bool = False
    bad_windows: int = 0


@dataclass
class HealthMonitor:
    """Window means in, alarm events and scalars out; its state goes into checkpoints."""

    config: HealthConfig
    states: dict[str, _AlarmState] = field(default_factory=dict)
    recon_best: float | None = None
    """Lowest finite `loss/recon` window mean after the warm-up."""

    def __post_init__(self) -> None:
        for alarm in ALARMS:
            self.states.setdefault(alarm, _AlarmState())

    def update(self, step: int, values: dict[str, float | None]) -> HealthUpdate:
        """One log window: `values` are the rank-averaged means the trainer logs at `step`."""
        scalars: dict[str, float] = {}
        events: list[HealthEvent] = []
        checks = {
            DISCRIMINATOR_COLLAPSE: self._discriminator,
            CODEBOOK_COLLAPSE: self._codebook,
            RECON_DIVERGENCE: self._recon,
        }
        for alarm, check in checks.items():
            if not self.config.enabled(alarm):
                continue
            verdict = check(step, values, scalars)
            if verdict is not None:
                event = self._advance(alarm, step, *verdict)
                if event is not None:
                    events.append(event)
            scalars[f"health/alarm_{alarm}"] = float(self.states[alarm].active)
        return HealthUpdate(events, scalars)

    def _advance(self, alarm: str, step: int, bad: bool, detail: str) -> HealthEvent | None:
        state = self.states[alarm]
        state.bad_windows = state.bad_windows + 1 if bad else 0
        if not state.active and state.bad_windows >= self.config.windows(alarm):
            state.active = True
            return HealthEvent(alarm, True, step, detail)
        if state.active and not bad:
            state.active = False
            return HealthEvent(alarm, False, step, detail)
        return None

    # Each check: (bad, detail) for a window with its measurement, None without one.

    def _discriminator(self, step, values, scalars) -> tuple[bool, str] | None:
        loss = _finite(values.get("loss/discriminator_hinge"))
        real = _finite(values.get("discriminator/logits_real"))
        fake = _finite(values.get("discriminator/logits_fake"))
        if loss is None or real is None or fake is None:
            return None
        gap = real - fake
        scalars["health/discriminator_logit_gap"] = gap
        c = self.config
        bad = loss < c.discriminator_loss_below or gap > c.discriminator_logit_gap_above
        return bad, (
            f"discriminator loss {loss:.4g} (alarm below {c.discriminator_loss_below:g}), "
            f"real - fake logit gap {gap:.4g} (alarm above {c.discriminator_logit_gap_above:g})"
        )

    def _codebook(self, step, values, scalars) -> tuple[bool, str] | None:
        usage = _finite(values.get("codebook/usage"))
        fraction = _finite(values.get("codebook/perplexity_fraction"))
        if usage is None or fraction is None:
            return None
        c = self.config
        bad = usage < c.codebook_usage_below or fraction < c.codebook_perplexity_fraction_below
        return bad, (
            f"codebook usage {usage:.4g} (alarm below {c.codebook_usage_below:g}), "
            f"perplexity fraction {fraction:.4g} "
            f"(alarm below {c.codebook_perplexity_fraction_below:g})"
        )

    def _recon(self, step, values, scalars) -> tuple[bool, str] | None:
        loss = values.get("loss/recon")
        if loss is None or step <= self.config.recon_warmup_steps:
            return None
        if not math.isfinite(loss):
            return True, f"loss/recon window mean is {loss}"
        best = self.recon_best
        self.recon_best = loss if best is None else min(best, loss)
        if best is None:
            return None  # the first window after the warm-up only sets the reference
        ratio = loss / best if best > 0 else (math.inf if loss > 0 else 1.0)
        scalars["health/recon_over_best"] = ratio
        return ratio > self.config.recon_factor, (
            f"loss/recon {loss:.4g} = {ratio:.3g} x the best window {best:.4g} "
            f"(alarm above {self.config.recon_factor:g} x)"
        )

    # Checkpoints (JSON: the trainer state).

    def state_dict(self) -> dict[str, Any]:
        return {
            "alarms": {
                name: {"active": s.active, "bad_windows": s.bad_windows}
                for name, s in self.states.items()
            },
            "recon_best": self.recon_best,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, saved in state.get("alarms", {}).items():
            if name in self.states:
                self.states[name] = _AlarmState(bool(saved["active"]), int(saved["bad_windows"]))
        best = state.get("recon_best")
        self.recon_best = None if best is None else float(best)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
