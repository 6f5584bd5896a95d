"""Which captions the auto-captioner wrote (and nobody edited since): `.captioner.json` in the dataset, written
by trainer/engine/autocaption.py, read by the dataset report (torch-free)."""
from __future__ import annotations

import json
from pathlib import Path

RECORD_FILE = ".captioner.json"


def record(folder: Path) -> dict:
    """{relative image path: {"model", "text"}} of the captions the captioner wrote."""
    try:
        data = json.loads((Path(folder) / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def provenance(folder: Path, items: list) -> dict:
    """How many captions came from the captioner (and are unchanged since) and how many by hand."""
    rec = record(folder)
    auto = sum(1 for it in items if it.caption and rec.get(rel_path(folder, it.path), {}).get("text") == it.caption
               and not rec[rel_path(folder, it.path)].get("appended"))  # hand-written text with the captioner's after it
    return {"captioner": auto, "hand": sum(1 for it in items if it.caption) - auto}


def rel_path(folder: Path, p: Path) -> str:
    """A dataset file as the record names it: relative, with forward slashes."""
    return Path(p).resolve().relative_to(Path(folder).resolve()).as_posix()
