"""The page a person lives in (issue 19): what the Dataset and Outputs tabs do with what a person gives them."""
from __future__ import annotations

import shutil

import pytest

from conftest import make_images
from trainer.data.importer import import_sources
from trainer.data.report import dataset_report, format_report


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
    from app.tabs.dataset import DatasetTab
    from app.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    d = ws.dataset_path("d", create=True)
    make_images(d, 2)
    make_images(d / "more", 1, caption=None)
    shutil.move(str(d / "more" / "img0.png"), str(d / "bare.png"))
    msg = DatasetTab(ws).bulk("d", "trigger", "zwx")
    assert msg == "Changed 3 caption(s)."
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

    from trainer.preview import grid, label_font

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
