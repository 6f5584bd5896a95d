"""The training engine end to end on tiny random-weight models: train, export, load in diffusers."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import ROOT, base_config, free_port, make_images
from trainer.engine import checkpoint as ckpt
from trainer.cli import main as cli
from trainer.recipe.config import TrainConfig
from trainer.events import read_events, request
from trainer.models import lora
from trainer.models.load import load_model

GEN = dict(num_inference_steps=2, height=64, width=64, output_type="np")


def run_cli(cfg: TrainConfig, tmp_path, *extra) -> int:
    path = tmp_path / f"cfg_{len(list(tmp_path.glob('cfg_*')))}.toml"
    cfg.save(path)
    return cli(["train", str(path), *extra])


def diffusers_pipe(model_dir, family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def trainer_pipe(model_dir, run_dir, scheduler):
    """The trainer's own adapted model, rebuilt from the last checkpoint's peft weights."""
    m = load_model(str(model_dir))
    parts, state, _ = ckpt.read_checkpoint(ckpt.latest_checkpoint(run_dir))
    lora.inject_for_config(m, TrainConfig.from_dict(state["config"]))
    lora.load_parts(m, parts)
    pipe = m.pipeline(scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe, m


def image(pipe, prompt="zwx, red square"):
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **GEN).images[0]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_cli_train_exports_a_file_diffusers_loads_exactly(family, request, dataset, tmp_path):
    model_dir = request.getfixturevalue(f"tiny_{family}")
    out = tmp_path / "run"
    assert run_cli(base_config(model_dir, dataset, out, conv_rank=2 if family == "sdxl" else 0), tmp_path) == 0
    lora_file = out / "lora.safetensors"
    assert lora_file.is_file()

    pipe = diffusers_pipe(model_dir, family)
    base_img = image(pipe)
    pipe.load_lora_weights(str(lora_file), adapter_name="mine")  # raises on any key it cannot place
    lora_img = image(pipe)
    own, m = trainer_pipe(model_dir, out, pipe.scheduler)
    own_img = image(own)
    assert abs(lora_img - own_img).max() < 1e-5, "diffusers with our file must equal the trainer's adapted model"
    assert abs(lora_img - base_img).max() > 1e-4, "the LoRA must change the image"
    pipe.set_adapters(["mine"], [0.0])
    assert abs(image(pipe) - base_img).max() < 1e-6, "strength 0 must reproduce the base model"

    # the text-encoder LoRA is applied too (not only the UNet)
    ids = pipe.tokenizer(["zwx"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    pipe.set_adapters(["mine"], [1.0])
    with torch.no_grad():
        a = pipe.text_encoder(ids)[0]
        b = m.text_encoders[0](ids)[0]
    assert torch.allclose(a, b, atol=1e-5)


def test_key_names_and_metadata_follow_the_kohya_layout(tiny_sd1, tiny_sdxl, dataset, tmp_path):
    for family, model_dir in (("sd1", tiny_sd1), ("sdxl", tiny_sdxl)):
        out = tmp_path / family
        assert run_cli(base_config(model_dir, dataset, out, save_precision="fp16", max_steps=1), tmp_path) == 0
        with safe_open(str(out / "lora.safetensors"), "pt") as f:
            keys = list(f.keys())
            md = f.metadata()
            tensors = {k: f.get_tensor(k) for k in keys}
        names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
        for n in names:
            assert {f"{n}.lora_down.weight", f"{n}.lora_up.weight", f"{n}.alpha"} <= set(keys)
            assert tensors[f"{n}.alpha"].dim() == 0
        assert all(t.dtype == torch.float16 for t in tensors.values())
        unet = [n for n in names if n.startswith("lora_unet_")]
        if family == "sd1":
            assert any(n.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for n in names)
            assert not any(n.startswith(("lora_te1_", "lora_te2_")) for n in names)
            assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in unet
            assert "lora_unet_down_blocks_0_attentions_0_proj_in" in unet
            assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].dim() == 4  # 1x1 conv
            assert md["ss_base_model_version"] == "sd_v1" and md["ss_v2"] == "False"
            assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
        else:
            assert all(("input_blocks" in n or "middle_block" in n or "output_blocks" in n) for n in unet)
            assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k" in unet
            assert "lora_unet_middle_block_1_proj_in" in unet
            assert "lora_unet_output_blocks_0_1_transformer_blocks_1_ff_net_2" in unet
            assert any(n.startswith("lora_te1_text_model_encoder_layers_") for n in names)
            assert any(n.startswith("lora_te2_text_model_encoder_layers_") for n in names)
            assert md["ss_base_model_version"] == "sdxl_base_v1-0"
        # per kohya: every TE attention + MLP module, every transformer-block linear
        assert len([n for n in names if "_te" in n[:9]]) == 6 * 3 * (2 if family == "sdxl" else 1)
        assert md["ss_network_module"] == "networks.lora"
        assert md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "4"
        assert json.loads(md["ss_trigger_words"]) == ["zwx"]
        assert md["modelspec.trigger_phrase"] == "zwx"
        freq = json.loads(md["ss_tag_frequency"])
        assert freq["data"]["red square"] == 4 and freq["data"]["tag0"] == 1
        assert json.loads(md["ss_dataset_dirs"]) == {"data": {"n_repeats": 1, "img_count": 4}}
        assert md["ss_steps"] == "1" and md["modelspec.sai_model_spec"] == "1.0.1"
        assert len(md["sshs_model_hash"]) == 64 and len(md["sshs_legacy_hash"]) == 8
        # kohya's hash is over the bytes after the header, independent of the metadata written
        raw = (out / "lora.safetensors").read_bytes()
        import hashlib

        n = int.from_bytes(raw[:8], "little")
        assert hashlib.sha256(raw[8 + n :]).hexdigest() == md["sshs_model_hash"]


def test_alpha_is_stored_and_scales_the_effect(tiny_sd1, dataset, tmp_path):
    """rank 8 / alpha 2: the file says alpha 2, and loading it applies W + (2/8) up @ down."""
    out = tmp_path / "run"
    assert run_cli(base_config(tiny_sd1, dataset, out, rank=8, alpha=2, train_text_encoder=False), tmp_path) == 0
    sd = load_file(str(out / "lora.safetensors"))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert float(sd[f"{name}.alpha"]) == 2.0 and sd[f"{name}.lora_down.weight"].shape[0] == 8

    pipe = diffusers_pipe(tiny_sd1, "sd1")
    pipe.load_lora_weights(str(out / "lora.safetensors"), adapter_name="a")
    # fold the file by hand into a fresh UNet and compare outputs
    from diffusers import UNet2DConditionModel

    ref = UNet2DConditionModel.from_pretrained(tiny_sd1, subfolder="unet")
    mods = dict(ref.named_modules())
    for key in sd:
        if key.endswith(".lora_down.weight"):
            n = key[: -len(".lora_down.weight")]
            down, up, alpha = sd[key].float(), sd[f"{n}.lora_up.weight"].float(), float(sd[f"{n}.alpha"])
            path = n[len("lora_unet_"):].replace("_", ".")
            mod = next(m for p, m in mods.items() if p.replace("_", ".") == path)
            delta = (up.flatten(1) @ down.flatten(1)).reshape(mod.weight.shape)
            mod.weight.data += (alpha / down.shape[0]) * delta
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ehs = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = pipe.unet(x, 10, ehs).sample
        want = ref(x, 10, ehs).sample
    assert torch.allclose(got, want, atol=1e-5)
    base = UNet2DConditionModel.from_pretrained(tiny_sd1, subfolder="unet")
    with torch.no_grad():
        assert (base(x, 10, ehs).sample - want).abs().max() > 1e-4


def _held_out_loss(m, latents, captions, seed=123):
    """Fixed-seed denoising loss on the concept at several timesteps."""
    from trainer.models.prompts import encode_prompts

    g = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        hs, _ = encode_prompts(m, m.text_encoders, captions, 1, "cpu")
        for t in (100, 300, 500, 700, 900):
            noise = torch.randn(latents.shape, generator=g)
            ts = torch.full((latents.shape[0],), t)
            noisy = m.noise_scheduler.add_noise(latents, noise, ts)
            total += torch.nn.functional.mse_loss(m.unet(noisy, ts, hs).sample, noise).item()
    return total / 5


@pytest.mark.slow  # a longer training: the full suite runs it, the fast tier does not
def test_training_learns_the_concept(tiny_sd1, tmp_path):
    data = tmp_path / "concept"
    make_images(data, 4, size=(64, 64), caption="red square on blue", concept=True)
    out = tmp_path / "run"
    cfg = base_config(tiny_sd1, data, out, max_steps=60, rank=8, alpha=8, unet_lr=3e-3, train_text_encoder=False)
    assert run_cli(cfg, tmp_path) == 0
    _, m = trainer_pipe(tiny_sd1, out, None)
    held = tmp_path / "held"
    make_images(held, 2, size=(64, 64), caption=None, seed=99, concept=True)  # unseen images of the concept
    from trainer.data.cache import encode_pixels, pixel_tensor

    lat = encode_pixels(m.vae, torch.stack([pixel_tensor(p, (64, 64), False) for p in sorted(held.glob("*.png"))]))
    caps = ["zwx, red square on blue"] * 2
    trained = _held_out_loss(m, lat, caps)
    lora.set_lora_scale(m.unet, 0.0)
    untrained = _held_out_loss(m, lat, caps)
    assert trained < 0.8 * untrained, (trained, untrained)


@pytest.mark.slow  # trains: the fast tier stays under 3 minutes (the full suite runs it)
def test_resume_matches_an_uninterrupted_run(tiny_sd1, dataset, tmp_path):
    kw = dict(max_steps=6, lr_scheduler="cosine", warmup_steps=2, shuffle_tags=True, caption_dropout=0.2, dropout=0.1)
    a = tmp_path / "a"
    assert run_cli(base_config(tiny_sd1, dataset, a, **kw), tmp_path) == 0
    b = tmp_path / "b"
    request(b, "stop")  # the engine stops (and saves) after its first step
    assert run_cli(base_config(tiny_sd1, dataset, b, **kw), tmp_path) == 0
    assert not (b / "lora.safetensors").exists()
    events, _ = read_events(b)
    assert events[-1]["type"] == "stopped" and events[-1]["step"] == 1
    assert run_cli(base_config(tiny_sd1, dataset, b, **kw), tmp_path, "--resume") == 0
    events, _ = read_events(b)
    assert any("Resumed from step-000001" in e.get("message", "") for e in events)
    wa, wb = load_file(str(a / "lora.safetensors")), load_file(str(b / "lora.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k


def test_export_command_reexports_at_another_precision(tiny_sd1, dataset, tmp_path):
    out = tmp_path / "run"
    assert run_cli(base_config(tiny_sd1, dataset, out, max_steps=2, save_precision="fp16"), tmp_path) == 0
    target = tmp_path / "x32.safetensors"
    assert cli(["export", str(out), "--precision", "fp32", "--out", str(target)]) == 0
    a, b = load_file(str(out / "lora.safetensors")), load_file(str(target))
    assert a.keys() == b.keys()
    assert all(t.dtype == torch.float32 for t in b.values())
    assert all(torch.allclose(a[k].float(), b[k], atol=1e-2, rtol=1e-2) for k in a)


@pytest.mark.slow  # trains: the fast tier stays under 3 minutes (the full suite runs it)
def test_keep_last_prunes_old_checkpoints(tiny_sd1, dataset, tmp_path):
    out = tmp_path / "run"
    assert run_cli(base_config(tiny_sd1, dataset, out, max_steps=5, save_every_steps=1, keep_last=2), tmp_path) == 0
    assert [p.name for p in ckpt.checkpoint_dirs(out)] == ["step-000004", "step-000005"]


@pytest.mark.slow  # trains: the fast tier stays under 3 minutes (the full suite runs it)
def test_v_prediction_model_trains_with_v_target(tiny_sd2v, dataset, tmp_path):
    out = tmp_path / "run"
    assert run_cli(base_config(tiny_sd2v, dataset, out, max_steps=2), tmp_path) == 0
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["ss_base_model_version"] == "sd_v2_v" and md["modelspec.prediction_type"] == "v"
    events, _ = read_events(out)
    assert any("v_prediction" in e.get("message", "") for e in events)


DDP_SCRIPT = """
import sys, torch
from trainer.recipe.config import TrainConfig
from trainer.engine.loop import State, after_step, batch_iterator, finish, train_step
from trainer.engine.setup import setup
from trainer.models import lora

cfg = TrainConfig.load(sys.argv[1])
run = setup(cfg, cfg.output_dir, echo=lambda m: None)   # the phases of train(), with a look at each rank's weights
state, batches = State(), batch_iterator(run, 0)
while state.step < run.total_steps:
    train_step(run, state, batches)
    after_step(run, state)
weights = {n: p.detach().clone() for m in run.trainable for n, p in run.accelerator.unwrap_model(m).named_parameters() if "lora_" in n}
torch.save({"weights": weights, "micro_per_epoch": run.micro_per_epoch}, f"{cfg.output_dir}/rank{run.accelerator.process_index}.pt")
finish(run, [run], [state])
"""


@pytest.mark.slow
def test_ddp_two_cpu_processes_write_one_file_with_equal_weights(tiny_sd1, tmp_path):
    data = tmp_path / "data"
    make_images(data, 4)
    out = tmp_path / "run"
    cfg = base_config(tiny_sd1, data, out, max_steps=3)
    cfg.save(tmp_path / "cfg.toml")
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(tmp_path / "ddp.py"), str(tmp_path / "cfg.toml")],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["lora.safetensors"]
    done = [e for e in read_events(out)[0] if e["type"] == "done"]
    assert len(done) == 1
    r0, r1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    w0, w1 = r0["weights"], r1["weights"]
    assert w0.keys() == w1.keys() and len(w0) > 0
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "DDP ranks must hold the same LoRA weights"
    assert any(w0[k].abs().sum() > 0 for k in w0 if "lora_B" in k)  # they trained (B starts at zero)
    # the file rank 0 wrote holds those weights
    sd = load_file(str(out / "lora.safetensors"))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    key = next(k for k in w0 if "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B" in k)
    assert torch.allclose(sd[f"{name}.lora_up.weight"].float(), w0[key], atol=1e-6)
    # each rank trained on its own share: 4 images / 2 ranks = 2 batches per rank per epoch
    assert r0["micro_per_epoch"] == r1["micro_per_epoch"] == 2


def test_progress_reports_by_the_clock_unless_a_step_interval_is_set(monkeypatch):
    """log_every_steps = 0 (the default) reports the first step, then about every LOG_INTERVAL_S, and the last:
    a fast GPU is not made to wait at every step. A set interval counts steps as before."""
    from trainer.engine import loop

    clock = [100.0]
    monkeypatch.setattr(loop.time, "time", lambda: clock[0])
    state = loop.State(step0=10)
    due = []
    for step in range(11, 31):  # a resumed run: steps 11..30, each 0.5 s
        state.step = step
        if loop.report_due(0, state, 30):
            due.append(step)
            state.reported = clock[0]
        clock[0] += 0.5
    assert due == [11, 15, 19, 23, 27, 30]
    assert [s for s in range(11, 31) if loop.report_due(5, loop.State(step=s, step0=10), 30)] == [15, 20, 25, 30]
    assert TrainConfig().log_every_steps == 0
    errors, _ = TrainConfig(log_every_steps=-1).problems()
    assert any("log_every_steps must be 0" in e for e in errors)
