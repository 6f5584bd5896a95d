"""The app: form mapping, pre-flight, presets, the worker protocol with real processes, gradio_client."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, launched_app, make_images, quick_cfg, wait_for
from app.forms import config_to_values, preflight, values_to_config
from app.runs import RunManager
from app.workspace import Workspace
from trainer.recipe.config import ConfigError, TrainConfig


@pytest.mark.slow
def test_ui_process_starts_without_torch():
    code = "import sys; import app.main, app.forms, app.runs, launch; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_form_values_round_trip_and_bad_values_are_plain():
    cfg = TrainConfig(base_model="m.safetensors", dataset="/d", rank=8, alpha=4.0, sample_prompts=["a", "b"])
    vals = config_to_values(cfg)
    assert vals["sample_prompts"] == "a\nb"
    vals["rank"] = 8.0  # gr.Number gives floats
    back = values_to_config(vals)
    assert back == cfg
    with pytest.raises(ConfigError, match="rank = 'lots' is not a valid int"):
        values_to_config({**vals, "rank": "lots"})


def test_form_resolves_workspace_dataset_names(tmp_path):
    ws = Workspace(tmp_path / "ws")
    ws.dataset_path("cats", create=True)
    cfg = values_to_config({"dataset": "cats", "base_model": "x"}, ws.datasets_dir)
    assert cfg.dataset == str(ws.datasets_dir / "cats")


def test_preflight_reports_conflicts_and_dataset_problems_in_plain_words(tiny_sd1, tiny_sdxl, tmp_path):
    data = tmp_path / "d"
    make_images(data, 2)
    (data / "bad.png").write_bytes(b"")
    ok, text = preflight({"base_model": str(tiny_sd1), "dataset": str(data), "resolution": 64, "min_bucket": 64})
    assert ok, text
    assert "Ready to start" in text and "bad.png" in text and "Projected peak VRAM" in text and "SD 1.x" in text
    ok, text = preflight({"base_model": str(tiny_sd1), "dataset": str(data), "train_text_encoder": True,
                          "optimizer": "prodigy", "unet_lr": 1e-4, "max_bucket": 256})
    assert not ok
    assert "Prodigy" in text and "max_bucket (256) is below the resolution (512)" in text
    ok, text = preflight({"base_model": str(tmp_path / "missing.safetensors"), "dataset": str(tmp_path / "nodata")})
    assert not ok and "Base model not found" in text and "Dataset folder not found" in text
    # a preset for the wrong family is flagged before Start
    from trainer.recipe.presets import find_preset

    ok, text = preflight({"base_model": str(tiny_sd1), "dataset": str(data)}, preset=find_preset("sdxl_character"))
    assert not ok and "is for SDXL but the base model is SD 1.x" in text
    ok, _ = preflight({"base_model": str(tiny_sdxl), "dataset": str(data), "resolution": 64, "min_bucket": 64},
                      preset=find_preset("sdxl_character"))
    assert ok


def test_check_setup_says_when_the_projected_peak_is_more_than_the_card_the_run_takes(tiny_sd1, tmp_path):
    """Issue 31: with a GPU, Check setup compares the projected peak with the memory of the card the run trains on
    (the smallest picked, else the first), says so in one warning with what to change, and still lets it start."""
    from app.gpu import parse_gpus, run_card
    from trainer.recipe.estimate import estimate_vram_gb

    data = tmp_path / "d"
    make_images(data, 2)
    values = {"base_model": str(tiny_sd1), "dataset": str(data), "batch_size": 2}
    est = estimate_vram_gb(values_to_config(values), "sd1")["total_gb"]
    mib = lambda gb: int(gb * 1024)  # nvidia-smi's memory.total is in MiB
    gpus = parse_gpus(f"0, Small Card, {mib(est - 0.5)}, {mib(est - 1)}\n1, Big Card, {mib(est + 0.5)}, {mib(est)}\n")

    def warned(card, **more):
        ok, text = preflight({**values, **more}, None, None, [], "cuda", card=card)
        assert ok, text  # a projection does not stop a run
        return "is more than the" in text, text

    over, text = warned(run_card(gpus))  # one GPU: the first
    assert over and f"about {est} GB" in text and "GPU 0 (Small Card)" in text
    assert "turn on gradient_checkpointing" in text
    assert not warned(run_card(gpus, [1]))[0]
    assert "GPU 0" in warned(run_card(gpus, [0, 1]))[1]  # a group: each rank holds a whole copy
    assert not warned(None)[0]
    assert not preflight(values, None, None, [], "cpu", card=run_card(gpus))[1].count("is more than the")
    assert not warned(run_card(gpus), device="cpu")[0]  # the run trains on the CPU
    tiny = parse_gpus("0, Tiny Card, 512, 400")
    over, text = warned(run_card(tiny), gradient_checkpointing=True)
    assert over and "gradient_checkpointing" not in text  # already on: the advice starts with what is left


def test_workspace_refuses_names_and_files_outside_it(tmp_path):
    ws = Workspace(tmp_path / "ws")
    assert ws.dataset_path("../../evil", create=True).parent == ws.datasets_dir
    (tmp_path / "secret.txt").write_text("x")
    with pytest.raises(ValueError):
        ws.resolve_file(str(tmp_path / "secret.txt"))
    with pytest.raises(ValueError):
        ws.resolve_file(str(ws.root / ".." / "secret.txt"))
    link = ws.root / "link.txt"
    link.symlink_to(tmp_path / "secret.txt")
    with pytest.raises(ValueError):
        ws.resolve_file(str(link))


@pytest.mark.slow
def test_worker_protocol_start_events_stop_resume_crash_relist(tiny_sd1, tmp_path):
    ws = Workspace(tmp_path / "ws")
    data = ws.dataset_path("d", create=True)
    make_images(data, 4)
    rm = RunManager(ws)
    # 1. start: events arrive, it finishes, a sample image and a LoRA appear
    run_id, created = rm.create(quick_cfg(tiny_sd1, data))
    assert created
    again, created2 = rm.create(quick_cfg(tiny_sd1, data))
    assert again == run_id and not created2  # a second click does not start a second run
    wait_for(lambda: rm.get(run_id)["status"] == "finished")
    v = rm.view(run_id)
    assert v.state == "finished" and v.step == 6
    assert v.losses[0][0] == 1 and v.losses[-1][0] == 6  # the first step and the last always report
    assert v.samples and Path(v.samples[0][0]).is_file()
    assert Path(v.output).is_file()

    # 2. stop saves and ends; resume finishes
    run2, _ = rm.create(quick_cfg(tiny_sd1, data, max_steps=100, save_every_steps=0, sample_every_steps=0))
    wait_for(lambda: rm.view(run2).step >= 2)
    assert "Stopping" in rm.stop(run2)
    wait_for(lambda: rm.get(run2)["status"] == "stopped")
    assert any((Path(rm.get(run2)["dir"]) / "checkpoints").glob("step-*"))
    # 3. a crash in the worker (corrupt base model) is a clear error and the manager keeps working
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"garbage" * 50)
    run3, _ = rm.create(quick_cfg(bad, data))
    wait_for(lambda: rm.get(run3)["status"] in ("failed", "crashed"))
    v3 = rm.view(run3)
    assert v3.state == "failed" and "damaged" in v3.error and "Traceback" not in v3.error
    # 4. a worker killed from outside shows as ended unexpectedly, in words
    run4, _ = rm.create(quick_cfg(tiny_sd1, data, max_steps=100000, save_every_steps=0, sample_every_steps=0, seed=7))
    wait_for(lambda: rm.view(run4).step >= 1)
    rm.kill(run4)
    wait_for(lambda: rm.get(run4)["status"] == "crashed")
    assert "killed" in rm.view(run4).error or "ended unexpectedly" in rm.view(run4).error
    # 5. a new manager (app restart) lists every run again with its state
    rm2 = RunManager(ws)
    states = {r["id"]: r["status"] for r in rm2.list()}
    assert states == {run_id: "finished", run2: "stopped", run3: "failed", run4: "crashed"}
    assert rm2.view(run_id).state == "finished"
    assert "Resuming" in rm2.resume(run2)
    wait_for(lambda: rm2.get(run2)["status"] == "finished", timeout=400)
    assert any("Resumed from" in line for line in rm2.view(run2).log)


@pytest.mark.slow
def test_queue_runs_one_at_a_time(tiny_sd1, tmp_path):
    ws = Workspace(tmp_path / "ws")
    data = ws.dataset_path("d", create=True)
    make_images(data, 2)
    rm = RunManager(ws)
    a, _ = rm.create(quick_cfg(tiny_sd1, data, max_steps=3, sample_every_steps=0, seed=1))
    b, _ = rm.create(quick_cfg(tiny_sd1, data, max_steps=3, sample_every_steps=0, seed=2))
    assert rm.get(b)["status"] == "queued"
    wait_for(lambda: rm.get(b)["status"] == "finished")
    ea = json.loads((Path(rm.get(a)["dir"]) / "events.jsonl").read_text().splitlines()[-1])
    eb = json.loads((Path(rm.get(b)["dir"]) / "events.jsonl").read_text().splitlines()[0])
    assert eb["time"] >= ea["time"]  # b started after a ended


@pytest.fixture
def live_app(tmp_path):
    with launched_app(tmp_path) as app:
        yield app


@pytest.mark.slow
def test_server_binds_loopback_only_by_default(live_app):
    import psutil

    _, _, port = live_app
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listening, f"nothing listens on port {port}"
    assert all(c.laddr.ip in ("127.0.0.1", "::1") for c in listening), listening
    # and it is not reachable through another local address
    other = _non_loopback_ip()
    if other:
        with socket.socket() as s:
            s.settimeout(2)
            assert s.connect_ex((other, port)) != 0


def _non_loopback_ip():
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent for UDP connect
            ip = s.getsockname()[0]
            return None if ip.startswith("127.") else ip
    except OSError:
        return None


@pytest.mark.slow
def test_gradio_client_start_to_finish(live_app, tiny_sd1):
    from gradio_client import Client

    url, ws, _ = live_app
    data = Path(ws) / "datasets" / "d"
    make_images(data, 2)
    client = Client(url, verbose=False)
    values = quick_cfg(tiny_sd1, "d", max_steps=2, sample_every_steps=0).to_dict()  # a workspace dataset name
    bad = json.loads(client.predict(json.dumps({**values, "rank": 0}), api_name="/start_run"))
    assert bad["run_id"] is None and "rank must be a positive" in bad["message"]
    res = json.loads(client.predict(json.dumps(values), api_name="/start_run"))
    run_id = res["run_id"]
    assert run_id and "Started" in res["message"]
    status = wait_for(lambda: (s := json.loads(client.predict(run_id, api_name="/run_status")))["status"] == "finished" and s)
    assert status["step"] == 2 and status["output"].endswith("lora.safetensors")
    runs = json.loads(client.predict(api_name="/list_runs"))
    assert [r["id"] for r in runs] == [run_id]
