"""Dataset pipeline on real files made here: bad images, odd names, kohya folders, zips, buckets, caches."""
from __future__ import annotations

import io
import math
import random
import struct
import zipfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import base_config, make_images
from trainer.cli import main as cli
from trainer.data.buckets import assign_bucket, make_buckets
from trainer.data.cache import LatentCache, vae_fingerprint
from trainer.data.captions import CaptionOptions, build_caption, tag_frequency, with_triggers
from trainer.data.images import ImageProblem, load_rgb, probe
from trainer.data.importer import import_sources, save_caption
from trainer.data.report import dataset_report
from trainer.data.scan import scan_dataset


def png_bytes(size=(32, 24), mode="RGB", color=(10, 200, 30)) -> bytes:
    b = io.BytesIO()
    Image.new(mode, size, color).save(b, "PNG")
    return b.getvalue()


def bomb_png(w=20000, h=20000) -> bytes:
    """A valid PNG header claiming 20000x20000 with almost no data."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")


@pytest.fixture
def zoo(tmp_path):
    """One of each awkward file."""
    d = tmp_path / "zoo"
    d.mkdir()
    good = Image.fromarray((np.random.RandomState(0).rand(40, 60, 3) * 255).astype(np.uint8))
    jpg = io.BytesIO()
    good.save(jpg, "JPEG")
    (d / "truncated.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) // 2])
    (d / "zero.png").write_bytes(b"")
    (d / "text.jpg").write_text("this is not an image")
    Image.fromarray((np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50), "I;16").save(d / "sixteen.png")
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(d / "cmyk.jpg")
    rot = Image.new("RGB", (60, 20), (255, 0, 0))
    exif = rot.getexif()
    exif[0x0112] = 6  # rotate 90: displayed as 20 wide, 60 tall
    rot.save(d / "rotated.jpg", exif=exif)
    pal = Image.new("P", (30, 30))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.info["transparency"] = 0
    pal.save(d / "palette.png", transparency=0)
    (d / "bomb.png").write_bytes(bomb_png())
    good.save(d / "ünïcødé name.webp")
    good.save(d / "plain.bmp")
    return d


def test_scan_skips_bad_files_with_reasons_and_reads_the_rest(zoo):
    res = scan_dataset(zoo)
    names = {it.path.name for it in res.items}
    assert names == {"sixteen.png", "cmyk.jpg", "rotated.jpg", "palette.png", "ünïcødé name.webp", "plain.bmp"}
    reasons = {s.path.name: s.reason for s in res.skipped}
    assert "empty" in reasons["zero.png"]
    assert "not a readable image" in reasons["text.jpg"]
    assert "large" in reasons["bomb.png"]
    assert "truncated" in reasons["truncated.jpg"]
    with pytest.raises(ImageProblem):
        load_rgb(zoo / "truncated.jpg")


def test_decoding_converts_every_mode_to_rgb_and_respects_exif(zoo):
    for name in ("sixteen.png", "cmyk.jpg", "palette.png", "plain.bmp", "ünïcødé name.webp"):
        im = load_rgb(zoo / name)
        assert im.mode == "RGB", name
    assert load_rgb(zoo / "rotated.jpg").size == (20, 60)
    assert probe(zoo / "rotated.jpg") == (20, 60)
    # 16-bit grey is scaled, not clipped to white
    a = np.asarray(load_rgb(zoo / "sixteen.png"))
    assert a.min() < 50 and a.max() > 200
    # transparent palette pixels become white
    assert load_rgb(zoo / "palette.png").getpixel((0, 0)) == (255, 255, 255)


def test_kohya_repeats_folders(tmp_path):
    root = tmp_path / "ds"
    make_images(root / "10_mychar", 3)
    make_images(root / "2_style", 2, seed=1)
    make_images(root / "misc", 1, seed=2)
    res = scan_dataset(root)
    assert res.subsets == {"10_mychar": {"n_repeats": 10, "img_count": 3}, "2_style": {"n_repeats": 2, "img_count": 2},
                           "misc": {"n_repeats": 1, "img_count": 1}}
    assert any("misc" in n and "repeats" in n for n in res.notes)
    rep = dataset_report(root)
    assert rep["images_with_repeats"] == 30 + 4 + 1


def test_import_files_folder_and_zip_copy_and_sanitise(tmp_path, zoo):
    src = tmp_path / "src"
    make_images(src, 2)
    before = {p: p.read_bytes() for p in src.iterdir()}
    ds = tmp_path / "ws" / "mine"
    rep = import_sources([src / "img0.png", src / "img0.txt", src / "img1.png"], ds)
    assert sorted(rep.imported) == ["img0.png", "img1.png"] and rep.captions == 1
    assert (ds / "img0.txt").read_text() == "red square, tag0"
    assert {p: p.read_bytes() for p in src.iterdir()} == before  # originals untouched
    # a second import of the same name (another picture) does not overwrite and does not steal captions
    other = tmp_path / "other" / "img0.png"
    other.parent.mkdir()
    other.write_bytes(png_bytes(color=(1, 2, 3)))
    rep2 = import_sources([other], ds)
    assert rep2.imported == ["img0_2.png"] and not (ds / "img0_2.txt").exists()

    # a zip with nested folders, a kohya folder, hostile names, and junk
    z = tmp_path / "pack.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("deep/nested/a.png", png_bytes(color=(4, 5, 6)))  # distinct pictures: a copy would be skipped
        zf.writestr("deep/nested/a.txt", "cat, sitting")
        zf.writestr("5_person/b.png", png_bytes(color=(7, 8, 9)))
        zf.writestr("../../escape.png", png_bytes(color=(10, 11, 12)))
        zf.writestr("/abs/olute.png", png_bytes(color=(13, 14, 15)))
        zf.writestr("__MACOSX/._a.png", b"junk")
        zf.writestr("bad.png", b"nope")
        zf.writestr("notes.md", b"hello")
    rep3 = import_sources([z], ds)
    assert "a.png" in rep3.imported and "5_person/b.png" in rep3.imported
    assert "escape.png" in rep3.imported and "olute.png" in rep3.imported
    assert (ds / "a.txt").read_text() == "cat, sitting"
    assert not (tmp_path / "escape.png").exists() and not (tmp_path / "ws" / "escape.png").exists()
    skipped = dict(rep3.skipped)
    assert "bad.png" in skipped and "notes.md" in skipped
    for p in ds.rglob("*"):
        assert ds.resolve() in p.resolve().parents

    # the zoo folder: good ones in, each bad one skipped with a reason
    rep4 = import_sources([zoo], tmp_path / "ws" / "zoo")
    skipped = dict(rep4.skipped)
    assert {"zero.png", "text.jpg", "bomb.png"} <= set(skipped)
    assert "ünïcødé name.webp" in rep4.imported


def test_unicode_and_traversal_names_from_a_browser_upload(tmp_path):
    src = tmp_path / "up"
    src.mkdir()
    (src / "x.png").write_bytes(png_bytes())
    ds = tmp_path / "ds"
    from trainer.data.importer import _import_group, ImportReport

    rep = ImportReport()
    _import_group([("../../x.png", lambda: png_bytes(color=(1, 1, 1)), None),
                   ("..\\..\\y.png", lambda: png_bytes(color=(2, 2, 2)), None),
                   ("名前 😀.png", lambda: png_bytes(color=(3, 3, 3)), None)], ds, rep)
    assert sorted(rep.imported) == sorted(["x.png", "y.png", "名前 _.png"]) or len(rep.imported) == 3
    for p in ds.rglob("*"):
        assert ds.resolve() in p.resolve().parents


def test_bucketing_properties():
    for res in (512, 768, 1024):
        buckets = make_buckets(res, 256, 2048, 64)
        for w, h in buckets:
            assert w % 64 == 0 and h % 64 == 0
            assert w * h <= res * res
            if max(w, h) < 2048:  # unless a side is capped by max_side, the area is close to the target
                assert w * h >= res * res * 0.80, (w, h)
        rng = random.Random(0)
        for _ in range(300):
            w, h = rng.randint(100, 5000), rng.randint(100, 5000)
            b = assign_bucket(w, h, buckets)
            assert b in buckets
            # no other bucket has a closer aspect ratio
            best = min(abs(math.log(x / y) - math.log(w / h)) for x, y in buckets)
            assert abs(math.log(b[0] / b[1]) - math.log(w / h)) == pytest.approx(best)
    # no upscale: a small image gets its own smaller bucket
    assert assign_bucket(300, 200, make_buckets(512), no_upscale=True) == (256, 192)


def test_trigger_and_keep_tokens_shuffle():
    assert with_triggers("a cat, sitting", ["zwx"]) == "zwx, a cat, sitting"
    assert with_triggers("zwx, a cat", ["zwx"]) == "zwx, a cat"
    opts = CaptionOptions(triggers=("zwx", "ohwx"), prefix="photo", shuffle_tags=True, keep_tokens=1, tag_dropout=0.3)
    rng = random.Random(0)
    seen = set()
    for _ in range(50):
        tags = build_caption("a cat, sitting, red, blue, green", opts, rng).split(", ")
        assert tags[:4] == ["zwx", "ohwx", "photo", "a cat"]  # triggers, prefix and the first kept tag stay put
        seen.add(tuple(tags[4:]))
    assert len(seen) > 5  # the rest really is shuffled / dropped
    assert build_caption(None, CaptionOptions(triggers=("zwx",), class_caption="a person")) == "zwx, a person"
    drop = CaptionOptions(caption_dropout=0.5)
    outs = [build_caption("a, b", drop, random.Random(i)) for i in range(40)]
    assert "" in outs and "a, b" in outs
    assert tag_frequency(["A, b", " a ,c", None]) == {"a": 2, "b": 1, "c": 1}


def test_report_lists_problems(tmp_path):
    d = tmp_path / "ds"
    make_images(d, 3, size=(64, 64))
    (d / "img2.txt").unlink()
    (d / "dup.png").write_bytes((d / "img0.png").read_bytes())
    (d / "zero.png").write_bytes(b"")
    (d / "img1.txt").write_text("zwx, blue")
    rep = dataset_report(d, resolution=512, trigger="zwx")
    assert rep["image_count"] == 4
    assert rep["missing_captions"] == ["dup.png", "img2.png"]
    assert rep["duplicates"] == [["dup.png", "img0.png"]]
    assert {s["file"] for s in rep["skipped"]} == {"zero.png"}
    assert len(rep["below_resolution"]) == 4
    assert rep["trigger_coverage"] == pytest.approx(1 / 4)
    assert rep["tag_frequency"]["red square"] == 1
    assert sum(rep["buckets"].values()) == 4


def test_dataset_cli(tmp_path, capsys):
    d = tmp_path / "ds"
    make_images(d, 2)
    assert cli(["dataset", str(d), "--trigger", "zwx"]) == 0
    out = capsys.readouterr().out
    assert "2 image(s)" in out and "lack the trigger" in out
    assert cli(["dataset", str(tmp_path / "missing")]) == 2


def test_latent_cache_second_run_does_no_vae_work_and_edits_invalidate(tiny_sd1, tmp_path):
    from diffusers import AutoencoderKL

    from trainer.data.loader import TrainData

    vae = AutoencoderKL.from_pretrained(tiny_sd1, subfolder="vae")
    d = tmp_path / "ds"
    make_images(d, 3)
    cfg = base_config(tiny_sd1, d, tmp_path / "out", flip=True)
    cache = LatentCache(tmp_path / "cache", vae_fingerprint(vae))
    data = TrainData(scan_dataset(d).items, cfg)
    calls = []
    orig = vae.encode
    vae.encode = lambda x: (calls.append(len(x)), orig(x))[1]
    assert cache.fill(vae, data.all_jobs()) == 6  # 3 images, flipped and not
    n_calls = len(calls)
    assert cache.fill(vae, TrainData(scan_dataset(d).items, cfg).all_jobs()) == 0
    assert len(calls) == n_calls  # not a single VAE call on the second run
    # a flipped latent is the flip of the image, not a copy
    h = data.hashes[0]
    a, b = cache.get(h, data.buckets[0], False), cache.get(h, data.buckets[0], True)
    assert not torch.allclose(a, b)
    # edit one image: exactly that one is encoded again
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(d / "img1.png")
    assert cache.fill(vae, TrainData(scan_dataset(d).items, cfg).all_jobs()) == 2


def test_caption_save_is_atomic_and_last_write_wins(tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(png_bytes())
    save_caption(img, "first,  version")
    save_caption(img, "second version\n")
    assert (tmp_path / "a.txt").read_text() == "second version"
    assert not list(tmp_path.glob(".*tmp"))


def test_batch_sampler_shares_each_epoch_between_ranks_as_accelerate_shards_it(tmp_path):
    """The sampler yields every rank's share in turn; accelerate's BatchSamplerShard must hand rank r exactly its
    own shares, so DDP ranks see disjoint images and a resumed sampler continues the same sequence. Two ranks of
    batch 1 take, slot for slot, the batches one process of batch 2 takes (weighted so that the averaged
    gradient is that batch's)."""
    from accelerate.data_loader import BatchSamplerShard

    from trainer.data.loader import BucketBatchSampler, TrainData

    d = tmp_path / "ds"
    make_images(d, 5, size=[(64, 64), (96, 64), (64, 96), (64, 64), (64, 64)])
    cfg = base_config(tmp_path / "m", d, tmp_path / "out", flip=True, max_bucket=128)
    data = TrainData(scan_dataset(d).items, cfg)
    per_epoch = data.micro_per_epoch(2)
    whole = list(BucketBatchSampler(data, 2, 0, 3 * per_epoch))
    for rank in (0, 1):
        mine = list(BatchSamplerShard(BucketBatchSampler(data, 2, 0, 3 * per_epoch), 2, rank))
        assert len(mine) == 3 * per_epoch and all(key[1] == rank or key[4] == 0 for b in mine for key in b)
        assert mine == whole[rank::2]
    for epoch in range(3):  # within an epoch the ranks never see the same (image, flip) entry twice
        keys = [(k[2], k[3]) for b in whole[2 * epoch * per_epoch : 2 * (epoch + 1) * per_epoch] for k in b if k[4]]
        assert len(keys) == len(set(keys)) == 5
    one = TrainData(scan_dataset(d).items, base_config(tmp_path / "m", d, tmp_path / "out", flip=True,
                                                       max_bucket=128, batch_size=2))
    assert one.micro_per_epoch(1) == per_epoch
    assert any(k[4] == 0 for b in whole for k in b)  # an odd bucket's last batch: the second rank pads, at weight 0
    single = list(BucketBatchSampler(one, 1, 0, 3 * per_epoch))
    for micro, batch in enumerate(single):
        group = [k for k in whole[2 * micro] + whole[2 * micro + 1] if k[4]]
        assert [k[:4] for k in group] == [k[:4] for k in batch]
        assert all(g[4] == 2 * k[4] for g, k in zip(group, batch))  # 2 / size: the two ranks' mean is the batch's
    assert list(BucketBatchSampler(data, 2, 2, 3 * per_epoch)) == whole[4:]
