"""The WD tagger through onnxruntime, with a tiny ONNX tagger built here (tests/captioners.py: made-up tags of all
three categories), and the tag tools: frequency, bulk tag edits and their undo."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioners import COLOURS, expected, tiny_tagger
from trainer.data.report import dataset_report
from trainer.engine.autocaption import CaptionError, CaptionOptions, caption_dataset
from trainer.engine.tagger import Tagger, TagOptions, prepare, tag_text


@pytest.fixture(scope="module")
def tagger(tmp_path_factory) -> Path:
    return tiny_tagger(tmp_path_factory.mktemp("tagger") / "wd-tiny-tagger")


def colour_set(folder: Path, colours=("red", "green", "blue"), captions=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(colours):
        Image.new("RGB", (40, 40), COLOURS[c]).save(folder / f"img{i}_{c}.png")
        if captions and captions[i] is not None:
            (folder / f"img{i}_{c}.txt").write_text(captions[i])
    return folder


def words(tags: list[str]) -> list[str]:
    return [tag_text(t, keep_underscores=False) for t in tags]


def test_preprocessing_is_the_publishers():
    """White under transparency and around the image (padded to a centred square), resized, BGR, 0-255 floats."""
    img = Image.new("RGBA", (4, 2), (255, 0, 0, 255))
    img.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent: white
    a = prepare(img, 4)
    assert a.shape == (4, 4, 3) and a.dtype == np.float32
    assert a[1, 1].tolist() == [0.0, 0.0, 255.0]  # red in BGR, not normalised
    assert a[1, 0].tolist() == [255.0, 255.0, 255.0]  # the transparent pixel
    assert a[0].tolist() == [[255.0] * 3] * 4 and a[3].tolist() == [[255.0] * 3] * 4  # padding rows, top and bottom
    assert prepare(Image.new("RGB", (30, 10), (0, 255, 0)), 8).shape == (8, 8, 3)


def test_thresholds_categories_ratings_blacklist_underscores_and_cap(tagger):
    images = [Image.new("RGB", (24, 24), COLOURS[c]) for c in COLOURS]
    got = Tagger(tagger, "cpu").caption(images)
    assert got == [", ".join(words(expected(c))) for c in COLOURS]
    red = got[0].split(", ")
    assert "hero (series)" in red and "villain" not in red  # character 0.92 kept, 0.69 under 0.85
    assert "^_^" in red and "red background" in red  # emoticons keep their underscore, long tags lose it
    assert not {"general", "sensitive"} & set(red)  # ratings only when asked
    opts = TagOptions(general_threshold=0.8, character_threshold=0.5, ratings=True, blacklist="red background, ^_^",
                      keep_underscores=True, max_tags=4)
    strict = Tagger(tagger, "cpu", opts).caption(images[:1])[0].split(", ")
    want = [t for t in expected("red", 0.8, 0.5, ratings=True) if t not in ("red_background", "^_^")][:4]
    assert strict == want and "general" in strict and "villain" in strict
    with pytest.raises(Exception, match="between 0 and 1"):
        TagOptions(general_threshold=1.5).check()


def test_a_fixed_batch_export_and_a_mismatched_tag_list(tmp_path):
    one = tiny_tagger(tmp_path / "batch1", size=8, batch=1)
    images = [Image.new("RGB", (8, 8), COLOURS[c]) for c in COLOURS]
    assert Tagger(one, "cpu").caption(images) == [", ".join(words(expected(c))) for c in COLOURS]
    (one / "selected_tags.csv").write_text("tag_id,name,category,count\n0,solo,0,1\n")
    with pytest.raises(Exception, match="not from the same tagger"):
        Tagger(one, "cpu")


def test_modes_trigger_provenance_preview_and_cancel_through_the_captioning_run(tagger, tmp_path):
    ds = colour_set(tmp_path / "d", captions=[None, "solo, my own words", None])
    events = []
    done = caption_dataset(ds, CaptionOptions(model=str(tagger), trigger="zwx", batch_size=2), events.append)
    assert done["written"] == 2 and "wd-tiny-tagger" in done["message"]
    assert (ds / "img0_red.txt").read_text() == "zwx, " + ", ".join(words(expected("red")))
    assert (ds / "img1_green.txt").read_text() == "solo, my own words"  # missing mode: a person's caption stays
    assert [e for e in events if e["type"] == "progress"][-1]["images_per_s"] > 0
    assert dataset_report(ds)["captions_by"] == {"captioner": 2, "hand": 1}

    caption_dataset(ds, CaptionOptions(model=str(tagger), mode="append"), lambda e: None)
    green = (ds / "img1_green.txt").read_text().split(", ")
    assert green[:3] == ["solo", "my own words", *[t for t in words(expected("green")) if t != "solo"][:1]]
    assert green.count("solo") == 1  # a tag the caption already has is not added twice

    shown = []
    caption_dataset(ds, CaptionOptions(model=str(tagger), mode="overwrite"), shown.append, preview=2)
    assert (ds / "img0_red.txt").read_text().startswith("zwx, ")  # a preview writes nothing
    assert [e["caption"] for e in shown if e["type"] == "caption"][0] == ", ".join(words(expected("red")))

    progress = []
    done = caption_dataset(ds, CaptionOptions(model=str(tagger), mode="overwrite", batch_size=1),
                           lambda e: progress.append(e) if e["type"] == "progress" else None,
                           should_stop=lambda: len(progress) >= 2)  # the start, then one batch
    assert done["stopped"] and done["written"] == 1 and "cancelled" in done["message"]
    assert (ds / "img0_red.txt").read_text() == ", ".join(words(expected("red")))  # overwritten, trigger gone
    assert (ds / "img2_blue.txt").read_text().startswith("zwx, ")  # not reached: kept


def test_a_folder_without_the_two_files_gets_one_sentence(tagger, tmp_path):
    half = tmp_path / "half"
    half.mkdir()
    (half / "model.onnx").write_bytes((tagger / "model.onnx").read_bytes())
    ds = colour_set(tmp_path / "d", ("red",))
    with pytest.raises(CaptionError, match=r"lacks selected_tags.csv: a WD tagger folder holds both"):
        caption_dataset(ds, CaptionOptions(model=str(half)), lambda e: None)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CaptionError, match=r"neither a captioning model \(config.json\) nor a WD tagger"):
        caption_dataset(ds, CaptionOptions(model=str(empty)), lambda e: None)
    (half / "selected_tags.csv").write_text("tag_id,name,category,count\n0,solo,0,1\n")
    (half / "model.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(CaptionError, match="does not load in onnxruntime"):
        caption_dataset(ds, CaptionOptions(model=str(half)), lambda e: None)


def test_the_caption_command_passes_the_tagger_options(tagger, tmp_path, capsys):
    from trainer.cli import main

    ds = colour_set(tmp_path / "d", ("red",))
    assert main(["caption", str(ds), "--model", str(tagger), "--blacklist", "red_background", "--max-tags", "2",
                 "--ratings", "--general-threshold", "0.5"]) == 0
    want = [t for t in words(expected("red", 0.5, ratings=True)) if t != "red background"][:2]
    assert (ds / "img0_red.txt").read_text() == ", ".join(want)
    assert "Wrote 1 caption(s) with wd-tiny-tagger" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------- tag tools
def test_tag_edits_each_do_one_thing():
    from trainer.data.tags import edit, frequency

    cap = "zwx, long_hair, solo, Long Hair, smile"
    assert edit(cap, "replace", "long hair", "blonde hair") == "zwx, blonde hair, solo, blonde hair, smile"
    assert edit(cap, "remove", "solo, smile") == "zwx, long_hair, Long Hair"
    assert edit(cap, "merge", "long_hair, smile", "hair") == "zwx, hair, solo"
    assert edit(cap, "front", "smile") == "smile, zwx, long_hair, solo, Long Hair"
    assert edit(cap, "dedupe") == "zwx, long_hair, solo, smile"
    assert edit(cap, "remove", "absent") == cap  # nothing to do: the caption is left byte for byte
    table = frequency([cap, "solo, 1girl", None, "1girl"])
    assert table == [("1girl", 2), ("solo", 2), ("long_hair", 1), ("smile", 1), ("zwx", 1)]  # once per caption


def test_bulk_tag_edits_count_what_changed_and_undo_puts_the_captions_back(tmp_path):
    from app.services import Studio
    from app.tabs.dataset import DatasetTab
    from app.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    folder = ws.dataset_path("d", create=True)
    colour_set(folder, captions=["long_hair, solo", "solo, smile, solo, solo_focus", None])
    tab = DatasetTab(Studio(ws, None, None))
    assert tab.tag_table("d") == [["solo", 2], ["long_hair", 1], ["smile", 1], ["solo_focus", 1]]
    assert [Path(p).name for p, _ in tab.with_tag("d", "solo")] == ["img0_red.png", "img1_green.png"]
    assert tab.bulk("d", "replace", "solo", "").startswith("Give the new tag")  # said, nothing changed
    assert tab.bulk("d", "replace", "solo", "1girl") == "Changed 2 caption(s) (*Undo last bulk edit* puts them back)."
    assert (folder / "img1_green.txt").read_text() == "1girl, smile, 1girl, solo_focus"  # the tag, not the text
    assert tab.bulk("d", "dedupe").startswith("Changed 1 caption(s)")  # the last bulk edit is now this one
    assert tab.bulk("d", "trigger", "zwx").startswith("Changed 3 caption(s)")  # the old bulk actions undo too
    assert (folder / "img2_blue.txt").read_text() == "zwx"
    (folder / "img0_red.txt").write_text("my own edit")  # a caption changed after the bulk edit
    msg = tab.undo_bulk("d")
    assert "add trigger 'zwx'" in msg and "2 caption(s) back" in msg and "1 changed since were kept" in msg
    assert not (folder / "img2_blue.txt").exists()  # it had no caption before: it has none again
    assert (folder / "img0_red.txt").read_text() == "my own edit"
    assert (folder / "img1_green.txt").read_text() == "1girl, smile, solo_focus"  # as after the dedupe
    assert tab.undo_bulk("d") == "No bulk edit to undo."  # one level: the last bulk edit
    assert sorted(p.name for p in folder.glob("*.png")) == ["img0_red.png", "img1_green.png", "img2_blue.png"]
