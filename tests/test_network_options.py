"""LoRA+ and kohya's rank / module dropout (issue 26, items 2 and 3) on peft's own layers."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import base_config
from trainer.engine.loop import train
from trainer.engine.setup import fresh_accelerate_state
from trainer.events import request
from trainer.models import lora
from trainer.models.load import load_model
from trainer.recipe.config import TrainConfig


def trained(model, data, out, **kw) -> dict:
    fresh_accelerate_state()
    path = train(base_config(model, data, out, **kw), out, echo=lambda *a: None)
    fresh_accelerate_state()
    return load_file(str(path))


def same(a, b, atol=1e-6):
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=atol) for k in a)


def _layer(model_dir, **cfg):
    m = load_model(str(model_dir))
    torch.manual_seed(0)
    lora.inject_for_config(m, TrainConfig(rank=4, alpha=4, train_text_encoder=False, **cfg))
    for p in lora.lora_parameters(m.unet):
        p.data.normal_()  # a LoRA that adds something (B starts at zero)
    name, layer = next((n, mod) for n, mod in m.unet.named_modules() if n.endswith("attn1.to_q") and hasattr(mod, "lora_A"))
    return layer


def test_rank_and_module_dropout_act_only_while_training_with_gradients(tiny_sd1):
    x = torch.randn(2, 5, 32)
    plain = _layer(tiny_sd1)
    dropped = _layer(tiny_sd1, rank_dropout=0.5)
    plain.eval(), dropped.eval()
    assert torch.allclose(plain(x), dropped(x))  # evaluation: no dropout
    dropped.train()
    with torch.no_grad():
        assert torch.allclose(plain(x), dropped(x))  # samples (no gradients): no dropout
    torch.manual_seed(1)
    y = dropped(x)
    assert not torch.allclose(plain(x), y)
    # kohya's rule: a per-image mask over the rank, kept channels scaled by 1/(1-p)
    base = plain.get_base_layer()(x)
    torch.manual_seed(1)
    keep = (torch.rand(2, 4) > 0.5).float() / 0.5
    a, b = plain.lora_A["default"], plain.lora_B["default"]
    assert torch.allclose(y, base + b(a(x) * keep[:, None, :]) * plain.scaling["default"], atol=1e-5)
    gone = _layer(tiny_sd1, module_dropout=0.999)
    gone.train()
    assert torch.allclose(gone(x), gone.get_base_layer()(x))  # the module left out: the base layer alone


def test_loraplus_puts_the_up_matrices_at_ratio_times_the_rate(tiny_sd1, dataset, tmp_path):
    from accelerate import Accelerator

    from trainer.engine.setup import make_schedule

    m = load_model(str(tiny_sd1))
    cfg = base_config(tiny_sd1, dataset, tmp_path, loraplus_lr_ratio=16, loraplus_text_encoder_lr_ratio=4)
    lora.inject_for_config(m, cfg)
    opt, *_ = make_schedule(cfg, m, Accelerator(cpu=True), 4, "cpu")
    fresh_accelerate_state()
    ups = lora.up_parameters(m.unet) | set().union(*(lora.up_parameters(te) for te in m.text_encoders))
    rates = {}
    for g in opt.param_groups:
        kinds = {id(p) in ups for p in g["params"]}
        assert len(kinds) == 1  # a group holds up or down matrices, never both
        rates.setdefault(kinds.pop(), set()).add(g["lr"])
    assert rates[False] == {cfg.unet_lr, cfg.text_encoder_lr}
    assert rates[True] == {cfg.unet_lr * 16, cfg.text_encoder_lr * 4}


@pytest.mark.slow
def test_each_option_changes_training_and_ratio_one_does_not(tiny_sd1, dataset, tmp_path):
    kw = dict(max_steps=3)
    base = trained(tiny_sd1, dataset, tmp_path / "base", **kw)
    for name, opts in {"loraplus": dict(loraplus_lr_ratio=16), "rank": dict(rank_dropout=0.3),
                       "module": dict(module_dropout=0.3)}.items():
        assert not same(base, trained(tiny_sd1, dataset, tmp_path / name, **kw, **opts)), name
    assert same(base, trained(tiny_sd1, dataset, tmp_path / "one", **kw, loraplus_lr_ratio=1))  # AdamW: per element
    with safe_open(str(tmp_path / "rank" / "lora.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["ss_network_args"])["rank_dropout"] == "0.3"


@pytest.mark.slow
def test_a_run_with_dropouts_and_loraplus_resumes_as_if_never_stopped(tiny_sd1, dataset, tmp_path):
    kw = dict(max_steps=4, rank_dropout=0.3, module_dropout=0.2, loraplus_lr_ratio=8, save_every_steps=1)
    a = trained(tiny_sd1, dataset, tmp_path / "a", **kw)
    b = tmp_path / "b"
    request(b, "stop")
    fresh_accelerate_state()
    assert train(base_config(tiny_sd1, dataset, b, **kw), b, echo=lambda *x: None) == b  # stopped after step 1
    fresh_accelerate_state()
    resumed = load_file(str(train(base_config(tiny_sd1, dataset, b, **kw), b, resume=True, echo=lambda *x: None)))
    fresh_accelerate_state()
    assert same(a, resumed)


def test_bad_pairs_and_kohya_names():
    from trainer.recipe.kohya_ss import import_kohya, to_sd_scripts_toml

    errors, _ = TrainConfig(optimizer="prodigy", unet_lr=1.0, text_encoder_lr=1.0, loraplus_lr_ratio=16).problems()
    assert any("LoRA+ with prodigy" in e and "sd-scripts #1929" in e for e in errors)
    errors, _ = TrainConfig(rank_dropout=1.0).problems()
    assert any("rank_dropout must be between 0 and 1" in e for e in errors)
    out, _ = import_kohya({"loraplus_lr_ratio": 16, "rank_dropout": "0.1", "module_dropout": 0.05})
    assert out == {"loraplus_lr_ratio": 16.0, "rank_dropout": 0.1, "module_dropout": 0.05}
    toml = to_sd_scripts_toml(TrainConfig(**out))
    assert 'network_args = ["rank_dropout=0.1", "module_dropout=0.05", "loraplus_lr_ratio=16"]' in toml


@pytest.mark.slow  # a training or a worker: the fast tier stays under 3 minutes
def test_ema_of_the_lora_is_what_the_file_holds_and_changes_nothing_else(tiny_sd1, dataset, tmp_path):
    """The EMA does not change training (the -raw file is the run without EMA, bit for bit), decay 0 follows the
    weights exactly, a real decay gives another file, and the metadata says so."""
    kw = dict(max_steps=3, unet_lr=1e-2, text_encoder_lr=1e-2)
    plain = trained(tiny_sd1, dataset, tmp_path / "plain", **kw)
    ema = trained(tiny_sd1, dataset, tmp_path / "ema", **kw, ema=True, ema_decay=0.9, ema_export="both")
    raw = load_file(str(tmp_path / "ema" / "lora-raw.safetensors"))
    assert same(plain, raw, atol=0) and not same(plain, ema)
    with safe_open(str(tmp_path / "ema" / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_ema"] == "True" and f.metadata()["ss_ema_decay"] == "0.9"
    assert same(plain, trained(tiny_sd1, dataset, tmp_path / "zero", **kw, ema=True, ema_decay=0.0))
    assert not (tmp_path / "zero" / "lora-raw.safetensors").exists()


@pytest.mark.slow
def test_a_run_with_ema_resumes_as_if_never_stopped(tiny_sd1, dataset, tmp_path):
    kw = dict(max_steps=4, ema=True, ema_decay=0.9, ema_update_every=1, save_every_steps=1, unet_lr=1e-2)
    a = trained(tiny_sd1, dataset, tmp_path / "a", **kw)
    b = tmp_path / "b"
    request(b, "stop")
    fresh_accelerate_state()
    assert train(base_config(tiny_sd1, dataset, b, **kw), b, echo=lambda *x: None) == b
    fresh_accelerate_state()
    resumed = load_file(str(train(base_config(tiny_sd1, dataset, b, **kw), b, resume=True, echo=lambda *x: None)))
    fresh_accelerate_state()
    assert same(a, resumed)
