"""A quantised frozen base (issue 13.1): fp8 storage, bitsandbytes int8 and NF4, under a LoRA trained with peft.
bitsandbytes 0.50 runs its int8 and NF4 layers on the CPU, so these run the real layers."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from conftest import base_config, make_images
from test_engine import _held_out_loss, diffusers_pipe, run_cli, trainer_pipe
from trainer.models import lora
from trainer.models.quantize import store_fp8


def test_fp8_layers_store_fp8_and_give_the_gradients_of_their_rounded_weights():
    torch.manual_seed(0)
    import copy

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(8 * 16, 5))
    ref = copy.deepcopy(net)
    net.requires_grad_(False)
    assert store_fp8(net, torch.float32) == 2
    assert all(p.dtype == torch.float8_e4m3fn for n, p in net.named_parameters() if n.endswith("weight"))
    for (_, a), (_, b) in zip(ref.named_parameters(), net.named_parameters()):
        a.data = b.data.float() if b.dtype == torch.float8_e4m3fn else a.data  # the reference uses the rounded weights
    x1 = torch.randn(2, 3, 4, 4, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    net(x1).square().sum().backward()
    ref(x2).square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-4)  # backward through the fp8 storage


@pytest.mark.parametrize("quant", ["fp8", "int8", "nf4"])
def test_each_quantised_base_trains_and_exports_a_file_diffusers_loads(quant, tiny_sd1, dataset, tmp_path):
    out = tmp_path / "run"
    assert run_cli(base_config(tiny_sd1, dataset, out, max_steps=2, base_quantization=quant), tmp_path) == 0
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        md, keys = f.metadata(), list(f.keys())
    assert md["lora_studio_base_quantization"] == quant and md["ss_fp8_base"] == str(quant == "fp8")
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te_") for k in keys)
    pipe = diffusers_pipe(tiny_sd1, "sd1")
    pipe.load_lora_weights(str(out / "lora.safetensors"), adapter_name="q")
    assert "q" in pipe.get_list_adapters()["unet"]


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["fp8", "int8", "nf4"])
def test_a_lora_trained_on_a_quantised_base_learns(quant, tiny_sd1, tmp_path):
    """The held-out loss of the concept drops, measured on the full-precision base as the web UIs use it."""
    data = tmp_path / "concept"
    make_images(data, 4, size=(64, 64), caption="red square on blue", concept=True)
    out = tmp_path / "run"
    cfg = base_config(tiny_sd1, data, out, max_steps=60, rank=8, alpha=8, unet_lr=3e-3, train_text_encoder=False,
                      base_quantization=quant)
    assert run_cli(cfg, tmp_path) == 0
    _, m = trainer_pipe(tiny_sd1, out, None)
    held = tmp_path / "held"
    make_images(held, 2, size=(64, 64), caption=None, seed=99, concept=True)
    from trainer.data.cache import encode_pixels, pixel_tensor

    lat = encode_pixels(m.vae, torch.stack([pixel_tensor(p, (64, 64), False) for p in sorted(held.glob("*.png"))]))
    caps = ["zwx, red square on blue"] * 2
    trained = _held_out_loss(m, lat, caps)
    lora.set_lora_scale(m.unet, 0.0)
    untrained = _held_out_loss(m, lat, caps)
    assert trained < 0.8 * untrained, (quant, trained, untrained)


def test_quantisation_is_in_the_estimate_the_kohya_import_and_the_checks():
    from trainer.recipe.config import TrainConfig
    from trainer.recipe.estimate import estimate_vram_gb
    from trainer.recipe.kohya_ss import import_kohya, to_sd_scripts_toml

    cfg = TrainConfig(base_model="m", dataset="d", mixed_precision="bf16")
    full = estimate_vram_gb(cfg, "sdxl")["weights_gb"]
    fp8 = estimate_vram_gb(cfg.replace(base_quantization="fp8"), "sdxl")["weights_gb"]
    nf4 = estimate_vram_gb(cfg.replace(base_quantization="nf4"), "sdxl")["weights_gb"]
    assert nf4 < fp8 < full
    assert import_kohya({"fp8_base": True})[0] == {"base_quantization": "fp8"}
    assert "fp8_base = true" in to_sd_scripts_toml(cfg.replace(base_quantization="fp8"))
    errors, _ = cfg.replace(base_quantization="nf4", use_dora=True).problems()
    assert any("use_dora with base_quantization = 'nf4' is not supported" in e for e in errors)


@pytest.mark.parametrize("cache_te", [True, False])
def test_set_up_brings_one_big_part_to_the_device_at_a_time(cache_te, tiny_sd1, dataset, tmp_path, monkeypatch):
    """Issue 13.2: the VAE alone while latents are cached, then the text encoders alone while their outputs are
    cached, then the UNet: the first run never holds them all at once (it used to move the UNet and the
    encoders first, then run the VAE beside them)."""
    from trainer.engine.setup import setup
    from trainer.models.load import LoadedModel

    moves = []
    orig = torch.nn.Module.to

    def recording_to(self, *a, **k):
        role = getattr(self, "_role", None)
        if role:
            dev = next((x for x in (*a, k.get("device")) if isinstance(x, (str, torch.device))), None)
            if dev is not None:  # on this CPU machine both are 'cpu': the engine moves to the run's device as
                # accelerator.device (a torch.device) and parks with the string "cpu"
                moves.append((role, "device" if isinstance(dev, torch.device) else "cpu"))
        return orig(self, *a, **k)

    from trainer.models import load as load_mod

    real_load = load_mod.load_model

    def tagged_load(*a, **k):
        m: LoadedModel = real_load(*a, **k)
        m.vae._role, m.unet._role = "vae", "unet"
        for te in m.text_encoders:
            te._role = "te"
        return m

    monkeypatch.setattr(torch.nn.Module, "to", recording_to)
    monkeypatch.setattr("trainer.engine.setup.load_model", tagged_load)
    cfg = base_config(tiny_sd1, dataset, tmp_path / "run", train_text_encoder=False, cache_text_encoder_outputs=cache_te)
    setup(cfg, tmp_path / "run", echo=lambda m: None)
    first = {role: next(i for i, m in enumerate(moves) if m == (role, "device")) for role in ("vae", "te", "unet")}
    vae_home = next(i for i, m in enumerate(moves) if m == ("vae", "cpu"))
    assert first["vae"] < vae_home < min(first["te"], first["unet"]), moves  # the VAE came and went alone
    if cache_te:  # the encoders came, encoded and went back before the UNet came; they stay parked
        te_home = next(i for i, m in enumerate(moves) if m == ("te", "cpu"))
        assert first["te"] < te_home < first["unet"], moves
        assert [m for m in moves if m[0] == "te"][-1] == ("te", "cpu"), moves


def test_skipping_peft_input_casts_under_autocast_changes_no_number(tiny_sd1):
    """Issue 13.6: peft casts each LoRA input to fp32 and autocast casts it back; without both casts the
    forward and the gradients are bit for bit the same."""
    from trainer.recipe.config import TrainConfig
    from trainer.models.load import load_model

    results = []
    for skip in (False, True):
        m = load_model(str(tiny_sd1))
        torch.manual_seed(0)
        lora.inject_for_config(m, TrainConfig(base_model="x", dataset="y", rank=4, alpha=4, train_text_encoder=False))
        m.unet.to(torch.bfloat16)
        for p in lora.lora_parameters(m.unet):
            p.data = p.data.float()
            torch.nn.init.normal_(p, std=0.05)  # a trained-looking LoRA (lora_up starts at zero)
        if skip:
            assert lora.skip_input_casting(m.unet) > 0
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 4, 8, 8, generator=g)
        hs = torch.randn(2, 77, m.unet.config.cross_attention_dim, generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m.unet(x.to(torch.bfloat16), torch.tensor([10, 500]), hs.to(torch.bfloat16)).sample
        out.float().square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in lora.lora_parameters(m.unet)]))
    (a, ga), (b, gb) = results
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga, gb))


def test_text_encoder_outputs_are_cached_by_default_when_the_encoders_are_frozen(tiny_sd1, dataset, tmp_path):
    """Issue 13.2: frozen encoders and fixed captions cache by default (the encoders leave the device); a trained
    encoder or randomised captions encode every step; sd-scripts gets the flag only when it applies."""
    from trainer.recipe.config import TrainConfig, tomllib
    from trainer.recipe.kohya_ss import to_sd_scripts_toml
    from trainer.engine.setup import setup

    def export_kohya(cfg):
        return tomllib.loads(to_sd_scripts_toml(cfg))

    assert TrainConfig(train_text_encoder=False).caches_text
    assert not TrainConfig(train_text_encoder=True).caches_text
    assert not TrainConfig(train_text_encoder=False, shuffle_tags=True).caches_text
    assert not TrainConfig(train_text_encoder=False, cache_text_encoder_outputs=False).caches_text
    assert "cache_text_encoder_outputs" not in export_kohya(TrainConfig(train_text_encoder=True))
    assert export_kohya(TrainConfig(train_text_encoder=False))["cache_text_encoder_outputs"] is True
    run = setup(base_config(tiny_sd1, dataset, tmp_path / "run", train_text_encoder=False), tmp_path / "run",
                echo=lambda m: None)
    assert run.text_cache is not None and all(next(te.parameters()).device.type == "cpu" for te in run.model.text_encoders)


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_a_quantised_base_renders_samples_of_several_steps(quant, tiny_sd1, dataset, tmp_path):
    """The sampler upcasts its latents to fp32 after the first step; bitsandbytes layers answered in fp32 under
    autocast, and the next bf16 norm refused the mix ('mixed dtype (CPU)'). They follow autocast now."""
    from trainer.engine.setup import setup
    from trainer.engine.sampling import render_samples

    cfg = base_config(tiny_sd1, dataset, tmp_path / "run", train_text_encoder=False, mixed_precision="bf16",
                      base_quantization=quant, sample_prompts=["zwx"], sample_steps=3, max_steps=1)
    run = setup(cfg, tmp_path / "run", echo=lambda m: None)
    render_samples(run, 1)
    assert len(list((tmp_path / "run" / "samples").glob("*.png"))) == 1


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_with_a_quantised_base_a_sample_has_one_big_part_on_the_device_at_a_time(quant, tiny_sd1, dataset, tmp_path):
    """Issue 13.5: SD 1.5 at 512 px with an nf4 base peaked while sampling (2.6 GB, over the 2.5 GB target): the
    fp32 VAE sat beside the UNet while it denoised, and the UNet beside the VAE while it decoded. With a
    quantised base the UNet now denoises while the VAE (its latents cached) waits in RAM, then the VAE decodes
    while the UNet waits, and each goes back after. A full-precision base keeps its UNet in place (no round
    trip for a run that did not ask for memory)."""
    from trainer import placement
    from trainer.engine.setup import setup
    from trainer.engine.sampling import render_samples

    cfg = base_config(tiny_sd1, dataset, tmp_path / "run", train_text_encoder=False, base_quantization=quant,
                      sample_prompts=["zwx", "zwx, red"], sample_steps=2, max_steps=1)
    run = setup(cfg, tmp_path / "run", echo=lambda m: None)
    unet, vae = run.accelerator.unwrap_model(run.unet), run.model.vae
    assert not placement.on_device_now(vae)  # latents cached: parked since set-up
    seen = []
    real_decode, real_forward = vae.decode, unet.forward
    vae.decode = lambda *a, **k: (seen.append(("decode", placement.on_device_now(unet), placement.on_device_now(vae))),
                                  real_decode(*a, **k))[1]
    unet.forward = lambda *a, **k: (seen.append(("denoise", True, placement.on_device_now(vae))), real_forward(*a, **k))[1]
    render_samples(run, 1)
    lean = quant != "none"
    per_prompt = [("denoise", True, not lean)] * 2 + [("decode", not lean, True)]  # 2 steps, then the decode
    assert seen == per_prompt * 2, seen
    assert placement.on_device_now(unet) and not placement.on_device_now(vae)  # each back where it was
    assert len(list((tmp_path / "run" / "samples").glob("*.png"))) == 2
