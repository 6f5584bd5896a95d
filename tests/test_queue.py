"""The visible run queue (issue 29): Start puts a run next in line and Add to queue at the end; queued runs move,
leave, take new settings and wait while the queue is paused; the queue lives in the workspace's SQLite and
survives an app restart; a run found dead after a restart is interrupted (resumable), never restarted by itself."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, make_images, quick_cfg, wait_for
from app.forms import config_to_values
from app.runs import RunManager
from app.services import Studio
from app.workspace import Workspace


def queued(rm) -> list[str]:
    return [r["id"] for r in rm.queue()]


def test_the_queue_orders_moves_edits_removes_and_pauses_across_a_restart(tiny_sd1, tmp_path):
    ws = Workspace(tmp_path / "ws")
    data = ws.dataset_path("d", create=True)
    make_images(data, 2)
    rm = RunManager(ws)
    assert "Queue paused" in rm.set_paused(True)  # nothing starts: the order alone is looked at
    studio = Studio(ws, rm)
    a, msg_a = studio.start(config_to_values(quick_cfg(tiny_sd1, data, seed=1)), to_queue=True)
    b, _ = studio.start(config_to_values(quick_cfg(tiny_sd1, data, seed=2)), to_queue=True)
    c, msg_c = studio.start(config_to_values(quick_cfg(tiny_sd1, data, seed=3)))  # Start: next in line
    assert queued(rm) == [c, a, b]
    assert "starts in a moment" in msg_c and "queue is paused" in msg_c
    assert msg_a.startswith("Queued")
    assert "number 3" in rm.move(c, 5) and queued(rm) == [a, b, c]
    assert "number 1" in rm.move(b, -1) and queued(rm) == [b, a, c]
    # editable until it starts: the form's settings, through the same pre-flight check as Start
    assert "now has the form's settings" in studio.edit_queued(a, config_to_values(quick_cfg(tiny_sd1, data, rank=8)))
    assert "rank 8" in studio.queue_rows()[1][2]
    bad = config_to_values(quick_cfg(tiny_sd1, data))
    bad["dataset"] = str(tmp_path / "nowhere")
    assert "now has" not in studio.edit_queued(a, bad)
    assert rm.stop(b) == "Removed from the queue." and queued(rm) == [a, c]
    # an app restart: the same queue, still paused, nothing started
    rm2 = RunManager(ws)
    assert queued(rm2) == [a, c] and rm2.paused()
    assert all(r["status"] != "running" for r in rm2.list())
    assert "Only a queued run" in rm2.update_config(b, quick_cfg(tiny_sd1, data))


def test_a_run_found_dead_after_a_restart_is_interrupted_and_waits_for_resume(tiny_sd1, tmp_path):
    ws = Workspace(tmp_path / "ws")
    data = ws.dataset_path("d", create=True)
    make_images(data, 2)
    rm = RunManager(ws)
    rm.set_paused(True)
    run, _ = rm.create(quick_cfg(tiny_sd1, data))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    rm._set(run, status="running", pid=dead.pid)  # what the index says when the computer went down mid-run
    rm2 = RunManager(ws)
    r = rm2.get(run)
    assert r["status"] == "interrupted" and "saved no checkpoint yet" in r["message"]
    assert rm2.view(run).error.startswith("Interrupted")
    assert rm2.queue() == []  # not put back in line, not restarted from zero


APP = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {tests!r})
    from conftest import quick_cfg
    from app.runs import RunManager
    from app.workspace import Workspace
    ws = Workspace({ws!r})
    rm = RunManager(ws)
    ids = [rm.create(quick_cfg({model!r}, {data!r}, max_steps=3, sample_every_steps=0, save_every_steps=0, seed=s),
                     front=False)[0] for s in (1, 2, 3)]
    print(" ".join(ids), flush=True)
    while rm.get(ids[1])["status"] != "running":
        rm.list()
        time.sleep(0.2)
    os._exit(0)  # the app dies in the middle of the second run; its detached worker trains on
""")


@pytest.mark.slow
def test_three_queued_runs_train_in_order_across_an_app_restart(tiny_sd1, tmp_path):
    ws_dir = tmp_path / "ws"
    data = Workspace(ws_dir).dataset_path("d", create=True)
    make_images(data, 2)
    script = APP.format(tests=str(ROOT / "tests"), ws=str(ws_dir), model=str(tiny_sd1), data=str(data))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    ids = out.stdout.split()
    rm = RunManager(Workspace(ws_dir))  # the app started again
    assert rm.get(ids[1])["status"] == "running" and rm.get(ids[2])["status"] == "queued"
    wait_for(lambda: rm.list() and all(rm.get(i)["status"] == "finished" for i in ids), timeout=600)
    spans = []
    for i in ids:
        events = [json.loads(line) for line in (Path(rm.get(i)["dir"]) / "events.jsonl").read_text().splitlines()]
        spans.append((events[0]["time"], events[-1]["time"]))
        assert Path(rm.view(i).output).is_file()
    assert spans[0][1] <= spans[1][0] and spans[1][1] <= spans[2][0]  # one after another, in the queue's order


class Runs:
    """The run manager's answer about the GPU (only `list` is asked by a waiting captioning job)."""

    def __init__(self, status):
        self.status = status

    def list(self):
        return [{"id": "r1", "status": self.status}]


@pytest.mark.slow  # a training or a worker: the fast tier stays under 3 minutes
def test_captioning_asked_for_during_a_run_waits_in_the_queue_and_starts_after_it(tmp_path):
    from PIL import Image

    from app.captioning import CaptionJobs
    from captioners import tiny_tagger

    ws = Workspace(tmp_path / "ws")
    folder = ws.dataset_path("d", create=True)
    Image.new("RGB", (32, 32), (255, 0, 0)).save(folder / "a.png")
    tagger = tiny_tagger(tmp_path / "wd-tiny")
    runs = Runs("running")
    jobs = CaptionJobs(ws, runs)
    assert jobs.start("d", str(tagger), "missing").startswith("Waiting in the queue")
    assert jobs.waiting() and not jobs.running() and jobs.state()["active"]
    assert "already running or waiting" in jobs.start("d", str(tagger), "missing")
    assert CaptionJobs(ws, runs).waiting()  # an app restart keeps it in line
    runs.status = "finished"  # the run ends: the captioning starts by itself
    wait_for(lambda: jobs.state().get("finished") and not jobs.waiting(), timeout=120)
    assert "Wrote 1 caption(s) with wd-tiny" in jobs.state()["message"]
    assert (folder / "a.txt").read_text().startswith("red background")


def test_a_waiting_captioning_goes_before_the_next_queued_run(tiny_sd1, tmp_path):
    """The queue's order across kinds of job: a run started (from the page's Start) while a captioning job waits
    for the GPU, or holds it, waits for it in the queue, and starts once the captioning is out of the way."""
    from app.captioning import CaptionJobs

    ws = Workspace(tmp_path / "ws")
    data = ws.dataset_path("d", create=True)
    make_images(data, 2)
    rm = RunManager(ws)
    jobs = CaptionJobs(ws, rm)
    (ws.captioning_dir / "job-1").mkdir(parents=True)  # as start() leaves a job that waits behind a run
    (ws.captioning_dir / "job-1" / "job.json").write_text(json.dumps({"waiting": True, "dataset": "d", "cmd": []}))
    run, said = Studio(ws, rm, jobs).start(config_to_values(quick_cfg(tiny_sd1, data)))
    assert run and said.startswith("Queued: it starts when the auto-captioning of the Dataset tab has finished"), said
    assert rm.get(run)["status"] == "queued" and all(r["status"] != "running" for r in rm.list())
    assert jobs.cancel().startswith("Taken out of the queue")
    wait_for(lambda: rm.list() and rm.get(run)["status"] == "running", timeout=30)
    rm.kill(run)
    wait_for(lambda: rm.get(run)["status"] != "running", timeout=60)


def test_the_newest_captioning_job_is_the_last_one_asked_for_even_within_a_second(tmp_path):
    """Job folders sort by time to the microsecond: with a random suffix, a job asked for in the same second as
    the one before could sort first, and the page followed (and refused over) the old one."""
    from app.captioning import CaptionJobs

    ws = Workspace(tmp_path / "ws")
    ws.dataset_path("d", create=True)
    jobs = CaptionJobs(ws, Runs("running"))
    for _ in range(10):
        assert jobs.start("d", "SmilingWolf/wd-vit-tagger-v3", "missing").startswith("Waiting in the queue")
        assert jobs.waiting()  # the job just asked for is the newest
        assert jobs.cancel().startswith("Taken out of the queue")


@pytest.mark.slow
def test_a_run_started_while_captioning_runs_starts_by_itself_when_it_ends(tiny_sd1, tmp_path, monkeypatch):
    """Start during auto-captioning queues the run; the captioning worker's end hands the GPU on, with no page
    asking (only `get` is read here, which schedules nothing)."""
    from app.captioning import CaptionJobs
    from captioners import tiny_tagger

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ws = Workspace(tmp_path / "ws")
    data = ws.dataset_path("d", create=True)
    make_images(data, 2)
    rm = RunManager(ws)
    jobs = CaptionJobs(ws, rm)
    assert jobs.start("d", str(tiny_tagger(tmp_path / "wd-tiny")), "overwrite") == "Captioning started."
    run, said = Studio(ws, rm, jobs).start(config_to_values(quick_cfg(tiny_sd1, data, max_steps=1,
                                                                      sample_every_steps=0)))
    assert said.startswith("Queued: it starts when the auto-captioning of the Dataset tab has finished"), said
    assert rm.get(run)["status"] == "queued"
    wait_for(lambda: rm.get(run)["status"] != "queued", timeout=120)
    assert jobs.state().get("finished") and "Wrote 2 caption(s)" in jobs.state()["message"]
    wait_for(lambda: rm.get(run)["status"] not in ("queued", "running"), timeout=300)
    assert rm.get(run)["status"] == "finished", rm.get(run)["message"]
