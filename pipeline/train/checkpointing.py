"""Checkpoints that survive crashes: both engines, EMA, step, data-loader and RNG states, config.

Layout under `output_dir/checkpoints/`::

    step_00001000/                 a complete checkpoint (has COMPLETE)
      generator/ discriminator/    DeepSpeed's files for each engine
      ema.pt  trainer_state.json  config.yaml
      rank_00000.pt ...            per rank: data-loader state and RNG states
      COMPLETE
    .partial-step_00001500/        being written, or left by a crash: ignored, then deleted

Every rank writes into the partial folder; after a barrier rank 0 marks it complete and renames
it (atomic on one file system), so a crash during a save never touches the previous checkpoint.
The folder must be on a file system all nodes share.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.distributed.collectives import all_reduce_max, barrier
from pipeline.distributed.world import World
from pipeline.train import engines as ds

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
COMPLETE = "COMPLETE"
UNIVERSAL = "universal"
"""A checkpoint's DeepSpeed universal form, made when a run resumes on another world size."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int

    @property
    def state(self) -> dict[str, Any]:
        return json.loads((self.path / "trainer_state.json").read_text())


def complete_checkpoints(root: Path) -> list[Checkpoint]:
    """Complete checkpoints under root, oldest first."""
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and (child / COMPLETE).is_file():
                found.append(Checkpoint(child, int(match.group(1))))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(root: Path) -> Checkpoint | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_write(path: Path, data: str) -> None:
    with open(path, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class Checkpointer:
    """Saves and restores the trainer's state; `keep` complete checkpoints are kept."""

    def __init__(self, root: Path, world: World, keep: int, config_yaml: str) -> None:
        self.root, self.world, self.keep, self.config_yaml = root, world, keep, config_yaml

    def save(
        self,
        step: int,
        engines: ds.Engines,
        ema_state: dict | None,
        loader_state: dict,
        trainer_state: dict,
        mid_save_hook: Callable[[], None] | None = None,
    ) -> Path:
        name = f"step_{step:08d}"
        partial = self.root / f".partial-{name}"
        if self.world.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        barrier()
        ds.save_engine(engines.generator, partial, "generator")
        if mid_save_hook is not None:
            mid_save_hook()  # tests kill a rank here, between the two engines' files
        if engines.discriminator is not None:
            ds.save_engine(engines.discriminator, partial, "discriminator")
        torch.save(
            {"loader": loader_state, "rng": rng_state()}, partial / f"rank_{self.world.rank:05d}.pt"
        )
        if self.world.rank == 0:
            if ema_state is not None:
                torch.save(ema_state, partial / "ema.pt")
            _fsync_write(partial / "config.yaml", self.config_yaml)
            state = {**trainer_state, "step": step, "world_size": self.world.world_size}
            _fsync_write(partial / "trainer_state.json", json.dumps(state, indent=2))
        barrier()  # every rank's files are written
        final = self.root / name
        if self.world.rank == 0:
            _fsync_write(partial / COMPLETE, "")
            if final.exists():  # a rerun reaching a step it saved before
                shutil.rmtree(final)
            partial.rename(final)
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        for stale in self.root.glob(".partial-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
        for old in complete_checkpoints(self.root)[: -self.keep]:
            shutil.rmtree(old.path, ignore_errors=True)

    def restore(self, checkpoint: Checkpoint, engines: ds.Engines) -> dict[str, Any]:
        """Loads the engines and returns {'trainer', 'ema', 'loader', 'rng', 'resharded'}.

        A checkpoint written by another number of ranks (a node was lost, or added) is first
        converted to DeepSpeed's universal format, once, into `CHECKPOINT/universal/` next to
        the original files, and loaded from there: weights, fp32 master weights, Adam moments,
        schedules and step counters all carry over. Only if DeepSpeed cannot convert or load it
        are the weights and the EMA loaded alone, with a warning.
        """
        trainer_state = checkpoint.state
        saved_world = int(trainer_state["world_size"])
        resharded = saved_world != self.world.world_size
        pairs = [(engines.generator, "generator")]
        if engines.discriminator is not None:
            pairs.append((engines.discriminator, "discriminator"))
        if not (resharded and self._restore_universal(checkpoint, pairs, saved_world)):
            for engine, tag in pairs:
                ds.load_engine(engine, checkpoint.path, tag, module_only=resharded)
        ema_path = checkpoint.path / "ema.pt"
        ema = torch.load(ema_path, map_location="cpu") if ema_path.is_file() else None
        rank_file = checkpoint.path / f"rank_{self.world.rank:05d}.pt"
        per_rank = (
            torch.load(rank_file, map_location="cpu", weights_only=False)
            if (rank_file.is_file())
            else {}
        )
        return {
            "trainer": trainer_state,
            "ema": ema,
            "loader": per_rank.get("loader"),
            "rng": None if resharded else per_rank.get("rng"),
            "resharded": resharded,
        }

    def _restore_universal(self, checkpoint: Checkpoint, pairs: list, saved_world: int) -> bool:
        """Converts (rank 0, once) and loads the universal form of each engine; False, after a
        warning, when DeepSpeed cannot."""
        universal = checkpoint.path / UNIVERSAL
        error = ""
        if self.world.rank == 0 and not (universal / COMPLETE).is_file():
            partial = checkpoint.path / f".partial-{UNIVERSAL}"
            shutil.rmtree(partial, ignore_errors=True)
            try:
                start = time.monotonic()
                for _, tag in pairs:
                    ds.convert_to_universal(checkpoint.path, tag, partial)
                _fsync_write(partial / COMPLETE, "")
                partial.rename(universal)
                logger.info(
                    "%s was written by %d ranks, this run has %d: converted to DeepSpeed's "
                    "universal checkpoint in %.1f s (%s)",
                    checkpoint.path,
                    saved_world,
                    self.world.world_size,
                    time.monotonic() - start,
                    universal,
                )
            except Exception as exc:  # noqa: BLE001 - any DeepSpeed failure: fall back, loudly
                error = f"{type(exc).__name__}: {exc}"
        barrier()
        if (universal / COMPLETE).is_file():
            try:
                for engine, tag in pairs:
                    ds.load_engine_universal(engine, universal, tag)
            except Exception as exc:  # noqa: BLE001
                error = f"{type(exc).__name__}: {exc}"
            failed = torch.tensor([float(bool(error))])
            if not all_reduce_max(failed).item():  # every rank loaded: all or none
                return True
            # Half-loaded engines: the fallback loads the weights again, on every rank.
        if self.world.rank == 0 or error:
            logger.warning(
                "!!! %s was written by %d ranks, this run has %d, and DeepSpeed could not "
                "convert or load it as a universal checkpoint (%s): loading the weights and "
                "the EMA only; optimizer moments and learning-rate schedule state start "
                "fresh !!!",
                checkpoint.path,
                saved_world,
                self.world.world_size,
                error or "see rank 0's log",
            )
        return False


def init_source(source: Path) -> Path | Checkpoint:
    """What `init_from` points at: an export folder (returned as is) or a complete checkpoint
    (a run folder's latest, or a checkpoint folder). ValueError otherwise."""
    if (source / "config.json").is_file() and (source / "model.safetensors").is_file():
        return source
    if (source / "checkpoints").is_dir():
        checkpoint = latest_checkpoint(source / "checkpoints")
    elif (source / COMPLETE).is_file():
        checkpoint = Checkpoint(source, -1)
    else:
        checkpoint = None
    if checkpoint is None:
        raise ValueError(
            f"init_from={source}: not an export, a run folder with a complete "
            "checkpoint, or a complete checkpoint folder"
        )
    return checkpoint


def module_weights(source: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(generator, discriminator) weights from a run folder, a checkpoint or an export, for
    `init_from`. Exports have no discriminator."""
    found = init_source(source)
    if isinstance(found, Path):
        from safetensors.torch import load_file

        return load_file(str(found / "model.safetensors")), None

    def states(tag: str) -> dict[str, torch.Tensor] | None:
        files = sorted((found.path / tag).glob("*model_states.pt"))
        if not files:
            return None
        package = torch.load(files[0], map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in package["module"].items()}

    generator = states("generator")
    if generator is None:
        raise ValueError(f"{found.path} holds no generator weights")
    return generator, states("discriminator")
