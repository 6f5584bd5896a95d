"""Tell a model's family from its files without torch (the UI process uses this)."""
from __future__ import annotations

import json
import struct
from pathlib import Path


def family_from_folder(folder: str | Path) -> str:
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    from trainer.models.families import with_prediction

    sched_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    if "text_encoder_2" in index and index["text_encoder_2"][0] is not None:
        group = "sdxl"
    else:
        unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
        te_cfg = json.loads((folder / "text_encoder" / "config.json").read_text())
        group = "sd2" if unet_cfg.get("use_linear_projection") or te_cfg.get("hidden_act") == "gelu" else "sd1"
    return with_prediction(group, sched_cfg.get("prediction_type", "epsilon")).key


def safetensors_header(path: str | Path) -> dict:
    """The JSON header of a .safetensors file (no tensor is read). Raise ValueError if it is not one."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ValueError("not a safetensors file")
        n = struct.unpack("<Q", raw)[0]
        if n > 100 * 1024 * 1024:
            raise ValueError("not a safetensors file (header too large)")
        header = json.loads(fh.read(n))
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file")
    return header


def safetensors_keys(path: str | Path) -> list[str]:
    return [k for k in safetensors_header(path) if k != "__metadata__"]


def read_metadata(path: str | Path) -> dict[str, str]:
    return safetensors_header(path).get("__metadata__", {}) or {}


def trigger_words(path: str | Path) -> list[str]:
    """The trigger words a LoRA file's metadata names (ours: ss_trigger_words; others: modelspec.trigger_phrase)."""
    try:
        md = read_metadata(path)
    except (OSError, ValueError):
        return []
    try:
        words = json.loads(md.get("ss_trigger_words", "[]"))
        if words:
            return list(words)
    except ValueError:
        pass
    return [w.strip() for w in md.get("modelspec.trigger_phrase", "").split(",") if w.strip()]


def family_from_keys(keys, metadata: dict | None = None) -> str | None:
    """The family of a single-file checkpoint's keys and header metadata (each family object knows its marker, and
    a variant how to tell itself apart without reading a tensor), or None."""
    from trainer.models.families import from_checkpoint_keys, variant_of

    fam = from_checkpoint_keys(keys)
    return variant_of(fam, keys, metadata=metadata).key if fam else None


def sniff_family(base_model: str) -> str:
    """'sd1' | 'sd2' | 'sd2v' | 'sdxl', or 'auto' when it cannot be told cheaply (hub ids, .ckpt)."""
    p = Path(base_model).expanduser() if base_model else None
    try:
        if p and p.is_dir() and (p / "model_index.json").is_file():
            return family_from_folder(p)
        if p and p.is_file() and p.suffix.lower() == ".safetensors":
            header = safetensors_header(p)
            return family_from_keys([k for k in header if k != "__metadata__"], header.get("__metadata__")) or "auto"
    except (OSError, ValueError, KeyError, struct.error):
        pass
    return "auto"
