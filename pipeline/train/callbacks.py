"""Hooks into the training loop, for code that is not part of training itself (the failure-path
tests' fault injection, pipeline.train.faults). The trainer calls a `Callbacks` of them; with
none installed every hook is a no-op."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class TrainerCallback:
    """One set of hooks; override what you need (each default does nothing)."""

    def on_step_start(self, step: int) -> None:
        """Before the micro-batches of optimizer step `step` are read."""

    def on_batch(self, step: int, video: torch.Tensor) -> torch.Tensor:
        """A micro-batch (b, c, t, h, w) of step `step` before the forward; returns the one to
        train on."""
        return video

    def during_save(self, step: int, stopping: bool) -> Callable[[], None] | None:
        """A function the checkpointer calls halfway through the checkpoint of `step` (between
        the two engines' files; `stopping`: the save of a stop request), or None."""
        return None


class Callbacks(TrainerCallback):
    """Several callbacks called in order (a batch goes through each in turn)."""

    def __init__(self, callbacks: Sequence[TrainerCallback] = ()) -> None:
        self.callbacks = tuple(callbacks)

    def on_step_start(self, step: int) -> None:
        for callback in self.callbacks:
            callback.on_step_start(step)

    def on_batch(self, step: int, video: torch.Tensor) -> torch.Tensor:
        for callback in self.callbacks:
            video = callback.on_batch(step, video)
        return video

    def during_save(self, step: int, stopping: bool) -> Callable[[], None] | None:
        hooks = [h for c in self.callbacks if (h := c.during_save(step, stopping)) is not None]
        if not hooks:
            return None

        def run_all() -> None:
            for hook in hooks:
                hook()

        return run_all
