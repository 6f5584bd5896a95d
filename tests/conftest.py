"""Shared fixtures: tiny random-weight models (built here, no network) and small image datasets."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_STUDIO_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    """Tests train several times in one process; accelerate's process-wide state must not carry over."""
    yield
    if "accelerate" in sys.modules:
        from trainer.engine.setup import fresh_accelerate_state

        fresh_accelerate_state()


def _model(tmp_path_factory, family):
    from trainer.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp(f"tiny_{family}") / "model", family)


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory) -> Path:
    return _model(tmp_path_factory, "sd1")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    return _model(tmp_path_factory, "sdxl")


@pytest.fixture(scope="session")
def tiny_sd2v(tmp_path_factory) -> Path:
    return _model(tmp_path_factory, "sd2v")


def make_images(folder: Path, n: int = 4, size=(64, 64), caption: str | None = "red square", seed: int = 0,
                concept: bool = False) -> list[Path]:
    """n PNGs (random noise, or one clear concept: a red square on a blue field) with .txt captions."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):
        w, h = size if isinstance(size, tuple) else size[i]
        if concept:
            a = np.zeros((h, w, 3), np.uint8)
            a[..., 2] = 200
            a[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = (220, 20, 20)
            a = np.clip(a.astype(int) + rng.randint(-10, 10, a.shape), 0, 255).astype(np.uint8)
        else:
            a = (rng.rand(h, w, 3) * 255).astype(np.uint8)
        p = folder / f"img{i}.png"
        Image.fromarray(a).save(p)
        if caption is not None:
            p.with_suffix(".txt").write_text(f"{caption}, tag{i}")
        out.append(p)
    return out


@pytest.fixture
def dataset(tmp_path) -> Path:
    d = tmp_path / "data"
    make_images(d, 4)
    return d


def base_config(model: Path, data: Path, out: Path, **kw):
    from trainer.recipe.config import TrainConfig

    values = dict(
        base_model=str(model), dataset=str(data), trigger="zwx", resolution=64, min_bucket=64, max_bucket=128,
        rank=4, alpha=4, max_steps=4, mixed_precision="no", save_precision="fp32", output_dir=str(out),
        device="cpu", unet_lr=1e-3, text_encoder_lr=1e-3,
    )
    values.update(kw)
    return TrainConfig(**values)


def quick_cfg(model, data, **kw):
    """A worker-process run of a tiny model that checkpoints and samples along the way."""
    from trainer.recipe.config import TrainConfig

    vals = dict(base_model=str(model), dataset=str(data), trigger="zwx", resolution=64, min_bucket=64, max_bucket=128,
                rank=4, alpha=4, max_steps=6, mixed_precision="no", device="cpu", save_every_steps=2,
                sample_prompts=["{trigger} red square"], sample_every_steps=3, sample_steps=2)
    vals.update(kw)
    return TrainConfig(**vals)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout=240, every=0.5):
    import time

    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError("timed out waiting")


from contextlib import contextmanager  # noqa: E402


@contextmanager
def launched_app(tmp_path: Path):
    """`python launch.py` on a free port with its own workspace; yields (url, workspace, port)."""
    import subprocess
    import urllib.request

    port = free_port()
    ws = tmp_path / "ws"
    log = open(tmp_path / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "launch.py", "--no-browser", "--port", str(port), "--workspace", str(ws)],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def up():
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).status == 200
        except OSError:
            return proc.poll() is not None  # stop waiting if it died

    try:
        wait_for(up, timeout=120)
        assert proc.poll() is None, "app did not start: " + (tmp_path / "app.log").read_text()[-2000:]
        yield f"http://127.0.0.1:{port}/", ws, port
    finally:
        stop_process_tree(proc)
        log.close()


def stop_process_tree(proc) -> None:
    """End a process and every process it started (workers run in their own session), found by process id."""
    import subprocess

    import psutil

    from app.workers import kill_tree

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    for c in children:
        kill_tree(c.pid)


def finished_run(model, tmp_path: Path, images: int = 2, **cfg):
    """A workspace with a dataset 'd' of `images` pictures and one run of `model` trained to the end through a real
    worker process. Returns (workspace, run manager, run id)."""
    from app.runs import RunManager
    from app.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    data = ws.dataset_path("d", create=True)
    make_images(data, images)
    rm = RunManager(ws)
    run_id, _ = rm.create(quick_cfg(model, data, **cfg))
    wait_for(lambda: rm.get(run_id)["status"] == "finished")
    return ws, rm, run_id
