"""Preview on tiny models: strengths, mixing, grids, hand-built kohya files, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import base_config
from trainer.cli import main as cli
from trainer.models.ldm_names import diffusers_to_sgm
from trainer.models import lora
from trainer.engine.preview import GenParams, LoraSpec, PreviewEngine, PreviewError, handle

P = dict(prompt="zwx, red square", seed=3, steps=2, cfg=5.0, width=64, height=64, sampler="Euler")


def arr(img):
    return np.asarray(img, dtype=np.float32)


def hand_made_kohya(model_dir, family, path, rank=4, alpha=2.0, seed=0, every=3):
    """A kohya LoRA built by hand (as if trained elsewhere): random down/up for some UNet attention and TE modules,
    SGM names for SDXL. Returns {module path: (scale * up @ down)} per part for direct application."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    g = torch.Generator().manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    te = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
    attn, _ = lora.unet_targets(unet)
    tensors, deltas = {}, {"unet": {}, "te": {}}
    lpb = unet.config.layers_per_block
    up_attn = {i: "CrossAttn" in t for i, t in enumerate(unet.config.up_block_types)}
    mods = dict(unet.named_modules())
    for m in attn[::every]:
        w = mods[m].weight
        name = "lora_unet_" + (diffusers_to_sgm(m, lpb, up_attn) if family == "sdxl" else m).replace(".", "_")
        down = torch.randn((rank, *w.shape[1:]), generator=g) * 0.3
        up = torch.randn((w.shape[0], rank, *([1] * (w.dim() - 2))), generator=g) * 0.3
        tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)})
        deltas["unet"][m] = (alpha / rank) * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    tmods = dict(te.named_modules())
    for m in lora.text_encoder_targets(te)[::every]:
        w = tmods[m].weight
        name = ("lora_te1_" if family == "sdxl" else "lora_te_") + ("text_model." + m if not m.startswith("text_model.") else m).replace(".", "_")
        down, up = torch.randn((rank, w.shape[1]), generator=g) * 0.3, torch.randn((w.shape[0], rank), generator=g) * 0.3
        tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)})
        deltas["te"][m] = (alpha / rank) * (up @ down)
    save_file(tensors, str(path))
    return deltas


def engine_for(model_dir):
    e = PreviewEngine("cpu")
    e.set_base(str(model_dir))
    return e


@pytest.mark.slow  # a training or a worker: the fast tier stays under 3 minutes
def test_strength_zero_is_base_one_is_trainer_and_effect_grows(tiny_sd1, dataset, tmp_path):
    out = tmp_path / "run"
    base_config(tiny_sd1, dataset, out, max_steps=6, unet_lr=3e-3).save(tmp_path / "c.toml")
    assert cli(["train", str(tmp_path / "c.toml")]) == 0
    f = str(out / "lora.safetensors")
    e = engine_for(tiny_sd1)
    base = arr(e.generate(GenParams(**P))[0][0])
    imgs = {s: arr(e.generate(GenParams(**P, loras=[LoraSpec(f, s)]))[0][0]) for s in (0.0, 0.5, 1.0)}
    assert np.array_equal(imgs[0.0], base)
    d = {s: np.abs(imgs[s] - base).mean() for s in imgs}
    assert d[0.0] == 0 < d[0.5] < d[1.0]
    # strength 1 equals the trainer's own adapted model
    from test_engine import trainer_pipe

    own, _ = trainer_pipe(tiny_sd1, out, None)
    own.scheduler = e.pipe.scheduler
    ref = own(P["prompt"], num_inference_steps=2, guidance_scale=5.0, width=64, height=64,
              generator=torch.Generator().manual_seed(3)).images[0]
    assert np.abs(arr(ref) - imgs[1.0]).max() <= 1.0  # 8-bit images; same up to rounding


def test_mixing_two_loras_equals_direct_weight_sum(tiny_sd1, tmp_path):
    f1, f2 = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    d1 = hand_made_kohya(tiny_sd1, "sd1", f1, seed=1)
    d2 = hand_made_kohya(tiny_sd1, "sd1", f2, seed=2, alpha=4.0)
    a, b = 0.7, -0.4
    e = engine_for(tiny_sd1)
    e.apply([LoraSpec(str(f1), a), LoraSpec(str(f2), b)])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ehs = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    ids = e.pipe.tokenizer(["zwx cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        got_u = e.pipe.unet(x, 50, ehs).sample
        got_t = e.pipe.text_encoder(ids)[0]
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd1, subfolder="unet")
    te = CLIPTextModel.from_pretrained(tiny_sd1, subfolder="text_encoder")
    um, tm = dict(unet.named_modules()), dict(te.named_modules())
    for dd, w in ((d1, a), (d2, b)):
        for m, delta in dd["unet"].items():
            um[m].weight.data += w * delta
        for m, delta in dd["te"].items():
            tm[m].weight.data += w * delta
    with torch.no_grad():
        want_u, want_t = unet(x, 50, ehs).sample, te(ids)[0]
    assert torch.allclose(got_u, want_u, atol=1e-4)
    assert torch.allclose(got_t, want_t, atol=1e-4)
    # changing strengths reloads nothing
    loaded = dict(e.loaded)
    e.apply([LoraSpec(str(f1), 0.1), LoraSpec(str(f2), 0.2)])
    assert e.loaded == loaded


def test_same_seed_same_image_and_grids_equal_their_singles(tiny_sd1, tmp_path):
    f = tmp_path / "a.safetensors"
    hand_made_kohya(tiny_sd1, "sd1", f)
    e = engine_for(tiny_sd1)
    p = GenParams(**P, loras=[LoraSpec(str(f), 1.0)])
    one, two = arr(e.generate(p)[0][0]), arr(e.generate(p)[0][0])
    assert np.array_equal(one, two)
    strengths = [0.0, 0.5, 1.0]
    g, cells = e.strength_grid(p, 0, strengths)
    for s, c in zip(strengths, cells):
        single = e.generate(GenParams(**P, loras=[LoraSpec(str(f), s)]))[0][0]
        assert np.array_equal(arr(c), arr(single))
    assert g.size[0] == 3 * 64
    cmp, (b, l) = e.compare(p)
    assert np.array_equal(arr(l), one) and np.array_equal(arr(b), arr(e.generate(GenParams(**P))[0][0]))
    for sampler in ("Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "UniPC"):
        assert e.generate(GenParams(**{**P, "sampler": sampler}))[0][0].size == (64, 64)


@pytest.mark.slow  # many generations: the fast tier stays under 3 minutes
def test_a_grid_drawn_as_one_batch_with_an_adapter_per_image_equals_one_at_a_time(tiny_sd1, tmp_path):
    """Variant and checkpoint grids run their cells as batches (peft's adapter_names, an adapter per sample), each
    image with its own generator at the seed: the same images as one generation per cell, up to the order of the
    batch's sums (at most one level of 255, seen with an ancestral sampler), and fewer passes."""
    files = []
    for i in range(2):
        files.append(str(tmp_path / f"l{i}.safetensors"))
        hand_made_kohya(tiny_sd1, "sd1", files[-1], seed=i)
    e = engine_for(tiny_sd1)
    calls = []
    e.pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    for sampler in ("Euler", "Euler a"):
        p = GenParams(**{**P, "sampler": sampler})
        start = len(calls)
        _, alone = e.variant_grid(p, files, ["a", "b"], [0.0, 1.0], batched=False)
        one_each = len(calls) - start
        _, together = e.variant_grid(p, files, ["a", "b"], [0.0, 1.0], batched=True)
        assert 2 * (len(calls) - start - one_each) == one_each  # two cells a batch: half the UNet passes
        for x, y in zip(alone, together):
            assert np.abs(arr(x) - arr(y)).max() <= 1.0
        assert not np.array_equal(arr(together[1]), arr(together[3]))  # each cell its own adapter
        assert np.array_equal(arr(together[0]), arr(together[2]))  # strength 0: both the base
    _, ckpts = e.checkpoint_grid(GenParams(**P), files, ["1", "2"], 0.5)
    _, single = e.checkpoint_grid(GenParams(**P), files, ["1", "2"], 0.5, batched=False)
    assert all(np.abs(arr(x) - arr(y)).max() <= 1.0 for x, y in zip(ckpts, single))


def test_sdxl_kohya_file_with_sgm_names_loads_and_mixes(tiny_sdxl, tmp_path):
    f = tmp_path / "xl.safetensors"
    deltas = hand_made_kohya(tiny_sdxl, "sdxl", f, every=2)
    e = engine_for(tiny_sdxl)
    e.apply([LoraSpec(str(f), 1.0)])
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    um = dict(unet.named_modules())
    for m, delta in deltas["unet"].items():
        um[m].weight.data += delta
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ehs = torch.randn(1, 77, 96, generator=torch.Generator().manual_seed(1))
    cond = {"text_embeds": torch.randn(1, 64), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        assert torch.allclose(e.pipe.unet(x, 50, ehs, added_cond_kwargs=cond).sample,
                              unet(x, 50, ehs, added_cond_kwargs=cond).sample, atol=1e-4)
    img = e.generate(GenParams(**P, loras=[LoraSpec(str(f), 0.5)]))[0][0]
    assert img.size == (64, 64)


def test_wrong_base_and_corrupt_files_get_plain_messages(tiny_sd1, tiny_sdxl, tmp_path):
    xl = tmp_path / "xl.safetensors"
    hand_made_kohya(tiny_sdxl, "sdxl", xl)
    e = engine_for(tiny_sd1)
    with pytest.raises(PreviewError, match="LoRA for SDXL, but the base model is SD 1.x"):
        e.apply([LoraSpec(str(xl), 1.0)])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(PreviewError, match="not a readable LoRA file"):
        e.apply([LoraSpec(str(bad), 1.0)])
    # through the worker protocol: an answer, never an exception
    ans = handle(e, {"base_model": str(tiny_sd1), "params": {**P, "loras": [{"path": str(xl), "strength": 1.0}]}}, tmp_path)
    assert ans["ok"] is False and "SDXL" in ans["error"]
    # the engine still works after the failures
    assert handle(e, {"base_model": str(tiny_sd1), "params": P}, tmp_path)["ok"]


def test_saved_png_carries_a1111_parameters(tiny_sd1, tmp_path):
    f = tmp_path / "mylora.safetensors"
    hand_made_kohya(tiny_sd1, "sd1", f)
    e = engine_for(tiny_sd1)
    ans = handle(e, {"base_model": str(tiny_sd1), "params": {**P, "negative": "blurry", "batch": 2,
                                                             "loras": [{"path": str(f), "strength": 0.8}]}}, tmp_path / "out")
    assert ans["ok"] and len(ans["images"]) == 2
    text = Image.open(ans["images"][1]).text["parameters"]
    assert text.startswith("zwx, red square <lora:mylora:0.8>\nNegative prompt: blurry\n")
    assert "Steps: 2, Sampler: Euler, CFG scale: 5, Seed: 4, Size: 64x64, Model: " in text


@pytest.mark.slow
def test_preview_tab_through_the_worker_process(tiny_sd1, tmp_path):
    """The tab's handler -> a real preview worker process; pipeline stays cached; grids from a run's checkpoints."""
    from app.tabs.preview import PreviewTab
    from conftest import finished_run

    ws, rm, run_id = finished_run(tiny_sd1, tmp_path, max_steps=4, save_every_steps=2, sample_every_steps=0)
    from app.services import Studio

    tab = PreviewTab(Studio(ws, rm))
    try:
        choices = dict((v, k) for k, v in tab.studio.lora_choices())
        final = next(p for p in choices if p.endswith("lora.safetensors") and "checkpoints" not in p)
        assert any("step-000002" in p for p in choices)
        v = dict(base_model=str(tiny_sd1), prompt="zwx", negative="", seed=5, steps=2, cfg=5.0, width=64, height=64,
                 sampler="Euler", batch=1, mode="Single image", strengths="0, 0.5, 1", loras=[(final, True, 1.0)])
        imgs, msg = tab.generate(v)
        assert len(imgs) == 1 and Image.open(imgs[0]).size == (64, 64), msg
        pid = tab.client.proc.pid
        imgs, msg = tab.generate({**v, "mode": "Strength grid"})
        assert Image.open(imgs[0]).size[0] == 3 * 64, msg
        imgs, msg = tab.generate({**v, "mode": "Checkpoint grid"})
        assert Image.open(imgs[0]).size[0] == 3 * 64, msg  # step 2, step 4, final
        imgs, msg = tab.generate({**v, "mode": "Base vs LoRA"})
        assert Image.open(imgs[0]).size[0] == 2 * 64, msg
        assert tab.client.proc.pid == pid  # one worker, pipeline kept between generations
        imgs, msg = tab.generate({**v, "base_model": str(tmp_path / "nope.safetensors")})
        assert imgs == [] and "not found" in msg
    finally:
        tab.client.close()
