"""The app's side of auto-captioning: one worker process at a time (`python -m trainer caption`), like a
training run; its JSON-line events say how far it is. No torch here."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from app.runs import _tail
from trainer.events import read_events, request
from app.workers import engine_command, gpu_busy, kill_tree, pid_alive, start_detached


class CaptionJobs:
    """The captioning worker. Asked for while a training run holds the GPU, a job waits in the queue (its job.json
    says so, so an app restart keeps it waiting) and starts when that run ends, before the next queued run."""

    def __init__(self, ws, runs, python: str = sys.executable):
        self.ws, self.runs, self.python = ws, runs, python
        self.root = ws.captioning_dir
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        if runs is not None and hasattr(runs, "gpu_claims"):
            runs.gpu_claims.append(lambda: self.waiting() or self.running())  # no training run starts before it
        if self.waiting():
            threading.Thread(target=self._start_when_free, args=(self.latest(),), daemon=True).start()

    # ------------------------------------------------------------------ the newest job
    def latest(self) -> Path | None:
        jobs = sorted(self.root.glob("job-*")) if self.root.is_dir() else []
        return jobs[-1] if jobs else None

    def _info(self, job: Path) -> dict:
        try:
            return json.loads((job / "job.json").read_text())
        except (OSError, ValueError):
            return {}

    def waiting(self) -> bool:
        """The newest job waits in the queue for the GPU (not started, not cancelled)."""
        job = self.latest()
        return bool(job) and self._info(job).get("waiting") is True

    def running(self, events: list[dict] | None = None) -> bool:
        """A worker of the newest job is alive and has not said it ended (`events`: that job's, if read)."""
        job = self.latest()
        if not job or self._info(job).get("waiting") is not None and "pid" not in self._info(job):
            return False
        alive = self._proc.poll() is None if self._proc is not None else pid_alive(self._info(job).get("pid"))
        ended = any(e["type"] in ("done", "error") for e in (self._events(job) if events is None else events))
        return alive and not ended  # a worker that said done is as good as gone

    @staticmethod
    def _events(job: Path) -> list[dict]:
        return read_events(job)[0]

    # ------------------------------------------------------------------ actions
    def start(self, dataset: str, model: str, mode: str, trigger: str = "", batch_size: int = 4,
              preview: int = 0, device: str = "auto", tags: dict | None = None) -> str:
        """Start a worker; a plain sentence back. Refused while a training run (or another captioning) runs."""
        with self._lock:
            if self.running() or self.waiting():
                return "Captioning is already running or waiting: wait for it or cancel it."
            busy = gpu_busy(self.runs, self, asking="captioning")
            folder = self.ws.dataset_path(dataset)
            # the name sorts by time (microseconds too): `latest` is the newest job even within one second
            job = self.root / datetime.now().strftime("job-%Y%m%d-%H%M%S-%f")
            job.mkdir(parents=True)
            cmd = engine_command("caption", str(folder), "--model", model, "--mode", mode, "--trigger", trigger,
                                 "--batch-size", str(int(batch_size)), "--device", device,
                                 "--job", str(job), python=self.python)
            if preview:
                cmd += ["--preview", str(int(preview))]
            cmd += tag_args(tags or {})
            info = {"dataset": dataset, "mode": mode, "preview": preview, "cmd": cmd}
            if busy:  # in line behind the training run; it goes before the next queued run
                (job / "job.json").write_text(json.dumps({**info, "waiting": True}))
                threading.Thread(target=self._start_when_free, args=(job,), daemon=True).start()
            else:
                self._spawn(job, info)
        self.ws.update_settings(caption_model=model)
        if busy:
            return ("Waiting in the queue: a training run is using the GPU, and captioning starts as soon as it has "
                    "finished (before any run queued after it). Cancel takes it out.")
        return "Previewing the first captions..." if preview else "Captioning started."

    def _spawn(self, job: Path, info: dict) -> None:
        self._proc = start_detached(info["cmd"], job / "worker.log")
        (job / "job.json").write_text(json.dumps({**info, "waiting": False, "pid": self._proc.pid}))
        threading.Thread(target=self._then_next, args=(self._proc,), daemon=True).start()

    def _then_next(self, proc) -> None:
        """When the worker ends, the next queued training run may take the GPU (without waiting for a page to ask)."""
        proc.wait()
        if hasattr(self.runs, "reconcile"):
            self.runs.reconcile()

    def _start_when_free(self, job: Path, every_s: float = 1.0) -> None:
        """Start a waiting job when no training run holds the GPU (or drop it when it was cancelled)."""
        while True:
            info = self._info(job)
            if info.get("waiting") is not True:
                return  # cancelled, or started
            if not any(r["status"] == "running" for r in self.runs.list()):
                with self._lock:
                    if self._info(job).get("waiting") is True:
                        self._spawn(job, info)
                return
            time.sleep(every_s)

    def cancel(self) -> str:
        job = self.latest()
        with self._lock:
            if job and self.waiting():
                (job / "job.json").write_text(json.dumps({**self._info(job), "waiting": "cancelled"}))
                return "Taken out of the queue: it had not started, nothing was written."
        if not job or not self.running():
            return "No captioning is running."
        request(job, "stop")  # the worker stops after the current batch; what it wrote stays
        threading.Thread(target=self._kill_later, args=(job,), daemon=True).start()
        return "Cancelling after the current batch: the captions written so far are kept."

    def _kill_later(self, job: Path, grace_s: float = 30.0) -> None:
        end = time.time() + grace_s
        while time.time() < end and self.running():
            time.sleep(0.5)
        if self.running():
            kill_tree(self._info(job).get("pid"))

    # ------------------------------------------------------------------ what the page shows
    def state(self) -> dict:
        """{active, dataset, preview, done, total, images_per_s, eta_s, captions, message, error, finished}."""
        job = self.latest()
        if not job:
            return {"active": False, "job": "", "captions": []}
        info, events = self._info(job), self._events(job)
        if info.get("waiting") in (True, "cancelled"):
            waiting = info["waiting"] is True
            return {"active": waiting, "job": job.name, "dataset": info.get("dataset", ""),
                    "preview": bool(info.get("preview")), "done": 0, "total": 0, "captions": [],
                    "status": "Waiting in the queue for the GPU (a training run is using it).", "error": None,
                    "message": "" if waiting else "Taken out of the queue before it started.", "finished": not waiting}
        prog = next((e for e in reversed(events) if e["type"] == "progress"), {})
        end = next((e for e in reversed(events) if e["type"] in ("done", "error")), None)
        status = next((e["message"] for e in reversed(events) if e["type"] == "status"), "Starting the worker...")
        active = self.running(events)
        error = end["message"] if end and end["type"] == "error" else None
        if not active and end is None:
            error = ("The captioning worker stopped without finishing (out of memory, or killed). The captions "
                     "written before that are kept. Its log: " + _tail(job / "worker.log", 600).strip()[-300:])
        return {"active": active, "job": job.name, "dataset": info.get("dataset", ""), "preview": bool(info.get("preview")),
                "done": prog.get("done", 0), "total": prog.get("total", 0), "images_per_s": prog.get("images_per_s"),
                "eta_s": prog.get("eta_s"), "device": prog.get("device", ""),
                "captions": [(e["file"], e["caption"]) for e in events if e["type"] == "caption"],
                "status": status, "message": end["message"] if end and not error else "", "error": error,
                "finished": end is not None or not active}


def tag_args(tags: dict) -> list[str]:
    """A WD tagger's options (trainer/engine/tagger.py TagOptions fields) as `caption` command arguments."""
    args = []
    for key in ("general_threshold", "character_threshold", "max_tags"):
        if tags.get(key) is not None:
            args += [f"--{key.replace('_', '-')}", str(tags[key])]
    if tags.get("blacklist"):
        args += ["--blacklist", str(tags["blacklist"])]
    args += ["--ratings"] if tags.get("ratings") else []
    args += ["--keep-underscores"] if tags.get("keep_underscores") else []
    return args


def progress_markdown(s: dict) -> str:
    """One line about the newest captioning job: progress, speed and ETA while it runs, its outcome after."""
    if not s.get("job"):
        return ""
    if s.get("error"):
        return f"**Captioning stopped:** {s['error']}"
    what = "Preview" if s.get("preview") else "Captioning"
    if s.get("active"):
        if not s.get("total"):
            return f"{what}: {s['status']}"
        speed = f" · {s['images_per_s']:.2f} images/s · about {s['eta_s']:.0f} s left" if s.get("images_per_s") else ""
        pct = 100 * s["done"] / max(1, s["total"])
        bar = f'<progress value="{s["done"]}" max="{max(1, s["total"])}" style="width:100%"></progress>'
        return (f"{bar}\n\n{what} `{s['dataset']}` on {s.get('device') or '...'}: {s['done']}/{s['total']} images "
                f"({pct:.0f}%){speed}")
    return f"{what} of `{s['dataset']}` finished: {s.get('message', '')}"
