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


def _bnb(name: str):
    def build(groups, cfg, device):
        try:
            import bitsandbytes as bnb

            return getattr(bnb.optim, name)(groups, weight_decay=cfg.weight_decay)
        except Exception as e:
            raise OptimizerError(
                f"{name} (bitsandbytes) is not usable here ({type(e).__name__}: {str(e)[:120]}). Use optimizer = "
                "'adamw' or 'lion', or install a bitsandbytes build that matches your CUDA."
            ) from None
    return build


def _pytorch_optimizer(name: str, **fixed):
    """An optimizer of the pytorch-optimizer package (CAME, Lion, schedule-free AdamW): one maintained dependency
    for the optimizers the peers offer, rather than one small package each."""
    def build(groups, cfg, device):
        try:
            import pytorch_optimizer
        except ImportError:
            raise OptimizerError(f"{name} needs the 'pytorch-optimizer' package: pip install pytorch-optimizer") from None
        extra = {"warmup_steps": cfg.warmup_steps} if name == "ScheduleFreeAdamW" else {}
        return getattr(pytorch_optimizer, name)(groups, weight_decay=cfg.weight_decay, **fixed, **extra)
    return build


def _adafactor(groups, cfg, device):
    """transformers' Adafactor. With adafactor_relative_step it finds its own step size from the step count
    (relative_step, scale_parameter, warmup_init): the learning rates are not used, and the schedule is its own."""
    from transformers.optimization import Adafactor

    if cfg.adafactor_relative_step:
        for g in groups:
            g["lr"] = None
        return Adafactor(groups, lr=None, relative_step=True, scale_parameter=True, warmup_init=True,
                         weight_decay=cfg.weight_decay)
    return Adafactor(groups, relative_step=False, scale_parameter=False, warmup_init=False, weight_decay=cfg.weight_decay)


@dataclass(frozen=True)
class Optimizer:
    key: str  # the config's value
    sd_scripts: str  # sd-scripts' optimizer_type
    state_bytes: int  # optimizer state per trained parameter (the estimate adds weight and gradient)
    build: Callable  # (param groups, config, device) -> torch optimizer; raises OptimizerError
    adaptive: bool = False  # finds its own step size: learning rates near 1.0
    kohya_names: tuple = field(default=())  # other kohya_ss spellings imported as this one (lower case, no '_')
    schedule_free: bool = False  # averages its own iterates: train/eval switch around samples, validation, saves;
    #                              its warm-up is its own, and the LR schedule must be constant
    label: str = ""  # what the page says of it


OPTIMIZERS: dict[str, Optimizer] = {o.key: o for o in (
    Optimizer("adamw", "AdamW", 8, _adamw, label="AdamW (torch)"),
    Optimizer("adamw8bit", "AdamW8bit", 2, _adamw8bit, label="AdamW, 8-bit state (bitsandbytes): less VRAM"),
    Optimizer("pagedadamw8bit", "PagedAdamW8bit", 2, _bnb("PagedAdamW8bit"),
              label="AdamW, 8-bit state paged to RAM under pressure (bitsandbytes)"),
    Optimizer("prodigy", "Prodigy", 16, _prodigy, adaptive=True, label="Prodigy: adaptive, use LR 1.0"),
    Optimizer("adafactor", "Adafactor", 1, _adafactor, kohya_names=("adafactor",),
              label="Adafactor (transformers): factored state, least memory"),
    Optimizer("lion", "pytorch_optimizer.Lion", 4, _pytorch_optimizer("Lion"), kohya_names=("pytorchoptimizer.lion",),
              label="Lion: one momentum; use a 3-10x lower LR than AdamW"),
    Optimizer("lion8bit", "Lion8bit", 1, _bnb("Lion8bit"), label="Lion, 8-bit state (bitsandbytes)"),
    Optimizer("came", "pytorch_optimizer.CAME", 4, _pytorch_optimizer("CAME"),
              kohya_names=("pytorchoptimizer.came", "camepytorch.came"), label="CAME: confidence-guided, factored"),
    Optimizer("schedulefree_adamw", "AdamWScheduleFree", 8, _pytorch_optimizer("ScheduleFreeAdamW"),
              kohya_names=("adamwschedulefree", "schedulefree.adamwschedulefree", "pytorchoptimizer.schedulefreeadamw"),
              schedule_free=True, label="Schedule-free AdamW: no LR schedule; warm-up steps go to the optimizer"),
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
