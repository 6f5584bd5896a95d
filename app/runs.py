"""Start, stop, queue and list training runs. Each run is a worker process running the engine's CLI.

The worker is started in its own session: closing the browser or restarting the app does not stop it.
A small SQLite index in the workspace lists runs; each run's truth is its folder (config.toml,
events.jsonl, checkpoints). One run trains at a time; later ones wait in a queue.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


from trainer.recipe.config import TrainConfig
from trainer.events import read_events, request
from trainer.runfiles import RunFiles

from app.workers import engine_command, group_command, kill_tree, pid_alive, start_detached

ACTIVE = ("queued", "running")


@dataclass
class RunView:
    """What the page shows of a run, folded from its event log."""
    offset: int = 0
    state: str = "queued"
    step: int = 0
    total: int = 0
    epoch: int = 0
    its: float = 0.0
    eta: float | None = None
    losses: list = field(default_factory=list)  # (step, loss)
    val_losses: list = field(default_factory=list)  # (step, validation loss)
    samples: list = field(default_factory=list)  # (path, caption)
    log: list = field(default_factory=list)
    error: str | None = None
    output: str | None = None
    checkpoints: list = field(default_factory=list)
    phase: tuple[int, int] | None = None  # (done, count) of the phase in `state` that has its own progress
    stopping: bool = False  # a stop was asked for and the run has not stopped yet
    memory: list = field(default_factory=list)  # CUDA readings of the progress events, for the spill warning
    dedicated_gb: float | None = None
    variant_losses: dict = field(default_factory=dict)  # a sweep: each variant's last training loss
    variant_val: list = field(default_factory=list)  # a sweep: (step, variant, validation loss)

    def fold(self, events: list[dict]) -> None:
        for e in events:
            t = e["type"]
            msg = e.get("message")
            if msg:
                self.log.append(f"{time.strftime('%H:%M:%S', time.localtime(e['time']))} {t}: {msg}")
            if t == "status":
                self.state = e.get("state", self.state)
                # caching counts what is done; sampling names the image being drawn (1-based)
                self.phase = ((e["index"] + 1 if "index" in e else e["done"]), e["count"]) if "count" in e else None
                if self.state == "training":
                    self.total = e.get("total", self.total)
            elif t == "progress":
                self.state, self.phase = "training", None
                self.step, self.total, self.epoch = e["step"], e["total"], e.get("epoch", 0)
                self.its, self.eta = e.get("its", 0.0), e.get("eta")
                self.losses.append((e["step"], e["loss"]))
                self.variant_losses = e.get("losses", self.variant_losses)
                if "reserved_gb" in e:
                    self.dedicated_gb = e.get("dedicated_gb")
                    self.memory = (self.memory + [{"step": e["step"], "reserved_gb": e["reserved_gb"],
                                                   "s_per_step": 1 / e["its"] if e.get("its") else None}])[-50:]
            elif t == "validation" and e.get("variant"):
                self.variant_val.append((e["step"], e["variant"], e["loss"]))
            elif t == "validation":
                self.val_losses.append((e["step"], e["loss"]))
            elif t == "sample":
                self.samples.append((e["path"], f"step {e['step']}: {e.get('prompt', '')}"))
                if "count" in e and e["index"] + 1 >= e["count"]:  # the last sample of a round: back to training
                    self.state, self.phase = "training", None
            elif t == "checkpoint":
                self.checkpoints.append(e["path"])
                self.state, self.phase = "training", None
            elif t == "error":
                self.state, self.error = "failed", msg
            elif t == "stopped":
                self.state = "stopped"
            elif t == "done":
                self.state, self.output, self.step = "finished", e["path"], e.get("step", self.step)
        self.log = self.log[-200:]

    def best_checkpoint(self) -> tuple[int, float] | None:
        """(step, validation loss) of the saved checkpoint with the lowest validation loss."""
        from trainer.runfiles import step_of

        saved = {step_of(Path(p)) for p in self.checkpoints if Path(p).is_dir()}  # pruned ones are gone
        scored = [(loss, step) for step, loss in self.val_losses if step in saved]
        return (min(scored)[1], min(scored)[0]) if scored else None


    def comparison(self) -> tuple[list[str], list[list], tuple[str, int, float] | None]:
        """A sweep's validation losses side by side: (headers, one row per measured step with each variant's loss,
        ★ on each variant's lowest, the best (variant, step, loss) overall)."""
        names = list(dict.fromkeys(n for _, n, _ in self.variant_val))
        steps = sorted({s for s, _, _ in self.variant_val})
        loss = {(s, n): v for s, n, v in self.variant_val}
        low = {n: min((loss[s, n], s) for s in steps if (s, n) in loss) for n in names}
        rows = [[s] + [f"{loss[s, n]:.4f}" + (" ★" if low[n][1] == s else "") if (s, n) in loss else "" for n in names]
                for s in steps]
        best = min(((v, s, n) for n, (v, s) in low.items()), default=None)
        return ["step"] + names, rows, (best[2], best[1], best[0]) if best else None


def config_hash(cfg: TrainConfig) -> str:
    d = cfg.to_dict()
    d.pop("output_dir", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def failed_rank(log_tail: str) -> tuple[int, int] | None:
    """(rank, exit code) of the first rank that failed, from torchrun's report of a group (its 'Root Cause')."""
    import re

    cause = log_tail[log_tail.rfind("Root Cause"):] if "Root Cause" in log_tail else ""
    m = re.search(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", cause, re.S)
    return (int(m[1]), int(m[2])) if m else None


def explain_crash(log_tail: str, code: int | None, gpu_ids: list[int] | None = None) -> str:
    """Plain words for a worker that died without saying why itself."""
    low = log_tail.lower()
    rank = failed_rank(log_tail)
    if rank is not None:
        r, rc = rank
        where = f" (GPU {gpu_ids[r]})" if gpu_ids and r < len(gpu_ids) else ""
        how = "was killed" if rc in (-9, 137) else "ran out of memory" if "out of memory" in low else f"failed (exit code {rc})"
        return (f"Rank {r}{where} of the group {how}, so the whole group stopped. Resume continues from the last "
                "checkpoint.")
    if "out of memory" in low:
        return ("The GPU ran out of memory. Lower batch size or resolution, turn on gradient checkpointing, use the "
                "8-bit optimizer or the low-VRAM preset, then Resume.")
    if code in (-9, 137):
        return "The training process was killed (out of system memory, or stopped from outside). Resume to continue from the last checkpoint."
    last = [ln for ln in log_tail.strip().splitlines() if ln.strip()][-1:] or ["no output"]
    return f"The training process ended unexpectedly (exit code {code}). Last log line: {last[0][:300]}. Resume to continue from the last checkpoint."


def gpu_ids_of(run: dict) -> list[int]:
    """The GPUs a run was given on the page ([] = the default device)."""
    return [int(i) for i in (run.get("gpu_ids") or "").split(",") if i.strip()]


def interrupted_message(run_dir: str) -> str:
    from trainer.runfiles import step_of

    saved = RunFiles(run_dir).checkpoint_dirs()
    where = (f"Resume continues from its last checkpoint (step {step_of(saved[-1])})." if saved else
             "It saved no checkpoint yet: start it again.")
    return f"Interrupted: the app or the computer stopped while this run trained. {where}"


class RunManager:
    def __init__(self, workspace, python: str = sys.executable):
        self.ws = workspace
        self.python = python
        self.db_path = workspace.runs_db
        self._lock = threading.RLock()
        self._views: dict[str, RunView] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self.gpu_claims: list = []  # other jobs that go before the next queued run (captioning waiting or running)
        with self._db() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS runs (id TEXT PRIMARY KEY, name TEXT, dir TEXT, status TEXT, created REAL,"
                " pid INTEGER, resume INTEGER DEFAULT 0, chash TEXT, message TEXT, event_offset INTEGER DEFAULT 0)"
            )
            cols = {r["name"] for r in db.execute("PRAGMA table_info(runs)")}
            if "event_offset" not in cols:  # an index written by an older version
                db.execute("ALTER TABLE runs ADD COLUMN event_offset INTEGER DEFAULT 0")
            if "position" not in cols:  # the queue's order (an older index: the creation order)
                db.execute("ALTER TABLE runs ADD COLUMN position REAL")
                db.execute("UPDATE runs SET position=created")
            if "processes" not in cols:  # where it trains: one process (the default device), or a group of ranks
                db.execute("ALTER TABLE runs ADD COLUMN processes INTEGER DEFAULT 1")
                db.execute("ALTER TABLE runs ADD COLUMN gpu_ids TEXT DEFAULT ''")
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        self.reconcile()

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=10, isolation_level=None)
        db.row_factory = sqlite3.Row
        return db

    # ------------------------------------------------------------- queries
    def list(self) -> list[dict]:
        self.reconcile()
        with self._db() as db:
            return [dict(r) for r in db.execute("SELECT * FROM runs ORDER BY created DESC")]

    def get(self, run_id: str) -> dict | None:
        with self._db() as db:
            r = db.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
        return dict(r) if r else None

    def view(self, run_id: str) -> RunView:
        """The run's live view, read incrementally from its event log."""
        run = self.get(run_id)
        if run is None:
            raise ValueError(f"No run {run_id}")
        with self._lock:
            v = self._views.setdefault(run_id, RunView())
            events, v.offset = read_events(run["dir"], v.offset)
            v.fold(events)
            if run["status"] == "queued" and v.state not in ("failed", "finished", "stopped"):
                v.state = "queued"
            if run["status"] in ("crashed", "interrupted") and not v.error:
                v.state, v.error = "failed", run["message"]
            if run["status"] == "running" and RunFiles(run["dir"]).request("stop").exists():
                v.stopping = True  # stays until the run has stopped (it saves first)
            v.stopping = v.stopping and run["status"] == "running" and v.state not in ("stopped", "failed", "finished")
        return v

    # ------------------------------------------------------------- actions
    def queue(self) -> list[dict]:
        """The queued runs, the next one first."""
        with self._db() as db:
            return [dict(r) for r in db.execute("SELECT * FROM runs WHERE status='queued' ORDER BY position, created")]

    def paused(self) -> bool:
        with self._db() as db:
            row = db.execute("SELECT value FROM meta WHERE key='paused'").fetchone()
        return bool(row and row["value"] == "1")

    def set_paused(self, paused: bool) -> str:
        """Pause the queue (the running run goes on; no queued run starts) or let it go on."""
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('paused', ?)", ("1" if paused else "0",))
        if not paused:
            self._schedule()
        return ("Queue paused: the running run goes on; the queued ones wait until you resume the queue."
                if paused else "Queue running: the next run starts when the GPU is free.")

    def move(self, run_id: str, delta: int) -> str:
        """Move a queued run `delta` places (-1: one earlier)."""
        with self._lock:
            q = [r["id"] for r in self.queue()]
            if run_id not in q:
                return "Only a queued run can be moved."
            i = q.index(run_id)
            j = max(0, min(len(q) - 1, i + delta))
            q.insert(j, q.pop(i))
            with self._db() as db:
                for pos, rid in enumerate(q):
                    db.execute("UPDATE runs SET position=? WHERE id=?", (float(pos), rid))
        return f"`{run_id}` is now number {j + 1} in the queue."

    def update_config(self, run_id: str, cfg: TrainConfig) -> str:
        """Replace the settings of a queued run (editable until it starts)."""
        with self._lock:
            run = self.get(run_id)
            if not run or run["status"] != "queued":
                return "Only a queued run can be edited: this one has started (or ended)."
            cfg = cfg.replace(output_dir=run["dir"])
            cfg.save(RunFiles(run["dir"]).config)
            self._set(run_id, chash=config_hash(cfg), name=cfg.output_name)
        return f"Queued run `{run_id}` now has the form's settings."

    def create(self, cfg: TrainConfig, name: str = "", front: bool = True, gpu_ids: list[int] | None = None,
               processes: int | None = None) -> tuple[str, bool]:
        """Queue a new run; (run id, created). `front`: next in line (Start), else last (Add to queue). An
        identical config already queued or running is reused, so a double click or a second browser tab does not
        start the same run twice."""
        h = config_hash(cfg)
        with self._lock:
            with self._db() as db:
                same = db.execute(
                    "SELECT id FROM runs WHERE chash=? AND status IN ('queued','running')", (h,)
                ).fetchone()
                if same:
                    return same["id"], False
                run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + h[:6]
                run_dir = self.ws.runs_dir / run_id
                run_dir.mkdir(parents=True, exist_ok=True)
                cfg = cfg.replace(output_dir=str(run_dir))
                cfg.save(RunFiles(run_dir).config)
                now = time.time()
                first = db.execute("SELECT MIN(position) AS p FROM runs WHERE status='queued'").fetchone()["p"]
                position = (first - 1.0 if first is not None else now) if front else now
                db.execute(
                    "INSERT INTO runs (id, name, dir, status, created, chash, position, processes, gpu_ids) "
                    "VALUES (?,?,?,?,?,?,?,?,?)",
                    (run_id, name or cfg.output_name, str(run_dir), "queued", now, h, position,
                     int(processes or len(gpu_ids or []) or 1), ",".join(str(i) for i in gpu_ids or [])),
                )
            self._schedule()
        return run_id, True

    def stop(self, run_id: str) -> str:
        run = self.get(run_id)
        if not run:
            return "No such run."
        if run["status"] == "queued":
            self._set(run_id, status="stopped", message="Removed from the queue before it started.")
            return "Removed from the queue."
        if run["status"] != "running":
            return f"The run is not running ({run['status']})."
        request(run["dir"], "stop")
        return "Stopping: the run saves a checkpoint at the end of the current step, then stops."

    def save_now(self, run_id: str) -> str:
        run = self.get(run_id)
        if not run or run["status"] != "running":
            return "Only a running run can save."
        request(run["dir"], "save")
        return "A checkpoint will be saved after the current step."

    def resume(self, run_id: str) -> str:
        run = self.get(run_id)
        if not run:
            return "No such run."
        if run["status"] in ACTIVE:
            return f"The run is already {run['status']}."
        if run["status"] == "finished":
            return ("This run has finished: its LoRA is written and there is nothing left to resume. To train longer, "
                    "start a new run from its settings (choose it, then Start).")
        if not RunFiles(run["dir"]).checkpoint_dirs():
            return "This run has no checkpoint to resume from; start it again instead."
        self._set(run_id, status="queued", resume=1, message=None)
        with self._lock:
            self._views.pop(run_id, None)
        self._schedule()
        return "Resuming from the last checkpoint."

    def kill(self, run_id: str) -> None:
        """Hard stop (tests, and shutting down a hung worker). Checkpoints on disk stay."""
        run = self.get(run_id)
        if run and pid_alive(run["pid"]):
            kill_tree(run["pid"])

    # ------------------------------------------------------------- workers
    def _set(self, run_id: str, **cols) -> None:
        keys = ", ".join(f"{k}=?" for k in cols)
        with self._db() as db:
            db.execute(f"UPDATE runs SET {keys} WHERE id=?", (*cols.values(), run_id))

    def _schedule(self) -> None:
        with self._lock:
            with self._db() as db:
                running = db.execute("SELECT id, pid FROM runs WHERE status='running'").fetchall()
                if any(pid_alive(r["pid"]) for r in running) or self.paused() or any(c() for c in self.gpu_claims):
                    return
                nxt = db.execute("SELECT * FROM runs WHERE status='queued' ORDER BY position, created LIMIT 1").fetchone()
            if nxt:
                self._spawn(dict(nxt))

    def _spawn(self, run: dict) -> None:
        files = RunFiles(run["dir"])
        args = ["train", str(files.config), "--run-dir", str(files.root)] + (["--resume"] if run["resume"] else [])
        gpu_ids = gpu_ids_of(run)
        if (run.get("processes") or 1) > 1:  # a group of ranks, through accelerate's launcher
            cfg = TrainConfig.load(files.config)
            cmd = group_command(*args, processes=run["processes"], gpu_ids=gpu_ids,
                                mixed_precision=cfg.mixed_precision, python=self.python)
        else:
            cmd = engine_command(*args, python=self.python)
        # the run's outcome is what the event log says after this point
        offset = files.events.stat().st_size if files.events.exists() else 0
        proc = start_detached(cmd, files.worker_log, gpu_ids if len(gpu_ids) == 1 else None)
        self._procs[run["id"]] = proc
        self._set(run["id"], status="running", pid=proc.pid, message=None, event_offset=offset)
        threading.Thread(target=self._watch, args=(run["id"], proc), daemon=True).start()

    def _watch(self, run_id: str, proc: subprocess.Popen) -> None:
        code = proc.wait()
        self._finish(run_id, code)
        self._procs.pop(run_id, None)
        self._schedule()

    def _finish(self, run_id: str, code: int | None) -> None:
        run = self.get(run_id)
        if run is None or run["status"] != "running":
            return
        events, _ = read_events(run["dir"], run["event_offset"] or 0)  # this attempt's events only
        final = next((e for e in reversed(events) if e["type"] in ("done", "error", "stopped")), None)
        self._record_timing(run, events)
        if final and final["type"] == "done" and code in (0, None):  # None: it finished while the app was away
            self._set(run_id, status="finished")
        elif final and final["type"] == "stopped":
            self._set(run_id, status="stopped")
        elif final and final["type"] == "error":
            self._set(run_id, status="failed", message=final.get("message"))
        elif code is None:  # found dead after an app restart: the app, or the computer, stopped under it
            self._set(run_id, status="interrupted", message=interrupted_message(run["dir"]))
        else:
            tail = _tail(RunFiles(run["dir"]).worker_log, 12000)
            self._set(run_id, status="crashed", message=explain_crash(tail, code, gpu_ids_of(run)))

    def _record_timing(self, run: dict, events: list[dict]) -> None:
        """What this attempt measured (s/step, start-up) goes into the workspace's timings, for the next estimate."""
        from trainer.recipe import timing

        try:
            timing.record(self.ws.timings_path, TrainConfig.load(RunFiles(run["dir"]).config), events, run["id"])
        except (OSError, ValueError):
            pass  # an estimate is a convenience: never a reason for a run's status to go unrecorded

    def reconcile(self) -> None:
        """After an app restart: runs marked running whose worker is gone get their final status;
        a live worker from an earlier app instance is watched again."""
        with self._db() as db:
            rows = [dict(r) for r in db.execute("SELECT * FROM runs WHERE status='running'")]
        for r in rows:
            if r["id"] in self._procs:
                continue
            if not pid_alive(r["pid"]):
                self._finish(r["id"], None)
        if rows or self.gpu_claims:  # a claim that ended (captioning done) lets the next queued run go
            self._schedule()


def _tail(path: Path, n: int = 4000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - n))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
