"""Several processes from the page (issue 29, item 1): the page's Start path launches a group through accelerate's
launcher (two CPU ranks on gloo here: the same command a GPU machine gets with --gpu_ids), rank 0 writes the one
file, and a rank killed with SIGKILL stops the group with one sentence naming it and leaves a resumable run."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from conftest import make_images, quick_cfg, wait_for
from app.forms import config_to_values
from app.gpu import parse_gpus
from app.runs import RunManager, explain_crash
from app.services import Studio
from app.workers import group_command
from app.workspace import Workspace
from trainer.engine.loop import train

TORCHRUN_REPORT = """
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
trainer FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-03_13:50:01
  host      : box
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 4242)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 4242
============================================================
"""


def test_the_gpu_list_the_group_command_and_a_dead_rank_in_words():
    smi = "0, NVIDIA GeForce RTX 4090, 24564, 23000\n1, NVIDIA GeForce RTX 3090, 24576, 1024\n"
    assert parse_gpus(smi) == [{"index": 0, "name": "NVIDIA GeForce RTX 4090", "total_gb": 24.0, "free_gb": 22.5},
                               {"index": 1, "name": "NVIDIA GeForce RTX 3090", "total_gb": 24.0, "free_gb": 1.0}]
    cmd = group_command("train", "c.toml", processes=2, gpu_ids=[0, 2], mixed_precision="bf16", port=29500, python="py")
    assert cmd[:3] == ["py", "-m", "accelerate.commands.launch"] and "--multi_gpu" in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "2" and cmd[cmd.index("--gpu_ids") + 1] == "0,2"
    assert cmd[cmd.index("--mixed_precision") + 1] == "bf16" and cmd[-4:] == ["-m", "trainer", "train", "c.toml"]
    said = explain_crash(TORCHRUN_REPORT, 1, [0, 2])
    assert said.startswith("Rank 1 (GPU 2) of the group was killed, so the whole group stopped") and "Resume" in said


def test_a_worker_numbers_the_gpus_as_the_picker_does(tmp_path, monkeypatch):
    """The picker shows nvidia-smi's indices (PCI bus order); CUDA numbers the fastest card first unless told, so
    every worker is started with CUDA_DEVICE_ORDER=PCI_BUS_ID, and a single-GPU run sees only the GPU picked."""
    import sys

    from app.workers import start_detached

    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")  # what CUDA does when nobody says
    log = tmp_path / "worker.log"
    probe = "import os; print(os.environ['CUDA_DEVICE_ORDER'], os.environ['CUDA_VISIBLE_DEVICES'])"
    assert start_detached([sys.executable, "-c", probe], log, gpu_ids=[1]).wait(60) == 0
    assert log.read_text().split() == ["PCI_BUS_ID", "1"]


def test_the_check_counts_a_groups_steps_and_batch(tmp_path):
    """Before Start, the plan of a group says its effective batch, and an epoch-based run counts 1/N of the steps
    for the time (each step takes about one GPU's time: every rank trains its own batch)."""
    from app.forms import preflight

    data = tmp_path / "d"
    make_images(data, 8)
    cfg = quick_cfg(tmp_path / "missing-model", data, max_steps=0, epochs=3, batch_size=2)
    _, alone = preflight(cfg, None, None, [], "cpu")
    _, group = preflight(cfg, None, None, [], "cpu", processes=2)
    assert "- Trains on" not in alone
    assert "effective batch 4 (2 per GPU x 2 x 1 accumulation); each epoch takes 1/2 of the steps" in group
    steps = [int(re.search(r"Time on this machine.*?\((\d+) steps ×", t).group(1)) for t in (alone, group)]
    assert steps == [12, 6]  # 8 images / batch 2 x 3 epochs; on two GPUs the global batch is 4


def workers_of(pid: int) -> list[psutil.Process]:
    """The training ranks under a group's launcher (processes running `-m trainer train`)."""
    procs = psutil.Process(pid).children(recursive=True)
    return [p for p in procs if "trainer" in p.cmdline() and "train" in p.cmdline() and "accelerate" not in " ".join(p.cmdline())]


@pytest.mark.slow
def test_a_group_of_two_started_from_the_page_and_a_killed_rank(tiny_sd1, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ws = Workspace(tmp_path / "ws")
    data = ws.dataset_path("d", create=True)
    # two buckets of 3 and 2 images: batches of 2, 2 and 1 an epoch, so one step has one image for two ranks
    make_images(data, 5, size=[(64, 64), (64, 64), (64, 64), (128, 64), (128, 64)])
    rm = RunManager(ws)
    studio = Studio(ws, rm)
    cfg = quick_cfg(tiny_sd1, data, max_steps=4, batch_size=1, sample_every_steps=0, save_every_steps=2)
    run, msg = studio.start(config_to_values(cfg), processes=2)
    assert run and "effective batch 2 (1 per GPU x 2 x 1 accumulation)" in msg, msg
    wait_for(lambda: rm.get(run)["status"] != "running" and rm.get(run)["status"] != "queued", timeout=400)
    assert rm.get(run)["status"] == "finished", rm.get(run)["message"]
    out = Path(rm.get(run)["dir"])
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["lora.safetensors"]  # rank 0 alone exports
    assert sum(1 for e in rm.view(run).log if "done: Finished" in e) == 1  # one event log, from rank 0
    assert rm.view(run).epoch == 2  # 3 global batches an epoch: 4 steps end in the second

    # the group's file is the file of one process with the same global batch (2), the same seed and data
    single = train(dataclasses.replace(cfg, batch_size=2), tmp_path / "single", echo=lambda m: None)
    a, b = load_file(str(out / "lora.safetensors")), load_file(str(single))
    assert a.keys() == b.keys()
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    size = max(float(b[k].float().abs().max()) for k in b if "lora_up" in k)
    assert diff < 1e-6 < size, (diff, size)  # summed in another order (gloo's all-reduce), nothing else differs

    # a rank killed mid-run: the group stops with a sentence naming it, and Resume finishes the run
    values = config_to_values(quick_cfg(tiny_sd1, data, max_steps=400, batch_size=1, sample_every_steps=0,
                                        save_every_steps=2, seed=5))
    run2, _ = studio.start(values, processes=2)
    wait_for(lambda: (Path(rm.get(run2)["dir"]) / "checkpoints").is_dir() and any(
        (Path(rm.get(run2)["dir"]) / "checkpoints").glob("step-*/state.json")), timeout=400)
    ranks = []
    wait_for(lambda: len(ranks.extend(workers_of(rm.get(run2)["pid"])) or ranks) >= 2, timeout=60)
    victim = next(p for p in ranks if p.environ().get("LOCAL_RANK") == "1")
    victim.kill()
    wait_for(lambda: rm.get(run2)["status"] not in ("running", "queued"), timeout=120)
    r = rm.get(run2)
    assert r["status"] == "crashed" and r["message"].startswith("Rank 1 of the group was killed"), r["message"]
    # the whole group is gone (a rank's data-loader workers follow within their watchdog's few seconds)
    wait_for(lambda: not [p for p in ranks if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], timeout=60)
    assert "Resuming" in rm.resume(run2)
    wait_for(lambda: rm.view(run2).step > 2, timeout=400)
    assert any("Resumed from" in line for line in rm.view(run2).log)
    rm.stop(run2)
    wait_for(lambda: rm.get(run2)["status"] not in ("running", "queued"), timeout=300)


@pytest.mark.slow
def test_the_cli_runs_under_an_accelerate_config_file(tiny_sd1, tmp_path, monkeypatch):
    """`train CFG --accelerate-config FILE` is accelerate's launcher with that file (two CPU ranks here; the same
    file with num_machines 2 and a main process address is the two-node case of the README)."""
    import subprocess
    import sys

    from conftest import ROOT, base_config

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = tmp_path / "data"
    make_images(data, 4)
    out = tmp_path / "run"
    base_config(tiny_sd1, data, out, max_steps=2).save(tmp_path / "c.toml")
    conf = tmp_path / "acc.yaml"
    conf.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 1\n"
                    "num_processes: 2\nmachine_rank: 0\nmixed_precision: 'no'\nuse_cpu: false\nmain_process_port: "
                    f"{__import__('conftest').free_port()}\n")
    r = subprocess.run([sys.executable, "-m", "trainer", "train", str(tmp_path / "c.toml"), "--accelerate-config",
                        str(conf)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["lora.safetensors"]
    assert r.stderr.count("[done] Finished") == 1  # rank 0 alone reports and writes
    missing = subprocess.run([sys.executable, "-m", "trainer", "train", str(tmp_path / "c.toml"), "--accelerate-config",
                              str(tmp_path / "nope.yaml")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert missing.returncode == 2 and "accelerate config --config_file" in missing.stderr
