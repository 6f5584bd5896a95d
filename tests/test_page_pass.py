"""The page, second pass: no wrong files, no lost values, nothing silent (issue 32's findings, each with a test
that failed before)."""
from __future__ import annotations

import os
import stat
import time

import pytest
from safetensors import safe_open

from conftest import base_config, make_images, quick_cfg, wait_for
from trainer.engine.loop import train
from trainer.engine.setup import fresh_accelerate_state
from trainer.events import read_events, request


@pytest.mark.slow
def test_two_runs_with_one_output_name_download_and_copy_their_own_files(tiny_sd1, tmp_path):
    """Downloads used to hand back the newer run's file for the older run, and web-UI copies overwrote each other."""
    from app.runs import RunManager
    from app.services import Studio
    from app.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    data = ws.dataset_path("d", create=True)
    make_images(data, 2)
    rm = RunManager(ws)
    runs = [rm.create(quick_cfg(tiny_sd1, data, output_name="second", max_steps=2, seed=s, sample_every_steps=0,
                                save_every_steps=0))[0] for s in (1, 2)]
    wait_for(lambda: all(rm.get(r)["status"] == "finished" for r in runs), timeout=300)
    studio = Studio(ws, rm)
    webui = tmp_path / "webui"
    webui.mkdir()
    ws.update_settings(webui_lora_dir=str(webui))
    finals = [studio.lora_files(r)[0] for r in runs]
    assert open(finals[0], "rb").read() != open(finals[1], "rb").read()
    for final in reversed(finals):  # the newer one first: the older one must still get its own file
        got = studio.download_copy(final)
        assert open(got, "rb").read() == open(final, "rb").read()
        assert "Copied to" in studio.copy_to_webui(final)
    copies = sorted(webui.glob("*.safetensors"))
    assert len(copies) == 2 and {open(c, "rb").read() for c in copies} == {open(f, "rb").read() for f in finals}


@pytest.mark.slow
def test_files_a_web_ui_reads_follow_the_umask(tiny_sd1, dataset, tmp_path):
    """tempfile made every output 0600 and every checkpoint folder 0700: another user (a web UI in Docker) could
    not read them."""
    from trainer.fsutil import atomic_dir, atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "caption.txt", "zwx")
        with atomic_dir(tmp_path / "folder") as d:
            (d / "x").write_text("1")
        out = tmp_path / "run"
        train(base_config(tiny_sd1, dataset, out, max_steps=1), out, echo=lambda *a: None)
        fresh_accelerate_state()
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "caption.txt") == 0o644 and mode(tmp_path / "folder") == 0o755
    ckpt = next((out / "checkpoints").iterdir())
    assert mode(out / "lora.safetensors") == 0o644 and mode(ckpt) == 0o755
    assert all(mode(f) == 0o644 for f in ckpt.iterdir()) and mode(out / "events.jsonl") == 0o644


def test_an_empty_number_box_is_refused_by_name_not_replaced_by_the_default(tmp_path):
    from app.forms import in_ui_words, preflight
    from app.runs import RunManager
    from app.services import Studio
    from app.workspace import Workspace

    ok, text = preflight({"base_model": "m.safetensors", "dataset": str(tmp_path), "max_steps": None, "unet_lr": None})
    page = in_ui_words(text)
    assert not ok and "**Max steps** is empty or not a number" in page and "**UNet learning rate** is empty" in page
    ws = Workspace(tmp_path / "ws")
    run_id, msg = Studio(ws, RunManager(ws)).start({"base_model": "m", "dataset": "d", "max_steps": None})
    assert run_id is None and "max_steps is empty or not a number" in msg


def test_a_resolution_the_family_does_not_train_at_is_refused_first_with_the_range(tmp_path):
    from app.forms import preflight

    ok, text = preflight({"base_model": "", "dataset": str(tmp_path), "resolution": 100000})
    first = text.split("\n")[1]
    assert not ok and "resolution 100000 is outside what SDXL trains at: choose 64 to 2048" in first
    assert "Projected peak VRAM" not in text  # no 76908 GB estimate for it
    ok, text = preflight({"base_model": "", "dataset": str(tmp_path), "resolution": 512})
    assert "outside what" not in text and "Projected peak VRAM" in text


def test_a_corrupt_file_is_named_as_dropped_not_by_a_temp_path(tmp_path):
    from trainer.data.importer import import_sources

    bad = tmp_path / "in" / "broken.png"
    bad.parent.mkdir()
    bad.write_bytes(b"garbage" * 50)
    rep = import_sources([bad], tmp_path / "ds")
    (name, reason), = rep.skipped
    assert name == "broken.png" and ".importing" not in reason and str(tmp_path) not in reason, reason


@pytest.mark.slow
def test_resuming_a_finished_run_changes_nothing_and_says_so(tiny_sd1, dataset, tmp_path):
    out = tmp_path / "run"
    cfg = base_config(tiny_sd1, dataset, out, max_steps=2)
    final = train(cfg, out, echo=lambda *a: None)
    fresh_accelerate_state()
    before = final.read_bytes(), final.stat().st_mtime_ns
    again = train(cfg, out, resume=True, echo=lambda *a: None)
    fresh_accelerate_state()
    assert again == final and (final.read_bytes(), final.stat().st_mtime_ns) == before
    assert read_events(out)[0][-1]["message"].startswith("This run had already finished")


@pytest.mark.slow
def test_a_resumed_run_keeps_the_time_it_first_started(tiny_sd1, dataset, tmp_path):
    out = tmp_path / "run"
    cfg = base_config(tiny_sd1, dataset, out, max_steps=3)
    request(out, "stop")
    train(cfg, out, echo=lambda *a: None)
    fresh_accelerate_state()
    first = next(e for e in read_events(out)[0] if e["type"] == "status" and e.get("state") == "starting")["time"]
    time.sleep(1.2)
    train(cfg, out, resume=True, echo=lambda *a: None)
    fresh_accelerate_state()
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_training_started_at"] == str(int(first))


@pytest.mark.slow
def test_the_run_manager_says_a_finished_run_has_nothing_to_resume(tiny_sd1, tmp_path):
    from conftest import finished_run

    ws, rm, run_id = finished_run(tiny_sd1, tmp_path, max_steps=2, sample_every_steps=0)
    msg = rm.resume(run_id)
    assert "has finished" in msg and rm.get(run_id)["status"] == "finished"


def test_the_block_table_starts_from_and_follows_the_forms_rank_and_alpha(tmp_path):
    """It opened at rank/alpha 16 whatever the form said, and *Use these values* wrote 16 into untouched blocks."""
    from app.main import build_ui

    ui = build_ui(tmp_path / "ws")
    train_tab = ui.lora_studio["tabs"]["train"]
    table = next(b for b in ui.blocks.values() if getattr(b, "elem_id", None) == "blocks-table")
    rank_box = train_tab.comps["rank"]
    follow = next(f for f in ui.fns.values() if any(t[0] == rank_box._id and t[1] == "change" for t in f.targets)
                  and table in f.outputs)
    data = {c: None for c in follow.inputs}
    data.update({train_tab.comps["rank"]: 8, train_tab.comps["alpha"]: 4.0})
    data.update({c: "" for n, c in train_tab.comps.items() if n.startswith(("block_", "down_", "mid_", "up_"))})
    data.update({c: c.value for c in follow.inputs if c.elem_id == "blocks-family"})
    rows = follow.fn(data)
    assert {(r[1], r[2]) for r in rows} == {(8, 4.0)}


def test_a_dataset_made_on_the_dataset_tab_is_offered_but_not_chosen_on_the_train_tab(tmp_path):
    """Creating a dataset used to switch the Train tab's Dataset to the new, empty one (and save that)."""
    from app.main import build_ui

    ui = build_ui(tmp_path / "ws")
    ws, train_tab = ui.lora_studio["workspace"], ui.lora_studio["tabs"]["train"]
    ds_field = train_tab.comps["dataset"]
    handlers = [f for f in ui.fns.values() if ds_field in f.outputs and any(t[1] == "change" for t in f.targets)
                and not any(t[0] == ds_field._id for t in f.targets)]
    assert handlers, "the Dataset tab's picker updates the Train tab's choices"
    ws.dataset_path("new", create=True)
    for h in handlers:
        update = h.fn(*([None] * len(h.inputs)))
        assert [c[0] if isinstance(c, (tuple, list)) else c for c in update["choices"]] == ["new"]
        assert "value" not in update  # the field keeps the dataset it holds
    saved = (tmp_path / "ws" / "ui_state.json")
    assert not saved.exists() or "new" not in saved.read_text()


@pytest.mark.slow
def test_a_waiting_run_says_it_is_queued_behind_which_run(tiny_sd1, tmp_path):
    from app.runs import RunManager
    from app.services import Studio
    from app.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    data = ws.dataset_path("d", create=True)
    make_images(data, 2)
    rm = RunManager(ws)
    studio = Studio(ws, rm)
    first, _ = rm.create(quick_cfg(tiny_sd1, data, max_steps=3, sample_every_steps=0, seed=1))
    second, _ = rm.create(quick_cfg(tiny_sd1, data, max_steps=3, sample_every_steps=0, seed=2))
    assert rm.get(second)["status"] == "queued"
    assert studio.start_message(second, True) == (f"Queued: it starts when `{first}` has finished (one job on the "
                                                  "GPU at a time).")
    assert studio.start_message(first, True) == "Started." and "already" in studio.start_message(first, False)
    wait_for(lambda: rm.get(second)["status"] == "finished", timeout=300)


def test_the_timer_keeps_an_answer_until_its_run_moves_on(tmp_path):
    """Picking another run (the form then holds its settings) must not be wiped by the next 1 s tick; a Stop's
    answer stays while the run stops; a run that moved on to another phase clears it."""
    from app.runs import RunView
    from app.services import Studio
    from app.tabs.train import TrainTab
    from app.workspace import Workspace

    class Runs:
        state = "training"

        def list(self):
            return [{"id": "r1", "name": "a", "status": "running"}, {"id": "r2", "name": "b", "status": "finished"}]

        def get(self, run_id):
            return next((r for r in self.list() if r["id"] == run_id), None)

        def view(self, run_id):
            v = RunView()
            v.state, v.stopping = (self.state, True) if run_id == "r1" else ("finished", False)
            return v

    runs = Runs()
    train = TrainTab(Studio(Workspace(tmp_path / "ws"), runs))
    train.studio.active_run = lambda: None
    _, _, shown = train.follow("r1", {})
    follow, _, shown = train.follow("r2", shown)  # the person picked another run: its answer stays
    assert follow["same_state"]
    follow, _, shown = train.follow("r2", shown)
    assert follow["same_state"]
    _, _, shown = train.follow("r1", shown)
    follow, _, shown = train.follow("r1", shown)  # stopping: still the training phase
    assert follow["same_state"]
    runs.state = "stopped"
    follow, _, _ = train.follow("r1", shown)
    assert not follow["same_state"]  # the run moved on: the answer is stale


def test_a_dataset_name_is_never_changed_without_a_word(tmp_path):
    from app.main import build_ui

    ui = build_ui(tmp_path / "ws")
    tab = ui.lora_studio["tabs"]["dataset"]
    for bad, became in (("a/b", "b"), ("../escape", "escape"), ("my set:1*?", "my set_1_")):
        with pytest.raises(ValueError, match=f"would become '{re_escape(became)}'"):
            tab.create(bad)
    assert ui.lora_studio["workspace"].list_datasets() == []
    assert tab.create("my set") == ("my set", "Dataset 'my set' is ready: drop images into it.")
    # the page says it on the status line (no red Error badge), and empties the name box only on success
    new_name = next(b for b in ui.blocks.values() if getattr(b, "elem_id", None) == "ds-new-name")
    on_create = next(f for f in ui.fns.values() if f.inputs == [new_name])
    picker, status, box = on_create.fn("a/b")
    assert status.startswith("**Not created:**") and box == {"__type__": "update"}
    picker, status, box = on_create.fn("second")
    assert picker.value == "second" and box == ""


def re_escape(s):
    import re

    return re.escape(s)


def test_the_page_says_where_to_start_and_what_an_empty_table_means(tmp_path):
    from app.main import build_ui

    ui = build_ui(tmp_path / "ws")
    texts = [getattr(b, "value", "") for b in ui.blocks.values() if getattr(b, "elem_id", None) == "start-here"]
    assert texts and "Start here" in texts[0]
    outputs = ui.lora_studio["tabs"]["outputs"]
    assert outputs.empty_note().startswith("No runs yet: train one in the *Train* tab")
    assert outputs.lists()[2] == outputs.empty_note()


def test_the_dataset_tab_remembers_its_pick_and_deletes_a_dataset_restorably(tmp_path):
    from app.main import build_ui

    ws_dir = tmp_path / "ws"
    ui = build_ui(ws_dir)
    tab, ws = ui.lora_studio["tabs"]["dataset"], ui.lora_studio["workspace"]
    tab.create("mine")
    make_images(ws.dataset_path("mine"), 2)
    (ws.dataset_path("mine") / "img0.txt").write_text("zwx, hand written")
    tab.create("other")
    tab.remember("mine")
    assert build_ui(ws_dir).lora_studio["tabs"]["dataset"].picked() == "mine"  # after a reload
    assert "in the workspace trash" in tab.delete("mine")
    assert ws.list_datasets() == ["other"] and tab.picked() is None  # a deleted pick is not offered back
    assert tab.undelete() == "mine"
    assert (ws.dataset_path("mine") / "img0.txt").read_text() == "zwx, hand written"  # all of it, as it was
    tab.delete("mine")
    tab.create("mine")
    with pytest.raises(ValueError, match="exists again"):
        tab.undelete()


def test_the_validation_plot_takes_room_only_when_a_run_measures_one(tmp_path):
    from app.runs import RunView
    from app.services import Studio
    from app.tabs.train import TrainTab
    from app.workspace import Workspace

    class Runs:
        val = []

        def list(self):
            return [{"id": "r", "name": "a", "status": "running", "dir": str(tmp_path)}]

        def get(self, run_id):
            return self.list()[0]

        def view(self, run_id):
            v = RunView()
            v.state, v.losses, v.val_losses = "training", [(1, 0.5)], list(self.val)
            return v

    runs = Runs()
    train = TrainTab(Studio(Workspace(tmp_path / "ws"), runs))
    assert train.live("r")[2].visible is False and train.live(None)[2].visible is False
    runs.val = [(2, 0.4)]
    assert train.live("r")[2].visible is True


def test_repeats_are_set_on_the_dataset_tab_and_reach_the_report_and_the_steps(tmp_path):
    """The engine read kohya's '<repeats>_' folders, but the page could not set how often a dataset repeats."""
    from app.forms import planned_steps, preflight
    from app.main import build_ui
    from trainer.data.report import dataset_report
    from trainer.data.scan import scan_dataset
    from trainer.recipe.config import TrainConfig

    ui = build_ui(tmp_path / "ws")
    tab, ws = ui.lora_studio["tabs"]["dataset"], ui.lora_studio["workspace"]
    tab.create("d")
    d = ws.dataset_path("d")
    make_images(d, 2)
    make_images(d / "10_extra", 1)
    rows = tab.repeat_rows("d")
    assert rows == [[tab.ROOT_LABEL, 2, 1], ["10_extra", 1, 10]]
    assert tab.save_repeats("d", [[tab.ROOT_LABEL, 2, 5], ["10_extra", 1, 3]]).startswith(
        "Repeats saved: 13 image(s) per epoch")
    assert tab.repeat_rows("d") == [[tab.ROOT_LABEL, 2, 5], ["10_extra", 1, 3]]
    assert sorted(it.repeats for it in scan_dataset(d).items) == [3, 5, 5]
    assert dataset_report(d)["images_with_repeats"] == 13 and (d / "10_extra").is_dir()  # no folder renamed
    assert planned_steps(TrainConfig(epochs=2, batch_size=1), 13) == 26
    ok, text = preflight({"base_model": "", "dataset": str(d)})
    assert "3 images (13 per epoch with repeats)" in text
    with pytest.raises(ValueError, match="whole number from 1 to 1000"):
        tab.save_repeats("d", [[tab.ROOT_LABEL, 2, 0]])


def test_the_base_model_field_offers_what_this_machine_has_and_the_well_known_ids(tmp_path, monkeypatch):
    from app.runs import RunManager
    from app.services import Studio
    from app.workspace import Workspace

    webui = tmp_path / "webui" / "models"
    (webui / "Lora").mkdir(parents=True)
    (webui / "Stable-diffusion" / "sub").mkdir(parents=True)
    (webui / "Stable-diffusion" / "sub" / "mymix.safetensors").write_bytes(b"x")
    (webui / "Stable-diffusion" / "notes.txt").write_text("not a model")
    cache = tmp_path / "hf"
    snap = cache / "models--someone--their-model" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "model_index.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    ws = Workspace(tmp_path / "ws")
    ws.update_settings(webui_lora_dir=str(webui / "Lora"))
    ws.remember_model("/models/used-before.safetensors")
    choices = dict((v, label) for label, v in Studio(ws, RunManager(ws)).model_choices())
    assert list(choices)[0] == "/models/used-before.safetensors"
    assert choices[str(webui / "Stable-diffusion" / "sub" / "mymix.safetensors")] == "mymix.safetensors (your web UI's checkpoints)"
    assert choices["someone/their-model"] == "someone/their-model (already downloaded)"
    assert "about 4 GB to download once" in choices["stable-diffusion-v1-5/stable-diffusion-v1-5"]
    assert "GB to download once" in choices["stabilityai/stable-diffusion-xl-base-1.0"]
    assert not any("notes.txt" in v for v in choices)


@pytest.mark.slow
def test_the_built_in_tiny_model_trains_the_whole_journey_offline(tmp_path):
    """A new user without a model: one click makes the tiny model (in a worker) and a demo dataset, fills the form,
    and the run goes through to a LoRA; the page says plainly that its images are noise."""
    from app.forms import preflight
    from app.runs import RunManager
    from app.services import Studio
    from app.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    studio = Studio(ws, RunManager(ws))
    values, text = studio.tiny_journey()
    assert "noise" in text and "offline" in text and (ws.tiny_model_dir / "model_index.json").is_file()
    assert dict((v, k) for k, v in studio.model_choices())[str(ws.tiny_model_dir)].startswith("Built-in tiny model")
    ok, plan = preflight(values, ws.datasets_dir)
    assert ok, plan
    run_id, msg = studio.start(values)
    assert run_id, msg
    wait_for(lambda: studio.runs.get(run_id)["status"] in ("finished", "failed"), timeout=300)
    assert studio.runs.get(run_id)["status"] == "finished"
    assert studio.tiny_journey()[0] == values  # a second click reuses what the first made


@pytest.mark.slow
def test_preview_reports_every_step_and_cancel_stops_the_worker(tiny_sd1, tmp_path):
    """Preview had no progress, no Cancel and kept computing after the tab closed, holding every later Generate."""
    from app.preview_client import PreviewClient

    client = PreviewClient(tmp_path / "pv")
    try:
        req = {"base_model": str(tiny_sd1), "params": {"prompt": "zwx", "steps": 3, "width": 64, "height": 64,
                                                        "batch": 2, "seed": 1, "loras": []}}
        seen = []
        ans = client.request(req, lambda d, t: seen.append((d, t)))
        assert ans["ok"] and len(ans["images"]) == 2 and seen == [(i, 6) for i in range(1, 7)]
        long = {**req, "params": {**req["params"], "steps": 40, "batch": 1}}
        steps = []

        def on_progress(done, total):
            steps.append(done)
            if done == 2:
                client.cancel()  # as the Cancel button does, while the worker works

        before = set((tmp_path / "pv").glob("*.png"))
        ans = client.request(long, on_progress)
        assert ans.get("cancelled") and max(steps) <= 3 and set((tmp_path / "pv").glob("*.png")) == before
        assert client.request(req)["ok"]  # the worker is free again, and a stale cancel does not stop this one
    finally:
        client.close()


def test_a_closed_preview_tab_cancels_its_generation_and_a_slow_size_is_announced(tmp_path):
    from app.runs import RunManager
    from app.services import Studio
    from app.tabs.preview import PreviewTab
    from app.workspace import Workspace

    class Client:
        cancelled = False

        def request(self, req, on_progress=None):
            for i in range(1, 4):
                on_progress(i, 3)
            return {"ok": True, "images": ["a.png"]}

        def cancel(self):
            Client.cancelled = True

    ws = Workspace(tmp_path / "ws")
    tab = PreviewTab(Studio(ws, RunManager(ws)), client=Client())
    v = {"base_model": "m", "prompt": "p", "negative": "", "seed": 1, "steps": 20, "cfg": 7, "width": 512,
         "height": 512, "sampler": "Euler a", "batch": 1, "mode": "Single image", "strengths": "", "loras": []}
    gen = tab.generate_live(v)
    first = next(gen)
    assert "Starting" in first[1] or "Generating" in first[1]
    gen.close()  # the browser tab went away
    assert Client.cancelled
    ws.timings_path.write_text('[{"step_s": 20.0, "startup_s": 60, "device": "cpu", "precision": "no", '
                               '"family": "sd1", "base": "m", "resolution": 512, "batch": 1, "te": true}]')
    assert "This will take about" in tab.duration_warning(v)  # 20 steps x 2/3 of a 20 s training step
    assert tab.duration_warning({**v, "steps": 2, "width": 256, "height": 256}) == ""
    *_, last = tab.generate_live(v)
    assert last == (["a.png"], "Done (seed 1).")
