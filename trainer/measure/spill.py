"""Is the driver spilling GPU memory into shared system memory? (issue 31, item 6; torch-free, the page asks it)

On Windows the NVIDIA driver lets a card's memory overflow into system RAM instead of failing ("CUDA - Sysmem
Fallback Policy"), and each step then gets 10-50x slower: the most common complaint in kohya_ss' tracker ("SDXL
extremely slow on a 4090", #1288, #1730, #2520). Two signs in the readings each progress event carries on CUDA
(reserved memory, the card's dedicated memory, seconds per step): reserved memory above the dedicated memory, or
a step time several times the run's usual one right after reserved memory rose. Untested on Windows itself: no
such machine here; tests feed readings.
"""
from __future__ import annotations

from statistics import median

SLOWDOWN = 3.0  # a step this many times the usual one
ROSE = 1.05  # reserved memory up by at least 5% over the readings before


def spill_warning(readings: list[dict], dedicated_gb: float | None) -> str | None:
    """readings: [{'step', 's_per_step', 'reserved_gb'}], oldest first. One sentence when memory spills, else None."""
    if not readings or not dedicated_gb:
        return None
    last = readings[-1]
    what = ("Lower the preset (a smaller card's), store the base in nf4 (Advanced › Memory, base_quantization), or "
            "set the NVIDIA driver's 'CUDA - Sysmem Fallback Policy' to 'Prefer No Sysmem Fallback' so it stops "
            "with out-of-memory instead.")
    if last.get("reserved_gb") and last["reserved_gb"] > dedicated_gb:
        return (f"Memory spills out of the card: the run holds {last['reserved_gb']:.1f} GB and the card has "
                f"{dedicated_gb:.1f} GB, so the driver borrows system memory and steps get 10-50x slower. " + what)
    earlier = [r for r in readings[:-1] if r.get("s_per_step")]
    if len(earlier) < 3 or not last.get("s_per_step"):
        return None
    usual = median(r["s_per_step"] for r in earlier)
    before = max(r.get("reserved_gb") or 0 for r in earlier[:-2] or earlier)
    rose = (last.get("reserved_gb") or 0) >= before * ROSE and before > 0
    if last["s_per_step"] >= SLOWDOWN * usual and rose and last["reserved_gb"] >= 0.9 * dedicated_gb:
        return (f"Steps slowed from {usual:.2f} to {last['s_per_step']:.2f} s right after memory rose to "
                f"{last['reserved_gb']:.1f} GB of the card's {dedicated_gb:.1f} GB: the driver is likely spilling into "
                "system memory. " + what)
    return None
