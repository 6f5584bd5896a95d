"""Resumable checkpoints: LoRA weights, optimizer, scheduler, step. Written as whole folders, atomically.

A checkpoint folder `checkpoints/step-000100/` holds:
  lora_state.safetensors  peft weights of each part ('unet.', 'te1.', 'te2.' prefixes) + per-module alphas
  optimizer.pt            optimizer state (loaded with weights_only=True)
  state.json              step, scheduler state, config, family, layout facts for export
  <output_name>.safetensors  the kohya file of this checkpoint (for Preview and checkpoint grids)
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CKPT_DIR = "checkpoints"
_STEP = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    d = Path(run_dir) / CKPT_DIR
    if not d.is_dir():
        return []
    found = [(int(m[1]), p) for p in d.iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
    return [p for _, p in sorted(found) if (p / "state.json").is_file()]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def pack_parts(parts: dict[str, tuple[dict, dict]]) -> dict[str, torch.Tensor]:
    out = {}
    for part, (state, alphas) in parts.items():
        for k, v in state.items():
            out[f"{part}.{k}"] = v.detach().to("cpu", torch.float32).contiguous()
        for m, a in alphas.items():
            out[f"{part}.{m}.__alpha__"] = torch.tensor(float(a))
    return out


def unpack_parts(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[dict, dict]]:
    parts: dict[str, tuple[dict, dict]] = {}
    for k, v in tensors.items():
        part, rest = k.split(".", 1)
        state, alphas = parts.setdefault(part, ({}, {}))
        if rest.endswith(".__alpha__"):
            alphas[rest[: -len(".__alpha__")]] = float(v)
        else:
            state[rest] = v
    return parts


def write_checkpoint(folder: Path, parts, optimizer_state: dict | None, state: dict) -> None:
    """Fill `folder` (a temp folder from fsutil.atomic_dir) with a resumable checkpoint."""
    save_file(pack_parts(parts), str(folder / "lora_state.safetensors"))
    if optimizer_state is not None:
        torch.save(optimizer_state, folder / "optimizer.pt")
    (folder / "state.json").write_text(json.dumps(state, indent=1, default=str))


def read_checkpoint(folder: str | Path) -> tuple[dict, dict, dict | None]:
    """(parts, state, optimizer state or None). Raise ValueError with a plain message if damaged."""
    folder = Path(folder)
    try:
        state = json.loads((folder / "state.json").read_text())
        parts = unpack_parts(load_file(str(folder / "lora_state.safetensors")))
    except (OSError, ValueError) as e:
        raise ValueError(f"Checkpoint {folder} is damaged ({e}). Resume from an earlier one.") from None
    opt = None
    if (folder / "optimizer.pt").is_file():
        opt = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    return parts, state, opt


def prune(run_dir: str | Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for p in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)


def remove_stale_temp(run_dir: str | Path) -> None:
    """Temp files and folders left by a process killed mid-write (names start with '.' and end with '.tmp')."""
    for d in (Path(run_dir), Path(run_dir) / CKPT_DIR):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.name.startswith(".") and (p.name.endswith(".tmp") or p.name.endswith(".old")):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
