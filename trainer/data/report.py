"""The dataset report: what a person should know before training, problems first."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from trainer.data.buckets import assign_bucket, make_buckets
from trainer.data.captions import has_trigger, split_tags, tag_frequency
from trainer.data.scan import file_hash, scan_dataset


def dataset_report(path: str | Path, resolution: int = 512, trigger: str = "", min_bucket: int = 256,
                   max_bucket: int = 1024, step: int = 64, no_upscale: bool = False) -> dict:
    scan = scan_dataset(path)
    triggers = [t.strip() for t in trigger.split(",") if t.strip()]
    items = scan.items
    buckets = make_buckets(resolution, min_bucket, max_bucket, step)
    hist = Counter()
    small, missing, without_trigger = [], [], []
    by_hash: dict[str, list[str]] = {}
    for it in items:
        b = assign_bucket(it.width, it.height, buckets, no_upscale, step)
        hist[f"{b[0]}x{b[1]}"] += it.repeats
        if it.width * it.height < resolution * resolution * 0.5:
            small.append({"file": _rel(scan.root, it.path), "size": f"{it.width}x{it.height}"})
        if not it.caption:
            missing.append(_rel(scan.root, it.path))
        elif triggers and not all(has_trigger(it.caption, t) for t in triggers):
            without_trigger.append(_rel(scan.root, it.path))
        by_hash.setdefault(file_hash(it.path), []).append(_rel(scan.root, it.path))
    dups = [v for v in by_hash.values() if len(v) > 1]
    sides = [min(it.width, it.height) for it in items]
    return {
        "root": str(scan.root),
        "image_count": len(items),
        "images_with_repeats": sum(it.repeats for it in items),
        "subsets": scan.subsets,
        "resolution_range": {"min": f"{min(sides)}px" if sides else None, "max": f"{max(sides)}px" if sides else None},
        "smallest": min(((it.width, it.height) for it in items), key=lambda s: s[0] * s[1], default=None),
        "largest": max(((it.width, it.height) for it in items), key=lambda s: s[0] * s[1], default=None),
        "below_resolution": small,
        "missing_captions": missing,
        "duplicates": dups,
        "trigger_words": triggers,
        "trigger_coverage": None if not triggers else (len(items) - len(missing) - len(without_trigger)) / max(1, len(items)),
        "captions_without_trigger": without_trigger,
        "tag_frequency": tag_frequency([it.caption for it in items]),
        "caption_lengths": {"max_tags": max((len(split_tags(it.caption or "")) for it in items), default=0)},
        "buckets": dict(sorted(hist.items(), key=lambda kv: -kv[1])),
        "skipped": [{"file": _rel(scan.root, s.path), "reason": s.reason} for s in scan.skipped],
        "notes": scan.notes,
        "blockers": ["No usable images in the folder."] if not items else [],
    }


def _rel(root: Path, p: Path) -> str:
    try:
        return str(p.relative_to(root))
    except ValueError:
        return str(p)


def format_report(rep: dict) -> str:
    """Plain-language text, problems first."""
    lines = []
    for b in rep["blockers"]:
        lines.append(f"BLOCKER: {b}")
    for s in rep["skipped"]:
        lines.append(f"Skipped {s['file']}: {s['reason']}")
    for d in rep["duplicates"]:
        lines.append(f"Duplicate images (same bytes): {', '.join(d)}")
    for s in rep["below_resolution"]:
        lines.append(f"Small image {s['file']} ({s['size']}): below the training resolution, will be upscaled")
    if rep["missing_captions"]:
        lines.append(f"{len(rep['missing_captions'])} image(s) without a caption: {', '.join(rep['missing_captions'][:10])}")
    if rep["trigger_coverage"] is not None and rep["captions_without_trigger"]:
        lines.append(f"{len(rep['captions_without_trigger'])} caption(s) lack the trigger word(s) (added automatically when training)")
    lines.extend(rep["notes"])
    lines.append(f"{rep['image_count']} image(s), {rep['images_with_repeats']} per epoch with repeats")
    for name, s in rep["subsets"].items():
        lines.append(f"  {name}: {s['img_count']} image(s) x {s['n_repeats']} repeats")
    if rep["smallest"]:
        lines.append(f"Sizes from {rep['smallest'][0]}x{rep['smallest'][1]} to {rep['largest'][0]}x{rep['largest'][1]}")
    if rep["trigger_coverage"] is not None:
        lines.append(f"Trigger coverage: {rep['trigger_coverage']:.0%}")
    top = list(rep["tag_frequency"].items())[:15]
    if top:
        lines.append("Top tags: " + ", ".join(f"{t} ({n})" for t, n in top))
    lines.append("Buckets: " + ", ".join(f"{b}: {n}" for b, n in rep["buckets"].items()))
    return "\n".join(lines)
