"""Resumable checkpoints: LoRA weights, optimizer, scheduler, step. Written as whole folders, atomically.

A checkpoint folder `checkpoints/step-000100/` holds:
  lora_state.safetensors  peft weights of each part ('unet.', 'te1.', 'te2.' prefixes) + per-module alphas
  optimizer.pt            optimizer state (loaded with weights_only=True)
  state.json              step, scheduler state, config, family, layout facts for export
  <output_name>.safetensors  the kohya file of this checkpoint (for Preview and checkpoint grids)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trainer.engine.faults import maybe_inject
from trainer.fsutil import atomic_dir, with_umask
from trainer.runfiles import LORA_STATE, OPTIMIZER, STATE, RunFiles


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    return RunFiles(run_dir).checkpoint_dirs()


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    return RunFiles(run_dir).latest_checkpoint()


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
    save_file(pack_parts(parts), str(folder / LORA_STATE))
    with_umask(folder / LORA_STATE)  # safetensors makes its files private; a checkpoint is the person's file
    if optimizer_state is not None:
        torch.save(optimizer_state, folder / OPTIMIZER)
    (folder / STATE).write_text(json.dumps(state, indent=1, default=str))


def save(run, step: int) -> Path | None:
    """Write the resumable checkpoint of a run (an engine.setup.Run) at `step`, with its kohya file; keep the last K.
    Every rank waits here; rank 0 writes. Returns the folder (None on other ranks)."""
    from trainer import placement
    from trainer.loras.export import export_parts

    run.accelerator.wait_for_everyone()
    if not run.main:
        return None
    placement.phase("save")
    cfg = run.cfg
    parts = run.parts()
    state = {"step": step, "total_steps": run.total_steps, "scheduler": run.scheduler.state_dict(), "config": cfg.to_dict(),
             "started_at": run.info["started_at"], **run.layout}
    folder = run.files.checkpoint(step)
    run.ev.emit("status", state="saving", step=step, message=f"Saving checkpoint at step {step}")
    epoch = run.epoch_of(max(0, step * cfg.gradient_accumulation - 1))
    info = {**run.info, "steps": step, "epoch": epoch}
    with atomic_dir(folder) as tmp:
        maybe_inject(step, "save")
        write_checkpoint(tmp, parts, run.optimizer.state_dict(), state)
        exported, exported_info = parts, info
        if run.ema is not None:  # resume from the training weights and the average; the file holds the average
            run.ema.save(tmp)
            with run.ema.swapped_in():  # cloned: the parts share the parameters' storage, which the swap restores
                exported = {k: ({n: t.clone() for n, t in st.items()}, a) for k, (st, a) in run.parts().items()}
            exported_info = {**info, "ema": True}
        export_parts(exported, cfg, run.layout, exported_info, tmp / run.files.final(cfg.output_name).name)
        if raw_file(run):
            export_parts(parts, cfg, run.layout, info, tmp / raw_file(run).name)
    prune(run.files.root, cfg.keep_last)
    run.ev.emit("checkpoint", step=step, path=str(folder), message=f"Saved checkpoint at step {step}")
    return folder


def raw_file(run) -> Path | None:
    """With ema_export = 'both': the file of the trained weights written beside the EMA one."""
    if run.ema is None or run.cfg.ema_export != "both":
        return None
    return run.files.final(f"{run.cfg.output_name}-raw")


def read_checkpoint(folder: str | Path) -> tuple[dict, dict, dict | None]:
    """(parts, state, optimizer state or None). Raise ValueError with a plain message if damaged."""
    folder = Path(folder)
    try:
        state = json.loads((folder / STATE).read_text())
        parts = unpack_parts(load_file(str(folder / LORA_STATE)))
    except (OSError, ValueError) as e:
        raise ValueError(f"Checkpoint {folder} is damaged ({e}). Resume from an earlier one.") from None
    opt = None
    if (folder / OPTIMIZER).is_file():
        opt = torch.load(folder / OPTIMIZER, map_location="cpu", weights_only=True)
    return parts, state, opt


def prune(run_dir: str | Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for p in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)


def remove_stale_temp(run_dir: str | Path) -> None:
    """Temp files and folders left by a process killed mid-write (names start with '.' and end with '.tmp')."""
    for d in (Path(run_dir), RunFiles(run_dir).checkpoints):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.name.startswith(".") and (p.name.endswith(".tmp") or p.name.endswith(".old")):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
