"""The house: one owner for each model family (trainer/models/families/) and for the kohya file
(trainer/loras/format.py). These tests hold the owners to what the rest of the code asks of them."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import base_config, make_images
from trainer.loras import format as lorafile
from trainer.models import families


def test_every_family_file_is_found_and_says_every_fact():
    """Each file in the package brings its families; every one answers the questions load, export, estimate, timing
    and the page ask, and its shipped configs exist."""
    import pkgutil

    import trainer.models.families as pkg

    files = {i.name for i in pkgutil.iter_modules(pkg.__path__)}
    assert files == {"sd1", "sd2", "sdxl"}
    assert set(families.KEYS) == {"sd1", "sd2", "sd2v", "sdxl", "sdxlv"}
    for f in families.FAMILIES.values():
        assert (f.config_dir / "unet" / "config.json").is_file(), f.key
        assert len(f.tokenizer_pads) == f.text_encoders == len(f.checkpoint_te), f.key
        assert f.part_prefix("unet") == "lora_unet_" and f.group in families.FAMILIES
        assert len(f.block_names) == sum(f.blocks)
        assert set(f.calibration.prior_step_s) == {"cpu", "cuda"}
    assert families.family("sd1").part_prefix("te1") == "lora_te_"  # LORA_FORMAT.md: not lora_te1_ for SD 1.x
    assert [families.family("sdxl").part_prefix(p) for p in ("te1", "te2")] == ["lora_te1_", "lora_te2_"]
    with pytest.raises(ValueError, match="no text encoder 'te2'"):
        families.family("sd1").part_prefix("te2")


@pytest.mark.parametrize("resolution,key", [(256, "sd1"), (512, "sd1"), (768, "sd1"), (1023, "sd1"), (1024, "sdxl"),
                                            (2048, "sdxl")])
def test_one_guess_from_a_resolution(resolution, key):
    """'SDXL if resolution >= 1024' has one owner; estimate, timing and the sd-scripts export all ask it."""
    from trainer.recipe.config import TrainConfig
    from trainer.recipe.estimate import estimate_vram_gb
    from trainer.recipe.kohya_ss import to_sd_scripts_toml

    assert families.guess(resolution).key == key
    assert families.resolve("auto", resolution).key == key
    assert families.resolve("sd2v", resolution).key == "sd2v"
    cfg = TrainConfig(resolution=resolution)
    assert estimate_vram_gb(cfg, "auto") == estimate_vram_gb(cfg, key)
    script = "sdxl_train_network.py" if key == "sdxl" else "train_network.py"
    assert f"accelerate launch {script} " in to_sd_scripts_toml(cfg)


def test_single_file_markers_belong_to_the_families():
    assert families.from_checkpoint_keys(["conditioner.embedders.1.model.ln_final.weight"]).key == "sdxl"
    assert families.from_checkpoint_keys(["cond_stage_model.model.ln_final.weight"]).key == "sd2"
    assert families.from_checkpoint_keys(["cond_stage_model.transformer.text_model.final_layer_norm.weight"]).key == "sd1"
    assert families.from_checkpoint_keys(["model.diffusion_model.out.0.weight"]) is None


def _lora(path, te_width=None, attn_width=None, metadata=None):
    t = {}
    for name, width in (("lora_te_text_model_encoder_layers_0_self_attn_q_proj", te_width),
                        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", attn_width)):
        if width:
            t[f"{name}.lora_down.weight"], t[f"{name}.lora_up.weight"] = torch.zeros(2, width), torch.zeros(320, 2)
    save_file(t, str(path), metadata=metadata)
    return path


def test_one_reader_tells_a_files_family_from_its_header(tmp_path):
    """Preview and the LoRA tools ask the same reader; Preview needs only the header (no tensor is read), and now
    tells SD 2.x from SD 1.x before diffusers fails with a shape error."""
    from trainer.engine.preview import PreviewError, lora_family
    from trainer.loras.tools import info

    cases = {"sd2": _lora(tmp_path / "a.safetensors", te_width=1024), "sd1": _lora(tmp_path / "b.safetensors", te_width=768),
             "sd2 ": _lora(tmp_path / "c.safetensors", attn_width=1024),
             "sdxl": _lora(tmp_path / "d.safetensors", te_width=768, metadata={"ss_base_model_version": "sdxl_base_v1-0"})}
    for want, path in cases.items():
        assert lora_family(path) == want.strip(), path.name
        assert lorafile.read(path).family == want.strip(), path.name
        assert info(path)["family"] == families.group_name(want.strip())
    save_file({"other": torch.zeros(1)}, str(tmp_path / "e.safetensors"))
    with pytest.raises(PreviewError, match="no kohya LoRA keys"):
        lora_family(tmp_path / "e.safetensors")


def test_modules_are_named_once_at_injection(tiny_sdxl):
    """The names given at injection are the file's keys, and per-block plans read their blocks from them."""
    from trainer.models import lora
    from trainer.models.load import load_model
    from trainer.recipe.config import TrainConfig

    m = load_model(str(tiny_sdxl))
    lora.inject_for_config(m, TrainConfig(rank=2, alpha=2, conv_rank=2))
    layout = lorafile.layout_of(m.unet.config)
    assert set(m.lora_names) == {"unet", "te1", "te2"}
    for part, names in m.lora_names.items():
        for module, name in names.items():
            assert name == lorafile.module_name(part, module, "sdxl", layout)
            assert name.startswith(families.family("sdxl").part_prefix(part))
    assert any("input_blocks" in n for n in m.lora_names["unet"].values())  # SGM names for SDXL


@pytest.mark.slow
def test_validation_noise_follows_the_vae_scale(tmp_path):
    """A VAE that downsamples 4x (not 8x): validation used to shape its noise `// 8` and crashed on the first
    validation; the noise now has the latents' shape."""
    from diffusers import AutoencoderKL

    from trainer.engine.loop import train
    from trainer.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd1")
    torch.manual_seed(0)
    pipe.vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                             up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 8, 16], latent_channels=4,
                             norm_num_groups=4, sample_size=64)
    model = tmp_path / "m"
    pipe.save_pretrained(model, safe_serialization=True)
    data = tmp_path / "data"
    make_images(data, 4)
    out = tmp_path / "run"
    cfg = base_config(model, data, out, max_steps=2, validation_split=0.25)
    path = train(cfg, out, echo=lambda *a: None)
    vals = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines() if '"validation"' in line]
    assert path.is_file() and vals and all(v["loss"] == v["loss"] for v in vals)


def test_a_variant_is_one_object(monkeypatch):
    """Adding a variant is one Family object in a file of the package (here put in place by the test, as the SDXL
    v-prediction variant is in sdxl.py): it is told apart in a single file, named in exports, estimated and laid
    out by the code that exists, with nothing else changed."""
    import dataclasses

    from trainer.loras.export import build_metadata
    from trainer.models.load import _family
    from trainer.recipe.config import TrainConfig
    from trainer.recipe.estimate import estimate_vram_gb

    base = families.family("sdxl")
    v = dataclasses.replace(base, key="sdxlx", name="SDXL (test variant)", base_version="sdxl_x_test",
                            prediction_type="v_prediction", checkpoint_marker=None, guessable=False,
                            detect=lambda keys, tensor, metadata: "x_pred" in keys)
    monkeypatch.setitem(families.FAMILIES, "sdxlx", v)
    sdxl_keys = ["conditioner.embedders.1.model.ln_final.weight"]
    assert _family(sdxl_keys + ["x_pred"], lambda k: None, {}) == "sdxlx"
    assert _family(sdxl_keys + ["v_pred"], lambda k: None, {}) == "sdxlv"
    assert _family(sdxl_keys, lambda k: None, {"modelspec.prediction_type": "v"}) == "sdxlv"
    assert _family(sdxl_keys, lambda k: None, {}) == "sdxl"
    assert v.config_dir == base.config_dir and families.group("sdxlx") == "sdxl"
    assert build_metadata(TrainConfig(), "sdxlx", {})["ss_base_model_version"] == "sdxl_x_test"
    layout = {"layers_per_block": 2, "up_has_attn": {0: True, 1: True, 2: False}}
    assert lorafile.module_name("unet", "down_blocks.1.attentions.0.proj_in", "sdxlx", layout) == \
        lorafile.module_name("unet", "down_blocks.1.attentions.0.proj_in", "sdxl", layout) == "lora_unet_input_blocks_4_1_proj_in"
    cfg = TrainConfig(resolution=1024)
    assert estimate_vram_gb(cfg, "sdxlx") == estimate_vram_gb(cfg, "sdxl") == estimate_vram_gb(cfg, "sdxlv")
