"""The samplers Preview offers, by the names A1111 users know, and the diffusers scheduler behind each.
Torch-free to import (the UI lists the names); diffusers is imported only to build one."""
from __future__ import annotations

# What a Preview generation uses unless told otherwise: GenParams' defaults and the Preview tab's starting values.
DEFAULTS = {"steps": 20, "cfg": 7.0, "width": 512, "height": 512, "sampler": "Euler a", "batch": 1, "seed": 1234}

_TABLE = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}
SAMPLERS = tuple(_TABLE)


def make_scheduler(name: str, config):
    """The diffusers scheduler for sampler `name`, from a pipeline's scheduler config."""
    if name not in _TABLE:
        raise ValueError(f"Unknown sampler '{name}'. Choose one of: {', '.join(SAMPLERS)}.")
    import diffusers

    cls, kw = _TABLE[name]
    return getattr(diffusers, cls).from_config(config, **kw)
