"""Training recipes: SDXL v-prediction, zero-terminal SNR, loss and noise options, more optimizers (kohya's
meanings). Each option changes training where it must, and nothing where it must not."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import base_config
from trainer.engine import objective
from trainer.engine.loop import train
from trainer.engine.setup import TrainingError, fresh_accelerate_state
from trainer.events import read_events, request
from trainer.recipe.config import TrainConfig


def trained(model, data, out, **kw) -> dict:
    fresh_accelerate_state()
    path = train(base_config(model, data, out, **kw), out, echo=lambda *a: None)
    fresh_accelerate_state()
    return load_file(str(path))


def same(a: dict, b: dict, atol=1e-6) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=atol) for k in a)


# ----------------------------------------------------------------------------------------------- the formulas
def _scheduler(**kw):
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **kw)


def test_loss_and_huber_schedules_follow_kohyas_formulas():
    """Written from sd-scripts' conditional_loss and get_huber_threshold_if_needed, checked element by element."""
    sched = _scheduler()
    t = torch.tensor([0, 500, 999])
    pred, target = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    d2 = (pred - target) ** 2
    cfg = TrainConfig(loss_type="huber", huber_schedule="constant", huber_c=0.2, huber_scale=1.5)
    c = 0.2 * 1.5
    assert torch.allclose(objective.elementwise_loss(cfg, pred, target, t, sched), 2 * c * (torch.sqrt(d2 + c * c) - c))
    cfg = cfg.replace(loss_type="smooth_l1")
    assert torch.allclose(objective.elementwise_loss(cfg, pred, target, t, sched), 2 * (torch.sqrt(d2 + c * c) - c))
    exp = objective.huber_c(cfg.replace(huber_schedule="exponential"), t, sched)
    assert torch.allclose(exp, torch.exp(math.log(0.2) / 1000 * t.float()) * 1.5)  # 1.5 at t=0, down to ~0.2*1.5
    snr_c = objective.huber_c(cfg.replace(huber_schedule="snr"), t, sched)
    ac = sched.alphas_cumprod[t]
    assert torch.allclose(snr_c, (1 - 0.2) / (1 + ((1 - ac) / ac) ** 0.5) ** 2 + 0.2)
    assert snr_c[0] > snr_c[1] > snr_c[2] > 0.2  # near 1 with little noise, towards huber_c with much
    assert torch.allclose(objective.elementwise_loss(TrainConfig(loss_type="l1"), pred, target, t, sched), d2.sqrt())


def test_timestep_weights_follow_kohyas_formulas():
    from diffusers.training_utils import compute_snr

    sched = _scheduler()
    t = torch.tensor([0, 10, 500, 999])
    snr = compute_snr(sched, t)
    capped = torch.minimum(snr, torch.tensor(1000.0))
    loss = torch.rand(4) + 0.5
    debiased = objective.weigh(TrainConfig(debiased_estimation_loss=True), loss, t, sched, v_pred=False)
    assert torch.allclose(debiased, loss / torch.sqrt(capped))
    assert torch.allclose(objective.weigh(TrainConfig(debiased_estimation_loss=True), loss, t, sched, True), loss / (capped + 1))
    vlike = objective.weigh(TrainConfig(v_pred_like_loss=0.3), loss, t, sched, False)
    assert torch.allclose(vlike, loss + loss / (capped / (capped + 1)) * 0.3)
    assert torch.equal(objective.weigh(TrainConfig(), loss, t, sched, False), loss)  # nothing on: untouched


def test_noise_options_draw_from_the_step_generator():
    lat = torch.randn(2, 4, 16, 16) + 0.5
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    plain = objective.sample_noise(TrainConfig(), lat, g())
    assert torch.equal(plain, objective.sample_noise(TrainConfig(), lat, g()))  # same generator, same noise
    # adaptive_noise_scale only adds to a noise offset: without one it changes nothing
    assert torch.equal(plain, objective.sample_noise(TrainConfig(adaptive_noise_scale=1.0), lat, g()))
    off = objective.sample_noise(TrainConfig(noise_offset=0.1), lat, g())
    adaptive = objective.sample_noise(TrainConfig(noise_offset=0.1, adaptive_noise_scale=0.5), lat, g())
    assert not torch.equal(off, adaptive) and not torch.equal(plain, off)
    pyramid = objective.sample_noise(TrainConfig(multires_noise_iterations=6, multires_noise_discount=0.3), lat, g())
    assert abs(float(pyramid.std()) - 1) < 1e-5 and not torch.equal(pyramid, plain)
    n = torch.zeros(2, 4, 8, 8)
    assert objective.input_noise(TrainConfig(), n, g()) is n
    fixed = objective.input_noise(TrainConfig(ip_noise_gamma=0.1), n, g())
    assert abs(float(fixed.std()) - 0.1) < 0.02
    rand = objective.input_noise(TrainConfig(ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True), n, g())
    assert 0 < float(rand.std()) < float(fixed.std())  # a strength drawn in [0, 0.1)


# ----------------------------------------------------------------------------------------------- in training
@pytest.mark.slow
def test_each_option_changes_training_and_equivalents_do_not(tiny_sd1, dataset, tmp_path):
    kw = dict(max_steps=3)
    base = trained(tiny_sd1, dataset, tmp_path / "base", **kw)
    changed = {
        "l1": dict(loss_type="l1"), "huber": dict(loss_type="huber"), "smooth_l1": dict(loss_type="smooth_l1"),
        "huber_exponential": dict(loss_type="huber", huber_schedule="exponential"),
        "debiased": dict(debiased_estimation_loss=True), "v_pred_like": dict(v_pred_like_loss=0.2),
        "multires": dict(multires_noise_iterations=4), "ip_noise": dict(ip_noise_gamma=0.1),
        "adaptive": dict(noise_offset=0.05, adaptive_noise_scale=0.5),
    }
    for name, opts in changed.items():
        assert not same(base, trained(tiny_sd1, dataset, tmp_path / name, **kw, **opts)), name
    # Huber with a huge, constant huber_c is the MSE (c * 2(sqrt(d^2 + c^2) - c) -> d^2): the same LoRA
    wide = trained(tiny_sd1, dataset, tmp_path / "wide", **kw, loss_type="huber", huber_schedule="constant", huber_c=1e3)
    assert same(base, wide, atol=1e-5)
    # kohya's default huber_schedule (snr) is what an l2 run ignores: no difference
    assert same(base, trained(tiny_sd1, dataset, tmp_path / "sched", **kw, huber_schedule="exponential"))


def test_loss_and_noise_options_are_written_as_kohya_does(tiny_sd1, dataset, tmp_path):
    out = tmp_path / "run"
    train(base_config(tiny_sd1, dataset, out, max_steps=1, loss_type="smooth_l1", huber_c=0.2,
                      multires_noise_iterations=6, ip_noise_gamma=0.1, debiased_estimation_loss=True), out,
          echo=lambda *a: None)
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["ss_loss_type"] == "smooth_l1" and md["ss_huber_schedule"] == "snr" and md["ss_huber_c"] == "0.2"
    assert md["ss_multires_noise_iterations"] == "6" and md["ss_multires_noise_discount"] == "0.3"
    assert md["ss_ip_noise_gamma"] == "0.1" and md["ss_debiased_estimation"] == "True"
    assert md["ss_zero_terminal_snr"] == "False" and md["ss_v_parameterization"] == "False"


@pytest.mark.slow
def test_zero_terminal_snr_trains_v_prediction_and_refuses_epsilon(tiny_sd1, tiny_sd2v, dataset, tmp_path):
    base = trained(tiny_sd2v, dataset, tmp_path / "v", max_steps=2)
    z = trained(tiny_sd2v, dataset, tmp_path / "z", max_steps=2, zero_terminal_snr=True)
    assert not same(base, z)
    with safe_open(str(tmp_path / "z" / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_zero_terminal_snr"] == "True"
    from trainer.engine.setup import set_objective
    from trainer.models.load import load_model

    m = load_model(str(tiny_sd2v))
    set_objective(TrainConfig(zero_terminal_snr=True), m)
    assert m.zero_terminal_snr and float(m.noise_scheduler.alphas_cumprod[-1]) < 1e-6  # pure noise at the end
    errors, _ = TrainConfig(zero_terminal_snr=True, prediction_type="epsilon").problems()
    assert any("zero_terminal_snr needs v-prediction" in e for e in errors)
    with pytest.raises(TrainingError, match="zero_terminal_snr needs v-prediction"):  # auto on an epsilon model
        trained(tiny_sd1, dataset, tmp_path / "eps", max_steps=1, zero_terminal_snr=True)


def _vpred_file(model_dir, path, *markers):
    from ldm import save_single_file

    save_single_file(model_dir, path, "sdxl")
    sd = load_file(str(path))
    sd.update({m: torch.tensor([]) for m in markers})
    save_file(sd, str(path))
    return path


@pytest.mark.slow
def test_an_sdxl_v_prediction_single_file_is_detected_and_trained_with_v(tiny_sdxl, dataset, tmp_path):
    """NoobAI-style single file: a `v_pred` marker (and `ztsnr`) is found without being told; the run trains the
    v target on a zero-terminal schedule, the LoRA says so, the pre-flight and Preview know it."""
    from trainer.engine.preview import PreviewEngine
    from trainer.models.load import load_model
    from trainer.models.sniff import sniff_family

    f = _vpred_file(tiny_sdxl, tmp_path / "noob.safetensors", "v_pred", "ztsnr")
    assert sniff_family(str(f)) == "sdxlv"
    m = load_model(str(f), config_dir=str(tiny_sdxl))
    assert (m.family, m.prediction_type, m.zero_terminal_snr) == ("sdxlv", "v_prediction", True)
    plain = load_model(str(_vpred_file(tiny_sdxl, tmp_path / "plain.safetensors")), config_dir=str(tiny_sdxl))
    assert (plain.family, plain.prediction_type, plain.zero_terminal_snr) == ("sdxl", "epsilon", False)
    out = tmp_path / "run"
    train(base_config(f, dataset, out, max_steps=2, model_config=str(tiny_sdxl)), out, echo=lambda *a: None)
    with safe_open(str(out / "lora.safetensors"), "pt") as fh:
        md = fh.metadata()
    assert md["ss_v_parameterization"] == "True" and md["modelspec.prediction_type"] == "v"
    assert md["ss_zero_terminal_snr"] == "True" and md["ss_base_model_version"] == "sdxl_base_v1-0"
    assert any("prediction type v_prediction" in e.get("message", "") for e in read_events(out)[0])
    engine = PreviewEngine(device="cpu")
    engine.set_base(str(f), str(tiny_sdxl))
    cfg = engine.pipe.scheduler.config
    assert cfg.prediction_type == "v_prediction" and cfg.rescale_betas_zero_snr


OPTIMIZERS = ["adafactor", "lion", "lion8bit", "pagedadamw8bit", "came", "schedulefree_adamw"]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_each_optimizer_trains_and_resumes_as_if_never_stopped(optimizer, tiny_sd1, dataset, tmp_path):
    kw = dict(max_steps=5, optimizer=optimizer, save_every_steps=1, unet_lr=1e-3)
    a = trained(tiny_sd1, dataset, tmp_path / "a", **kw)
    default = trained(tiny_sd1, dataset, tmp_path / "adamw", max_steps=5, save_every_steps=1, unet_lr=1e-3)
    if optimizer == "pagedadamw8bit":
        # bitsandbytes keeps 32-bit state for tensors under 4096 elements (its min_8bit_size), as a tiny model's LoRA
        # is: then paged AdamW is AdamW, and must give its LoRA
        assert same(a, default, atol=1e-5)
    else:
        assert not same(a, default)  # another optimizer, another LoRA
    b = tmp_path / "b"
    request(b, "stop")  # stops (and saves) after its first step
    fresh_accelerate_state()
    assert train(base_config(tiny_sd1, dataset, b, **kw), b, echo=lambda *x: None) == b
    fresh_accelerate_state()
    resumed = load_file(str(train(base_config(tiny_sd1, dataset, b, **kw), b, resume=True, echo=lambda *x: None)))
    fresh_accelerate_state()
    assert same(a, resumed), optimizer


@pytest.mark.slow
def test_adafactor_with_relative_steps_and_schedule_free_make_their_own_schedule(tiny_sd1, dataset, tmp_path):
    rel = trained(tiny_sd1, dataset, tmp_path / "rel", max_steps=2, optimizer="adafactor", adafactor_relative_step=True)
    fixed = trained(tiny_sd1, dataset, tmp_path / "fix", max_steps=2, optimizer="adafactor")
    assert not same(rel, fixed)
    errors, _ = TrainConfig(optimizer="schedulefree_adamw", lr_scheduler="cosine").problems()
    assert any("makes its own schedule" in e for e in errors)
    errors, _ = TrainConfig(optimizer="adafactor", adafactor_relative_step=True, warmup_steps=10).problems()
    assert any("relative steps makes its own schedule" in e for e in errors)
    errors, _ = TrainConfig(optimizer="adamw", adafactor_relative_step=True).problems()
    assert any("applies to optimizer = 'adafactor' only" in e for e in errors)
    # schedule-free: samples, validation and the export use its averaged weights, not the ones it steps with
    sf = tmp_path / "sf"
    trained(tiny_sd1, dataset, sf, max_steps=3, optimizer="schedulefree_adamw", warmup_steps=1)
    from trainer.engine import checkpoint as ckpt

    parts, _, opt_state = ckpt.read_checkpoint(ckpt.latest_checkpoint(sf))
    assert all(not g["train_mode"] for g in opt_state["param_groups"])  # saved in eval mode: the averaged x


def test_optimizer_facts_have_one_owner():
    from trainer.recipe import optimizers
    from trainer.recipe.estimate import estimate_vram_gb
    from trainer.recipe.kohya_ss import import_kohya, to_sd_scripts_toml

    cfg = TrainConfig(resolution=512, rank=64)
    params = {k: estimate_vram_gb(cfg.replace(optimizer=k), "sd1")["terms_gb"]["LoRA weights, gradients and optimizer state"]
              for k in ("adamw", "adamw8bit", "lion", "lion8bit", "adafactor", "prodigy")}
    assert params["prodigy"] > params["adamw"] > params["lion"] > params["adamw8bit"] > params["lion8bit"] >= params["adafactor"]
    for o in optimizers.OPTIMIZERS.values():
        assert o.key in TrainConfig.choices("optimizer")
        toml = to_sd_scripts_toml(TrainConfig(optimizer=o.key, lr_scheduler="constant"))
        assert f'optimizer_type = "{o.sd_scripts}"' in toml
        assert import_kohya({"optimizer": o.sd_scripts})[0]["optimizer"] == o.key  # round trip
    out, notes = import_kohya({"loss_type": "smooth_l1", "huber_schedule": "exponential", "huber_c": "0.2",
                               "multires_noise_iterations": 6, "ip_noise_gamma": 0.1, "zero_terminal_snr": True,
                               "debiased_estimation_loss": True, "loss_type_x": 1})
    assert out["loss_type"] == "smooth_l1" and out["huber_schedule"] == "exponential" and out["huber_c"] == 0.2
    assert out["zero_terminal_snr"] and out["debiased_estimation_loss"] and out["multires_noise_iterations"] == 6
    assert import_kohya({"loss_type": "perceptual"})[1] == ["loss_type = 'perceptual' is not supported (l2, l1, huber, smooth_l1): ignored"]


@pytest.mark.slow
def test_the_page_offers_the_recipes_in_their_groups_and_refuses_bad_pairs(tiny_sd2v, dataset, tmp_path):
    """Each option is a field of the Train tab's Advanced groups (Loss, Noise, Training), every optimizer is a
    choice, and Check setup names a conflicting pair in the labels the person sees."""
    from app.forms import in_ui_words, preflight
    from app.main import build_ui

    train = build_ui(tmp_path / "ws").lora_studio["tabs"]["train"]
    for name, group in (("loss_type", "loss"), ("huber_c", "loss"), ("debiased_estimation_loss", "loss"),
                        ("multires_noise_iterations", "noise"), ("ip_noise_gamma", "noise"),
                        ("zero_terminal_snr", "training"), ("adafactor_relative_step", "training")):
        assert name in train.comps and f"(Advanced › {group.capitalize()})" in in_ui_words(f"`{name}`"), name
    assert {c[1] if isinstance(c, tuple) else c for c in train.comps["optimizer"].choices} >= {
        "adafactor", "lion", "lion8bit", "pagedadamw8bit", "came", "schedulefree_adamw"}
    values = {"base_model": str(tiny_sd2v), "dataset": str(dataset), "optimizer": "schedulefree_adamw",
              "lr_scheduler": "cosine", "loss_type": "huber", "zero_terminal_snr": True}
    ok, text = preflight(values)
    assert not ok and "makes its own schedule" in in_ui_words(text) and "**Lr scheduler**" in in_ui_words(text)
    ok, text = preflight({**values, "lr_scheduler": "constant"})  # a v-prediction model: zero-terminal SNR is fine
    assert ok, text
