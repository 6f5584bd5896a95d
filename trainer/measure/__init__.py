"""Measurement on top of the engine (bench, memory, reliability): it calls the engine; the engine never imports it.

Commands here print their tables; they write into a tracked file (BENCHMARKS.md, RELIABILITY.md) only when
`--out FILE` asks for it.
"""
from __future__ import annotations

# The full-size architectures built with random weights for measurements, by the name their rows carry in
# BENCHMARKS.md, and the family whose shipped configs they are built from.
ARCHITECTURES = {"sd15": "sd1", "sdxl": "sdxl"}


def family_of(arch: str) -> str:
    """The family key of a measured architecture ('sd15' -> 'sd1'); 'tiny' is the tests' SD 1.x model."""
    return ARCHITECTURES.get(arch, "sd1")


def arch_of(family: str) -> str:
    """The full-size architecture that measures a family's presets (its group's; SD 2.x is measured as SD 1.5's
    layout until it has its own row)."""
    from trainer.models import families

    group = families.group(family)
    return next((a for a, f in ARCHITECTURES.items() if f == group), "sd15")
