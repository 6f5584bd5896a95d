"""The whole user journey in a real browser: Debian's Chromium driven by Playwright against `python launch.py`.

Dataset -> Train (Quick test preset, tiny random model) -> Outputs (download, load in diffusers) -> Preview
(strength 0 vs 1, a strength grid) -> reload mid-run and see the live view re-attach. A screenshot of each
step goes to test-artifacts/e2e/ (the README's screenshots come from there).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import ROOT, launched_app, make_images

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts" / "e2e"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium not installed (apt install chromium)")]


@pytest.fixture
def app_url(tmp_path):
    with launched_app(tmp_path) as (url, ws, _):
        yield url, ws


def line_pixels(png: bytes) -> int:
    """Pixels of the plot's line colour (Gradio's orange accent) in a screenshot: a drawn curve has many."""
    import io

    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int(((a[..., 0] > 200) & (a[..., 1] > 70) & (a[..., 1] < 170) & (a[..., 2] < 90)).sum())


class UI:
    def __init__(self, page):
        self.p = page

    def shot(self, name, focus=None):
        """A screenshot, with the element `focus` (an elem_id) scrolled into view first."""
        if focus:
            self.p.locator(f"#{focus}").first.scroll_into_view_if_needed()
            self.p.wait_for_timeout(300)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.p.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=False)

    def tab(self, name):
        self.p.get_by_role("tab", name=name).click()
        self.p.wait_for_timeout(300)

    def text(self, elem_id, value):
        box = self.p.locator(f"#{elem_id} textarea, #{elem_id} input").first
        box.fill(str(value))
        box.press("Tab")

    def custom(self, elem_id, value):
        box = self.p.locator(f"#{elem_id} input[role=combobox]")
        box.click()
        box.fill(str(value))
        box.press("Enter")
        self.p.wait_for_timeout(200)

    def choose(self, elem_id, option):
        box = self.p.locator(f"#{elem_id} input[role=combobox]")
        box.click()
        opt = self.p.get_by_role("option", name=option) if isinstance(option, str) else self.p.get_by_role("option").filter(has_text=option)
        opt.first.click()
        self.p.wait_for_timeout(300)

    def click(self, elem_id):
        self.p.locator(f"#{elem_id}").click()

    def until(self, pred, what: str, timeout: float = 30):
        """Wait on a condition, not on the clock: `pred()` true within `timeout` seconds, or fail saying `what`."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if pred():
                    return
            except (OSError, ValueError, KeyError):  # a file or a key not written yet
                pass
            self.p.wait_for_timeout(200)
        self.shot("failed-until")
        raise AssertionError(f"timed out waiting until {what}")

    def wait_text(self, elem_id, pattern, timeout=240):
        loc = self.p.locator(f"#{elem_id}")
        deadline = time.time() + timeout
        while time.time() < deadline:
            t = loc.inner_text()
            if re.search(pattern, t):
                return t
            self.p.wait_for_timeout(500)
        self.shot(f"failed-{elem_id}")
        raise AssertionError(f"#{elem_id} never matched {pattern!r}; last text: {t[:500]!r}")


@contextmanager
def dataset_page(url: str, dataset: str, images: int):
    """Chromium on the app's Dataset tab with `dataset` picked (its `images` images still without captions) and
    the auto-caption section open: (page, UI)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        ui = UI(page)
        page.goto(url)
        ui.choose("ds-pick", dataset)
        ui.wait_text("ds-report", rf"{images} image\(s\) without a caption")
        page.locator("#cap-accordion").get_by_text("Auto-caption with a local model").click()
        yield page, ui
        browser.close()


def test_full_journey_in_a_real_browser(app_url, tiny_sd1, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, ws = app_url
    imgs = make_images(tmp_path / "photos", 4, size=(96, 96), caption=None)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        page.set_default_timeout(60_000)
        ui = UI(page)
        page.goto(url)

        # 1. Dataset: create, upload 4 images through the drop zone's file input, set a trigger word
        ui.text("ds-new-name", "mychar")
        ui.click("ds-create")
        ui.wait_text("ds-status", "ready")
        page.locator("#ds-upload input[type=file]").set_input_files([str(p) for p in imgs])
        ui.wait_text("ds-status", r"Imported 4 image")
        ui.wait_text("ds-report", r"4 image\(s\)")
        ui.text("ds-trigger", "zwx")
        ui.click("ds-add-trigger")
        ui.wait_text("ds-status", "Changed 4 caption")  # every image gets the trigger, those without a caption too
        page.locator("#ds-gallery img").first.click()
        ui.wait_text("ds-image-info", re.escape(imgs[0].name))  # the editor holds this image (and its caption) now
        ui.text("ds-caption", "zwx, red square")
        ui.click("ds-save-caption")
        ui.wait_text("ds-status", "Saved the caption")
        ui.wait_text("ds-report", r"trigger coverage: 100%")
        assert (ws / "datasets" / "mychar" / f"{imgs[1].stem}.txt").read_text() == "zwx"
        assert (ws / "datasets" / "mychar").is_dir() and len(list((ws / "datasets" / "mychar").glob("*.png"))) == 4
        ui.shot("1-dataset", "ds-upload")

        # 1b. A second drop: one picture already there, one new: only the new one comes in. Then the new one is
        # removed to the trash, and an image is excluded from training and included again.
        extra = make_images(tmp_path / "more", 1, size=(96, 80), caption=None, seed=7)[0]
        extra = extra.rename(extra.with_name("zz_new.png"))  # sorts last in the gallery
        page.locator("#ds-upload input[type=file]").set_input_files([str(imgs[0]), str(extra)])
        ui.wait_text("ds-status", r"Imported 1 image.*already in the dataset")
        ui.wait_text("ds-report", r"5 image\(s\)")
        page.locator("#ds-gallery img").nth(4).click()  # file order: the new one sorts last
        ui.wait_text("ds-image-info", re.escape(extra.name) + r".*96×80 px")
        ui.click("ds-remove")
        ui.wait_text("ds-status", "to the trash")
        ui.wait_text("ds-report", r"4 image\(s\)")
        assert not (ws / "datasets" / "mychar" / extra.name).exists() and list((ws / "trash").rglob(extra.name))
        page.locator("#ds-gallery img").first.click()
        ui.click("ds-exclude")
        ui.wait_text("ds-image-info", "excluded from training")
        ui.wait_text("ds-report", r"1 image\(s\) excluded from training")
        ui.click("ds-exclude")
        ui.wait_text("ds-status", "included in training again")
        ui.wait_text("ds-report", r"4 image\(s\), 4 per epoch")

        # 2. Train: Quick test preset, the tiny model, pre-flight, Start, progress and loss chart, finished
        ui.tab("Train")
        ui.choose("preset", "Quick test")
        ui.custom("f-base_model", str(tiny_sd1))
        ui.choose("f-dataset", "mychar")
        trigger = page.locator("#f-trigger textarea, #f-trigger input").first
        trigger.press_sequentially("zwx, ohwx", delay=0)  # keystrokes faster than the saves: none may be lost
        ui.text("f-resolution", 64)
        ui.text("f-max_steps", 12)
        page.get_by_text("Advanced").click()
        # the Network choice shows its own fields only: LoKr's appear, LoRA's DoRA goes, and back again
        expect(page.locator("#f-use_dora")).to_be_visible()
        expect(page.locator("#f-lokr_factor")).to_be_hidden()
        ui.choose("f-network_type", "lokr")
        expect(page.locator("#f-lokr_factor")).to_be_visible()
        expect(page.locator("#f-use_tucker")).to_be_visible()
        expect(page.locator("#f-use_dora")).to_be_hidden()
        ui.choose("f-network_type", "lora")
        expect(page.locator("#f-use_dora")).to_be_visible()
        expect(page.locator("#f-lokr_factor")).to_be_hidden()
        ui.text("f-min_bucket", 64)
        ui.text("f-save_every_steps", 4)
        # a field emptied with the keyboard and one pasted into are kept as well (Gradio's `input` event misses both)
        suffix = page.locator("#f-caption_suffix textarea, #f-caption_suffix input").first
        suffix.press_sequentially("abc", delay=0)
        suffix.press("Control+a")
        suffix.press("Backspace")
        suffix.press("Tab")
        page.locator("#f-class_caption textarea, #f-class_caption input").first.click()
        page.keyboard.insert_text("a photo")
        page.keyboard.press("Tab")
        ui.click("check")
        ui.wait_text("preflight", "Ready to start")
        ui.wait_text("preflight", r"Time on this machine \(CPU\): about")

        # 2b. A reload keeps the filled form (preset, model, dataset, trigger, steps, an Advanced field)
        saved = lambda: json.loads((ws / "ui_state.json").read_text())["train"]  # noqa: E731
        ui.until(lambda: saved()["save_every_steps"] == 4 and saved()["trigger"] == "zwx, ohwx"
                 and saved()["caption_suffix"] == "" and saved()["class_caption"] == "a photo",
                 "the form's every keystroke and last edit were saved, a deletion and a paste too")
        page.reload()
        ui.tab("Train")
        expect(page.locator("#f-max_steps input").first).to_have_value("12", timeout=30_000)
        assert page.locator("#f-trigger textarea, #f-trigger input").first.input_value() == "zwx, ohwx"
        assert page.locator("#f-dataset input[role=combobox]").input_value() == "mychar"
        assert page.locator("#f-base_model input[role=combobox]").input_value() == str(tiny_sd1)
        assert page.locator("#preset input[role=combobox]").input_value() == "Quick test"
        assert page.locator("#f-mixed_precision input[role=combobox]").input_value() == "no"  # no GPU here
        ui.click("start")
        ui.wait_text("progress", r"step [1-9]\d*/12")
        ui.wait_text("progress", r"finished", timeout=300)
        assert page.locator("#loss-plot canvas, #loss-plot svg").count() > 0  # the chart rendered
        ui.until(lambda: line_pixels(page.locator("#loss-plot").screenshot()) > 50, "the loss curve is drawn")
        # the picker follows the run's end by itself, no Refresh
        deadline = time.time() + 10
        while "finished" not in page.locator("#run-pick input[role=combobox]").input_value() and time.time() < deadline:
            page.wait_for_timeout(300)
        assert "finished" in page.locator("#run-pick input[role=combobox]").input_value()
        # the log box shows its newest line
        ui.until(lambda: page.locator("#log textarea").evaluate("e => e.scrollHeight - e.scrollTop - e.clientHeight < 4"),
                 "the log box follows its newest line")
        ui.shot("2-train", "progress")

        # 3. Outputs: the finished run is listed without Refresh; download its LoRA; it loads in diffusers
        ui.tab("Outputs")
        ui.wait_text("outputs-table", r"finished", timeout=15)
        ui.choose("out-run", re.compile(r"\d{8}-\d{6}"))  # the one run
        page.wait_for_timeout(1500)
        with page.expect_download() as dl:
            ui.click("out-download")
        target = tmp_path / "downloaded.safetensors"
        assert re.fullmatch(r"lora-\d{8}-\d{6}-\w+\.safetensors", dl.value.suggested_filename), dl.value.suggested_filename
        dl.value.save_as(target)
        ui.shot("3-outputs")
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1)
        pipe.load_lora_weights(str(target), adapter_name="dl")
        assert "dl" in pipe.get_list_adapters()["unet"]

        # 4. Preview: strength 0 and 1 with one seed differ; a strength grid renders
        ui.tab("Preview")
        ui.custom("pv-base", str(tiny_sd1))
        ui.click("pv-refresh")
        page.wait_for_timeout(500)
        # a bad LoRA file next to good ones: its message, and the pickers keep working
        broken = tmp_path / "broken.safetensors"
        broken.write_bytes(b"this is not a safetensors file")
        page.locator("#pv-add input[type=file]").set_input_files(str(broken))
        ui.wait_text("pv-status", r"Not added:")
        ui.choose("pv-lora-0", re.compile(r"final"))
        ui.text("pv-prompt", "zwx, red square")
        ui.text("pv-steps", 2)
        ui.text("pv-width", 64)
        ui.text("pv-height", 64)
        def generate() -> Path:
            before = set((ws / "previews").glob("*.png"))
            ui.click("pv-generate")
            deadline = time.time() + 180
            while not (set((ws / "previews").glob("*.png")) - before) and time.time() < deadline:
                page.wait_for_timeout(500)
            new = set((ws / "previews").glob("*.png")) - before
            if len(new) != 1:
                ui.shot("failed-preview")
            assert len(new) == 1, "no preview image was written: " + page.locator("#pv-status").inner_text()
            ui.wait_text("pv-status", r"Done \(seed 1234\)")
            return new.pop()

        results = []
        for strength in (0, 1):
            ui.text("pv-strength-0", strength)
            results.append(generate())
        import numpy as np
        from PIL import Image

        a, b = (np.asarray(Image.open(p), dtype=np.float32) for p in results)
        assert np.abs(a - b).mean() > 0, "strength 0 and 1 must differ"
        page.get_by_label("Strength grid").check()
        grid_png = generate()
        assert "strength_grid" in grid_png.name and Image.open(grid_png).size[0] == 5 * 64
        page.locator("#pv-gallery img").first.wait_for(state="visible")
        ui.shot("4-preview", "pv-gallery")

        # 5. A second, longer run: reload the page mid-run and see the live view re-attach
        ui.tab("Train")
        # (long enough that only Stop ends it: 400 steps took 53 s here, less than a reload under load)
        ui.text("f-max_steps", 4000)
        page.get_by_text("Advanced", exact=True).click()  # closed again since the reload
        ui.text("f-seed", 7)
        ui.click("start")
        ui.wait_text("progress", r"step [1-9]\d*/4000", timeout=180)
        page.reload()
        ui.tab("Train")  # no clicks needed: the reloaded page selects the running run by itself
        first = ui.wait_text("progress", r"step \d+/4000")
        n1 = int(re.search(r"step (\d+)/4000", first).group(1))
        ui.wait_text("progress", rf"step (?!{n1}/)\d+/4000")  # it keeps moving after the reload
        ui.shot("5-reattached")
        ui.click("stop")
        ui.wait_text("progress", "stopped", timeout=120)

        # 6. Compare settings: two ranks make two variants, the panel says what they need, the check plans the sweep
        page.locator("#compare").get_by_text("Compare settings").click()
        ui.text("cmp-first-values", "4, 8")
        ui.click("cmp-make")
        ui.until(lambda: page.locator("#f-variants textarea").input_value() == "rank = 4\nrank = 8",
                 "the variants box holds one line per rank")
        ui.wait_text("cmp-note", r"2 variants in one run: about [\d.]+ GB projected for the card", timeout=30)
        ui.click("check")
        ui.wait_text("preflight", r"Compares 2 variants in one run")
        browser.close()

    docs = ROOT / "docs" / "screenshots"
    if os.environ.get("UPDATE_SCREENSHOTS"):
        docs.mkdir(parents=True, exist_ok=True)
        for src, dst in (("1-dataset", "dataset"), ("2-train", "train"), ("3-outputs", "outputs"), ("4-preview", "preview")):
            shutil.copyfile(ARTIFACTS / f"{src}.png", docs / f"{dst}.png")


def test_auto_caption_in_a_real_browser(app_url, tmp_path):
    """Dataset tab: preview the first captions of a tiny BLIP, caption the dataset, see the report count them,
    and find the model remembered in Settings."""
    from captioners import tiny_blip

    url, ws = app_url
    model = tiny_blip(tmp_path / "tiny-blip")
    make_images(ws / "datasets" / "d", 3, size=(64, 64), caption=None)
    with dataset_page(url, "d", 3) as (page, ui):
        ui.custom("cap-model", str(model))
        ui.text("cap-trigger", "zwx")
        ui.click("cap-preview")
        ui.wait_text("cap-progress", r"Preview of d finished: Previewed 3 caption", timeout=180)
        ui.wait_text("cap-table", r"zwx, ")
        assert not list((ws / "datasets" / "d").glob("*.txt"))  # a preview writes nothing
        ui.click("cap-start")
        ui.wait_text("cap-progress", r"Captioning of d finished: Wrote 3 caption\(s\) with tiny-blip", timeout=180)
        ui.wait_text("ds-report", r"3 by the captioner \(unedited\), 0 by hand")
        ui.shot("6-auto-caption", "cap-progress")
        assert all(p.read_text().startswith("zwx, ") for p in (ws / "datasets" / "d").glob("*.txt"))
        ui.tab("Settings")
        assert page.locator("#settings-caption-model textarea, #settings-caption-model input").first.input_value() == str(model)


def test_tagging_and_undoing_a_tag_replace_in_a_real_browser(app_url, tmp_path):
    """Dataset tab: a WD tagger (a tiny ONNX one, tests/captioners.py) tags the dataset through the worker, with
    its own options shown; the Tags table counts the tags, a click shows a tag's images, a replace changes every
    caption and *Undo last bulk edit* puts them back."""
    from PIL import Image
    from playwright.sync_api import expect

    from captioners import COLOURS, tiny_tagger

    url, ws = app_url
    model = tiny_tagger(tmp_path / "wd-tiny-tagger")
    folder = ws / "datasets" / "t"
    folder.mkdir(parents=True)
    for i, c in enumerate(("red", "red", "green")):
        Image.new("RGB", (48, 48), COLOURS[c]).save(folder / f"img{i}.png")
    with dataset_page(url, "t", 3) as (page, ui):
        expect(page.locator("#cap-general")).to_be_hidden()  # BLIP is chosen: no tagger options
        ui.custom("cap-model", str(model))
        expect(page.locator("#cap-general")).to_be_visible()
        ui.text("cap-blacklist", "simple background")
        ui.click("cap-start")
        ui.wait_text("cap-progress", r"Captioning of t finished: Wrote 3 caption\(s\) with wd-tiny-tagger", timeout=180)
        red = (folder / "img0.txt").read_text().split(", ")
        assert "red background" in red and "hero (series)" in red and "simple background" not in red
        page.get_by_text("Tags", exact=True).click()
        ui.wait_text("ds-tag-table", r"red background")
        ui.shot("7-tags", "ds-tag-table")
        page.locator("#ds-tag-table [role=gridcell]").filter(has_text=re.compile(r"^\s*red background\s*$")).first.click()
        ui.until(lambda: page.locator("#ds-tag-gallery img").count() == 2, "the tag's two images are shown")
        before = {p.name: p.read_text() for p in folder.glob("*.txt")}
        ui.choose("ds-tag-op", "Replace a tag")
        ui.text("ds-tag-a", "red background")
        ui.text("ds-tag-b", "crimson backdrop")
        ui.click("ds-tag-apply")
        ui.wait_text("ds-status", r"Changed 2 caption\(s\)")
        assert "crimson backdrop" in (folder / "img1.txt").read_text()
        ui.wait_text("ds-tag-table", r"crimson backdrop")
        ui.click("ds-undo")
        ui.wait_text("ds-status", r"Undid the last bulk edit \(replace a tag 'red background' -> 'crimson backdrop'\): "
                                  r"2 caption\(s\) back")
        assert {p.name: p.read_text() for p in folder.glob("*.txt")} == before
