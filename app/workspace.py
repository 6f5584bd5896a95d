"""The workspace folder: datasets/, runs/, presets/, loras/, settings.json, runs.sqlite. No torch here."""
from __future__ import annotations

import json
import threading
from pathlib import Path

from trainer.fsutil import atomic_write_text, inside, safe_name


class Workspace:
    _state_lock = threading.Lock()  # handlers run in threads: one read-modify-write of ui_state.json at a time

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        for d in ("datasets", "runs", "presets", "loras", "previews"):
            (self.root / d).mkdir(parents=True, exist_ok=True)

    @property
    def runs_db(self) -> Path:
        """The SQLite index of runs (and the queue)."""
        return self.root / "runs.sqlite"

    @property
    def tiny_model_dir(self) -> Path:
        """The built-in tiny random-weight model, made on first use (trainer tiny-model)."""
        return self.root / "models" / "tiny-sd1"

    @property
    def previews_dir(self) -> Path:
        """Images Preview generated."""
        return self.root / "previews"

    @property
    def captioning_dir(self) -> Path:
        """One folder per auto-captioning job: its events, stop file and worker log."""
        return self.root / "captioning"

    @property
    def downloads_dir(self) -> Path:
        """Copies handed to the browser for download, named for people."""
        return self.root / "downloads"

    @property
    def datasets_dir(self) -> Path:
        return self.root / "datasets"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def presets_dir(self) -> Path:
        return self.root / "presets"

    @property
    def trash_dir(self) -> Path:
        """Images removed from datasets, restorable (trainer/data/manage.py)."""
        return self.root / "trash"

    @property
    def loras_dir(self) -> Path:
        return self.root / "loras"

    def undo_file(self, dataset: str) -> Path:
        """The captions a dataset's last bulk edit replaced (trainer/data/tags.py), for its undo."""
        return self.root / "undo" / f"{dataset}.json"

    def list_datasets(self) -> list[str]:
        return sorted(p.name for p in self.datasets_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    def dataset_path(self, name: str, create: bool = False) -> Path:
        """The folder of a named dataset; the name is sanitised and cannot leave the workspace."""
        clean = safe_name(name or "", fallback="")
        if not clean:
            raise ValueError("Give the dataset a name (letters, digits, spaces, - and _).")
        p = inside(self.datasets_dir, self.datasets_dir / clean)
        if create:
            p.mkdir(parents=True, exist_ok=True)
        elif not p.is_dir():
            raise ValueError(f"No dataset named '{clean}'. Create it first.")
        return p

    # ------------------------------------------------------------ settings
    @property
    def settings_path(self) -> Path:
        return self.root / "settings.json"

    def settings(self) -> dict:
        try:
            return json.loads(self.settings_path.read_text())
        except (OSError, ValueError):
            return {}

    def update_settings(self, **changes) -> dict:
        s = {**self.settings(), **changes}
        atomic_write_text(self.settings_path, json.dumps(s, indent=1))
        return s

    @property
    def timings_path(self) -> Path:
        """Measured step costs of this machine's runs (trainer/recipe/timing.py)."""
        return self.root / "timings.json"

    # ------------------------------------------------------------ what the page last showed
    @property
    def ui_state_path(self) -> Path:
        return self.root / "ui_state.json"

    def _ui_states(self) -> dict:
        try:
            data = json.loads(self.ui_state_path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def ui_state(self, part: str) -> dict:
        """The last values of a part of the page ('train', 'preview'): a reload restores them."""
        got = self._ui_states().get(part)
        return got if isinstance(got, dict) else {}

    def save_ui_state(self, part: str, values: dict) -> None:
        with self._state_lock:
            data = self._ui_states()
            data[part] = values
            atomic_write_text(self.ui_state_path, json.dumps(data, indent=1, default=str))

    def caption_model(self) -> str:
        """The captioning model the person chose last (Dataset tab, Settings tab), else the default."""
        from trainer.engine.autocaption import DEFAULT_MODEL

        return self.settings().get("caption_model") or DEFAULT_MODEL

    def remember_model(self, model: str) -> list[str]:
        recent = [m for m in self.settings().get("recent_models", []) if m != model]
        recent = ([model] + recent)[:10] if model else recent
        self.update_settings(recent_models=recent)
        return recent

    def resolve_file(self, path: str) -> Path:
        """A file the UI may serve: it must be inside the workspace (symlinks followed)."""
        p = inside(self.root, path)
        if not p.is_file():
            raise ValueError("No such file in the workspace.")
        return p
