"""The layout of a run folder, in one place: the engine writes it, the app reads it (torch-free).

    <run>/config.toml                     the TrainConfig the run was started with
    <run>/events.jsonl                    the append-only event log (trainer.events)
    <run>/control/{stop,save}             requests into the engine, polled between steps
    <run>/checkpoints/step-000100/        resumable checkpoints (trainer.engine.checkpoint), each with its kohya file
    <run>/samples/step000100_00.png       sample images
    <run>/<output_name>.safetensors       the final LoRA
    <run>/worker.log, <run>/error.log     the worker's output; an engine bug's traceback
    <run>/tensorboard/                    TensorBoard event files (tensorboard = true)
    <run>/variants/<name>/                a sweep's variant: its checkpoints/ and samples/ (its final file is
                                          <run>/<output_name>-<name>.safetensors)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CONFIG = "config.toml"
EVENTS = "events.jsonl"
CONTROL = "control"
CHECKPOINTS = "checkpoints"
SAMPLES = "samples"
WORKER_LOG = "worker.log"
ERROR_LOG = "error.log"
TENSORBOARD = "tensorboard"
VARIANTS = "variants"
# inside a checkpoint folder
LORA_STATE = "lora_state.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"
_STEP = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class RunFiles:
    root: Path

    def __init__(self, root) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def events(self) -> Path:
        return self.root / EVENTS

    @property
    def control(self) -> Path:
        return self.root / CONTROL

    def request(self, command: str) -> Path:
        """The file that asks the engine to act ('stop', 'save'): present until the engine takes it."""
        return self.control / command

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def samples(self) -> Path:
        return self.root / SAMPLES

    @property
    def worker_log(self) -> Path:
        return self.root / WORKER_LOG

    @property
    def error_log(self) -> Path:
        return self.root / ERROR_LOG

    def final(self, output_name: str) -> Path:
        return self.root / f"{output_name}.safetensors"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:06d}"

    def sample(self, step: int, index: int) -> Path:
        return self.samples / f"step{step:06d}_{index:02d}.png"

    def checkpoint_dirs(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = [(int(m[1]), p) for p in self.checkpoints.iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
        return [p for _, p in sorted(found) if (p / STATE).is_file()]

    def latest_checkpoint(self) -> Path | None:
        dirs = self.checkpoint_dirs()
        return dirs[-1] if dirs else None

    def final_loras(self) -> list[Path]:
        return sorted(p for p in self.root.glob("*.safetensors") if not p.name.startswith("."))

    def variant_dirs(self) -> list[Path]:
        """A sweep's variant folders (none for a run of one LoRA)."""
        folder = self.root / VARIANTS
        return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def checkpoint_loras(self) -> list[tuple[int, Path]]:
        """(step, kohya file) of every checkpoint, oldest first (a sweep: every variant's)."""
        out = []
        for d in self.checkpoint_dirs():
            for f in sorted(d.glob("*.safetensors")):
                if f.name != LORA_STATE:
                    out.append((step_of(d), f))
        for v in self.variant_dirs():
            out += RunFiles(v).checkpoint_loras()
        return sorted(out, key=lambda sf: sf[0])

    def lora_files(self) -> list[Path]:
        """Final LoRA first, then each checkpoint's, newest first."""
        return self.final_loras() + [f for _, f in reversed(self.checkpoint_loras())]

    @staticmethod
    def of_checkpoint(checkpoint_dir) -> "RunFiles":
        """The run a checkpoints/step-N folder belongs to."""
        return RunFiles(Path(checkpoint_dir).parents[1])

    @staticmethod
    def of_lora(path) -> "RunFiles":
        """The run a LoRA file belongs to (a final file or a checkpoint's)."""
        p = Path(path)
        root = p.parents[2] if _STEP.match(p.parent.name) else p.parent
        return RunFiles(root.parents[1] if root.parent.name == VARIANTS else root)  # a variant's: the sweep's run


def step_of(checkpoint_dir) -> int | None:
    m = _STEP.match(Path(checkpoint_dir).name)
    return int(m[1]) if m else None
