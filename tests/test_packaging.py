"""`pip install .` next to a cluster's own torch: pip's resolver, in --dry-run --report mode, keeps
an installed torch of the supported range and refuses one outside it.

The installed torch is a metadata-only distribution ahead of the venv's own on PYTHONPATH, so
pip sees that version; --no-index makes the run offline (what pip would have to fetch, it
cannot, and says so)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of what `pip install .` builds from (setuptools writes its egg-info there)."""
    copy = tmp_path_factory.mktemp("project")
    for name in ("model", "pipeline", "data_prep"):
        shutil.copytree(REPO / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, copy / name)
    return copy


def _dry_run(project: Path, site: Path, torch: str, torchvision: str, report: Path):
    for name, version in (("torch", torch), ("torchvision", torchvision)):
        info = site / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        info.joinpath("METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        )
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index"]
    command += ["--no-build-isolation", "--report", str(report), str(project)]
    env = {**os.environ, "PYTHONPATH": str(site), "PIP_NO_INPUT": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("torch", "torchvision"), [("2.11.0", "0.26.0"), ("2.14.1", "0.29.1")])
def test_pip_keeps_an_installed_torch_of_the_range(project, tmp_path, torch, torchvision):
    report = tmp_path / "report.json"
    result = _dry_run(project, tmp_path / "site", torch, torchvision, report)
    assert result.returncode == 0, result.stderr[-2000:]
    installs = [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
    assert installs == ["magvit2-at-scale"]  # torch, torchvision and the rest stay as they are


def test_pip_refuses_a_torch_outside_the_range(project, tmp_path):
    result = _dry_run(project, tmp_path / "site", "2.10.0", "0.25.0", tmp_path / "report.json")
    assert result.returncode != 0 and "ResolutionImpossible" in result.stderr
    assert "torchvision" in result.stdout  # what pip would have to replace, and cannot fetch
