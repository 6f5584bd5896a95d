"""Events out of the engine (JSON lines, append-only) and commands into it (files polled between steps).

The one protocol between the app and every detached engine process (a training run, an auto-captioning job):
each works in a folder laid out as trainer/runfiles.py says, appends its events to `events.jsonl` there and
takes its requests from `control/`. The UI re-reads `events.jsonl` from any offset, so a reloaded page or a
restarted app re-attaches to a run.
Event types: status, log, warning, progress, validation, sample, checkpoint, error, stopped, done.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from trainer.runfiles import RunFiles

COMMANDS = ("stop", "save")


def event(type: str, **data) -> dict:
    """One event: its type, the time, its data."""
    return {"type": type, "time": round(time.time(), 3), **data}


def event_line(type: str, **data) -> str:
    """One event as the JSON line every engine process writes (to its events.jsonl, or to a pipe)."""
    return json.dumps(event(type, **data), ensure_ascii=False, default=str)


def parse_event(line: str | bytes) -> dict | None:
    """The event of a JSON line, or None for anything else (a half-written line, a library's own output)."""
    try:
        ev = json.loads(line)
    except ValueError:
        return None
    return ev if isinstance(ev, dict) and "type" in ev else None


class EventLog:
    def __init__(self, run_dir: str | Path, enabled: bool = True, echo=None):
        self.path = RunFiles(run_dir).events
        self.enabled = enabled
        self.echo = echo  # callable(str) for terminal messages
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, type: str, **data) -> dict:
        ev = event(type, **data)
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
        ev = parse_event(line)
        if ev is not None:
            events.append(ev)
    return events, offset + end


def request(run_dir: str | Path, command: str) -> None:
    """Ask a running engine to stop (after saving) or to save now."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command}")
    p = RunFiles(run_dir).request(command)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(str(time.time()))


def take_request(run_dir: str | Path, command: str) -> bool:
    """True once per request: the engine removes the file when it acts on it."""
    p = RunFiles(run_dir).request(command)
    try:
        os.remove(p)
        return True
    except FileNotFoundError:
        return False
