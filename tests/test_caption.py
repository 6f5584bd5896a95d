"""Auto-captioning with tiny random-weight BLIP and Florence-2 models (built in tests/captioners.py): modes,
trigger first, preview, cancel, provenance in the report, the offline message, the worker and the CLI."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from captioners import tiny_blip, tiny_florence
from conftest import make_images, wait_for
from trainer.engine.autocaption import CaptionError, CaptionOptions, caption_dataset, resolve_model
from trainer.data.report import dataset_report, format_report


@pytest.fixture(scope="module")
def blip(tmp_path_factory) -> Path:
    return tiny_blip(tmp_path_factory.mktemp("blip") / "tiny-blip")


@pytest.fixture(scope="module")
def florence(tmp_path_factory) -> Path:
    return tiny_florence(tmp_path_factory.mktemp("florence") / "tiny-florence")


def mixed_dataset(folder: Path) -> Path:
    """Three images: two without a caption, one with a hand-written one."""
    make_images(folder, 3, caption=None)
    (folder / "img1.txt").write_text("hand written")
    return folder


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.png")}


def test_missing_mode_captions_only_images_without_one_trigger_first(blip, tmp_path):
    ds = mixed_dataset(tmp_path / "d")
    before = digest(ds)
    events = []
    done = caption_dataset(ds, CaptionOptions(model=str(blip), trigger="zwx", batch_size=2, max_new_tokens=6),
                           events.append)
    assert done["written"] == 2 and done["total"] == 2
    assert (ds / "img1.txt").read_text() == "hand written"  # a person's caption is not touched
    for name in ("img0", "img2"):
        text = (ds / f"{name}.txt").read_text()
        assert text.startswith("zwx, ") and len(text) > len("zwx, ")
    assert digest(ds) == before  # originals never modified
    progress = [e for e in events if e["type"] == "progress"]
    assert progress[-1]["done"] == 2 and progress[-1]["images_per_s"] > 0
    rep = dataset_report(ds)
    assert rep["captions_by"] == {"captioner": 2, "hand": 1}
    assert "2 by the captioner (unedited), 1 by hand or edited" in format_report(rep)
    (ds / "img0.txt").write_text("edited by me")  # an edited auto caption is the person's now
    assert dataset_report(ds)["captions_by"] == {"captioner": 1, "hand": 2}
    record = (ds / ".captioner.json").read_text()
    assert str(tmp_path) not in record and "tiny-blip" in record  # the model by name, no path of this computer
    again = caption_dataset(ds, CaptionOptions(model=str(blip)), lambda e: None)
    assert again["written"] == 0 and "every image has a caption" in again["message"]


def test_an_unreadable_image_is_skipped_and_named_while_the_others_are_captioned(blip, tmp_path):
    ds = mixed_dataset(tmp_path / "d")
    (ds / "broken.png").write_bytes(b"not a png")
    done = caption_dataset(ds, CaptionOptions(model=str(blip), batch_size=2, max_new_tokens=4), lambda e: None)
    assert done["written"] == 2 and len(done["skipped"]) == 1 and done["skipped"][0].startswith("broken.png: ")
    assert not (ds / "broken.txt").exists() and (ds / "broken.png").read_bytes() == b"not a png"
    assert "broken.png" in done["message"]
    again = caption_dataset(ds, CaptionOptions(model=str(blip)), lambda e: None)  # nothing left but the broken one
    assert again["written"] == 0 and "every image has a caption" in again["message"] and "broken.png" in again["message"]


def test_florence_preview_writes_nothing_then_append_and_overwrite(florence, tmp_path):
    ds = mixed_dataset(tmp_path / "d")
    events = []
    done = caption_dataset(ds, CaptionOptions(model=str(florence), mode="overwrite", max_new_tokens=5),
                           events.append, preview=2)
    shown = [e for e in events if e["type"] == "caption"]
    assert done["preview"] and len(shown) == 2 and all(e["caption"] and not e["written"] for e in shown)
    assert sorted(p.name for p in ds.glob("*.txt")) == ["img1.txt"] and (ds / "img1.txt").read_text() == "hand written"

    caption_dataset(ds, CaptionOptions(model=str(florence), mode="append", max_new_tokens=5), lambda e: None)
    appended = (ds / "img1.txt").read_text()
    assert appended.startswith("hand written, ") and len(appended) > len("hand written, ")
    assert (ds / "img0.txt").read_text() and not (ds / "img0.txt").read_text().startswith(",")

    caption_dataset(ds, CaptionOptions(model=str(florence), mode="overwrite", trigger="ohwx", max_new_tokens=5),
                    lambda e: None)
    replaced = (ds / "img1.txt").read_text()
    assert "hand written" not in replaced and replaced.startswith("ohwx, ")
    assert dataset_report(ds)["captions_by"] == {"captioner": 3, "hand": 0}


def test_cancel_keeps_what_was_written(blip, tmp_path):
    ds = tmp_path / "d"
    make_images(ds, 4, caption=None)
    batches = []
    done = caption_dataset(ds, CaptionOptions(model=str(blip), batch_size=1, max_new_tokens=4),
                           lambda e: batches.append(e) if e["type"] == "progress" else None,
                           should_stop=lambda: len(batches) >= 3)  # the start, then two batches
    assert done["stopped"] and done["written"] == 2 and "cancelled" in done["message"]
    assert len(list(ds.glob("*.txt"))) == 2


def test_model_problems_are_one_plain_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CaptionError, match=r"not downloaded and this computer is offline.*hf download someone/captioner"):
        resolve_model("someone/captioner")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptionError, match="holds neither a captioning model"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(CaptionError, match="neither a model folder"):
        resolve_model("no such thing")
    ds = tmp_path / "d"
    make_images(ds, 1, caption=None)
    with pytest.raises(CaptionError, match="Unknown mode"):
        caption_dataset(ds, CaptionOptions(model="x/y", mode="sometimes"), lambda e: None)


class BusyRuns:
    """The run manager's answer while a training run holds the GPU (only `list` is asked)."""

    def __init__(self, status):
        self.status = status

    def list(self):
        return [{"id": "r1", "status": self.status}]


@pytest.mark.slow
def test_the_dataset_tab_captions_through_the_worker_and_waits_while_training(blip, tmp_path):
    from app.captioning import CaptionJobs
    from app.services import Studio
    from app.tabs.dataset import DatasetTab
    from app.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    make_images(ws.dataset_path("d", create=True), 3, caption=None)
    waiting = CaptionJobs(ws, BusyRuns("running"))
    busy = DatasetTab(Studio(ws, BusyRuns("running"), waiting))
    assert busy.start_captioning("d", str(blip), "missing", False).startswith("Waiting in the queue")
    assert "Waiting in the queue for the GPU" in busy.captioning()[0]
    assert waiting.cancel().startswith("Taken out of the queue")  # before it started: nothing written
    assert not list(ws.dataset_path("d").glob("*.txt"))
    tab = DatasetTab(Studio(ws, BusyRuns("finished"), CaptionJobs(ws, BusyRuns("finished"))))
    assert "tick *Yes, replace existing captions*" in tab.start_captioning("d", str(blip), "overwrite", False)
    assert tab.start_captioning("d", str(blip), "missing", False, trigger="zwx", batch_size=2) == "Captioning started."
    assert "already running" in tab.start_captioning("d", str(blip), "missing", False)
    wait_for(lambda: tab.captioning()[2].get("finished"), timeout=180)
    md, rows, state = tab.captioning()
    assert state["error"] is None, md
    assert "finished: Wrote 3 caption(s) with tiny-blip" in md
    assert len(rows) == 3 and all(c.startswith("zwx, ") for _, c in rows)
    assert all(it.caption and it.caption.startswith("zwx, ") for it, _ in tab.entries("d"))
    assert ws.caption_model() == str(blip)  # the Settings tab and the next visit start from it

    # cancel: the stop file ends the worker after its current batch; what it wrote stays
    assert tab.start_captioning("d", str(blip), "overwrite", True, batch_size=1) == "Captioning started."
    assert tab.captions.running()  # no sleep: cancel while the worker still loads, so it cannot finish first
    assert "Cancelling" in tab.captions.cancel()
    wait_for(lambda: tab.captioning()[2].get("finished"), timeout=180)
    md, rows, state = tab.captioning()
    assert "cancelled" in md and len(rows) < 3, md


@pytest.mark.slow
def test_the_caption_command(blip, tmp_path, capsys):
    from trainer.cli import main

    ds = mixed_dataset(tmp_path / "d")
    assert main(["caption", str(ds), "--model", str(blip), "--trigger", "zwx", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "img0.png: zwx, " in out and "Wrote 2 caption(s)" in out
    assert main(["caption", str(ds), "--mode", "overwrite", "--model", str(tmp_path / "nothing-here")]) == 2
    assert "neither a model folder" in capsys.readouterr().out


def test_the_progress_line_says_how_far_how_fast_and_how_it_ended():
    from app.captioning import progress_markdown

    running = {"job": "j", "active": True, "dataset": "d", "device": "cuda", "done": 3, "total": 12,
               "images_per_s": 1.5, "eta_s": 6.0, "status": ""}
    md = progress_markdown(running)
    assert '<progress value="3" max="12"' in md and "3/12 images (25%)" in md and "1.50 images/s" in md
    assert "about 6 s left" in md
    assert "Loading" in progress_markdown({**running, "total": 0, "status": "Loading tiny-blip..."})
    assert progress_markdown({"job": "j", "active": False, "error": "The worker stopped."}).startswith(
        "**Captioning stopped:** The worker stopped.")
    done = progress_markdown({"job": "j", "active": False, "dataset": "d", "message": "Wrote 12 caption(s)."})
    assert "finished: Wrote 12 caption(s)." in done
    assert progress_markdown({"job": ""}) == ""


def test_trigger_only_captions_count_as_missing_appended_ones_as_hand_and_excluded_ones_are_said(blip, tmp_path):
    """After *Add trigger to captions* every image had a caption ('zwx'), so missing mode found nothing; appending
    to hand-written text counted as 'by the captioner, unedited'; 'Wrote N' counted an excluded image silently."""
    from trainer.data.manage import set_excluded

    ds = tmp_path / "d"
    make_images(ds, 4, caption=None)
    for i in range(3):
        (ds / f"img{i}.txt").write_text("zwx")
    (ds / "img3.txt").write_text("zwx, a hand-written start")
    set_excluded(ds, ds / "img2.png", True)
    done = caption_dataset(ds, CaptionOptions(model=str(blip), trigger="zwx", max_new_tokens=6), lambda e: None)
    assert done["written"] == 3 and "(1 of them for excluded images)" in done["message"]
    assert (ds / "img3.txt").read_text() == "zwx, a hand-written start"  # described already: left alone
    assert all((ds / f"img{i}.txt").read_text().startswith("zwx, ") for i in range(3))
    assert dataset_report(ds)["captions_by"] == {"captioner": 2, "hand": 1}  # img2 is excluded: not in the report
    caption_dataset(ds, CaptionOptions(model=str(blip), mode="append", trigger="zwx", max_new_tokens=6), lambda e: None)
    assert (ds / "img3.txt").read_text().startswith("zwx, a hand-written start, ")
    # appended captions carry text that was there before (the person's, or an earlier run's): not 'unedited'
    assert dataset_report(ds)["captions_by"] == {"captioner": 0, "hand": 3}
