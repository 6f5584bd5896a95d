"""`python -m trainer lora ...`: info, spectrum, resize, merge, extract on kohya-format LoRA files."""
from __future__ import annotations

import json
import sys


def add_commands(sub) -> None:
    p = sub.add_parser("lora", help="inspect, resize, merge or extract LoRA files")
    ls = p.add_subparsers(dest="lora_cmd", required=True)
    i = ls.add_parser("info", help="family, modules, ranks, alphas, metadata, size")
    i.add_argument("file")
    i.add_argument("--progress", action="store_true", help="error events on stderr, as JSON lines (trainer/events.py)")
    i.set_defaults(fn=lambda a: _run(a, lambda t: t.info(a.file), True))
    s = ls.add_parser("spectrum", help="singular values of each module's update; ranks keeping 90/95/99%%")
    s.add_argument("file")
    s.add_argument("--json", action="store_true", help="everything, as JSON")
    s.add_argument("--progress", action="store_true", help="progress and error events on stderr, as JSON lines (trainer/events.py; the app reads them)")
    s.set_defaults(fn=lambda a: _run(a, lambda t: t.spectrum(a.file, on_progress=progress(a)), a.json, _spectrum_text))
    r = ls.add_parser("resize", help="best rank-k approximation of each module (truncated SVD)")
    r.add_argument("file")
    _rank_or_energy(r)
    r.add_argument("--out", required=True)
    r.add_argument("--precision", choices=["fp16", "bf16", "fp32"], help="default: the source's")
    r.set_defaults(fn=lambda a: _run(a, lambda t: t.resize(a.file, a.out, a.rank, a.energy, a.precision, on_progress=progress(a)), True))
    m = ls.add_parser("merge", help="weighted sum of LoRAs of one family (exact, or re-factorised to --rank)")
    m.add_argument("sources", nargs="+", metavar="FILE:WEIGHT")
    m.add_argument("--rank", type=int)
    m.add_argument("--out", required=True)
    m.add_argument("--precision", choices=["fp16", "bf16", "fp32"])
    m.add_argument("--progress", action="store_true", help="accepted for symmetry; a merge reports when done")
    m.set_defaults(fn=lambda a: _run(a, lambda t: t.merge(parse_sources(a.sources), a.out, a.rank, a.precision), True))
    e = ls.add_parser("extract", help="a LoRA of the difference between two checkpoints of one family")
    e.add_argument("--base", required=True)
    e.add_argument("--tuned", required=True)
    _rank_or_energy(e)
    e.add_argument("--conv", action="store_true", help="also the ResNet convolutions (LoCon)")
    e.add_argument("--out", required=True)
    e.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default="fp16")
    e.add_argument("--model-config", help="for single files of an unusual size: a diffusers folder with their configs")
    e.set_defaults(fn=lambda a: _run(a, lambda t: t.extract(a.base, a.tuned, a.out, a.rank, a.energy, a.conv, a.precision,
                                                         on_progress=progress(a), model_config=a.model_config), True))


def progress(args):
    """--progress: progress events on stderr, the JSON lines of trainer/events.py (the app's Tools tab reads them)."""
    if not getattr(args, "progress", False):
        return None
    from trainer.events import event_line

    return lambda d, t: print(event_line("progress", done=d, total=t), file=sys.stderr, flush=True)


def _rank_or_energy(p) -> None:
    p.add_argument("--progress", action="store_true", help="progress and error events on stderr, as JSON lines (trainer/events.py; the app reads them)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--rank", type=int)
    g.add_argument("--energy", type=float, help="per module, the smallest rank keeping this share (e.g. 0.95)")


def parse_sources(items: list[str]) -> list[tuple[str, float]]:
    """'a.safetensors:0.7' -> ('a.safetensors', 0.7); a missing weight is 1."""
    from trainer.loras.tools import LoraToolError

    out = []
    for item in items:
        path, sep, w = item.rpartition(":")
        try:
            out.append((path, float(w)) if sep and path else (item, 1.0))
        except ValueError:  # no weight given ('C:\\loras\\a.safetensors'), or not a number
            if w.lower().endswith(".safetensors"):
                out.append((item, 1.0))
            else:
                raise LoraToolError(f"'{item}': the weight after ':' must be a number, e.g. {path}:0.7.") from None
    return out


def _spectrum_text(rep: dict) -> str:
    lines = [f"{rep['file']} ({rep['family']}): smallest rank keeping 90 / 95 / 99% of the update's energy"]
    for b, v in rep["blocks"].items():
        lines.append(f"  {b:5s} {v['modules']:4d} modules   {v['rank_90']:4d} / {v['rank_95']:4d} / {v['rank_99']:4d}")
    return "\n".join(lines)


def _run(args, fn, as_json: bool, text=None) -> int:
    from trainer.events import event_line
    from trainer.loras import tools as loratools

    try:
        rep = fn(loratools)
    except loratools.LoraToolError as e:
        print(event_line("error", message=str(e)) if getattr(args, "progress", False) else f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(rep, indent=1) if as_json or text is None else text(rep))
    return 0
