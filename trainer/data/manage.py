"""Keep a dataset tidy without losing anything: exclude an image from training, or remove it to a trash folder
it can be restored from. No torch here.

- Excluded images stay where they are; their names (relative to the dataset folder, one per line) are in the
  dataset's `.excluded` file, which `scan_dataset` honours, so training, the report and the CLI agree.
- Removing moves the image and its caption files into `<trash>/<dataset>/<time>/`, keeping their relative
  paths, so restoring puts them back exactly where they were.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from trainer.data.scan import CAPTION_EXTS, EXCLUDE_FILE, excluded
from trainer.fsutil import atomic_write_text, inside


def _rel(root: Path, image: Path) -> str:
    return inside(root, image).relative_to(root.resolve()).as_posix()


def set_excluded(root: str | Path, image: str | Path, exclude: bool) -> bool:
    """Exclude an image from training (or include it again). Returns whether it is excluded now."""
    root = Path(root)
    rel = _rel(root, Path(image))
    names = excluded(root)
    names = names | {rel} if exclude else names - {rel}
    atomic_write_text(root / EXCLUDE_FILE, "".join(f"{n}\n" for n in sorted(names)))
    return rel in names


def companions(image: Path) -> list[Path]:
    """The image and the caption files that belong to it."""
    return [image] + [image.with_suffix(ext) for ext in CAPTION_EXTS if image.with_suffix(ext).is_file()]


def remove_to_trash(root: str | Path, image: str | Path, trash: str | Path) -> Path:
    """Move an image and its captions into the trash; return the trash folder that holds them."""
    root = Path(root).resolve()
    image = inside(root, image)
    if not image.is_file():
        raise ValueError(f"{image.name} is not in the dataset any more.")
    rel = _rel(root, image)
    batch = inside(trash, Path(trash) / root.name / time.strftime("%Y%m%d-%H%M%S"))
    while batch.exists():  # two removals in the same second each get their own folder
        batch = batch.with_name(batch.name + "_")
    for f in companions(image):
        dst = batch / Path(rel).parent / f.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(f), str(dst))
    if rel in excluded(root):
        set_excluded(root, image, False)
    return batch


def trash_batches(root: str | Path, trash: str | Path) -> list[Path]:
    """The dataset's trash folders, newest last."""
    base = Path(trash) / Path(root).name
    return sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []


def restore_last(root: str | Path, trash: str | Path) -> list[str]:
    """Put the most recently removed image (and its captions) back; return the restored relative names.
    A file that exists again in the dataset is left in the trash rather than overwritten."""
    root = Path(root)
    batches = trash_batches(root, trash)
    if not batches:
        raise ValueError("Nothing of this dataset is in the trash.")
    batch, restored = batches[-1], []
    for f in sorted(p for p in batch.rglob("*") if p.is_file()):
        rel = f.relative_to(batch)
        dst = inside(root, root / rel)
        if dst.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(f), str(dst))
        restored.append(rel.as_posix())
    if not any(p.is_file() for p in batch.rglob("*")):
        shutil.rmtree(batch)
    return restored


DATASETS_TRASH = ".datasets"  # inside the trash: whole datasets, each as <stamp>/<its name>


def remove_dataset(root: str | Path, trash: str | Path) -> Path:
    """Move a whole dataset folder (images, captions, its exclusions and captioner record) into the trash."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"There is no dataset '{root.name}'.")
    batch = inside(trash, Path(trash) / DATASETS_TRASH / time.strftime("%Y%m%d-%H%M%S"))
    while batch.exists():  # two removals in the same second each get their own folder
        batch = batch.with_name(batch.name + "_")
    batch.mkdir(parents=True)
    shutil.move(str(root), str(batch / root.name))
    return batch / root.name


def restore_last_dataset(datasets_dir: str | Path, trash: str | Path) -> str:
    """Put the most recently removed dataset back under its name; return the name. While a dataset of that name
    exists again, the removed one stays in the trash, and that is said."""
    base = Path(trash) / DATASETS_TRASH
    batches = sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    if not batches:
        raise ValueError("No removed dataset is in the trash.")
    (folder,) = [p for p in batches[-1].iterdir() if p.is_dir()]
    dst = inside(datasets_dir, Path(datasets_dir) / folder.name)
    if dst.exists():
        raise ValueError(f"A dataset named '{folder.name}' exists again: rename it, then restore.")
    shutil.move(str(folder), str(dst))
    batches[-1].rmdir()
    return folder.name
