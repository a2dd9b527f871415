"""The command lines: console scripts, usage lines, the training config reference, --print-config
and `launch/train.sh --help`, each run as a user runs it (a subprocess at this repository).

The console scripts are read from pyproject.toml's [project.scripts] and called as the installed
wrapper calls them (sys.argv[0] = the script's name, sys.exit(function())), since an editable
install may predate a script.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from model.config import DiscriminatorConfig, TokenizerConfig
from pipeline.data.loader import DataConfig
from pipeline.train.config import (
    FaultInjection,
    LossScheduleConfig,
    OptimizerConfig,
    SpeedConfig,
    TrainConfig,
    load_config,
)
from pipeline.train.health import HealthConfig

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
TINY = REPO / "launch" / "configs" / "tiny_cpu.yaml"
# A default each --help must show (the options' defaults, not just their names).
SHOWN_DEFAULT = {
    "magvit-evaluate": "clips per batch per rank (default: 4)",
    "magvit-tokenize": "clips per batch per rank (default: 8)",
    "magvit-train": "  num_steps = 1000",
}
SECTIONS = {
    "model": TokenizerConfig,
    "model.discriminator": DiscriminatorConfig,
    "data": DataConfig,
    "generator_optim": OptimizerConfig,
    "discriminator_optim": OptimizerConfig,
    "losses": LossScheduleConfig,
    "speed": SpeedConfig,
    "health": HealthConfig,
    "faults": FaultInjection,
}
NOT_CONFIGURABLE = {"data": {"micro_batch_size", "time_compression", "mode"}}


def run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run(
        args, cwd=REPO, env=environment, capture_output=True, text=True, timeout=180
    )


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    module, function = SCRIPTS[name].split(":")
    code = (
        f"import sys; from {module} import {function}; sys.argv[0] = {name!r}; "
        f"sys.argv[1:] = {list(args)!r}; sys.exit({function}())"
    )
    return run([sys.executable, "-c", code])


@pytest.fixture(scope="module")
def train_help() -> str:
    result = run([sys.executable, "-m", "pipeline.train", "--help"])
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_command_has_a_console_script():
    assert {"magvit-train", "magvit-evaluate", "magvit-tokenize"} <= set(SCRIPTS)
    assert {"magvit-shard", "magvit-verify", "magvit-data"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_help_names_itself(name):
    result = run_script(name, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {name} "), result.stdout[:200]
    assert SHOWN_DEFAULT.get(name, "") in result.stdout


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_installed_console_script_help(name):
    """The wrapper pip wrote into the venv (a fresh install, as in CI, has every script)."""
    script = Path(sys.executable).parent / name
    if not script.exists():
        pytest.skip(f"{name} is not installed in this venv (its install predates the script)")
    result = run([str(script), "--help"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {name} "), result.stdout[:200]


@pytest.mark.parametrize(
    "module", ["pipeline.train", "pipeline.evaluate", "pipeline.tokenize", "data_prep"]
)
def test_module_help_names_python_m(module):
    result = run([sys.executable, "-m", module, "--help"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m {module} "), result.stdout[:200]


def test_tokenize_file_commands_name_the_console_script():
    result = run_script("magvit-tokenize", "encode-file", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: magvit-tokenize encode-file "), result.stdout[:200]


def test_train_help_lists_every_top_level_key(train_help):
    for f in dataclasses.fields(TrainConfig):
        if f.name in SECTIONS or f.name == "eval_data":
            assert f"\n{f.name}.*: " in train_help, f.name
        else:
            assert re.search(rf"^  {f.name}( = | \(required\)|$)", train_help, re.M), f.name


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_train_help_lists_every_key_of_each_section(train_help, section):
    skipped = NOT_CONFIGURABLE.get(section, set()) | {"discriminator"}
    for f in dataclasses.fields(SECTIONS[section]):
        if f.name not in skipped:
            assert re.search(rf"^  {section}\.{f.name}( = | \(required\)|$)", train_help, re.M)
    for name in NOT_CONFIGURABLE.get(section, ()):
        assert f"  {section}.{name} " not in train_help


def test_train_help_shows_defaults_and_docstrings(train_help):
    assert "  generator_optim.lr = 0.0001\n" in train_help
    assert "  data.num_workers = 2\n      Data-loader worker processes per rank" in train_help
    assert "optim.lr=" not in train_help.replace("generator_optim.lr=", "")


def help_override_examples(train_help: str) -> list[str]:
    """The overrides of the help's first example (the line after `... tiny_cpu.yaml \\`)."""
    lines = train_help.splitlines()
    start = next(i for i, line in enumerate(lines) if line.endswith("tiny_cpu.yaml \\"))
    return lines[start + 1].split()


def print_config(*args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "pipeline.train", "--print-config", *args])


@pytest.mark.parametrize("config", ["tiny_cpu.yaml", "base_128.yaml"])
def test_print_config_round_trips(tmp_path, config):
    path = REPO / "launch" / "configs" / config
    result = print_config("--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "rank" not in result.stderr  # no process group, no rank logging
    assert isinstance(yaml.safe_load(result.stdout), dict)
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(result.stdout)
    assert load_config(dumped) == load_config(path)


def test_help_override_example_works_with_print_config(tmp_path, train_help):
    overrides = help_override_examples(train_help)
    assert "generator_optim.lr=2e-4" in overrides
    result = print_config("--config", str(TINY), *overrides)
    assert result.returncode == 0, result.stderr
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(result.stdout)
    assert load_config(dumped) == load_config(TINY, overrides)
    config = load_config(dumped)
    assert config.generator_optim.lr == pytest.approx(2e-4)
    assert (config.num_steps, config.data.num_workers) == (20, 4)


def test_print_config_rejects_an_unknown_key():
    result = print_config("--config", str(TINY), "optim.lr=2e-4")
    assert result.returncode == 2
    assert "unknown top-level key(s) ['optim']" in result.stderr


def test_train_sh_help_prints_usage_once(tmp_path):
    # A `deepspeed` next to the interpreter would be the launcher: it must not start.
    marker = tmp_path / "launched"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (fake / "python").chmod(0o755)
    (fake / "deepspeed").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (fake / "deepspeed").chmod(0o755)
    result = run(
        ["bash", "launch/train.sh", "--config", str(TINY), "--help"], PYTHON=str(fake / "python")
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("usage:") == 1
    assert "usage: python -m pipeline.train " in result.stdout
    for variable in ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "HOSTFILE"):
        assert variable in result.stdout
    assert "  generator_optim.lr = " in result.stdout
    assert not marker.exists()
