"""How long a run will take on this machine, said before Start (torch-free).

Every run that trains a few steps leaves a measurement in the workspace's `timings.json`: seconds per step and
seconds from start to the first step, with what decides them (base model, family, device, precision,
resolution, batch, text encoder trained or not). An estimate uses, in this order: a measurement of the same
base model on this machine, one of the same family, or a rough prior. Costs are scaled by pixels x batch;
the live ETA (from the run's own steps) takes over once it runs.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from trainer.fsutil import atomic_write_text
from trainer.models import families

# Seconds per image per step before this machine measured anything: each family's `calibration.prior_step_s`.
PRIOR_STARTUP_S = {"cpu": 120.0, "cuda": 60.0}  # loading, caching
KEEP = 50  # measurements kept per workspace


def _work(resolution: int, batch: int, accumulation: int) -> float:
    return resolution * resolution * batch * max(1, accumulation)


def measure(events: list[dict]) -> dict | None:
    """A run's step cost and start-up time from its event log (None when it trained fewer than 2 reported steps)."""
    start = next((e for e in events if e["type"] == "status"), None)
    info = next((e for e in events if e["type"] == "status" and e.get("state") == "training" and "device" in e), None)
    prog = [e for e in events if e["type"] == "progress"]
    if not (start and info and len(prog) >= 2) or prog[-1]["step"] <= prog[0]["step"]:
        return None
    step_s = (prog[-1]["time"] - prog[0]["time"]) / (prog[-1]["step"] - prog[0]["step"])
    startup = max(0.0, prog[0]["time"] - start["time"] - step_s * prog[0]["step"])
    step_s /= max(1, info.get("variants", 1))  # a sweep's step trains each variant: one network's is what others reuse
    return {"step_s": round(step_s, 4), "startup_s": round(startup, 1), "device": info["device"],
            "precision": info.get("precision", ""), "family": info.get("family", "")}


def record(path: str | Path, cfg, events: list[dict], run_id: str = "") -> dict | None:
    """Add a run's measurement to the workspace's timings file; return it."""
    m = measure(events)
    if m is None:
        return None
    m.update(run=run_id, base=Path(cfg.base_model).name or cfg.base_model, resolution=cfg.resolution,
             batch=cfg.batch_size, accumulation=cfg.gradient_accumulation, te=bool(cfg.train_text_encoder))
    items = load(path) + [m]
    atomic_write_text(path, json.dumps(items[-KEEP:], indent=1))
    return m


def load(path: str | Path) -> list[dict]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return []
    return [d for d in data if isinstance(d, dict) and "step_s" in d] if isinstance(data, list) else []


def fmt_duration(s: float) -> str:
    if s < 90:
        return f"{max(1, round(s))} s"
    if s < 5400:
        return f"{round(s / 60)} min"
    return f"{s / 3600:.1f} h"


def estimate(cfg, family: str, total_steps: int, device: str, measurements: list[dict]) -> dict:
    """{seconds, startup_s, step_s, source}: the run's expected duration on `device`, and what it rests on."""
    spec = families.family(families.resolve(family, cfg.resolution).group)
    fam = spec.key
    base = Path(cfg.base_model).name or cfg.base_model
    work = _work(cfg.resolution, cfg.batch_size, cfg.gradient_accumulation)
    same = [m for m in measurements if m["device"] == device and m.get("te") == bool(cfg.train_text_encoder)]
    pick = ([m for m in same if m.get("base") == base and m.get("precision") == cfg.mixed_precision]
            or [m for m in same if families.group(m.get("family") or "sd1") == fam])
    if pick:
        scaled = [m["step_s"] * work / _work(m["resolution"], m["batch"], m.get("accumulation", 1)) for m in pick[-5:]]
        step_s, startup = statistics.median(scaled), statistics.median(m["startup_s"] for m in pick[-5:])
        runs = sorted({m.get("run", "") for m in pick[-5:]} - {""})
        source = f"measured on this machine ({', '.join(runs[-2:]) or 'earlier runs'}), scaled to this resolution and batch"
    else:
        step_s = spec.calibration.prior_step_s[device] * work / _work(spec.native_resolution, 1, 1)
        startup = PRIOR_STARTUP_S[device]
        source = "a rough figure for this kind of machine, until a run here has measured it"
    step_s *= max(1, len(getattr(cfg, "variants", None) or []))  # a sweep's step trains (and samples) each variant
    rounds = (total_steps // cfg.sample_every_steps if cfg.sample_every_steps else 0) + 1
    images = rounds * len(cfg.sample_prompts)
    # a sampling step is ~2 forward passes (guidance) of one image: ~2/3 of a training step's work per image
    sample_s = images * cfg.sample_steps * step_s / max(1, cfg.batch_size * cfg.gradient_accumulation) * 2 / 3
    seconds = startup + total_steps * step_s + sample_s
    return {"seconds": seconds, "startup_s": startup, "step_s": step_s, "sample_s": sample_s, "source": source}


def describe(est: dict, total_steps: int) -> str:
    """'about 4 min (20 steps x 6.1 s, + 2 min loading and caching; ...)'."""
    parts = f"{total_steps} steps × {est['step_s']:.2g} s + {fmt_duration(est['startup_s'])} loading and caching"
    if est["sample_s"] >= 1:
        parts += f" + {fmt_duration(est['sample_s'])} of samples"
    return f"about {fmt_duration(est['seconds'])} ({parts}; {est['source']})"
