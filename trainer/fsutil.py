"""Atomic writes and safe paths: an output is either the old file or the new one, never half of one."""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import unicodedata
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def with_umask(path: Path, directory: bool = False) -> Path:
    """Give a temp file or folder the permissions a plain open() or mkdir() would (normally 0644 / 0755): tempfile
    makes them private (0600 / 0700), and a web UI running as another user, or in Docker, could not read the
    LoRA, caption or config that becomes of it."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())
    return path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with_umask(tmp)  # after the writer: a library may have made the file anew
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder under a temp name and rename it into place when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = with_umask(Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)), directory=True)
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_UNSAFE = re.compile(r"[^\w.\- ()\[\]+,@&'!]+", re.UNICODE)


def safe_name(name: str, fallback: str = "file") -> str:
    """A plain file name from whatever a browser or a zip says: no folders, no '..', no control chars."""
    name = unicodedata.normalize("NFC", str(name)).replace("\\", "/").split("/")[-1]
    name = _UNSAFE.sub("_", name).strip(" .")
    if not name or set(name) <= {".", "_"}:
        name = fallback
    return name[:180]


def inside(root: str | os.PathLike, candidate: str | os.PathLike) -> Path:
    """Resolve `candidate` and make sure it is inside `root` (symlinks followed). Raise ValueError if not."""
    root_r = Path(root).resolve()
    cand = Path(candidate)
    if not cand.is_absolute():
        cand = root_r / cand
    cand_r = cand.resolve()
    if cand_r != root_r and root_r not in cand_r.parents:
        raise ValueError(f"'{candidate}' is outside the workspace; refusing.")
    return cand_r


def unique_path(folder: Path, name: str) -> Path:
    """folder/name, or folder/stem_2.ext etc. if that exists already."""
    p = folder / name
    stem, suffix = Path(name).stem, Path(name).suffix
    i = 2
    while p.exists():
        p = folder / f"{stem}_{i}{suffix}"
        i += 1
    return p
