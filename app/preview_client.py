"""The app's side of the preview worker: one long-lived process that keeps the pipeline loaded."""
from __future__ import annotations

import json
import subprocess
import sys
import threading

from app.workers import engine_command, start_attached
from trainer.events import parse_event


class PreviewClient:
    def __init__(self, out_dir, python: str = sys.executable):
        self.out_dir = str(out_dir)
        self.python = python
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()  # one generation at a time; others wait their turn

    def _ensure(self) -> None:
        if self.proc and self.proc.poll() is None:
            return
        self.proc = start_attached(engine_command("preview-worker", "--out", self.out_dir, python=self.python),
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                   bufsize=1)
        ready = self.proc.stdout.readline()
        if not ready:
            raise RuntimeError("The preview worker did not start.")

    def cancel(self) -> None:
        """Ask the worker to stop the generation under way (at its next denoising step)."""
        from pathlib import Path

        from trainer.engine.preview import CANCEL_FILE

        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.out_dir) / CANCEL_FILE).touch()

    def request(self, req: dict, on_progress=None) -> dict:
        """Send one request; `on_progress(done, total)` hears the worker's progress events until the answer."""
        with self.lock:
            try:
                self._ensure()
                self.proc.stdin.write(json.dumps(req) + "\n")
                self.proc.stdin.flush()
                line = self.proc.stdout.readline()
                while line and (ev := parse_event(line)) is not None:  # progress before the answer
                    if on_progress and ev["type"] == "progress":
                        on_progress(ev["done"], ev["total"])
                    line = self.proc.stdout.readline()
            except (OSError, RuntimeError) as e:
                self.proc = None
                return {"ok": False, "error": f"The preview worker could not be reached ({e}). Try again."}
            if not line:
                code = self.proc.poll()
                self.proc = None
                return {"ok": False, "error": f"The preview worker stopped (exit code {code}), probably out of memory. "
                                              "Try a smaller size; the next generation starts a fresh worker."}
            return json.loads(line)

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
