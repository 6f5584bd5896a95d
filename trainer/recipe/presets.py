"""Presets: partial TrainConfig files laid over the defaults, with a name, a family and the reasons.

A preset file:

    [preset]
    name = "SD 1.5 character"
    family = "sd1"            # sd1 | sd2 | sdxl | any
    description = "When to use it and why its numbers are what they are."
    steps = "Typical steps per image count."

    [config]
    rank = 32
    ...

    [cpu]                     # optional: laid over [config] on a machine without an NVIDIA GPU
    max_steps = 10

Shipped presets live in the repository's `presets/`; a user's own in the workspace's `presets/` (never
overwriting a shipped one).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trainer.recipe.config import ConfigError, TrainConfig, dumps_toml, tomllib
from trainer.fsutil import atomic_write_text, safe_name
from trainer.models import families

SHIPPED_DIR = Path(__file__).resolve().parents[2] / "presets"
# Fields that belong to a person's run, not to a recipe
PERSONAL = ("base_model", "dataset", "trigger", "output_dir", "output_name", "config_version", "class_caption", "sample_prompts")


@dataclass
class Preset:
    key: str  # file stem
    name: str
    family: str
    description: str
    steps: str
    config: dict
    path: Path
    shipped: bool = True
    meta: dict = field(default_factory=dict)
    cpu: dict = field(default_factory=dict)  # what changes on a machine without a GPU

    def apply(self, cfg: TrainConfig, gpu: bool = True) -> TrainConfig:
        over = self.config if gpu else {**self.config, **self.cpu}
        return TrainConfig.from_dict({**cfg.to_dict(), **over}, source=f"preset '{self.name}'")


def load_preset(path: str | Path, shipped: bool = True) -> Preset:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"Preset {path.name} cannot be read ({e}).") from None
    meta, cfg, cpu = data.get("preset", {}), data.get("config", {}), data.get("cpu", {})
    TrainConfig.from_dict({**cfg, **cpu}, source=f"preset {path.name}")  # unknown keys / bad types fail here
    return Preset(path.stem, meta.get("name", path.stem), meta.get("family", "any"), meta.get("description", ""),
                  meta.get("steps", ""), cfg, path, shipped, meta, cpu)


def list_presets(user_dir: str | Path | None = None) -> list[Preset]:
    out = [load_preset(p, True) for p in sorted(SHIPPED_DIR.glob("*.toml"))]
    if user_dir and Path(user_dir).is_dir():
        for p in sorted(Path(user_dir).glob("*.toml")):
            try:
                out.append(load_preset(p, False))
            except ConfigError:
                continue  # a broken user file should not hide the others
    return out


def find_preset(name_or_key: str, user_dir=None) -> Preset:
    for p in list_presets(user_dir):
        if name_or_key in (p.key, p.name):
            return p
    raise ConfigError(f"No preset named '{name_or_key}'.")


def preset_diff(cfg: TrainConfig) -> dict:
    """The config values that differ from the defaults, minus personal fields: what a preset stores."""
    base = TrainConfig().to_dict()
    return {k: v for k, v in cfg.to_dict().items() if k not in PERSONAL and base.get(k) != v}


def save_user_preset(user_dir: str | Path, name: str, cfg: TrainConfig, family: str = "any", description: str = "") -> Preset:
    key = safe_name(name, fallback="").replace(" ", "_").lower()
    if not key:
        raise ConfigError("Give the preset a name.")
    if (SHIPPED_DIR / f"{key}.toml").exists() or any(p.name == name for p in list_presets() if p.shipped):
        raise ConfigError(f"'{name}' is the name of a shipped preset; choose another name.")
    path = Path(user_dir) / f"{key}.toml"
    text = "[preset]\n" + dumps_toml({"name": name, "family": family, "description": description}) + "\n[config]\n" + dumps_toml(preset_diff(cfg))
    atomic_write_text(path, text)
    return load_preset(path, shipped=False)


def rename_user_preset(user_dir, key: str, new_name: str) -> Preset:
    p = find_preset(key, user_dir)
    if p.shipped:
        raise ConfigError("Shipped presets cannot be renamed; save a copy under a new name.")
    cfg = TrainConfig.from_dict(p.config)
    new = save_user_preset(user_dir, new_name, cfg, p.family, p.description)
    if new.path != p.path:
        p.path.unlink()
    return new


def delete_user_preset(user_dir, key: str) -> None:
    p = find_preset(key, user_dir)
    if p.shipped:
        raise ConfigError("Shipped presets cannot be deleted.")
    p.path.unlink()


def family_mismatch(preset: Preset, model_family: str) -> str | None:
    """A plain warning when a preset is for another model family than the base model."""
    if preset.family in ("any", "") or model_family in ("auto", ""):
        return None
    if families.group(model_family) != families.group(preset.family):
        return (f"The preset '{preset.name}' is for {families.group_name(preset.family)} but the base model is "
                f"{families.group_name(model_family)}: its resolution and learning rates "
                "will be wrong. Pick a preset for your model.")
    return None
