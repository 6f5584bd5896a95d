"""Import images (and their captions) into a named dataset folder. Copies; never moves or edits originals.

Sources: a list of files (what a drag-and-drop gives), a folder, a .zip. Names are sanitised, clashes get a
suffix, a caption travels with its image, and kohya `<repeats>_<name>` folders keep their meaning.
"""
from __future__ import annotations

import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from trainer.data.images import ImageProblem, is_image_name, probe
from trainer.data.scan import CAPTION_EXTS, REPEATS_DIR, file_hash
from trainer.fsutil import atomic_write_text, inside, safe_name, unique_path

MAX_ZIP_MEMBER = 256 * 1024 * 1024
MAX_ZIP_TOTAL = 8 * 1024 * 1024 * 1024


@dataclass
class ImportReport:
    imported: list[str] = field(default_factory=list)
    captions: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        s = f"Imported {len(self.imported)} image(s) and {self.captions} caption(s)."
        if self.skipped:
            s += f" Skipped {len(self.skipped)}: " + "; ".join(f"{n} ({r})" for n, r in self.skipped[:20])
        return s


def import_sources(sources: list[str | Path], dataset_dir: str | Path) -> ImportReport:
    """Import each source (file, folder or zip) into dataset_dir."""
    dataset_dir = Path(dataset_dir)
    dataset_dir.mkdir(parents=True, exist_ok=True)
    rep = ImportReport()
    loose: list[tuple[str, Path]] = []  # (logical relative name, real path)
    for src in sources:
        src = Path(src)
        if src.is_dir():
            loose.extend((str(p.relative_to(src.parent)), p) for p in sorted(src.rglob("*")) if p.is_file())
        elif src.suffix.lower() == ".zip":
            _import_zip(src, dataset_dir, rep)
        elif src.is_file():
            loose.append((src.name, src))
        else:
            rep.skipped.append((src.name, "not found"))
    _import_group([(n, lambda p=p: p.read_bytes(), p) for n, p in loose], dataset_dir, rep)
    return rep


def _target_folder(dataset_dir: Path, logical: str) -> Path:
    """Only a kohya repeats folder survives as a sub-folder; everything else lands in the dataset root."""
    for part in PurePosixPath(logical.replace("\\", "/")).parts[:-1]:
        name = safe_name(part)
        if REPEATS_DIR.match(name):
            return inside(dataset_dir, dataset_dir / name)
    return dataset_dir


def _import_group(entries, dataset_dir: Path, rep: ImportReport) -> None:
    """entries: (logical name, read() -> bytes, source path or None). Images first, then their captions."""
    images, captions = {}, {}
    for logical, read, src in entries:
        base = PurePosixPath(logical.replace("\\", "/"))
        key = (str(base.parent), base.stem)
        if is_image_name(base.name):
            images[key] = (logical, read, src)
        elif base.suffix.lower() in CAPTION_EXTS:
            captions.setdefault(key, (logical, read))
        elif not base.name.startswith(".") and base.name not in ("Thumbs.db", "desktop.ini"):
            rep.skipped.append((base.name, "not an image or caption file"))
    known = {file_hash(p): str(p.relative_to(dataset_dir)) for p in sorted(dataset_dir.rglob("*"))
             if p.is_file() and is_image_name(p.name) and not p.name.startswith(".")} if images else {}
    for key, (logical, read, src) in images.items():
        folder = _target_folder(dataset_dir, logical)
        folder.mkdir(parents=True, exist_ok=True)
        target = unique_path(folder, safe_name(PurePosixPath(logical.replace("\\", "/")).name, "image.png"))
        while target.with_suffix(".txt").exists():  # never pair the new image with an older caption
            target = unique_path(folder, f"{target.stem}_new{target.suffix}")
        tmp = folder / f".{target.name}.importing"
        try:
            if src is not None:
                shutil.copyfile(src, tmp)
            else:
                tmp.write_bytes(read())
            probe(tmp)
            digest = file_hash(tmp)
            if digest in known:  # the same picture dropped again: keep the one the dataset has
                tmp.unlink(missing_ok=True)
                rep.skipped.append((PurePosixPath(logical).name, f"already in the dataset as {known[digest]}"))
                captions.pop(key, None)
                continue
        except ImageProblem as e:
            tmp.unlink(missing_ok=True)
            rep.skipped.append((PurePosixPath(logical).name, str(e)))
            continue
        except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
            tmp.unlink(missing_ok=True)
            rep.skipped.append((PurePosixPath(logical).name, f"could not copy ({getattr(e, 'strerror', None) or e})"))
            continue
        tmp.replace(target)
        rep.imported.append(str(target.relative_to(dataset_dir)))
        known[digest] = rep.imported[-1]
        cap = captions.pop(key, None)
        if cap is not None:
            try:
                text = cap[1]().decode("utf-8-sig", errors="replace")
                atomic_write_text(target.with_suffix(".txt"), " ".join(text.split()))
                rep.captions += 1
            except OSError as e:
                rep.skipped.append((PurePosixPath(cap[0]).name, f"caption not copied ({e.strerror})"))
    for logical, _ in captions.values():
        rep.skipped.append((PurePosixPath(logical).name, "caption without a matching image"))


def _import_zip(path: Path, dataset_dir: Path, rep: ImportReport) -> None:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        rep.skipped.append((path.name, f"not a readable zip ({e})"))
        return
    with zf:
        total = 0
        entries = []
        for info in zf.infolist():
            if info.is_dir() or info.filename.startswith("__MACOSX/"):
                continue
            total += info.file_size
            if info.file_size > MAX_ZIP_MEMBER or total > MAX_ZIP_TOTAL:
                rep.skipped.append((info.filename, "too large inside the zip"))
                continue
            entries.append((info.filename, lambda i=info: zf.read(i), None))
        try:
            _import_group(entries, dataset_dir, rep)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
            rep.skipped.append((path.name, f"the zip is damaged ({e})"))


def save_caption(image_path: str | Path, text: str, ext: str = ".txt") -> Path:
    """Write the caption beside its image, atomically (a crash leaves the old caption or the new one)."""
    p = Path(image_path).with_suffix(ext)
    atomic_write_text(p, " ".join(text.split()))
    return p
