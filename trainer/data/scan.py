"""Find the images and captions of a dataset folder, in the layouts users already have.

- a folder of images with same-name caption files (`a.png` + `a.txt`);
- kohya's `<repeats>_<name>` sub-folders (`10_mychar/`), repeats = 10;
- other sub-folders are read too (repeats 1) and reported, so nothing is silently ignored; a `masks/` folder
  holds masks for masked loss (trainer/data/masks.py), not training images.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from trainer.data.images import ImageProblem, is_image_name, probe

REPEATS_DIR = re.compile(r"^(\d+)_(.+)$")
CAPTION_EXTS = (".txt", ".caption")
EXCLUDE_FILE = ".excluded"  # images left out of training, one relative name per line (trainer/data/manage.py)
REPEATS_FILE = ".repeats.json"  # repeats set on the page: {".": n for the folder's own images, "sub-folder": n}
ROOT_KEY = "."


@dataclass
class ImageItem:
    path: Path
    width: int
    height: int
    caption: str | None  # None: no caption file
    caption_path: Path
    repeats: int = 1
    subset: str = ""


@dataclass
class Skipped:
    path: Path
    reason: str


@dataclass
class ScanResult:
    root: Path
    items: list[ImageItem] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    subsets: dict[str, dict] = field(default_factory=dict)  # name -> {"n_repeats", "img_count"}
    notes: list[str] = field(default_factory=list)
    excluded: list[ImageItem] = field(default_factory=list)  # in the folder, left out of training by the person


def excluded(root: str | Path) -> set[str]:
    """Relative names of the images the person excluded from training."""
    try:
        text = (Path(root) / EXCLUDE_FILE).read_text(encoding="utf-8")
    except OSError:
        return set()
    return {line.strip() for line in text.splitlines() if line.strip()}


def read_caption(path: Path) -> str | None:
    """Caption text, tolerant of BOMs, CRLF and odd encodings; None if there is no file."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError:
        return None
    for enc in ("utf-8-sig", "utf-16") if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ("utf-8-sig",):
        try:
            text = raw.decode(enc)
            break
        except UnicodeDecodeError:
            continue
    else:
        text = raw.decode("latin-1")
    text = text.replace("\x00", "")
    return " ".join(text.split())  # one line, single spaces


def caption_path_for(image: Path, ext: str = ".txt") -> Path:
    return image.with_suffix(ext)


def _subfolders(root: Path) -> list[tuple[Path, int, str]]:
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "masks"):
        m = REPEATS_DIR.match(d.name)
        if m:
            out.append((d, max(1, int(m.group(1))), d.name))
        else:
            out.append((d, 1, d.name))
    return out


def repeats_set(root: str | Path) -> dict[str, int]:
    """The repeats the person set on the page, by folder ('.' for the dataset's own images). They win over a kohya
    '<repeats>_' prefix, without renaming the folder (exclusions and captions keep their paths)."""
    import json

    try:
        data = json.loads((Path(root) / REPEATS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): int(v) for k, v in data.items() if isinstance(v, int) and v >= 1} if isinstance(data, dict) else {}


def set_repeats(root: str | Path, folder: str, repeats: int) -> None:
    """How often the images of `folder` (a sub-folder's name, or '.') are used per epoch."""
    import json

    from trainer.fsutil import atomic_write_text

    if int(repeats) != repeats or not 1 <= repeats <= 1000:
        raise ValueError(f"Repeats must be a whole number from 1 to 1000 (got {repeats}).")
    root = Path(root)
    if folder != ROOT_KEY and not (root / folder).is_dir():
        raise ValueError(f"The dataset has no sub-folder '{folder}'.")
    data = {**repeats_set(root), folder: int(repeats)}
    atomic_write_text(root / REPEATS_FILE, json.dumps(data, indent=1))


def scan_dataset(root: str | Path, caption_ext: str = ".txt") -> ScanResult:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Dataset folder not found: {root}")
    res = ScanResult(root=root)
    left_out = excluded(root)
    chosen = repeats_set(root)
    groups: list[tuple[Path, int, str]] = [(root, chosen.get(ROOT_KEY, 1), root.name)]
    for d, repeats, name in _subfolders(root):
        if not REPEATS_DIR.match(name) and name not in chosen:
            res.notes.append(f"Sub-folder '{name}' has no '<repeats>_' prefix: its images are used once per epoch.")
        groups.append((d, chosen.get(name, repeats), name))
    for folder, repeats, name in groups:
        count = 0
        for p in sorted(folder.iterdir()):
            if not p.is_file() or p.name.startswith("."):
                continue
            if not is_image_name(p.name):
                if p.suffix.lower() not in CAPTION_EXTS and p.suffix.lower() != caption_ext and not p.name.endswith(".json"):
                    res.skipped.append(Skipped(p, "not an image type we read (png, jpg, jpeg, webp, bmp)"))
                continue
            try:
                w, h = probe(p)
            except ImageProblem as e:
                res.skipped.append(Skipped(p, str(e)))
                continue
            cap_path = caption_path_for(p, caption_ext)
            caption = read_caption(cap_path)
            if caption is None and caption_ext != ".caption":
                alt = caption_path_for(p, ".caption")
                if alt.exists():
                    cap_path, caption = alt, read_caption(alt)
            item = ImageItem(p, w, h, caption, cap_path, repeats, name)
            if p.relative_to(root).as_posix() in left_out:
                res.excluded.append(item)
                continue
            res.items.append(item)
            count += 1
        if count:
            res.subsets[name] = {"n_repeats": repeats, "img_count": count}
    return res


def holdout_count(fraction: float, images: int) -> int:
    """How many of `images` a validation_split of `fraction` holds out (at least one when it is on)."""
    return max(1, round(fraction * images)) if fraction > 0 else 0


def holdout_error(fraction: float, images: int) -> str | None:
    """The sentence when a validation_split would leave no image to train on (the pre-flight check and the engine
    both ask here), else None."""
    if fraction > 0 and holdout_count(fraction, images) >= images:
        return (f"validation_split = {fraction:g} would hold out all {images} image(s): none would be left to train "
                "on. Add images or lower it.")
    return None


def folder_caption(item: ImageItem) -> str | None:
    """kohya's DreamBooth-style caption from a '<repeats>_<name>' folder: 'zwx woman' for 10_zwx woman/."""
    m = REPEATS_DIR.match(item.subset)
    return (m.group(2).strip() or None) if m else None


def file_hash(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
