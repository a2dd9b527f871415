"""Training health alarms: each alarm driven into and out of its condition on the pure
monitor, the config checks, and one tiny real run whose config makes an alarm fire."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from trainrun import CONFIG, base_overrides, explain, finished, metrics, single_process

from pipeline.train.config import load_config
from pipeline.train.health import (
    CODEBOOK_COLLAPSE,
    DISCRIMINATOR_COLLAPSE,
    RECON_DIVERGENCE,
    HealthConfig,
    HealthMonitor,
)

ONLY = {
    DISCRIMINATOR_COLLAPSE: dict(codebook_collapse=False, recon_divergence=False),
    CODEBOOK_COLLAPSE: dict(discriminator_collapse=False, recon_divergence=False),
    RECON_DIVERGENCE: dict(discriminator_collapse=False, codebook_collapse=False),
}


def drive(monitor: HealthMonitor, windows: list[dict], start: int = 1):
    """(step, started/cleared events, alarm flag) per window."""
    out = []
    for step, values in enumerate(windows, start=start):
        update = monitor.update(step, values)
        flags = {k: v for k, v in update.scalars.items() if k.startswith("health/alarm_")}
        out.append((step, [(e.alarm, e.active) for e in update.events], flags, update.scalars))
    return out


def discriminator(loss=2.0, real=0.1, fake=0.0):
    return {
        "loss/discriminator_hinge": loss,
        "discriminator/logits_real": real,
        "discriminator/logits_fake": fake,
    }


def test_discriminator_collapse_starts_after_n_low_loss_windows_and_clears_once():
    monitor = HealthMonitor(HealthConfig(discriminator_windows=3, **ONLY[DISCRIMINATOR_COLLAPSE]))
    low = discriminator(loss=0.01)
    rows = drive(monitor, [discriminator(), low, low, low, low, discriminator(), discriminator()])
    events = [(step, e) for step, e, _, _ in rows if e]
    assert events == [
        (4, [(DISCRIMINATOR_COLLAPSE, True)]),
        (6, [(DISCRIMINATOR_COLLAPSE, False)]),
    ]
    flags = [f["health/alarm_discriminator_collapse"] for _, _, f, _ in rows]
    assert flags == [0, 0, 0, 1, 1, 0, 0]
    assert set(rows[0][2]) == {"health/alarm_discriminator_collapse"}  # only enabled alarms
    assert rows[3][3]["health/discriminator_logit_gap"] == pytest.approx(0.1)


def test_discriminator_collapse_on_the_logit_gap_and_a_broken_streak_restarts_the_count():
    monitor = HealthMonitor(HealthConfig(discriminator_windows=2, **ONLY[DISCRIMINATOR_COLLAPSE]))
    apart = discriminator(real=4.0, fake=-2.0)  # gap 6 > 5
    rows = drive(monitor, [apart, discriminator(), apart, {}, apart])
    # Window 4 has no discriminator values (not trained): it neither counts nor breaks the run.
    assert [e for _, e, _, _ in rows] == [[], [], [], [], [(DISCRIMINATOR_COLLAPSE, True)]]
    assert rows[4][3]["health/discriminator_logit_gap"] == pytest.approx(6.0)
    assert "health/discriminator_logit_gap" not in rows[3][3]
    assert rows[3][2]["health/alarm_discriminator_collapse"] == 0


def codebook(usage=0.8, fraction=0.2):
    return {"codebook/usage": usage, "codebook/perplexity_fraction": fraction}


def test_codebook_collapse_on_usage_or_perplexity_and_only_at_codebook_windows():
    monitor = HealthMonitor(HealthConfig(codebook_windows=2, **ONLY[CODEBOOK_COLLAPSE]))
    windows = [codebook(), codebook(usage=0.01), {}, codebook(fraction=0.001), {}, codebook()]
    rows = drive(monitor, windows)
    assert [e for _, e, _, _ in rows] == [
        [],
        [],
        [],
        [(CODEBOOK_COLLAPSE, True)],
        [],
        [(CODEBOOK_COLLAPSE, False)],
    ]
    # The flag is logged at every log step, between codebook windows too.
    assert [f["health/alarm_codebook_collapse"] for _, _, f, _ in rows] == [0, 0, 0, 1, 1, 0]


def test_recon_divergence_after_the_warmup_against_the_best_window():
    config = HealthConfig(
        recon_factor=2.0, recon_warmup_steps=2, recon_windows=2, **ONLY[RECON_DIVERGENCE]
    )
    monitor = HealthMonitor(config)
    losses = [9.0, 9.0, 1.0, 0.5, 1.5, 1.2, 0.9, 1.1]
    rows = drive(monitor, [{"loss/recon": v} for v in losses])
    # Steps 1-2 are warm-up (their 9.0 is not a reference); best 1.0 then 0.5; 1.5 and 1.2
    # are > 2 x 0.5 on two windows in a row: the alarm; 0.9 clears it.
    assert [e for _, e, _, _ in rows if e] == [
        [(RECON_DIVERGENCE, True)],
        [(RECON_DIVERGENCE, False)],
    ]
    assert [s for s, e, _, _ in rows if e] == [6, 7]
    assert rows[4][3]["health/recon_over_best"] == pytest.approx(3.0)
    assert "health/recon_over_best" not in rows[0][3]
    assert monitor.recon_best == 0.5


def test_a_nonfinite_recon_window_counts_as_divergence():
    monitor = HealthMonitor(
        HealthConfig(recon_warmup_steps=0, recon_windows=2, **ONLY[RECON_DIVERGENCE])
    )
    rows = drive(monitor, [{"loss/recon": v} for v in (1.0, math.nan, math.inf, 1.0)])
    assert [e for _, e, _, _ in rows] == [
        [],
        [],
        [(RECON_DIVERGENCE, True)],
        [(RECON_DIVERGENCE, False)],
    ]
    assert monitor.recon_best == 1.0


def test_disabled_alarms_are_silent_and_not_logged():
    off = HealthConfig(
        discriminator_collapse=False, codebook_collapse=False, recon_divergence=False
    )
    monitor = HealthMonitor(replace(off, discriminator_windows=1, codebook_windows=1))
    values = {**discriminator(loss=0.0), **codebook(usage=0.0), "loss/recon": math.nan}
    update = monitor.update(200, values)
    assert update.events == [] and update.scalars == {}


def test_the_state_round_trips_so_a_resumed_run_continues_its_windows():
    config = HealthConfig(discriminator_windows=3, recon_warmup_steps=0)
    low = {**discriminator(loss=0.0), "loss/recon": 1.0}
    straight = HealthMonitor(config)
    drive(straight, [low, low])
    resumed = HealthMonitor(config)
    resumed.load_state_dict(json.loads(json.dumps(straight.state_dict())))
    assert resumed.state_dict() == straight.state_dict()
    assert resumed.recon_best == 1.0
    # The third bad window in a row fires on both: the resumed run kept the count of two.
    for monitor in (straight, resumed):
        events = monitor.update(3, low).events
        assert [(e.alarm, e.active) for e in events] == [(DISCRIMINATOR_COLLAPSE, True)]
        assert "discriminator loss 0" in events[0].message()
    assert HealthMonitor(config).update(3, low).events == []  # a fresh one would not


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"discriminator_windows": 0}, "health.discriminator_windows must be >= 1"),
        ({"codebook_usage_below": -0.1}, "health.codebook_usage_below must be a finite"),
        ({"discriminator_logit_gap_above": math.inf}, "discriminator_logit_gap_above"),
        ({"recon_factor": 1.0}, "health.recon_factor must be > 1"),
        ({"recon_warmup_steps": -1}, "health.recon_warmup_steps must be >= 0"),
    ],
)
def test_bad_health_values_raise(changes, message):
    with pytest.raises(ValueError, match=message):
        HealthConfig(**changes)


def test_the_health_section_loads_from_overrides_and_rejects_unknown_keys():
    config = load_config(
        CONFIG, ["health.codebook_usage_below=0.2", "health.recon_divergence=false"]
    )
    assert config.health.codebook_usage_below == 0.2 and not config.health.recon_divergence
    assert config.to_dict()["health"]["codebook_usage_below"] == 0.2
    assert load_config(CONFIG).health == HealthConfig()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['usage'\] in health"):
        load_config(CONFIG, ["health.usage=0.1"])
    with pytest.raises(ValueError, match="health.recon_windows must be int"):
        load_config(CONFIG, ["health.recon_windows=2.5"])


@pytest.mark.parametrize(
    "recording",
    [
        "tiny_cpu_metrics.jsonl",  # tiny_cpu.yaml: 200 steps, LFQ, GAN from step 100 (f91baca)
        "demo_cpu_metrics.jsonl",  # the demo, demo_cpu.yaml: 400 steps, FSQ, no GAN (2026-12-02)
    ],
)
def test_the_defaults_stay_quiet_on_the_demo_runs(recording):
    """Logged windows of healthy CPU runs on the sample video (2 ranks, `bash launch/train.sh`):
    the values the monitor reads from their metrics.jsonl."""
    log = Path(__file__).parent / "data" / recording
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    monitor = HealthMonitor(HealthConfig())
    for row in rows:
        values = {k: v for k, v in row.items() if k != "step"}
        update = monitor.update(row["step"], values)
        assert update.events == [], (row["step"], [e.message() for e in update.events])
    assert monitor.recon_best is not None  # the recon check did run


def test_a_real_run_warns_and_logs_the_alarm(tmp_path, video_shards):
    """Usage is always below 1.01: the codebook alarm must fire, once, and stay on when the
    run resumes."""
    output = tmp_path / "run"
    overrides = base_overrides(
        output,
        video_shards,
        num_steps=2,
        checkpoint_every=2,
        codebook_stats_window=1,
        export_on_finish="false",
        **{"health.codebook_usage_below": 1.01, "health.codebook_windows": 1},
    )
    result = single_process(overrides)
    assert finished(result), explain(result)
    log = result.stdout + result.stderr
    assert log.count("health ALARM at step 1: codebook_collapse (codebook usage") == 1, log
    assert log.count("health ALARM") == 1 and "health cleared" not in log, log  # once
    rows = metrics(output)
    for step in (1, 2):
        assert rows[step]["health/alarm_codebook_collapse"] == 1.0, rows[step]
        assert rows[step]["health/alarm_recon_divergence"] == 0.0
        assert rows[step]["codebook/usage"] < 1.01
    (checkpoint,) = sorted((output / "checkpoints").glob("step_*"))
    state = json.loads((checkpoint / "trainer_state.json").read_text())["health"]
    assert state["alarms"][CODEBOOK_COLLAPSE] == {"active": True, "bad_windows": 2}

    # Resumed for one more step: the alarm is still on, so no second warning.
    result = single_process([*overrides, "num_steps=3"])
    assert finished(result), explain(result)
    log = result.stdout + result.stderr
    assert "resumed from" in log and "health ALARM" not in log, log
    assert metrics(output)[3]["health/alarm_codebook_collapse"] == 1.0
