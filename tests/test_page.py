"""The page a person lives in (issue 19): what the Dataset and Outputs tabs do with what a person gives them."""
from __future__ import annotations

import shutil

import pytest

from conftest import make_images
from trainer.data.importer import import_sources
from trainer.data.report import dataset_report, format_report
from trainer.events import read_events


def test_dropping_the_same_images_again_imports_only_the_new_one(tmp_path):
    src = tmp_path / "src"
    make_images(src, 3)
    ds = tmp_path / "ds"
    first = import_sources(sorted(src.glob("img[01].png")), ds)
    assert len(first.imported) == 2
    again = import_sources(sorted(src.glob("img*.png")), ds)  # a second drop: two old pictures and one new
    assert again.imported == ["img2.png"]
    assert sorted(r for _, r in again.skipped) == ["already in the dataset as img0.png", "already in the dataset as img1.png"]
    renamed = tmp_path / "renamed.png"
    shutil.copyfile(src / "img0.png", renamed)  # same picture under another name is still the same picture
    assert not import_sources([renamed], ds).imported
    assert sorted(p.name for p in ds.glob("*.png")) == ["img0.png", "img1.png", "img2.png"]


def test_add_trigger_reaches_every_image_even_without_a_caption(tmp_path):
    from app.services import Studio
    from app.tabs.dataset import DatasetTab
    from app.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    d = ws.dataset_path("d", create=True)
    make_images(d, 2)
    make_images(d / "more", 1, caption=None)
    shutil.move(str(d / "more" / "img0.png"), str(d / "bare.png"))
    msg = DatasetTab(Studio(ws, None)).bulk("d", "trigger", "zwx")
    assert msg.startswith("Changed 3 caption(s)")
    assert (d / "bare.txt").read_text() == "zwx"
    assert (d / "img0.txt").read_text().startswith("zwx, ")


def test_report_lists_say_when_they_stop(tmp_path):
    d = tmp_path / "ds"
    make_images(d, 14, caption=None)
    text = format_report(dataset_report(d, 64))
    assert "14 image(s) without a caption" in text and "and 4 more" in text


@pytest.mark.slow
def test_downloads_and_copies_are_named_after_their_run_and_step(tiny_sd1, tmp_path):
    from app.services import Studio
    from conftest import finished_run

    ws, rm, run_id = finished_run(tiny_sd1, tmp_path, max_steps=2, save_every_steps=1, sample_every_steps=0)
    studio = Studio(ws, rm)
    names = [Studio.public_name(ws.resolve_file(f)) for f in studio.lora_files(run_id)]
    assert names[0] == f"lora-{run_id}.safetensors" and f"lora-{run_id}-step-000001.safetensors" in names
    assert len(set(names)) == len(names)
    got = studio.download_copy(studio.lora_files(run_id)[1])
    assert got.endswith(names[1]) and open(got, "rb").read() == open(studio.lora_files(run_id)[1], "rb").read()


def test_grid_labels_are_words_with_their_spaces():
    """PIL's bitmap default font all but drops spaces ('checkpointsatstrength 1'); grids use a real font."""
    from PIL import Image, ImageFont

    from trainer.engine.preview import grid, label_font

    for cell in (64, 512):
        font = label_font(cell)
        assert font.getlength("at strength") - font.getlength("atstrength") >= 3, cell
    assert ImageFont.load_default().getlength("a b") - ImageFont.load_default().getlength("ab") < 3  # the old one
    out = grid([Image.new("RGB", (512, 512))] * 2, ["strength 0", "strength 0.5"], 2, "mine at several strengths")
    assert out.size[0] == 1024 and out.size[1] > 512 + 2 * 20  # whole cells, with room for a readable title and labels


def test_a_bad_lora_file_gets_its_message_and_leaves_the_pickers_alone(tmp_path):
    import gradio as gr

    from app.main import build_ui

    ui = build_ui(tmp_path / "ws")
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    add = next(i for i, b in ui.blocks.items() if isinstance(b, gr.File) and "Add a LoRA" in (b.label or ""))
    fn = next(f for f in ui.fns.values() if any(t[0] == add for t in f.targets))
    out = fn.fn(str(bad))  # before: a gr.Error, which Gradio shows on every output, the four pickers included
    *pickers, status = out
    assert all(p == gr.update() for p in pickers) and status.startswith("**Not added:**") and "safetensors" in status


def test_an_excluded_image_stays_in_the_folder_but_out_of_training(tmp_path):
    """Exclude is the person's 'not this one': training (scan), the report and the gallery agree; undo is one click."""
    from app.services import Studio
    from app.tabs.dataset import DatasetTab
    from app.workspace import Workspace
    from trainer.data.scan import scan_dataset

    ws = Workspace(tmp_path / "ws")
    d = ws.dataset_path("d", create=True)
    make_images(d, 3)
    make_images(d / "5_sub", 1)
    tab = DatasetTab(Studio(ws, None))
    msg = tab.toggle_exclude("d", str(d / "5_sub" / "img0.png"))
    assert "excluded from training" in msg and (d / "5_sub" / "img0.png").exists()
    scan = scan_dataset(d)
    assert sorted(it.path.name for it in scan.items) == ["img0.png", "img1.png", "img2.png"]
    assert [it.path for it in scan.excluded] == [d / "5_sub" / "img0.png"] and "5_sub" not in scan.subsets
    assert "1 image(s) excluded from training: 5_sub/img0.png" in format_report(dataset_report(d, 64))
    assert sum(cap.startswith("⊘ excluded") for _, cap in tab.items("d")) == 1 and len(tab.items("d")) == 4
    assert "excluded from training" in tab.info("d", str(d / "5_sub" / "img0.png"))
    assert "included in training again" in tab.toggle_exclude("d", str(d / "5_sub" / "img0.png"))
    assert len(scan_dataset(d).items) == 4


def test_removing_an_image_moves_it_and_its_caption_to_a_trash_it_can_come_back_from(tmp_path):
    from app.services import Studio
    from app.tabs.dataset import DatasetTab
    from app.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    d = ws.dataset_path("d", create=True)
    make_images(d, 2)
    before = (d / "img1.png").read_bytes(), (d / "img1.txt").read_text()
    tab = DatasetTab(Studio(ws, None))
    tab.toggle_exclude("d", str(d / "img1.png"))
    assert "to the trash" in tab.remove("d", str(d / "img1.png"))
    assert not (d / "img1.png").exists() and not (d / "img1.txt").exists()
    assert [p for p, _ in tab.items("d")] == [str(d / "img0.png")]
    assert len(list(ws.trash_dir.rglob("img1.*"))) == 2
    with pytest.raises(ValueError, match="outside the workspace"):
        tab.remove("d", str(tmp_path / "elsewhere.png"))
    assert tab.restore("d") == "Restored img1.png, img1.txt."
    assert ((d / "img1.png").read_bytes(), (d / "img1.txt").read_text()) == before
    assert len(tab.items("d")) == 2 and not any(ws.trash_dir.rglob("*.png"))
    with pytest.raises(ValueError, match="Nothing of this dataset is in the trash"):
        tab.restore("d")


def test_the_caption_editor_names_the_image_and_its_size(tmp_path):
    from app.services import Studio
    from app.tabs.dataset import DatasetTab
    from app.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    d = ws.dataset_path("d", create=True)
    make_images(d, 1, size=(80, 48))
    text = DatasetTab(Studio(ws, None)).info("d", str(d / "img0.png"))
    kb = (d / "img0.png").stat().st_size / 1024
    assert text.startswith("**img0.png** · 80×48 px · ") and f"{kb:.0f} KB" in text


def test_every_phase_of_a_run_is_shown_as_it_happens(tiny_sd1, dataset, tmp_path):
    """Fold a real run's event log one event at a time, as the page does: rendering sample N/M, saving and
    writing the file each show while they happen, and the ETA is gone once the run ended."""
    from app.runs import RunView
    from app.tabs.train import progress_markdown
    from conftest import base_config
    from trainer.cli import main as cli

    out = tmp_path / "run"
    cfg = base_config(tiny_sd1, dataset, out, max_steps=4, sample_every_steps=2, save_every_steps=2,
                      sample_prompts=["a", "b", "c"], sample_steps=1)
    cfg.save(tmp_path / "c.toml")
    assert cli(["train", str(tmp_path / "c.toml")]) == 0
    events, _ = read_events(out)
    v, seen = RunView(), []
    for e in events:
        v.fold([e])
        text = progress_markdown({"id": "r"}, v).split("\n\n")
        seen.append(text[0])
        if v.state in ("finished",):
            assert "ETA" not in "\n".join(text)
    shown = list(dict.fromkeys(seen))  # in order, without repeats
    want = ["**Run `r`: loading the model**", "**Run `r`: caching latents", "**Run `r`: training**",
            "**Run `r`: rendering sample 1/3**", "**Run `r`: rendering sample 2/3**",
            "**Run `r`: rendering sample 3/3**", "**Run `r`: saving a checkpoint**",
            "**Run `r`: writing the LoRA file**", "**Run `r`: finished**"]
    positions = [next((i for i, s in enumerate(shown) if s.startswith(w.rstrip("*")) ), None) for w in want]
    assert None not in positions and positions == sorted(positions), (shown, positions)
    # after a round of samples the view is back to training, not stuck on 'rendering'
    assert shown[shown.index("**Run `r`: rendering sample 3/3**") + 1] in ("**Run `r`: training**", "**Run `r`: saving a checkpoint**")


def test_a_stopping_run_says_so_and_drops_its_eta():
    from app.runs import RunView
    from app.tabs.train import progress_markdown

    v = RunView()
    v.fold([{"type": "progress", "time": 0, "step": 3, "total": 10, "loss": 0.5, "its": 1.0, "eta": 7}])
    assert "ETA 0m07s" in progress_markdown({"id": "r"}, v)
    v.stopping = True
    text = progress_markdown({"id": "r"}, v)
    assert "stopping (saves first)" in text and "ETA" not in text
    v.stopping = False
    v.fold([{"type": "stopped", "time": 1, "step": 3, "message": "Stopped at step 3"}])
    text = progress_markdown({"id": "r"}, v)
    assert "stopped" in text and "ETA" not in text


@pytest.mark.slow
def test_run_picker_and_outputs_follow_a_run_to_its_end_without_refresh(tiny_sd1, tmp_path):
    """The page's timers call `follow`: a run that finishes shows 'finished' in the picker and the Outputs table
    on the next tick, and nothing is re-sent while nothing changed."""
    import gradio as gr

    from app.runs import RunManager
    from app.services import Studio
    from app.tabs.outputs import OutputsTab
    from app.tabs.train import TrainTab
    from app.workspace import Workspace
    from conftest import wait_for
    from conftest import quick_cfg

    ws = Workspace(tmp_path / "ws")
    data = ws.dataset_path("d", create=True)
    make_images(data, 2)
    studio = Studio(ws, RunManager(ws))
    train, outputs = TrainTab(studio), OutputsTab(studio)
    run_id, _ = studio.runs.create(quick_cfg(tiny_sd1, data, max_steps=2))
    follow, picked, shown = train.follow(None, {})  # a page with no run picked picks up the active one
    assert picked == run_id and follow["picker"].value == run_id
    _, _, _, out_sig, note = outputs.follow(None, None, "")
    assert note == ""  # a run exists: nothing to explain
    wait_for(lambda: studio.runs.get(run_id)["status"] == "finished")
    follow, _, shown2 = train.follow(run_id, shown)
    labels = [label for label, _ in follow["picker"].choices]
    assert labels == [f"{run_id} · lora · finished"] and not follow["same_state"]
    follow, _, _ = train.follow(run_id, shown2)
    assert follow["picker"] == gr.update() and follow["same_state"]  # nothing new: nothing sent
    table, pick, files, sig, _ = outputs.follow(run_id, None, out_sig)
    assert sig != out_sig and table[0][:2] == [run_id, "finished"]
    assert files.value.endswith("lora.safetensors") and [label for label, _ in files.choices][0] == "final · lora.safetensors"
    assert outputs.follow(run_id, files.value, sig) == (gr.update(), gr.update(), gr.update(), sig, gr.update())
    # choosing the run puts its settings back into the form, by the names the form uses
    vals = train.run_values(run_id)
    assert vals["dataset"] == "d" and vals["max_steps"] == 2 and vals["base_model"] == str(tiny_sd1)
    assert vals["output_name"] == "lora" and "output_dir" not in vals
    # and the run measured this machine for the next estimate
    from trainer.recipe import timing

    assert [m["run"] for m in timing.load(ws.timings_path)] == [run_id]


def test_the_train_form_and_preview_come_back_as_the_person_left_them(tmp_path):
    """Edits are kept per workspace; a new page (or a restarted app) restores them instead of the defaults."""
    from app.gpu import gpu_present
    from app.main import build_ui

    ws_dir = tmp_path / "ws"
    ui = build_ui(ws_dir)
    train, preview = ui.lora_studio["tabs"]["train"], ui.lora_studio["tabs"]["preview"]
    assert train.default_values()["mixed_precision"] == ("bf16" if gpu_present() else "no")
    ui.lora_studio["workspace"].dataset_path("d", create=True)
    edits = {"base_model": "/models/base.safetensors", "dataset": "d", "trigger": "zwx", "max_steps": 77, "rank": 8}
    data = {train.comps[n]: edits.get(n, v) for n, v in train.default_values().items() if n in train.comps}
    train.remember({**data, train.preset_dd: "quick_test"})
    pv = {c: c.value for c in preview.kept.values()}
    preview.remember({**pv, preview.kept["prompt"]: "zwx, red square", preview.kept["strength-0"]: 0.6})

    ui2 = build_ui(ws_dir)  # a reload, or the app started again
    train2, preview2 = ui2.lora_studio["tabs"]["train"], ui2.lora_studio["tabs"]["preview"]
    picker, preset, *form = train2.page_load()
    got = dict(zip(train2.order, form))
    assert preset.value == "quick_test"
    assert got["base_model"].value == "/models/base.safetensors" and got["dataset"].value == "d"
    assert (got["trigger"], got["max_steps"], got["rank"]) == ("zwx", 77, 8)
    assert got["mixed_precision"] == train2.default_values()["mixed_precision"]  # untouched fields keep the default
    values = dict(zip(preview2.kept, preview2.page_load()))
    assert values["prompt"] == "zwx, red square" and values["strength-0"] == 0.6
    # a first visit (nothing saved) gets every default; before, the LoRA pickers raised and showed "Error"
    fresh = build_ui(tmp_path / "fresh").lora_studio["tabs"]["preview"]
    values = dict(zip(fresh.kept, fresh.page_load()))
    assert values["strength-0"] == 1.0 and values["lora-0"].value is None and values["prompt"] in ("", None)
    # a broken state file is no reason not to start
    (ws_dir / "ui_state.json").write_text("{broken")
    assert build_ui(ws_dir).lora_studio["tabs"]["train"].restored_values() == (train.default_values(), None)


def test_page_messages_name_the_labels_the_person_sees(tmp_path):
    from app.forms import in_ui_words, preflight

    ok, text = preflight({"base_model": "", "dataset": str(tmp_path), "max_bucket": 256})
    page = in_ui_words(text)
    assert not ok and "base_model" not in page and "max_bucket" not in page
    assert "**Base model** is empty" in page and "**Max bucket** (Advanced › Images) (256) is below" in page
    # paths and words that merely contain a key are left alone
    assert in_ui_words("/data/min_bucket_test/x.png") == "/data/min_bucket_test/x.png"


def test_check_setup_says_how_long_the_run_takes_here_from_what_this_machine_measured(tiny_sd1, dataset, tmp_path):
    from app.forms import config_to_values, preflight
    from conftest import base_config
    from trainer.recipe import timing
    from trainer.cli import main as cli

    cfg = base_config(tiny_sd1, dataset, tmp_path / "run", max_steps=5)
    values = config_to_values(cfg)
    ok, text = preflight(values, None, None, [], "cpu")
    assert ok and "Time on this machine (CPU): about" in text and "rough figure" in text
    cfg.save(tmp_path / "c.toml")
    assert cli(["train", str(tmp_path / "c.toml")]) == 0
    events, _ = read_events(tmp_path / "run")
    m = timing.record(tmp_path / "timings.json", cfg, events, "r1")
    assert m["device"] == "cpu" and m["family"] == "sd1" and m["step_s"] > 0
    # the first and the last step always report: the cost per step is the time between them over 4 steps
    prog = [e for e in events if e["type"] == "progress"]
    assert (prog[0]["step"], prog[-1]["step"]) == (1, 5)
    assert m["step_s"] == pytest.approx((prog[-1]["time"] - prog[0]["time"]) / 4, abs=5e-5)  # kept to 4 decimals
    measured = timing.load(tmp_path / "timings.json")
    _, text = preflight({**values, "max_steps": 40}, None, None, measured, "cpu")
    assert "measured on this machine (r1)" in text
    est = timing.estimate(cfg.replace(max_steps=40), "sd1", 40, "cpu", measured)
    double = timing.estimate(cfg.replace(max_steps=40, resolution=2 * cfg.resolution), "sd1", 40, "cpu", measured)
    assert double["step_s"] == pytest.approx(4 * est["step_s"])  # scaled by pixels
    assert est["seconds"] == pytest.approx(m["startup_s"] + 40 * m["step_s"])
    # a GPU estimate does not borrow a CPU measurement
    assert "rough figure" in timing.estimate(cfg, "sd1", 40, "cuda", measured)["source"]


def test_without_a_gpu_quick_test_and_every_preset_run_in_fp32_and_say_so(tmp_path):
    from app.runs import RunManager
    from app.services import Studio
    from app.workspace import Workspace
    from trainer.recipe.presets import find_preset, list_presets

    ws = Workspace(tmp_path / "ws")
    studio = Studio(ws, RunManager(ws))
    for p in list_presets():
        vals, info = studio.apply_preset(p.key, {}, gpu=False)
        assert vals["mixed_precision"] == "no" and "No NVIDIA GPU here" in info, p.key
        gpu_vals, gpu_info = studio.apply_preset(p.key, {}, gpu=True)
        assert gpu_vals["mixed_precision"] == p.config.get("mixed_precision", "bf16") and "No NVIDIA" not in gpu_info
    quick = find_preset("quick_test")
    assert quick.cpu, "Quick test has settings for a machine without a GPU"
    vals, _ = studio.apply_preset("quick_test", {}, gpu=False)
    assert all(vals[k] == v for k, v in quick.cpu.items())
