"""Base-model loading: single-file checkpoints (offline), family detection, the shipped configs."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import base_config
from ldm import save_single_file
from trainer.cli import main as cli
from trainer.models.load import CONFIG_ROOT, ModelError, clip_tokenizer, load_model
from trainer.models.sniff import sniff_family


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_checkpoint_loads_the_same_weights_as_the_folder(family, suffix, request, tmp_path):
    folder = request.getfixturevalue(f"tiny_{family}")
    f = tmp_path / f"model{suffix}"
    save_single_file(folder, f, family)
    if suffix == ".safetensors":
        assert sniff_family(str(f)) == family  # the UI tells the family from the header alone
    a, b = load_model(str(folder)), load_model(str(f), config_dir=str(folder))
    assert b.family == family
    pairs = [(a.unet, b.unet), (a.vae, b.vae)] + list(zip(a.text_encoders, b.text_encoders))
    for x, y in pairs:
        sx, sy = x.state_dict(), y.state_dict()
        assert sx.keys() == sy.keys()
        assert all(torch.equal(sx[k], sy[k]) for k in sx)


@pytest.mark.slow  # trains: the fast tier stays under 3 minutes (the full suite runs it)
def test_training_from_a_single_file_exports_the_same_lora(tiny_sd1, dataset, tmp_path):
    f = tmp_path / "model.safetensors"
    save_single_file(tiny_sd1, f, "sd1")
    outs = []
    for name, model, extra in (("folder", tiny_sd1, {}), ("file", f, {"model_config": str(tiny_sd1)})):
        out = tmp_path / name
        cfg = base_config(model, dataset, out, max_steps=2, **extra)
        cfg.save(tmp_path / f"{name}.toml")
        assert cli(["train", str(tmp_path / f"{name}.toml")]) == 0
        outs.append(out / "lora.safetensors")
    from safetensors.torch import load_file

    a, b = load_file(str(outs[0])), load_file(str(outs[1]))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst  # same weights; only float summation order may differ


def test_shipped_configs_describe_the_real_architectures():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def count(m):
        return round(sum(p.numel() for p in m.parameters()) / 1e6, 1)

    expected = {"sd1": (859.5, [123.1]), "sd2": (865.9, [340.4]), "sd2v": (865.9, [340.4]), "sdxl": (2567.5, [123.1, 694.7])}
    for fam, (unet_m, te_m) in expected.items():
        d = CONFIG_ROOT / fam
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(json.loads((d / "unet" / "config.json").read_text()))
            tes = [CLIPTextModel(CLIPTextConfig(**json.loads((d / "text_encoder" / "config.json").read_text())))]
            if fam == "sdxl":
                tes.append(CLIPTextModelWithProjection(CLIPTextConfig(**json.loads((d / "text_encoder_2" / "config.json").read_text()))))
        assert count(unet) == unet_m, fam
        assert [count(t) for t in tes] == te_m, fam
    sched = json.loads((CONFIG_ROOT / "sd2v" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"


def test_shipped_tokenizer_is_openai_clip():
    tok = clip_tokenizer()
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert clip_tokenizer(pad="!").pad_token_id == 0


def test_a_lora_file_given_as_base_model_is_refused_plainly(tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "someone_elses_lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(f))
    with pytest.raises(ModelError, match="Unknown architecture.*or a LoRA"):
        load_model(str(f))
