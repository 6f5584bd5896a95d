"""Tag tools for a dataset's captions (comma-separated tags, as booru taggers and kohya's scripts write them): the
tag frequency table, and bulk edits over every caption (replace, remove, merge, move to the front, dedupe) that
can be undone.

Every bulk edit of a dataset goes through `apply_bulk`: before a caption changes, the captions it replaces are
written to the undo record (one per dataset, in the workspace), so `undo_last` puts them back. A caption the
person changed after the edit is left as it is, and said. Torch-free.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from trainer.data.captions import join_tags, split_tags
from trainer.fsutil import atomic_write_text

OPS = {"replace": "Replace a tag", "remove": "Remove tags", "merge": "Merge tags into one",
       "front": "Move a tag to the front", "dedupe": "Remove repeated tags within each caption"}


def _key(tag: str) -> str:
    """Tags compare without case, with '_' and ' ' the same (a tagger's long_hair is a person's long hair)."""
    return " ".join(tag.replace("_", " ").lower().split())


def frequency(captions) -> list[tuple[str, int]]:
    """[(tag, images with it)], most frequent first: each tag spelled as it first appears, counted once per caption."""
    counts: dict[str, int] = {}
    spelling: dict[str, str] = {}
    for cap in captions:
        seen = set()
        for t in split_tags(cap or ""):
            k = _key(t)
            spelling.setdefault(k, t)
            if k not in seen:
                seen.add(k)
                counts[k] = counts.get(k, 0) + 1
    return sorted(((spelling[k], n) for k, n in counts.items()), key=lambda x: (-x[1], x[0].lower()))


def has_tag(caption: str | None, tag: str) -> bool:
    return _key(tag) in {_key(t) for t in split_tags(caption or "")}


def edit(caption: str, op: str, a: str = "", b: str = "") -> str:
    """One caption after a tag edit. `a`: the tag (remove, merge: comma-separated tags); `b`: the new tag (replace)
    or the one to merge into (merge). Tags the edit does not touch keep their spelling and order."""
    tags = split_tags(caption)
    names = {_key(t) for t in split_tags(a)}
    if op == "replace":
        new = [b.strip() if _key(t) in names else t for t in tags]
        if not b.strip():
            new = [t for t in new if t]
    elif op == "remove":
        new = [t for t in tags if _key(t) not in names]
    elif op == "merge":
        new = [b.strip() if _key(t) in names else t for t in tags]
        new = dedupe(new, only=_key(b))
    elif op == "front":
        first = [t for t in tags if _key(t) in names]
        new = first + [t for t in tags if _key(t) not in names]
    elif op == "dedupe":
        new = dedupe(tags)
    else:
        raise ValueError(f"Unknown tag edit '{op}': use one of {', '.join(OPS)}.")
    return join_tags(new) if new != tags else caption


def dedupe(tags: list[str], only: str | None = None) -> list[str]:
    """Each tag once (the first stays); with `only`, just that tag."""
    seen, out = set(), []
    for t in tags:
        k = _key(t)
        if k in seen and (only is None or k == only):
            continue
        seen.add(k)
        out.append(t)
    return out


def check(op: str, a: str, b: str) -> None:
    """The bulk edit's words make sense, or a sentence saying what to fill in."""
    if op not in OPS:
        raise ValueError(f"Choose a tag edit ({', '.join(OPS.values())}).")
    if op != "dedupe" and not split_tags(a):
        raise ValueError("Give the tag to change (for Remove and Merge: one or more, comma-separated).")
    if op in ("replace", "merge") and not b.strip():
        raise ValueError("Give the new tag: " + ("what the tag becomes." if op == "replace" else "the one to merge into."))
    if op in ("replace", "merge") and "," in b:
        raise ValueError("The new tag is one tag: no commas in it.")


# ----------------------------------------------------------------------------------------- bulk edits and undo
def caption_of(image: Path) -> str | None:
    """An image's caption as the dataset scan reads it (.txt, else .caption), spaces normalised; None without one."""
    from trainer.data.scan import CAPTION_EXTS, caption_path_for, read_caption

    for ext in CAPTION_EXTS:
        text = read_caption(caption_path_for(image, ext))
        if text is not None:
            return " ".join(text.split())
    return None


def apply_bulk(folder: Path, changes: dict[Path, str], undo_file: Path, what: str) -> int:
    """Write new captions {image path: caption} (only those that differ), keeping the ones they replace in
    `undo_file` first. Returns how many captions changed."""
    from trainer.data.importer import save_caption

    before = {p: caption_of(p) for p in changes}
    todo = {p: text for p, text in changes.items() if " ".join(text.split()) != (before[p] or "")}
    if not todo:
        return 0
    record = {"what": what, "at": int(time.time()),
              "captions": {p.relative_to(folder).as_posix(): {"before": before[p], "after": " ".join(t.split())}
                           for p, t in todo.items()}}
    undo_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(undo_file, json.dumps(record, ensure_ascii=False, indent=1))
    for p, text in todo.items():
        save_caption(p, text)
    return len(todo)


def last_edit(undo_file: Path) -> str | None:
    """What the last bulk edit did (None when there is nothing to undo)."""
    try:
        return json.loads(undo_file.read_text(encoding="utf-8"))["what"]
    except (OSError, ValueError, KeyError):
        return None


def undo_last(folder: Path, undo_file: Path) -> str:
    """Put back the captions the last bulk edit replaced; a sentence saying what happened."""
    from trainer.data.importer import save_caption

    try:
        record = json.loads(undo_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "No bulk edit to undo."
    restored, kept = 0, []
    for rel, c in record["captions"].items():
        img = folder / rel
        if not img.exists():
            continue
        if (caption_of(img) or "") != c["after"]:
            kept.append(img.name)  # changed after the bulk edit: the person's newer text stays
            continue
        if c["before"] is None:
            img.with_suffix(".txt").unlink(missing_ok=True)
        else:
            save_caption(img, c["before"])
        restored += 1
    undo_file.unlink(missing_ok=True)
    msg = f"Undid the last bulk edit ({record['what']}): {restored} caption(s) back as they were."
    if kept:
        msg += f" {len(kept)} changed since were kept as they are ({', '.join(kept[:3])}{'...' if len(kept) > 3 else ''})."
    return msg
