"""EMA of the LoRA weights (OneTrainer, ai-toolkit and SimpleTuner have it; kohya does not), with diffusers'
own `EMAModel`: a shadow copy, updated after optimizer steps, kept where the config says (the CPU on cards
under 12 GB by default). Samples and validation use it while on; the exported file holds it (and, when asked,
the trained weights beside it); checkpoints keep it, so a resumed run goes on with the same average.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

EMA_FILE = "ema.pt"  # in a checkpoint folder
SMALL_CARD_GB = 12


def ema_device(cfg, device: torch.device) -> torch.device:
    """Where the shadow copy lives: 'cpu', 'device' (beside the LoRA), or 'auto' (the CPU on cards under 12 GB)."""
    if cfg.ema_device == "cpu" or device.type != "cuda":
        return torch.device("cpu")
    if cfg.ema_device == "device":
        return device
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    return torch.device("cpu") if total < SMALL_CARD_GB else device


class LoraEMA:
    """The EMA of a run's trainable LoRA parameters."""

    def __init__(self, cfg, params: list[torch.nn.Parameter], device: torch.device):
        from diffusers.training_utils import EMAModel

        self.params, self.device, self.every = params, device, max(1, cfg.ema_update_every)
        self.ema = EMAModel(self._here(), decay=cfg.ema_decay)

    def _here(self) -> list[torch.Tensor]:
        """The parameters as the shadow's device sees them (a copy when the shadow waits on the CPU)."""
        if all(p.device == self.device for p in self.params):
            return self.params
        return [p.detach().to(self.device).requires_grad_(True) for p in self.params]

    def update(self, step: int) -> None:
        if step % self.every == 0:
            self.ema.step(self._here())

    @contextmanager
    def swapped_in(self):
        """The EMA weights in the model for the block, then the trained ones again, exactly."""
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def save(self, folder: Path) -> None:
        torch.save(self.ema.state_dict(), Path(folder) / EMA_FILE)

    def load(self, folder: Path) -> bool:
        path = Path(folder) / EMA_FILE
        if not path.is_file():
            return False
        self.ema.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.ema.to(self.device)
        return True
