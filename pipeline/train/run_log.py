"""Where the run's scalars, reconstruction clips and config go: one `RunLog` the trainer calls,
fanning out to OUTPUT_DIR/metrics.jsonl (always), TensorBoard and/or Weights & Biases (the
config's `logger`). Only rank 0 writes; on the other ranks every call does nothing."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any, Protocol

import torch

from pipeline.distributed.world import World
from pipeline.train.metrics import TensorBoard, side_by_side_gif


class Sink(Protocol):
    def scalars(self, values: dict[str, float], step: int) -> None: ...
    def video(self, tag: str, real: torch.Tensor, fake: torch.Tensor, step: int) -> None: ...
    def text(self, tag: str, text: str) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class JsonLines:
    """The scalars as one JSON object per logged step, for scripts (NaN kept as NaN)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def scalars(self, values: dict[str, float], step: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}, allow_nan=True) + "\n")

    def video(self, tag: str, real: torch.Tensor, fake: torch.Tensor, step: int) -> None:
        pass

    def text(self, tag: str, text: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class Wandb:
    """A Weights & Biases run in OUTPUT_DIR/wandb (the `wandb` extra). `mode` None lets wandb
    choose (WANDB_MODE, else online); "offline" needs no network (`wandb sync` uploads later).
    A resumed training run continues the same wandb run (its id is kept in OUTPUT_DIR)."""

    def __init__(
        self, output_dir: Path, project: str, mode: str | None, name: str | None, config: dict
    ) -> None:
        import wandb

        self.wandb = wandb
        self.media = output_dir / "wandb_media"
        id_file = output_dir / "wandb_run_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        self.run = wandb.init(
            project=project,
            mode=mode,
            name=name or output_dir.resolve().name,
            dir=str(output_dir),
            id=run_id,
            resume="allow",
            config=config,
        )
        id_file.write_text(run_id + "\n")

    def scalars(self, values: dict[str, float], step: int) -> None:
        finite = {k: v for k, v in values.items() if v is not None and math.isfinite(v)}
        self.run.log(finite, step=step)

    def video(self, tag: str, real: torch.Tensor, fake: torch.Tensor, step: int) -> None:
        gif, _, _ = side_by_side_gif(real, fake)
        self.media.mkdir(parents=True, exist_ok=True)
        path = self.media / f"{tag.replace('/', '_')}_{step:08d}.gif"
        path.write_bytes(gif)  # from a file: wandb encodes raw frames only with moviepy
        self.run.log({tag: self.wandb.Video(str(path), format="gif")}, step=step)

    def text(self, tag: str, text: str) -> None:
        self.run.config.update({tag: text}, allow_val_change=True)

    def flush(self) -> None:
        pass  # wandb streams in its own process

    def close(self) -> None:
        self.run.finish()


class RunLog:
    """Every sink of the run behind one object: each call goes to each sink, in order."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def scalars(self, values: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.scalars(values, step)

    def video(self, tag: str, real: torch.Tensor, fake: torch.Tensor, step: int) -> None:
        for sink in self.sinks:
            sink.video(tag, real, fake, step)

    def text(self, tag: str, text: str) -> None:
        for sink in self.sinks:
            sink.text(tag, text)

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def build_run_log(config: Any, world: World) -> RunLog:
    """The sinks `config.logger` selects (a TrainConfig), on rank 0; none elsewhere."""
    if world.rank != 0:
        return RunLog([])
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    sinks: list[Sink] = [JsonLines(output_dir / "metrics.jsonl")]
    if config.logger in ("tensorboard", "both"):
        sinks.append(TensorBoard(output_dir / "tensorboard"))
    if config.logger in ("wandb", "both"):
        sinks.append(
            Wandb(
                output_dir,
                config.wandb_project,
                config.wandb_mode,
                config.wandb_run_name,
                config.to_dict(),
            )
        )
    return RunLog(sinks)
