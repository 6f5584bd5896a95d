"""Training quality tools (issue 17): class images, validation loss, masked loss, timestep range, folder
captions, TensorBoard, and kohya_ss import of each. Real training on tiny random-weight models."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import base_config, make_images
from trainer.cli import main as cli
from trainer.events import read_events
from trainer.engine.loop import batch_iterator, batch_loss, micro_step
from trainer.engine.setup import setup
from trainer.models import lora


def run_cli(cfg, tmp_path) -> int:
    path = tmp_path / f"cfg_{len(list(tmp_path.glob('cfg_*')))}.toml"
    cfg.save(path)
    return cli(["train", str(path)])


def grads(run) -> list[torch.Tensor]:
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for m in run.trainable for p in lora.lora_parameters(m)]


# ------------------------------------------------------------------------------------------ masked loss
def test_a_fully_masked_image_contributes_no_gradient(tiny_sd1, tmp_path):
    data = tmp_path / "d"
    img = make_images(data, 1, size=(64, 64))[0]
    (data / "masks").mkdir()
    Image.new("L", (64, 64), 0).save(data / "masks" / img.name)  # black: ignore everything
    cfg = base_config(tiny_sd1, data, tmp_path / "run", masked_loss=True, train_text_encoder=False)
    run = setup(cfg, tmp_path / "run", echo=lambda m: None)
    assert len(run.data.items) == 1  # masks/ is not read as training images
    batch = next(batch_iterator(run, 0))
    assert batch["mask"].shape == (1, 1, 8, 8) and float(batch["mask"].max()) == 0.0
    loss = batch_loss(run, batch, [torch.Generator().manual_seed(0)])
    loss.backward()
    assert float(loss) == 0.0 and all(float(g.abs().max()) == 0.0 for g in grads(run))
    # the same image unmasked does push the LoRA
    run.optimizer.zero_grad(set_to_none=True)
    batch_loss(run, {**batch, "mask": torch.ones_like(batch["mask"])}, [torch.Generator().manual_seed(0)]).backward()
    assert any(float(g.abs().max()) > 0 for g in grads(run))


def test_masks_come_from_alpha_or_a_masks_file_with_the_images_crop_and_flip(tmp_path):
    from trainer.data.masks import mask_source, mask_tensor

    root = tmp_path / "d"
    root.mkdir()
    rgba = np.zeros((64, 128, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[:, :32, 3] = 0  # left quarter transparent
    Image.fromarray(rgba, "RGBA").save(root / "a.png")
    Image.new("RGB", (64, 64), "red").save(root / "b.png")
    (root / "masks").mkdir()
    half = np.zeros((64, 64), np.uint8)
    half[:32] = 255  # top half learns
    Image.fromarray(half, "L").save(root / "masks" / "b.png")
    Image.new("RGB", (64, 64), "red").save(root / "c.png")
    assert [mask_source(root / n, root) for n in ("a.png", "b.png", "c.png")] == ["alpha", "file", None]
    m = mask_tensor(root / "a.png", root, (128, 64), False)[0]
    assert m.shape == (8, 16) and float(m[:, :4].max()) == 0.0 and float(m[:, 4:].min()) == 1.0
    flipped = mask_tensor(root / "a.png", root, (128, 64), True)[0]
    assert torch.equal(flipped, m.flip(-1))
    b = mask_tensor(root / "b.png", root, (64, 64), False)[0]
    assert float(b[:4].min()) == 1.0 and float(b[4:].max()) == 0.0
    assert float(mask_tensor(root / "c.png", root, (64, 64), False).min()) == 1.0


def test_the_dataset_report_counts_masks(tmp_path):
    from trainer.data.report import dataset_report, format_report

    d = tmp_path / "d"
    imgs = make_images(d, 3)
    (d / "masks").mkdir()
    Image.new("L", (64, 64), 255).save(d / "masks" / imgs[0].name)
    rep = dataset_report(d, 64)
    assert rep["image_count"] == 3 and rep["masks"] == {"file": 1, "alpha": 0}
    assert "masks for masked loss: 1 image(s) (1 from masks/, 0 from alpha)" in format_report(rep)


# ------------------------------------------------------------------------------------------ class images
def test_class_images_add_their_weighted_gradient_to_every_step(tiny_sd1, tmp_path):
    """Prior preservation as in kohya / DreamBooth: each step's gradient is that of loss + w * class loss."""
    data, reg = tmp_path / "d", tmp_path / "reg"
    make_images(data, 2)
    make_images(reg / "1_person", 3, caption=None, seed=5)
    w = 0.7
    cfg = base_config(tiny_sd1, data, tmp_path / "run", reg_dataset=str(reg), prior_loss_weight=w,
                      train_text_encoder=False, gradient_accumulation=2, class_caption="a photo of a person")
    run = setup(cfg, tmp_path / "run", echo=lambda m: None)
    assert run.info["num_reg_images"] == 3 and run.data.reg.fixed_captions()[0] == "a photo of a person"
    batches = batch_iterator(run, 0)
    batch = next(batches)
    assert set(batch) == {"train", "reg"} and len(batch["reg"]["caption"]) == 1  # each step sees both
    from trainer.engine.loop import sample_generators

    batch_loss(run, batch["train"], sample_generators(cfg.seed, 0, batch["train"]["slot"])).backward()
    train_only = grads(run)
    run.optimizer.zero_grad(set_to_none=True)
    batch_loss(run, batch["reg"], sample_generators(cfg.seed, 0, batch["reg"]["slot"], 7)).backward()
    reg_only = grads(run)
    run.optimizer.zero_grad(set_to_none=True)
    micro_step(run, batch, 0)  # the first of two accumulated micro-steps: gradients stay, no optimizer step
    got = grads(run)
    assert any(float(r.abs().max()) > 0 for r in reg_only)
    for a, b, c in zip(got, train_only, reg_only):
        torch.testing.assert_close(a, (b + w * c) / 2, atol=1e-6, rtol=1e-4)  # accelerate divides by the accumulation


def test_class_images_train_and_say_so_in_the_file(tiny_sd1, tmp_path):
    from safetensors import safe_open

    data, reg = tmp_path / "d", tmp_path / "reg"
    make_images(data, 2)
    make_images(reg / "2_person", 2, caption="a photo of a person", seed=3)
    out = tmp_path / "run"
    assert run_cli(base_config(tiny_sd1, data, out, max_steps=3, reg_dataset=str(reg)), tmp_path) == 0
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["ss_num_reg_images"] == "4" and md["ss_prior_loss_weight"] == "1.0"
    assert str(tmp_path) not in md["ss_lora_studio_config"]  # the class folder by name only


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.slow  # a longer training: the full suite runs it, the fast tier does not
def test_validation_loss_of_a_run_that_learns_falls_and_is_reproducible(tiny_sd1, tmp_path):
    data = tmp_path / "concept"
    make_images(data, 6, size=(64, 64), caption="red square on blue", concept=True)
    out = tmp_path / "run"
    cfg = base_config(tiny_sd1, data, out, max_steps=40, rank=8, alpha=8, unet_lr=3e-3, train_text_encoder=False,
                      validation_split=0.34, validation_every_steps=10)
    assert run_cli(cfg, tmp_path) == 0
    events, _ = read_events(out)
    held = next(e for e in events if e.get("message", "").startswith("Validation: 2 image(s) held out"))
    vals = [e for e in events if e["type"] == "validation"]
    assert [e["step"] for e in vals] == [10, 20, 30, 40] and all(e["images"] == 2 for e in vals)
    assert vals[-1]["loss"] < vals[0]["loss"], vals
    progress = [e for e in events if e["type"] == "progress"]
    assert max(e["epoch"] for e in progress) >= 1 and held
    # the same data and seed hold out the same images, and the same weights measure the same loss
    again = tmp_path / "again"
    assert run_cli(cfg.replace(output_dir=str(again), max_steps=10), tmp_path) == 0
    ev2, _ = read_events(again)
    assert next(e for e in ev2 if e.get("message", "").startswith("Validation:"))["message"] == held["message"]
    assert next(e for e in ev2 if e["type"] == "validation")["loss"] == pytest.approx(vals[0]["loss"], rel=1e-6)


def test_a_validation_folder_and_an_impossible_split(tiny_sd1, tmp_path):
    data, val = tmp_path / "d", tmp_path / "val"
    make_images(data, 2)
    make_images(val, 1, seed=9)
    out = tmp_path / "run"
    assert run_cli(base_config(tiny_sd1, data, out, max_steps=2, validation_dataset=str(val)), tmp_path) == 0
    vals = [e for e in read_events(out)[0] if e["type"] == "validation"]
    assert [(e["step"], e["images"]) for e in vals] == [(2, 1)]  # at the end (no checkpoints in between)
    one, bad = tmp_path / "one", tmp_path / "bad"
    make_images(one, 1)
    assert run_cli(base_config(tiny_sd1, one, bad, validation_split=0.5, max_steps=2), tmp_path) != 0
    err = [e for e in read_events(bad)[0] if e["type"] == "error"][-1]["message"]
    assert "would hold out all 1 image(s)" in err


# ------------------------------------------------------------------------------------------ timesteps, folder captions
def test_timesteps_stay_in_the_chosen_range(tiny_sd1, dataset, tmp_path):
    cfg = base_config(tiny_sd1, dataset, tmp_path / "run", min_timestep=700, max_timestep=720, batch_size=2)
    run = setup(cfg, tmp_path / "run", echo=lambda m: None)
    seen = []
    run.model.unet.register_forward_pre_hook(lambda mod, args: seen.append(args[1].clone()))
    batches = batch_iterator(run, 0)
    for micro in range(4):
        micro_step(run, next(batches), micro)
    t = torch.cat(seen)
    assert len(t) == 8 and int(t.min()) >= 700 and int(t.max()) < 720


def test_captions_from_kohya_folder_names(tmp_path):
    from trainer.data.scan import folder_caption, scan_dataset
    from trainer.events import EventLog
    from trainer.engine.setup import scan_for_training

    d = tmp_path / "d"
    make_images(d / "10_zwx woman", 1, caption=None)
    make_images(d / "3_ohwx", 1)  # has a caption file: kept
    make_images(d / "loose", 1, caption=None)  # no '<repeats>_' name: nothing to take
    cfg = base_config(tmp_path, d, tmp_path / "o", caption_from_folder=True)
    items = {it.subset: it.caption for it in scan_for_training(cfg, EventLog(tmp_path / "o", enabled=False)).items}
    assert items == {"10_zwx woman": "zwx woman", "3_ohwx": (d / "3_ohwx" / "img0.txt").read_text(), "loose": None}
    assert folder_caption(scan_dataset(d).items[0]) == "zwx woman"
    off = {it.subset: it.caption for it in scan_for_training(cfg.replace(caption_from_folder=False),
                                                             EventLog(tmp_path / "o", enabled=False)).items}
    assert off["10_zwx woman"] is None


# ------------------------------------------------------------------------------------------ TensorBoard
@pytest.mark.slow  # a longer training: the full suite runs it, the fast tier does not
def test_tensorboard_event_files_appear_when_enabled(tiny_sd1, dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert run_cli(base_config(tiny_sd1, dataset, out, max_steps=3, log_every_steps=1, tensorboard=True, validation_split=0.25,
                               sample_every_steps=0, sample_prompts=["zwx"], sample_steps=1), tmp_path) == 0
    files = list((out / "tensorboard").rglob("events.out.tfevents*"))
    assert files
    acc = EventAccumulator(str(files[0].parent))
    acc.Reload()
    assert {"loss", "lr", "val_loss"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]
    assert acc.Tags()["images"]  # the final samples
    off = tmp_path / "off"
    assert run_cli(base_config(tiny_sd1, dataset, off, max_steps=1), tmp_path) == 0
    assert not (off / "tensorboard").exists()


# ------------------------------------------------------------------------------------------ kohya_ss import
def test_kohya_import_maps_every_quality_setting_and_drops_nothing_silently():
    from trainer.recipe.config import TrainConfig
    from trainer.recipe.kohya_ss import import_kohya

    mapped, notes = import_kohya({
        "reg_data_dir": "/kohya/reg", "prior_loss_weight": 0.5, "min_timestep": 100, "max_timestep": 900,
        "masked_loss": True, "logging_dir": "/kohya/logs", "log_with": "tensorboard", "validation_split": 0.1,
        "validate_every_n_steps": 50, "train_data_dir": "/kohya/img", "pretrained_model_name_or_path": "/m.safetensors",
    })
    assert mapped == {"reg_dataset": "/kohya/reg", "prior_loss_weight": 0.5, "min_timestep": 100, "max_timestep": 900,
                      "masked_loss": True, "tensorboard": True, "validation_split": 0.1, "validation_every_steps": 50}
    text = " ".join(notes)
    assert "reg_data_dir" in text and "logging_dir" in text
    assert "pretrained_model_name_or_path" in text and "train_data_dir" in text  # kept the person's own, and said so
    TrainConfig.from_dict(mapped)
    _, notes = import_kohya({"log_with": "wandb"})
    assert any("only TensorBoard" in n for n in notes)


def test_preflight_checks_the_class_and_validation_folders(tiny_sd1, tmp_path):
    from app.forms import preflight

    data = tmp_path / "d"
    make_images(data, 2)
    ok, text = preflight({"base_model": str(tiny_sd1), "dataset": str(data), "resolution": 64,
                          "reg_dataset": str(tmp_path / "nope"), "validation_dataset": str(tmp_path / "nada")})
    assert not ok and "Class-image folder not found" in text and "Validation folder not found" in text
    shutil.copytree(data, tmp_path / "reg")
    ok, text = preflight({"base_model": str(tiny_sd1), "dataset": str(data), "resolution": 64, "masked_loss": True,
                          "reg_dataset": str(tmp_path / "reg")})
    assert ok and "2 class image(s)" in text and "none of the images has a mask" in text


def test_the_page_plots_validation_beside_training_and_names_the_best_checkpoint(tiny_sd1, tmp_path):
    from app.runs import RunView
    from app.tabs.train import progress_markdown

    data = tmp_path / "concept"
    make_images(data, 6, size=(64, 64), caption="red square on blue", concept=True)
    out = tmp_path / "run"
    assert run_cli(base_config(tiny_sd1, data, out, max_steps=6, save_every_steps=2, keep_last=0, tensorboard=True,
                               validation_split=0.34, train_text_encoder=False), tmp_path) == 0
    v = RunView()
    v.fold(read_events(out)[0])
    assert [s for s, _ in v.val_losses] == [2, 4, 6]  # with each checkpoint and at the end
    step, loss = v.best_checkpoint()
    assert loss == min(x for _, x in v.val_losses) and (out / "checkpoints" / f"step-{step:06d}").is_dir()
    text = progress_markdown({"id": "r", "dir": str(out)}, v)
    assert f"lowest validation loss among the checkpoints: step {step}" in text
    assert f'tensorboard --logdir "{out / "tensorboard"}"' in text
