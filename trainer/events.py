"""Events out of the engine (JSON lines, append-only) and commands into it (files polled between steps).

The UI re-reads `events.jsonl` from any offset, so a reloaded page or a restarted app re-attaches to a run.
Event types: status, log, warning, progress, validation, sample, checkpoint, error, stopped, done.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from trainer.runfiles import RunFiles

COMMANDS = ("stop", "save")


class EventLog:
    def __init__(self, run_dir: str | Path, enabled: bool = True, echo=None):
        self.path = RunFiles(run_dir).events
        self.enabled = enabled
        self.echo = echo  # callable(str) for terminal messages
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, type: str, **data) -> dict:
        ev = {"type": type, "time": round(time.time(), 3), **data}
        if self.enabled:
            line = json.dumps(ev, ensure_ascii=False, default=str) + "\n"
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
            if self.echo and type in ("status", "log", "warning", "error", "checkpoint", "done", "stopped"):
                self.echo(f"[{type}] {ev.get('message', '')}".rstrip())
        return ev


def read_events(run_dir: str | Path, offset: int = 0) -> tuple[list[dict], int]:
    """Complete event lines from byte `offset`; returns (events, new offset). A half-written last line waits."""
    path = RunFiles(run_dir).events
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    events = []
    end = data.rfind(b"\n") + 1
    for line in data[:end].splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events, offset + end


def request(run_dir: str | Path, command: str) -> None:
    """Ask a running engine to stop (after saving) or to save now."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command}")
    d = RunFiles(run_dir).control
    d.mkdir(parents=True, exist_ok=True)
    (d / command).write_text(str(time.time()))


def take_request(run_dir: str | Path, command: str) -> bool:
    """True once per request: the engine removes the file when it acts on it."""
    p = RunFiles(run_dir).control / command
    try:
        os.remove(p)
        return True
    except FileNotFoundError:
        return False
