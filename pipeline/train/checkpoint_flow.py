"""The trainer's side of checkpoints: what a save holds beyond the engines, resuming a run from
its latest complete checkpoint, the final export, and initial weights from another run.

pipeline.train.checkpointing writes and reads the checkpoint folders; these functions decide what
goes in and where it comes back to on the `Trainer`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from model import Tokenizer
from model.pretrained import save_pretrained
from pipeline.train.checkpointing import latest_checkpoint, module_weights, set_rng_state

if TYPE_CHECKING:
    from pipeline.train.trainer import Trainer

logger = logging.getLogger(__name__)


def trainer_state(trainer: Trainer) -> dict[str, Any]:
    """The loop's own state (trainer_state.json, next to the step): counters, LeCAM anchors,
    health alarms."""
    return {
        "counters": trainer.counters,
        "lecam_ema": {
            "real_logits": float(trainer.lecam_ema[0]),
            "fake_logits": float(trainer.lecam_ema[1]),
            "updates": trainer.lecam_updates,
        },
        "health": trainer.health.state_dict(),
    }


def save(trainer: Trainer) -> None:
    """A checkpoint of the current step (both engines, EMA, loader, RNG, `trainer_state`)."""
    trainer.checkpointer.save(
        trainer.step,
        trainer.engines,
        trainer.ema.state_dict() if trainer.ema else None,
        trainer.loader.state_dict(),
        trainer_state(trainer),
        mid_save_hook=trainer.callbacks.during_save(trainer.step, stopping=trainer.stopped),
    )
    trainer.saved_step = trainer.step
    trainer.stop.saved()
    trainer.tensorboard.flush()


def resume(trainer: Trainer) -> None:
    """Restores the latest complete checkpoint under the run's folder, if there is one."""
    checkpoint = latest_checkpoint(trainer.config.checkpoint_dir)
    if checkpoint is None:
        return
    restored = trainer.checkpointer.restore(checkpoint, trainer.engines)
    _restore_trainer_state(trainer, restored["trainer"])
    if trainer.ema is not None and restored["ema"] is not None:
        trainer.ema.load_state_dict(restored["ema"])
    if restored["loader"] is not None:
        trainer.loader.load_state_dict(restored["loader"])
    if restored["rng"] is not None:
        set_rng_state(restored["rng"])
    if trainer.world.rank == 0:
        logger.info("resumed from %s at step %d", checkpoint.path, trainer.step)


def _restore_trainer_state(trainer: Trainer, state: dict[str, Any]) -> None:
    """`trainer_state` back onto the trainer (older checkpoints may lack some parts)."""
    trainer.step = int(state["step"])
    trainer.counters.update(state.get("counters", {}))
    lecam = state.get("lecam_ema")
    if lecam is not None:
        values = (lecam["real_logits"], lecam["fake_logits"])
        trainer.lecam_ema.copy_(torch.tensor(values, dtype=torch.float32))
        trainer.lecam_updates = int(lecam["updates"])
    if "health" in state:
        trainer.health.load_state_dict(state["health"])


def export(trainer: Trainer) -> Path | None:
    """The EMA generator as safetensors + config JSON, loadable without DeepSpeed (rank 0)."""
    if trainer.world.rank != 0:
        return None
    ema = trainer.ema
    state = ema.state_dict_for(trainer.tokenizer) if ema else None
    path = save_pretrained(
        trainer.tokenizer,
        trainer.output_dir / "export",
        state_dict=state,
        metadata={"step": trainer.step, "ema": ema is not None},
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
