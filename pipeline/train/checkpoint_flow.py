"""The trainer's side of checkpoints: what a save holds beyond the engines, resuming a run from
its latest complete checkpoint, the final export, and initial weights from another run.

pipeline.train.checkpointing writes and reads the checkpoint folders; these functions decide what
goes in and where it comes back to on the `Trainer`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from model import Tokenizer
from model.pretrained import save_pretrained
from pipeline.train.checkpointing import latest_checkpoint, module_weights, set_rng_state

logger = logging.getLogger(__name__)


class CheckpointFlow:
    """The `Trainer`'s checkpoint methods (a mixin: they read and set the trainer's step, engines,
    EMA, loader, counters, LeCAM anchors, health monitor and checkpointer)."""

    def trainer_state(self) -> dict[str, Any]:
        """The loop's own state (trainer_state.json, next to the step): counters, LeCAM anchors,
        health alarms."""
        return {
            "counters": self.counters,
            "lecam_ema": {
                "real_logits": float(self.lecam_ema[0]),
                "fake_logits": float(self.lecam_ema[1]),
                "updates": self.lecam_updates,
            },
            "health": self.health.state_dict(),
        }

    def save(self) -> None:
        """A checkpoint of the current step (both engines, EMA, loader, RNG, `trainer_state`)."""
        self.checkpointer.save(
            self.step,
            self.engines,
            self.ema.state_dict() if self.ema else None,
            self.loader.state_dict(),
            self.trainer_state(),
            mid_save_hook=self.callbacks.during_save(self.step, stopping=self.stopped),
        )
        self.saved_step = self.step
        self.stop.saved()
        self.run_log.flush()

    def maybe_resume(self) -> None:
        """Restores the latest complete checkpoint under the run's folder, if there is one."""
        checkpoint = latest_checkpoint(self.config.checkpoint_dir)
        if checkpoint is None:
            return
        restored = self.checkpointer.restore(checkpoint, self.engines)
        self._restore_trainer_state(restored["trainer"])
        if self.ema is not None and restored["ema"] is not None:
            self.ema.load_state_dict(restored["ema"])
        if restored["loader"] is not None:
            self.loader.load_state_dict(restored["loader"])
        if restored["rng"] is not None:
            set_rng_state(restored["rng"])
        if self.world.rank == 0:
            logger.info("resumed from %s at step %d", checkpoint.path, self.step)

    def _restore_trainer_state(self, state: dict[str, Any]) -> None:
        """`trainer_state` back onto the trainer (older checkpoints may lack some parts)."""
        self.step = int(state["step"])
        self.counters.update(state.get("counters", {}))
        lecam = state.get("lecam_ema")
        if lecam is not None:
            values = (lecam["real_logits"], lecam["fake_logits"])
            self.lecam_ema.copy_(torch.tensor(values, dtype=torch.float32))
            self.lecam_updates = int(lecam["updates"])
        if "health" in state:
            self.health.load_state_dict(state["health"])

    def export(self) -> Path | None:
        """The EMA generator as safetensors + config JSON, loadable without DeepSpeed (rank 0)."""
        if self.world.rank != 0:
            return None
        ema = self.ema
        state = ema.state_dict_for(self.tokenizer) if ema else None
        path = save_pretrained(
            self.tokenizer,
            self.output_dir / "export",
            state_dict=state,
            metadata={"step": self.step, "ema": ema is not None},
        )
        logger.info("exported the %s generator to %s", "EMA" if ema else "final", path)
        return path


def load_initial_weights(
    source: Path, tokenizer: Tokenizer, critics: torch.nn.Module | None, rank: int
) -> None:
    """`init_from`: another run's generator (and discriminator) weights; optimizer state starts
    fresh."""
    generator, discriminator = module_weights(source)
    generator = {k.removeprefix("tokenizer."): v for k, v in generator.items()}
    tokenizer.load_state_dict(generator)
    if critics is not None and discriminator is not None:
        critics.load_state_dict({k.removeprefix("critics."): v for k, v in discriminator.items()})
    if rank == 0:
        logger.info("initialised weights from %s (fresh optimizer state)", source)
