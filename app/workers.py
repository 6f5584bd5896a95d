"""Starting, watching and stopping engine processes: the one owner of how the app runs `python -m trainer ...`.

Training runs (app/runs.py), captioning (app/captioning.py), the Preview worker (app/preview_client.py) and the
LoRA tools (app/tabs/tools.py) all start their process here, with the same environment; `gpu_busy` is the one
rule for "one job on the GPU at a time". The GPU belongs to these processes, never to the UI process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from trainer.events import parse_event

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def engine_command(*args: str, python: str = sys.executable) -> list[str]:
    return [python, "-m", "trainer", *args]


def group_command(*args: str, processes: int, gpu_ids: list[int] | None = None, mixed_precision: str = "no",
                  port: int | None = None, python: str = sys.executable) -> list[str]:
    """`python -m trainer ARGS` as a group of `processes` ranks through accelerate's own launcher (torchrun
    underneath; never a home-made process group): `--multi_gpu` on the GPUs `gpu_ids`, or ranks on the CPU (gloo)
    when the config says device = 'cpu'. Mixed precision is passed on."""
    cmd = [python, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", mixed_precision if mixed_precision in ("fp16", "bf16") else "no",
           "--dynamo_backend", "no", "--main_process_port", str(port or free_port())]
    if gpu_ids:
        cmd += ["--gpu_ids", ",".join(str(i) for i in gpu_ids)]
    return cmd + ["-m", "trainer", *args]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(unbuffered: bool = True) -> dict:
    """The environment of every engine process: this checkout first on PYTHONPATH, output not held back, and CUDA's
    device numbers in PCI bus order, nvidia-smi's: the GPU picker lists nvidia-smi's indices, while CUDA numbers
    the fastest card first by default, so with two different cards "GPU 1" would train on the other one."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    return env


def start_detached(cmd: list[str], log_path: str | Path, gpu_ids: list[int] | None = None) -> subprocess.Popen:
    """A worker in its own session / process group, its output appended to `log_path`: closing the browser or the
    app's terminal does not stop it, and a restarted app finds it again by its process id. `gpu_ids`: the one GPU
    a single-process run was given (CUDA_VISIBLE_DEVICES)."""
    detach = ({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt" else {"start_new_session": True})
    env = worker_env()
    if gpu_ids:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in gpu_ids)
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, **detach)


def start_attached(cmd: list[str], **pipes) -> subprocess.Popen:
    """A worker that talks to this process through pipes (Preview's requests, the tools' progress lines)."""
    return subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=worker_env(unbuffered=False), **pipes)


def pid_alive(pid: int | None) -> bool:
    """Is this process running (a zombie is not)? psutil answers the same on Linux, macOS and Windows."""
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, ValueError):
        return False


def kill_tree(pid: int | None) -> None:
    """Kill a worker and every process it started (DataLoader workers, torchrun children), on every platform."""
    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except (psutil.Error, ValueError, TypeError):
        return
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


def gpu_busy(runs, captions=None, asking: str = "") -> str | None:
    """Which job holds the GPU, in words for the page, or None when it is free: a training run, or
    auto-captioning. `asking` is the job that wants it ('training', 'captioning', 'preview')."""
    if asking != "training" and any(r["status"] == "running" for r in runs.list()):
        return "training"
    if asking != "captioning" and captions is not None and captions.running():
        return "captioning"
    return None


def run_tool(argv: list[str]):
    """Run one `trainer lora` command; yield ('progress', done, total) while it works, then ('done', result) or
    ('error', message). The worker speaks in events (--progress): progress, and an error's sentence."""
    argv = list(argv) + ([] if "--progress" in argv else ["--progress"])
    with tempfile.TemporaryFile() as out:
        proc = start_attached(engine_command("lora", *argv), stdout=out, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, text=True)
        errors = []
        for line in proc.stderr:  # the worker's events (trainer/events.py); anything else is a library talking
            ev = parse_event(line)
            if ev and ev["type"] == "progress":
                yield "progress", int(ev["done"]), int(ev["total"])
            elif ev and ev["type"] == "error":
                errors.append(ev["message"])
        code = proc.wait()
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    if code != 0:
        yield "error", errors[-1] if errors else f"The tool stopped unexpectedly (exit code {code})."
        return
    yield "done", json.loads(text)
