"""Fault trials: kill -9 at random points, injected disk/OOM faults, fuzzed inputs. Shared by the tests and by
`python -m trainer reliability`, which writes RELIABILITY.md from a fresh run so the figures stay true."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def check_files(run_dir: Path) -> list[str]:
    """Every visible .safetensors under run_dir must load completely. Returns the problems found."""
    from safetensors.torch import load_file

    bad = []
    for p in run_dir.rglob("*.safetensors"):
        if any(part.startswith(".") for part in p.relative_to(run_dir).parts):
            continue  # temp files and temp folders of interrupted writes are not outputs
        try:
            load_file(str(p))
        except Exception as e:  # a truncated file raises from safetensors' parser
            bad.append(f"{p.relative_to(run_dir)}: {type(e).__name__}")
    return bad


def run_cli(config: Path, run_dir: Path, resume: bool, kill_after: float | None = None, env=None) -> int | None:
    """Run the train CLI as a process; SIGKILL it after `kill_after` seconds. Returns the exit code (None if killed)."""
    cmd = [sys.executable, "-m", "trainer", "train", str(config), "--run-dir", str(run_dir)] + (["--resume"] if resume else [])
    e = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), **(env or {})}
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=e)
    if kill_after is None:
        return proc.wait(timeout=900)
    try:
        return proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return None


def kill_trials(config: Path, work: Path, kills: int = 10, seed: int = 0, reference: Path | None = None) -> dict:
    """Train with SIGKILLs at random moments, resuming each time, until the run finishes; then compare the final
    LoRA with an uninterrupted run. Kill moments are spread over start-up, steps, checkpoint writes and export."""
    from safetensors.torch import load_file

    from trainer.events import read_events

    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    if reference is None:
        reference = work / "reference"
        t0 = time.time()
        assert run_cli(config, reference, resume=False) == 0, "the uninterrupted run failed"
        first = next(e["time"] for e in read_events(reference)[0] if e["type"] == "progress")
        startup = first - t0  # process start to first step: imports, model load, caching
    else:
        startup = 10.0
    run = work / "killed"
    done, killed, problems, attempts = False, 0, [], 0
    while not done and attempts < kills * 3:
        attempts += 1
        if killed < kills:
            # late start-up, the first steps, checkpoint writes (and the export, when little work is left)
            delay = startup * rng.uniform(0.6, 1.0) + rng.uniform(0.0, 2.0)
            code = run_cli(config, run, resume=run.exists(), kill_after=delay)
            if code is None:
                killed += 1
        else:
            code = run_cli(config, run, resume=True)
        problems += [f"after attempt {attempts}: {p}" for p in check_files(run)]
        done = code == 0 and (run / "lora.safetensors").is_file()
    a, b = load_file(str(reference / "lora.safetensors")), load_file(str(run / "lora.safetensors")) if done else {}
    worst = max(((a[k].float() - b[k].float()).abs().max().item() for k in a), default=float("inf")) if done else float("inf")
    return {"kills": killed, "attempts": attempts, "finished": done, "bad_files": problems, "max_abs_diff": worst,
            "same_keys": done and a.keys() == b.keys()}


def fuzzed_image(rng: random.Random, seeds: list[bytes]) -> bytes:
    """One fuzzed image file: a real header with a few bytes changed, a truncation, a PNG that claims huge (or zero)
    dimensions, or a header followed by random bytes."""
    import struct
    import zlib

    kind = rng.random()
    if kind < 0.35:
        base = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 8)):
            if base:
                base[rng.randrange(len(base))] = rng.randrange(256)
        return bytes(base)
    if kind < 0.6:
        b = rng.choice(seeds)
        return b[: rng.randint(0, len(b))]
    if kind < 0.75:
        w, h = rng.choice([(20000, 20000), (1, 10**6), (65535, 65535), (0, 5)])
        ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
        chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)  # noqa: E731
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    return rng.choice(seeds)[:8] + bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))


def fuzzed_caption(rng: random.Random) -> bytes:
    """A caption file's bytes: random text with NULs and BOMs in UTF-8, UTF-16, Latin-1 or cp1252, or raw bytes."""
    enc = rng.choice(["utf-8", "utf-16", "latin-1", "cp1252", "raw"])
    text = "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(160, 0x3000), 0, 0xFEFF])) for _ in range(rng.randint(0, 80)))
    return bytes(rng.randrange(256) for _ in range(40)) if enc == "raw" else text.encode(enc, errors="replace")


def fuzz_inputs(n: int, seed: int = 0) -> dict:
    """Random bytes with real image headers, truncations, huge dimensions and odd caption encodings through the
    probe/decoder, the caption reader and the importer. Counts outcomes; any crash is recorded."""
    import io

    from PIL import Image

    from trainer.data.images import ImageProblem, load_rgb, probe
    from trainer.data.importer import import_sources
    from trainer.data.scan import read_caption

    rng = random.Random(seed)
    good = io.BytesIO()
    Image.new("RGB", (40, 30), (9, 99, 199)).save(good, "PNG")
    jpg = io.BytesIO()
    Image.new("RGB", (40, 30), (9, 99, 199)).save(jpg, "JPEG")
    seeds = [good.getvalue(), jpg.getvalue(), b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"BM" + b"\x00" * 60, b"\x89PNG\r\n\x1a\n"]

    stats = {"inputs": 0, "accepted": 0, "rejected_with_reason": 0, "crashes": [], "captions": 0, "imported": 0,
             "import_skipped": 0, "slowest_s": 0.0}
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        for i in range(n):
            data = fuzzed_image(rng, seeds)  # before the name: the same seed gives the same files as before
            f = td / f"x{i}{rng.choice(['.png', '.jpg', '.webp', '.bmp'])}"
            f.write_bytes(data)
            stats["inputs"] += 1
            t0 = time.time()
            try:
                probe(f)
                load_rgb(f)
                stats["accepted"] += 1
            except ImageProblem:
                stats["rejected_with_reason"] += 1
            except Exception as e:
                stats["crashes"].append(f"{f.name}: {type(e).__name__}: {e}")
            stats["slowest_s"] = max(stats["slowest_s"], time.time() - t0)
            cap = td / f"x{i}.txt"
            cap.write_bytes(fuzzed_caption(rng))
            try:
                read_caption(cap)
                stats["captions"] += 1
            except Exception as e:
                stats["crashes"].append(f"caption {cap.name}: {type(e).__name__}: {e}")
            f.unlink()
            cap.unlink()
        # the importer over a batch of fuzzed files at once
        src = td / "src"
        src.mkdir()
        for i in range(min(n, 300)):
            b = bytearray(rng.choice(seeds))
            if b and rng.random() < 0.7:
                b[rng.randrange(len(b))] ^= 0xFF
            (src / f"{rng.choice(['', '../', 'ü', ' '])}f{i}{rng.choice(['.png', '.jpg', '.txt'])}".replace("/", "_")).write_bytes(bytes(b))
        try:
            rep = import_sources([src], td / "ds")
            stats["imported"], stats["import_skipped"] = len(rep.imported), len(rep.skipped)
        except Exception as e:
            stats["crashes"].append(f"importer: {type(e).__name__}: {e}")
    return stats


def trial_config(work: Path) -> Path:
    """The kill trials' run in `work`: a tiny SD1 model, four images, 200 steps checkpointed every 3; its config."""
    import numpy as np
    from PIL import Image

    from trainer.recipe.config import TrainConfig
    from trainer.models.tiny import save_tiny_model

    model = save_tiny_model(work / "model", "sd1")
    data = work / "data"
    data.mkdir()
    for i in range(4):
        Image.fromarray((np.random.RandomState(i).rand(64, 64, 3) * 255).astype("uint8")).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"zwx, tag{i}")
    cfg = TrainConfig(base_model=str(model), dataset=str(data), resolution=64, min_bucket=64, max_bucket=128, rank=4,
                      alpha=4, max_steps=200, save_every_steps=3, keep_last=2, mixed_precision="no", device="cpu",
                      save_precision="fp32", lr_scheduler="cosine", warmup_steps=3, shuffle_tags=True)
    cfg.save(work / "cfg.toml")
    return work / "cfg.toml"


def write_report(out: Path | None, kills: int = 10, fuzz: int = 3000) -> str:
    """Run the trials on a tiny model; return the report, written to `out` (RELIABILITY.md) when given."""
    work = Path(tempfile.mkdtemp(prefix="lora_reliability_"))
    os.environ.setdefault("LORA_STUDIO_CACHE", str(work / "cache"))
    cfg_path = trial_config(work)
    t0 = time.time()
    k = kill_trials(cfg_path, work / "kill", kills=kills, seed=1)
    k_time = time.time() - t0
    t0 = time.time()
    f = fuzz_inputs(fuzz, seed=1)
    f_time = time.time() - t0
    text = report_text(kills, fuzz, k, k_time, f, f_time)
    if out:
        Path(out).write_text(text)
    return text


def report_text(kills: int, fuzz: int, k: dict, k_time: float, f: dict, f_time: float) -> str:
    """RELIABILITY.md from the kill trials' (`k`) and the fuzzing's (`f`) counts and wall times."""
    import platform

    text = f"""# Reliability

Generated by `python -m trainer reliability --kills {kills} --fuzz {fuzz}` on {time.strftime('%Y-%m-%d %H:%M')}
({platform.machine()}, {os.cpu_count()} cores). Rerun it to refresh these figures. The same trials run in the
test suite (`tests/test_reliability.py`) with smaller counts.

## kill -9 during training, checkpointing and export
A tiny SD1 model trains 200 steps, checkpointing every 3 steps (keep last 2). The training process is
killed with SIGKILL at random moments (between 60% of its measured start-up time and 2 s into training:
model loading, latent caching, steps, checkpoint writes, and the export when little work is left), then
resumed with `--resume`, until it finishes.

| what | result |
|---|---|
| SIGKILLs delivered | {k['kills']} |
| processes started | {k['attempts']} |
| run finished after the kills | {k['finished']} |
| truncated or unreadable `.safetensors` seen after any kill | {len(k['bad_files'])} |
| final LoRA vs uninterrupted run: same keys | {k['same_keys']} |
| final LoRA vs uninterrupted run: max abs difference | {k['max_abs_diff']:.3g} (tolerance 1e-6) |
| wall time | {k_time:.0f} s |

Why it holds: every output is written to a temp name and renamed into place (checkpoint folders too), the
randomness of step N is a function of (seed, N), and resume restores LoRA weights, optimizer and scheduler.

## Fuzzed inputs
| what | count |
|---|---|
| generated image files (mutated/truncated real PNG/JPEG/WebP/BMP headers, huge dimensions, random bytes) | {f['inputs']} |
| decoded fine | {f['accepted']} |
| rejected with a reason | {f['rejected_with_reason']} |
| crashes (anything but a plain rejection) | {len(f['crashes'])} |
| slowest single file | {f['slowest_s']:.3f} s |
| caption files in odd encodings read | {f['captions']} |
| importer batch: imported / skipped with a reason | {f['imported']} / {f['import_skipped']} |
| wall time | {f_time:.0f} s |

## Other faults (tests in `tests/test_reliability.py`)
- Disk full (ENOSPC) and I/O error (EIO) injected at a checkpoint write: the run stops with a plain message
  about disk space, the last good checkpoint stays loadable, no half-written checkpoint is left visible.
- CUDA out-of-memory injected in a step of a real worker process: the page shows what to change (batch size,
  resolution, gradient checkpointing, 8-bit optimizer), the last checkpoint is kept, the app keeps serving.
- Hostile requests to the running app: paths outside the workspace (`../`, absolute, symlinks) are refused;
  an upload named `../../x.png` lands inside the dataset folder; two Start requests give one run; the server
  binds 127.0.0.1 only by default.
- Caption edits saved while a run reads the dataset are kept; of two saves the last one wins.
"""
    if k["bad_files"] or f["crashes"]:
        text += "\n## Problems found\n" + "\n".join(f"- {x}" for x in k["bad_files"] + f["crashes"]) + "\n"
    return text


def add_command(sub) -> None:
    r = sub.add_parser("reliability", help="run the fault trials and print the report (--out RELIABILITY.md to keep it)")
    r.add_argument("--kills", type=int, default=10)
    r.add_argument("--fuzz", type=int, default=3000)
    r.add_argument("--out", default="", help="also write the report to this file (e.g. RELIABILITY.md)")
    r.set_defaults(fn=lambda a: print(write_report(Path(a.out) if a.out else None, a.kills, a.fuzz)) or 0)
