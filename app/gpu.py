"""Is there an NVIDIA GPU? Asked without importing torch (the UI process stays light)."""
from __future__ import annotations

import functools
import shutil
import subprocess


@functools.lru_cache(maxsize=1)
def gpu_present() -> bool:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def parse_gpus(csv_text: str) -> list[dict]:
    """nvidia-smi's `--query-gpu=index,name,memory.total,memory.free --format=csv,noheader,nounits` lines."""
    out = []
    for line in csv_text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 4 and parts[0].isdigit():
            try:
                out.append({"index": int(parts[0]), "name": parts[1], "total_gb": round(float(parts[2]) / 1024, 1),
                            "free_gb": round(float(parts[3]) / 1024, 1)})
            except ValueError:
                continue
    return out


def list_gpus() -> list[dict]:
    """The GPUs the worker will see (index, name, memory and free memory in GB), asked of nvidia-smi; [] without."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=index,name,memory.total,memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return parse_gpus(out.stdout) if out.returncode == 0 else []


def run_card(gpus: list[dict], picked: list[int] | None = None) -> dict | None:
    """The card whose memory bounds a run: the smallest of the picked GPUs (each rank of a group holds a whole
    copy), else the first, as a run on one GPU takes cuda:0; None without a GPU."""
    cards = [g for g in gpus if g["index"] in picked] if picked else gpus[:1]
    return min(cards, key=lambda g: g["total_gb"]) if cards else None


def gpu_label(g: dict) -> str:
    return f"GPU {g['index']}: {g['name']} ({g['total_gb']:g} GB, {g['free_gb']:g} GB free)"
