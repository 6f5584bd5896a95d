"""Every option does what it says (issue 12): each test here failed before its fix."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import base_config, make_images
from trainer.cli import main as cli
from trainer.recipe.config import TrainConfig
from trainer.data.captions import CaptionOptions, build_caption
from trainer.events import read_events


def train(cfg: TrainConfig, tmp_path: Path) -> int:
    path = tmp_path / f"cfg_{len(list(tmp_path.glob('cfg_*')))}.toml"
    cfg.save(path)
    return cli(["train", str(path)])


def tensor_hash(path: Path) -> str:
    with safe_open(str(path), "pt") as f:
        return f.metadata()["sshs_model_hash"]


# ------------------------------------------------------------------------------------------ 2. triggers stay first
@pytest.mark.parametrize("caption", ["red, blue, zwx, green", "zwx, red, blue, green", "red, ZWX, blue"])
def test_trigger_words_lead_every_caption_in_every_mode(caption):
    modes = [dict(shuffle_tags=True, keep_tokens=0), dict(shuffle_tags=True, keep_tokens=2),
             dict(tag_dropout=0.5, keep_tokens=0), dict(shuffle_tags=True, tag_dropout=0.3, prefix="masterpiece")]
    for mode in modes:
        opts = CaptionOptions(triggers=("zwx",), **mode)
        for seed in range(40):
            tags = build_caption(caption, opts, random.Random(seed)).split(", ")
            assert tags[0].lower() == "zwx", (mode, seed, tags)
            assert [t.lower() for t in tags].count("zwx") == 1
    # a caption that already mentions the trigger inside a phrase is not given a second one
    assert build_caption("photo of zwx, red", CaptionOptions(triggers=("zwx",))) == "photo of zwx, red"


# ------------------------------------------------------------------------------------------ 3. memory-only latents
def test_latents_cached_in_memory_only_write_nothing_and_train_the_same(tiny_sd1, dataset, tmp_path, monkeypatch):
    files = {}
    for to_disk in (False, True):
        cache = tmp_path / f"cache_{to_disk}"
        monkeypatch.setenv("LORA_STUDIO_CACHE", str(cache))
        out = tmp_path / f"run_{to_disk}"
        assert train(base_config(tiny_sd1, dataset, out, max_steps=2, cache_latents_to_disk=to_disk), tmp_path) == 0
        written = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
        assert bool(written) == to_disk, written
        files[to_disk] = out / "lora.safetensors"
    assert tensor_hash(files[False]) == tensor_hash(files[True])


# ------------------------------------------------------------------------------------------ 4. no local paths
def test_exported_metadata_holds_no_local_paths(tiny_sd1, tmp_path):
    data = tmp_path / "private_photos" / "10_me"
    make_images(data, 2)
    out = tmp_path / "runs" / "mine"
    cfg = base_config(tiny_sd1, data.parent, out, max_steps=1, model_config=str(tiny_sd1))
    assert train(cfg, tmp_path) == 0
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    private = [str(tmp_path), str(Path.home()), str(tiny_sd1.parent), str(data.parent)]
    for key, value in meta.items():
        for p in private:
            assert p not in value, (key, p)
    saved = json.loads(meta["ss_lora_studio_config"])
    assert saved["dataset"] == "private_photos" and saved["base_model"] == tiny_sd1.name
    assert saved["output_dir"] == "mine" and saved["rank"] == cfg.rank  # the recipe itself is kept


# ------------------------------------------------------------------------------------------ 5. defaults follow
def test_default_buckets_follow_the_resolution():
    small = TrainConfig(base_model="m", dataset="d", resolution=128)
    assert small.problems()[0] == [] and small.bucket_range == (128, 1024)
    big = TrainConfig(base_model="m", dataset="d", resolution=1536)
    assert big.problems()[0] == [] and big.bucket_range == (256, 1536)
    assert TrainConfig(base_model="m", dataset="d").bucket_range == (256, 1024)  # the 512 default is unchanged
    # a value the user set is theirs, and still checked
    errors = TrainConfig(base_model="m", dataset="d", resolution=128, min_bucket=256).problems()[0]
    assert any("min_bucket (256) is above the resolution (128)" in e for e in errors)


# ------------------------------------------------------------------------------------------ 6. process control
def test_worker_processes_are_watched_and_killed_without_posix_only_calls(tmp_path):
    """Windows has neither os.killpg nor os.WNOHANG: liveness and killing a worker's tree go through psutil."""
    import ast

    import app.runs
    from app.workers import kill_tree, pid_alive
    from conftest import wait_for

    tree = ast.parse(Path(app.runs.__file__).read_text())
    posix = {(n.value.id, n.attr) for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
    assert not posix & {("os", "kill"), ("os", "killpg"), ("os", "waitpid"), ("os", "WNOHANG"), ("signal", "SIGKILL")}

    script = tmp_path / "parent.py"
    script.write_text("import subprocess, sys, time\n"
                      "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
                      f"open(r'{tmp_path / 'child.pid'}', 'w').write(str(child.pid))\n"
                      "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, str(script)])
    wait_for(lambda: (tmp_path / "child.pid").exists() and (tmp_path / "child.pid").read_text(), timeout=60)
    child = int((tmp_path / "child.pid").read_text())
    assert pid_alive(proc.pid) and pid_alive(child)
    kill_tree(proc.pid)  # the worker and what it started (DataLoader workers, torchrun children)
    assert not pid_alive(proc.pid), "an ended worker (a zombie until reaped) is not alive"
    assert not pid_alive(child)
    proc.wait(timeout=30)


# ------------------------------------------------------------------------------------------ 7. phases move back
def test_sampling_leaves_parked_text_encoders_parked_and_draws_what_the_pipeline_draws(tiny_sd1, dataset, tmp_path):
    """With cached text-encoder outputs the encoders are parked off the GPU, and the sample prompts were encoded
    at set-up by the pipeline's own encode_prompt: sampling borrows only the VAE, and the image is the one the
    pipeline makes from the prompt with the encoders at hand."""
    import numpy as np
    from PIL import Image

    from trainer.engine.setup import setup
    from trainer.engine.sampling import render_samples

    cfg = base_config(tiny_sd1, dataset, tmp_path / "run", train_text_encoder=False, cache_text_encoder_outputs=True,
                      sample_prompts=["zwx, a photo"], sample_steps=2, max_steps=1)
    run = setup(cfg, tmp_path / "run", echo=lambda m: None)
    assert set(run.sample_cond) == {"zwx, a photo"}
    moves = []
    for te in run.model.text_encoders + [run.model.vae]:
        orig = te.to
        te.to = lambda *a, _o=orig, _m=te, **k: (moves.append((_m, a[0] if a else k.get("device"))), _o(*a, **k))[1]
    render_samples(run, 1)
    sample = np.asarray(Image.open(next((tmp_path / "run" / "samples").glob("*.png"))))
    for m in run.model.text_encoders:
        assert not [d for mod, d in moves if mod is m]  # never brought back
    assert [str(torch.device(d)) for mod, d in moves if mod is run.model.vae] == [str(run.accelerator.device), "cpu"]
    pipe = run.model.pipeline()
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad(), run.accelerator.autocast():
        direct = pipe("zwx, a photo", num_inference_steps=2, generator=torch.Generator().manual_seed(cfg.sample_seed),
                      height=cfg.resolution, width=cfg.resolution).images[0]
    assert np.array_equal(sample, np.asarray(direct))


def test_large_samples_decode_in_tiles_and_the_vae_is_left_as_it_was(tiny_sd1):
    from trainer.engine.sampling import tiled_decode
    from trainer.models.load import load_model

    vae = load_model(str(tiny_sd1)).vae
    before = (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size)
    with tiled_decode(vae, 512):
        assert not vae.use_tiling  # 512 px and below: whole
    with tiled_decode(vae, 1024):
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        assert (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size) == (True, 512, 512 // scale)
    assert (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size) == before


# ------------------------------------------------------------------------------------------ 8. one read
def test_a_single_file_checkpoint_is_not_read_whole_to_find_its_family(tiny_sd1, tmp_path, monkeypatch):
    from ldm import save_single_file
    from trainer.models import load

    f = tmp_path / "model.safetensors"
    save_single_file(tiny_sd1, f, "sd1")

    def whole_read(path):
        raise AssertionError("the checkpoint was read whole before the loader read it")

    monkeypatch.setattr(load, "read_checkpoint", whole_read)
    m = load.load_model(str(f), config_dir=str(tiny_sd1))
    assert m.family == "sd1"


# ------------------------------------------------------------------------------------------ 9. plain messages
def test_dataset_tab_handlers_answer_bad_input_in_words(tmp_path):
    import gradio as gr

    from app.main import build_ui

    ui = build_ui(tmp_path / "ws")
    buttons = {b.value: i for i, b in ui.blocks.items() if isinstance(b, gr.Button)}

    def handler(label):
        return next(f.fn for f in ui.fns.values() if any(t[0] == buttons[label] for t in f.targets))

    for label, args, words in (("Add trigger to captions", ("nope", "zwx"), "No dataset named 'nope'"),
                               ("Import folder", ("nope", str(tmp_path)), "No dataset named 'nope'"),
                               ("Save caption", ("nope", str(tmp_path / "x.png"), "cap"), "outside the workspace")):
        with pytest.raises(gr.Error) as e:  # Gradio shows a gr.Error's message; any other exception as "Error"
            handler(label)(*args)
        assert words in e.value.message, (label, e.value.message)


# ------------------------------------------------------------------------------------------ GPU code paths on the CPU
def test_bf16_autocast_and_8bit_adamw_run_for_real_on_the_cpu(tiny_sd1, dataset, tmp_path):
    import bitsandbytes as bnb
    from diffusers import StableDiffusionPipeline

    from trainer.engine.setup import setup

    cfg = base_config(tiny_sd1, dataset, tmp_path / "run", mixed_precision="bf16", optimizer="adamw8bit", max_steps=3)
    run = setup(cfg, tmp_path / "probe", echo=lambda m: None)
    assert run.weight_dtype == torch.bfloat16 and run.accelerator.mixed_precision == "bf16"
    assert next(p for n, p in run.model.unet.named_parameters() if "lora_" not in n).dtype == torch.bfloat16
    assert isinstance(run.optimizer.optimizer, bnb.optim.AdamW8bit)
    assert train(cfg, tmp_path) == 0
    events, _ = read_events(tmp_path / "run")
    assert any("slow" in e.get("message", "") and "bf16" in e.get("message", "") for e in events if e["type"] == "warning")
    assert not any("fp32 instead" in e.get("message", "") for e in events)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    pipe.load_lora_weights(str(tmp_path / "run" / "lora.safetensors"))
