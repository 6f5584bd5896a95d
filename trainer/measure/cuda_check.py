"""`python -m trainer memory --cuda-check --preset P`: what a real CUDA card uses for a preset, beside the projection.

The projection (`python -m trainer memory`, the pre-flight estimate) counts tensors on the CPU and adds two assumed
terms: the CUDA context and the caching allocator's slack (trainer/recipe/estimate.py). This is the command that
checks them on a GPU: the allocator is capped at the card size the preset promises
(`torch.cuda.set_per_process_memory_fraction`), the preset runs on the full-size architecture (random weights)
with a fresh in-memory latent cache (so the VAE encode happens), and at the end of every phase it reads
`max_memory_allocated`, `max_memory_reserved` and the card's own used memory (`mem_get_info`). What a card needs
is reserved memory plus the context outside the allocator, never allocated memory alone.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

GB = 1024**3


def cuda_reading() -> dict:
    """The peaks since the last reading (then reset) and what the card holds now, in bytes."""
    import torch

    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    out = {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved(),
           "reserved_now": torch.cuda.memory_reserved(), "card_used": total - free}
    torch.cuda.reset_peak_memory_stats()
    return out


class PhaseReadings:
    """A placement watcher (trainer/placement.py): at each phase change, the readings of the phase that ended (a
    phase met again keeps its highest). `read` gives the readings (cuda_reading on a GPU)."""

    def __init__(self, read=cuda_reading, say=None):
        self.read, self.say, self.current, self.rows = read, say, None, {}

    def phase(self, name: str) -> None:
        self.close()
        self.current = name

    def placed(self, x, on_device: bool) -> None:
        pass

    def close(self) -> None:
        if self.current is None:
            return
        r = self.read()
        r["context"] = r["card_used"] - r["reserved_now"]  # the card's memory outside torch's allocator
        old = self.rows.get(self.current)
        self.rows[self.current] = r if old is None else {k: max(old[k], r[k]) for k in r}
        if self.say:
            self.say(f"  {self.current:<20} allocated {r['allocated'] / GB:6.2f}  reserved {r['reserved'] / GB:6.2f}  "
                     f"card {r['card_used'] / GB:6.2f} GB")
        self.current = None


def report(rows: dict, projected_gb: float, card_gb: float) -> tuple[str, float]:
    """(a table of the phases with the peak and the ratio to the projection, what the card needed in GB)."""
    lines = ["| phase | max allocated GB | max reserved GB | card used GB | context GB |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['allocated'] / GB:.2f} | {r['reserved'] / GB:.2f} | {r['card_used'] / GB:.2f} | "
                     f"{r['context'] / GB:.2f} |")
    peak = max(rows, key=lambda n: rows[n]["reserved"])
    need = (rows[peak]["reserved"] + max(r["context"] for r in rows.values())) / GB
    lines += ["", f"Peak: {peak}, {rows[peak]['reserved'] / GB:.2f} GB reserved (allocated {rows[peak]['allocated'] / GB:.2f});"
              f" with the context the card needed {need:.2f} GB, against {projected_gb:.2f} GB projected "
              f"(ratio {need / projected_gb:.2f}) and the {card_gb:g} GB the preset promises."]
    return "\n".join(lines), need


def card_size(preset) -> float | None:
    """The card size a preset promises, from its name or description ('on a 12 GB card', 'a 12 GB card')."""
    m = re.search(r"(\d+(?:\.\d+)?) GB card", f"{preset.name} {preset.description}")
    return float(m[1]) if m else None


def run_cuda_check(args) -> int:
    import torch

    from trainer.engine.loop import train
    from trainer.engine.setup import TrainingError, fresh_accelerate_state
    from trainer import placement
    from trainer.measure import family_of
    from trainer.measure.bench import build_model, synthetic_dataset
    from trainer.measure.memory import architecture, config_for, measured_config
    from trainer.recipe.estimate import estimate_vram_gb
    from trainer.recipe.presets import find_preset

    if not torch.cuda.is_available():
        print("error: --cuda-check runs the preset on a CUDA GPU, and none is visible here. Run it on the machine "
              "with the card (a CUDA build of torch); `python -m trainer memory` without it projects on the CPU.")
        return 2
    preset = find_preset(args.preset) if args.preset else None
    card = args.card_gb or (card_size(preset) if preset else None)
    if not card:
        print("error: give --card-gb (the card size to cap the allocator at): the preset does not say one.")
        return 2
    total = torch.cuda.get_device_properties(0).total_memory
    if card * GB > total:
        print(f"error: the preset promises a {card:g} GB card, more than this GPU's {total / GB:.1f} GB.")
        return 2
    torch.cuda.set_per_process_memory_fraction(card * GB / total)
    work = Path(tempfile.mkdtemp(prefix="lora_cuda_check_"))
    cfg = config_for(args)
    cfg = measured_config(cfg).replace(device="cuda", max_steps=args.steps, output_dir=str(work / "run"),
                                       dataset=str(synthetic_dataset(work / "data", max(2, cfg.batch_size * 2),
                                                                     cfg.resolution)))
    arch = architecture(args)  # the preset's own family's architecture
    projected = estimate_vram_gb(cfg, family_of(arch))["total_gb"]
    print(f"{args.preset or arch} on {torch.cuda.get_device_name()}, allocator capped at {card:g} GB")
    readings = PhaseReadings(say=lambda m: print(m, flush=True))
    fresh_accelerate_state()
    model = build_model(arch, "cpu", torch.float32)  # built on the host: the run places what it needs
    failed = None
    try:
        with placement.watching(readings):
            train(cfg, work / "run", echo=lambda m: None, model=model)
    except TrainingError as e:
        failed = str(e)
    readings.close()
    table, need = report(readings.rows, projected, card) if readings.rows else ("(no phase finished)", 0.0)
    print(table)
    if failed:
        print(f"\nThe run did not fit in {card:g} GB: {failed}")
        return 1
    return 0
