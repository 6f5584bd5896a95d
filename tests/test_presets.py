"""Presets: every shipped one trains; user presets; kohya_ss import/export."""
from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from conftest import base_config
from trainer.cli import main as cli
from trainer.recipe.config import ConfigError, TrainConfig, tomllib
from trainer.recipe.kohya_ss import import_kohya, import_kohya_file, to_sd_scripts_toml
from trainer.recipe.presets import (
    SHIPPED_DIR, delete_user_preset, family_mismatch, find_preset, list_presets, rename_user_preset, save_user_preset,
)

SHIPPED = sorted(p.stem for p in SHIPPED_DIR.glob("*.toml"))


def test_the_promised_presets_ship_with_their_reasons():
    assert {"sd15_character", "sd15_style", "sd15_concept", "sdxl_character", "sdxl_style", "sdxl_lowvram",
            "quick_test"} <= set(SHIPPED)
    for p in list_presets():
        assert p.name and p.family in ("sd1", "sdxl", "any") and len(p.description) > 80 and p.steps
        cfg = p.apply(TrainConfig(base_model="m", dataset="d"))
        cfg.validate()
    low = find_preset("sdxl_lowvram").apply(TrainConfig(base_model="m", dataset="d"))
    assert low.optimizer == "adamw8bit" and low.gradient_checkpointing and low.cache_latents
    assert low.cache_text_encoder_outputs and not low.train_text_encoder and low.rank <= 8
    assert find_preset("sdxl_style").apply(TrainConfig()).unet_lr == 1.0  # Prodigy wants LR 1.0


@pytest.mark.parametrize("key", SHIPPED)
def test_every_shipped_preset_trains_a_few_steps(key, tiny_sd1, tiny_sdxl, dataset, tmp_path):
    p = find_preset(key)
    model = tiny_sdxl if p.family == "sdxl" else tiny_sd1
    cfg = p.apply(base_config(model, dataset, tmp_path / "run"))
    # only what a tiny model needs changes: size and length. Optimizer (8-bit AdamW too) and precision (bf16 too)
    # are the preset's own, so the code a GPU user runs is the code that runs here.
    cfg = cfg.replace(resolution=64, min_bucket=64, max_bucket=128, max_steps=2, epochs=1, save_every_steps=0,
                      sample_every_steps=0)
    cfg.save(tmp_path / "c.toml")
    assert cli(["train", str(tmp_path / "c.toml")]) == 0
    assert (tmp_path / "run" / "lora.safetensors").is_file()
    with safe_open(str(tmp_path / "run" / "lora.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["ss_optimizer"] == p.apply(TrainConfig()).optimizer
    assert md["ss_mixed_precision"] == p.apply(TrainConfig()).mixed_precision


def test_user_presets_save_rename_delete_and_never_overwrite_shipped(tmp_path):
    user = tmp_path / "presets"
    user.mkdir()
    cfg = TrainConfig(base_model="/my/model.safetensors", dataset="/my/data", rank=12, alpha=6.0, unet_lr=3e-4)
    p = save_user_preset(user, "My faces", cfg, family="sd1", description="mine")
    assert not p.shipped and p.config == {"rank": 12, "alpha": 6.0, "unet_lr": 3e-4}  # personal fields stay out
    assert find_preset("My faces", user).apply(TrainConfig()).rank == 12
    with pytest.raises(ConfigError, match="shipped preset"):
        save_user_preset(user, "Quick test", cfg)
    with pytest.raises(ConfigError, match="cannot be deleted"):
        delete_user_preset(user, "quick_test")
    r = rename_user_preset(user, p.key, "Faces v2")
    assert find_preset("Faces v2", user).config["rank"] == 12
    with pytest.raises(ConfigError):
        find_preset("My faces", user)
    delete_user_preset(user, r.key)
    assert [x for x in list_presets(user) if not x.shipped] == []


def test_wrong_family_preset_is_flagged():
    assert "is for SDXL but the base model is SD 1.x" in family_mismatch(find_preset("sdxl_character"), "sd1")
    assert family_mismatch(find_preset("sdxl_character"), "sdxl") is None
    assert family_mismatch(find_preset("quick_test"), "sd1") is None


KOHYA_SD15 = {
    "LoRA_type": "Standard", "pretrained_model_name_or_path": "runwayml/stable-diffusion-v1-5",
    "network_dim": 64, "network_alpha": 64, "learning_rate": 0.0001, "unet_lr": 0.0001, "text_encoder_lr": 5e-05,
    "optimizer": "AdamW8bit", "lr_scheduler": "cosine", "lr_warmup": 10, "max_train_steps": "2000",
    "train_batch_size": 2, "max_resolution": "512,512", "mixed_precision": "bf16", "save_precision": "fp16",
    "gradient_checkpointing": True, "cache_latents": True, "cache_latents_to_disk": False, "min_snr_gamma": 5,
    "noise_offset": 0.05, "network_dropout": 0.1, "keep_tokens": 1, "shuffle_caption": True,
    "caption_extension": "txt", "epoch": 10, "seed": "1234", "xformers": "xformers", "color_aug": False,
    "random_crop": False, "optimizer_args": "", "v2": False, "some_future_option": 3,
}


def test_kohya_json_import_maps_and_explains(tmp_path):
    f = tmp_path / "kohya.json"
    f.write_text(json.dumps(KOHYA_SD15))
    values, notes = import_kohya_file(f)
    cfg = TrainConfig.from_dict(values)
    assert (cfg.rank, cfg.alpha, cfg.unet_lr, cfg.text_encoder_lr) == (64, 64.0, 1e-4, 5e-5)
    assert cfg.optimizer == "adamw8bit" and cfg.lr_scheduler == "cosine" and cfg.max_steps == 2000
    assert cfg.warmup_steps == 200  # kohya_ss's lr_warmup is a percentage
    assert cfg.batch_size == 2 and cfg.resolution == 512 and cfg.mixed_precision == "bf16"
    assert cfg.gradient_checkpointing and cfg.cache_latents and not cfg.cache_latents_to_disk
    assert cfg.min_snr_gamma == 5 and cfg.noise_offset == 0.05 and cfg.dropout == 0.1
    assert cfg.shuffle_tags and cfg.keep_tokens == 1 and cfg.caption_extension == ".txt" and cfg.seed == 1234
    ignored = " ".join(notes)
    assert "xformers" in ignored and "some_future_option" in ignored  # unknown keys are listed, not dropped silently


def test_kohya_conflicts_are_resolved_as_sd_scripts_does_and_said():
    values, notes = import_kohya({"learning_rate": 0.0002, "unet_lr": 0.0001, "text_encoder_lr": 0,
                                  "cache_text_encoder_outputs": True, "optimizer": "DAdaptAdam", "lr_scheduler": "cosine_with_restarts",
                                  "max_resolution": "1024,768", "lr_warmup": 5})
    assert values["unet_lr"] == 1e-4 and values["train_text_encoder"] is False
    assert values["cache_text_encoder_outputs"] is True  # allowed: the TE is not trained
    assert values["lr_scheduler"] == "cosine" and "optimizer" not in values
    text = " | ".join(notes)
    assert "unet_lr" in text and "DAdaptAdam" in text and "cosine_with_restarts" in text and "not square" in text
    assert "lr_warmup" in text  # a percentage without max_train_steps cannot become steps
    values, notes = import_kohya({"text_encoder_lr": 5e-5, "cache_text_encoder_outputs": True})
    assert values["cache_text_encoder_outputs"] is False and any("conflicts" in n for n in notes)
    with pytest.raises(ValueError):
        import_kohya_file(__file__)  # not JSON


def test_round_trip_to_toml_and_sd_scripts(tmp_path):
    cfg = TrainConfig(base_model="/m.safetensors", dataset="/d", trigger="zwx, ohwx", rank=8, alpha=2.5,
                      sample_prompts=['a "quoted" prompt', "ünïcode"], conv_rank=4, min_snr_gamma=5.0)
    cfg.save(tmp_path / "c.toml")
    assert TrainConfig.load(tmp_path / "c.toml") == cfg
    sd = tomllib.loads(to_sd_scripts_toml(cfg))
    assert sd["network_dim"] == 8 and sd["network_alpha"] == 2.5 and sd["optimizer_type"] == "AdamW"
    assert sd["network_args"] == ["conv_dim=4", "conv_alpha=1"] and sd["min_snr_gamma"] == 5.0
    assert cli(["presets", "export-kohya", str(tmp_path / "c.toml")]) == 0
    (tmp_path / "k.json").write_text(json.dumps(KOHYA_SD15))
    assert cli(["presets", "import-kohya", str(tmp_path / "k.json"), "--out", str(tmp_path / "from_kohya.toml")]) == 0
    assert TrainConfig.load(tmp_path / "from_kohya.toml").rank == 64
