"""The optimizers a run can use: one table, one owner (torch-free at import; each builds itself lazily).

The config's choice list, the pre-flight's learning-rate advice, the estimate's optimizer-state bytes, the
kohya_ss import / sd-scripts export names and the engine's construction all read the entry here, so adding an
optimizer is one entry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


class OptimizerError(RuntimeError):
    """An optimizer that cannot be built here, with what to do instead."""


def _adamw(groups, cfg, device):
    import torch

    kw = {"fused": True} if device == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, **kw)


def _adamw8bit(groups, cfg, device):
    try:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, weight_decay=cfg.weight_decay)
    except Exception as e:
        raise OptimizerError(
            f"The 8-bit optimizer (bitsandbytes) is not usable here ({type(e).__name__}: {str(e)[:120]}). "
            "Use optimizer = 'adamw', or install a bitsandbytes build that matches your CUDA."
        ) from None


def _prodigy(groups, cfg, device):
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise OptimizerError("Prodigy needs the 'prodigyopt' package: pip install prodigyopt") from None
    return Prodigy(groups, weight_decay=cfg.weight_decay, safeguard_warmup=True, use_bias_correction=True)


@dataclass(frozen=True)
class Optimizer:
    key: str  # the config's value
    sd_scripts: str  # sd-scripts' optimizer_type
    state_bytes: int  # optimizer state per trained parameter (the estimate adds weight and gradient)
    build: Callable  # (param groups, config, device) -> torch optimizer; raises OptimizerError
    adaptive: bool = False  # finds its own step size: learning rates near 1.0
    kohya_names: tuple = field(default=())  # other kohya_ss spellings imported as this one


OPTIMIZERS: dict[str, Optimizer] = {o.key: o for o in (
    Optimizer("adamw", "AdamW", 8, _adamw),
    Optimizer("adamw8bit", "AdamW8bit", 2, _adamw8bit, kohya_names=("pagedadamw8bit",)),
    Optimizer("prodigy", "Prodigy", 16, _prodigy, adaptive=True),
)}
KEYS = tuple(OPTIMIZERS)


def get(key: str) -> Optimizer:
    try:
        return OPTIMIZERS[key]
    except KeyError:
        raise OptimizerError(f"Unknown optimizer '{key}'. Known: {', '.join(KEYS)}.") from None


def from_kohya(name: str) -> Optimizer | None:
    """The optimizer a kohya_ss config names ('AdamW8bit', 'PagedAdamW8bit', 'Prodigy', ...), or None."""
    n = str(name).lower().replace("_", "")
    return next((o for o in OPTIMIZERS.values() if n == o.key or n in o.kohya_names), None)
