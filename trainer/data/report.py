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
    from trainer.data.masks import mask_source

    from trainer.data.provenance import provenance

    sources = Counter(mask_source(it.path, scan.root) for it in items)
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
        "captions_by": provenance(scan.root, items),  # {"captioner": n, "hand": n}: unchanged auto captions vs the rest
        "duplicates": dups,
        "trigger_words": triggers,
        "trigger_coverage": None if not triggers else (len(items) - len(missing) - len(without_trigger)) / max(1, len(items)),
        "captions_without_trigger": without_trigger,
        "tag_frequency": tag_frequency([it.caption for it in items]),
        "caption_lengths": {"max_tags": max((len(split_tags(it.caption or "")) for it in items), default=0)},
        "buckets": dict(sorted(hist.items(), key=lambda kv: -kv[1])),
        "skipped": [{"file": _rel(scan.root, s.path), "reason": s.reason} for s in scan.skipped],
        "notes": scan.notes,
        "excluded": [_rel(scan.root, it.path) for it in scan.excluded],
        "masks": {"file": sources["file"], "alpha": sources["alpha"]},
        "blockers": ["No usable images in the folder."] if not items else [],
    }


def _rel(root: Path, p: Path) -> str:
    try:
        return str(p.relative_to(root))
    except ValueError:
        return str(p)


def listing(names: list[str], code=str, most: int = 10) -> str:
    """'a, b, c and 7 more': a list that says when it stops."""
    shown = ", ".join(code(x) for x in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def problem_lines(rep: dict, code=str) -> list[str]:
    """The report's problems in plain words, most serious first. `code` formats a file name."""
    out = [f"Blocker: {b}" for b in rep["blockers"]]
    out += [f"Skipped {code(s['file'])}: {s['reason']}" for s in rep["skipped"]]
    out += [f"Duplicate images (same bytes): {', '.join(code(x) for x in d)}" for d in rep["duplicates"]]
    out += [f"{code(s['file'])} is small ({s['size']}) for the training resolution and will be upscaled"
            for s in rep["below_resolution"][:20]]
    if len(rep["below_resolution"]) > 20:
        out.append(f"and {len(rep['below_resolution']) - 20} more small image(s)")
    if rep["missing_captions"]:
        out.append(f"{len(rep['missing_captions'])} image(s) without a caption: " + listing(rep["missing_captions"], code))
    if rep["trigger_coverage"] is not None and rep["captions_without_trigger"]:
        out.append(f"{len(rep['captions_without_trigger'])} caption(s) lack the trigger word(s) "
                   "(added automatically when training, or use 'Add trigger to captions')")
    return out + list(rep["notes"])


def summary_lines(rep: dict, code=str) -> list[str]:
    out = [f"{rep['image_count']} image(s), {rep['images_with_repeats']} per epoch with repeats"]
    if rep.get("excluded"):
        out.append(f"{len(rep['excluded'])} image(s) excluded from training: " + listing(rep["excluded"], code))
    out += [f"{code(name)}: {s['img_count']} image(s) x {s['n_repeats']} repeats" for name, s in rep["subsets"].items()]
    if rep["smallest"]:
        out.append(f"sizes from {rep['smallest'][0]}x{rep['smallest'][1]} to {rep['largest'][0]}x{rep['largest'][1]}")
    by = rep.get("captions_by") or {}
    if by.get("captioner"):
        out.append(f"captions: {by['captioner']} by the captioner (unedited), {by['hand']} by hand or edited")
    if rep["trigger_coverage"] is not None:
        out.append(f"trigger coverage: {rep['trigger_coverage']:.0%}")
    masks = rep.get("masks") or {}
    if sum(masks.values()):
        out.append(f"masks for masked loss: {sum(masks.values())} image(s) ({masks['file']} from masks/, "
                   f"{masks['alpha']} from alpha)")
    top = list(rep["tag_frequency"].items())[:20]
    if top:
        out.append("top tags: " + ", ".join(f"{t} ({n})" for t, n in top))
    return out


def format_report(rep: dict, markdown: bool = False) -> str:
    """The report for a person, problems first: plain text for the CLI, markdown for the UI."""
    if not markdown:
        lines = problem_lines(rep) + summary_lines(rep)
        lines.append("Buckets: " + ", ".join(f"{b}: {n}" for b, n in rep["buckets"].items()))
        return "\n".join(lines)

    def code(x):
        return f"`{x}`"

    problems = problem_lines(rep, code)
    out = ["#### Problems"] + [f"- {p}" for p in problems] if problems else ["#### No problems found"]
    out += ["#### Summary"] + [f"- {x}" for x in summary_lines(rep, code)]
    if rep["buckets"]:
        out += ["#### Buckets", "| bucket | images |\n|---|---|\n" + "\n".join(f"| {b} | {n} |" for b, n in rep["buckets"].items())]
    return "\n".join(out)
