"""DoRA for real: trained with peft, exported as kohya `dora_scale`, and the weight ComfyUI and A1111 compute from
the file is the weight that was trained.

The two loaders' formulas are written here from reading their public source (ComfyUI
`comfy/weight_adapter/base.py:weight_decompose` with `lora.py:calculate_weight`; AUTOMATIC1111
`extensions-builtin/Lora/network.py:apply_weight_decompose` with `finalize_updown`), not imported from them.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from conftest import base_config
from trainer.engine import checkpoint as ckpt
from trainer.cli import main as cli
from trainer.recipe.config import TrainConfig
from trainer.loras.format import module_name
from trainer.models import lora
from trainer.models.load import load_model


def column_norm(w: torch.Tensor) -> torch.Tensor:
    """||w||_c per input channel, shaped to broadcast against w ([1, in] or [1, in, 1, 1])."""
    return w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1, keepdim=True).reshape(w.shape[1], *[1] * (w.dim() - 1)).transpose(0, 1)


def comfyui_weight(w, up, down, alpha, dora_scale, strength=1.0):
    """ComfyUI: lora_diff = up @ down scaled by alpha / rank, added, normalised per column, times dora_scale;
    a strength other than 1 blends the result with the original weight."""
    diff = (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * (alpha / down.shape[0])
    calc = w + diff
    calc = calc * (dora_scale / column_norm(calc))
    return w + strength * (calc - w)


def a1111_weight(w, up, down, alpha, dora_scale, multiplier=1.0):
    """A1111: the decomposition runs on W + up @ down (no alpha yet); the difference to W is then scaled by
    alpha / dim and the multiplier."""
    merged = (up.flatten(1) @ down.flatten(1)).reshape(w.shape) + w
    final_updown = merged * (dora_scale / column_norm(merged)) - w
    return w + final_updown * (alpha / down.shape[0]) * multiplier


def apply(mod, x, weight):
    base = mod.get_base_layer()
    if isinstance(base, torch.nn.Conv2d):
        return F.conv2d(x, weight, base.bias, base.stride, base.padding, base.dilation, base.groups)
    return F.linear(x, weight, base.bias)


def trained(model_dir, run_dir):
    """The trainer's own adapted model, rebuilt from the last checkpoint's peft weights."""
    m = load_model(str(model_dir))
    parts, state, _ = ckpt.read_checkpoint(ckpt.latest_checkpoint(run_dir))
    cfg = TrainConfig.from_dict(state["config"])
    lora.inject_for_config(m, cfg)
    lora.load_parts(m, parts)
    return m, state


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_weight_comfyui_and_a1111_compute_from_the_file_is_the_trained_weight(family, request, dataset, tmp_path):
    model_dir = request.getfixturevalue(f"tiny_{family}")
    out = tmp_path / "run"
    cfg = base_config(model_dir, dataset, out, use_dora=True, rank=4, alpha=2, max_steps=4, unet_lr=2e-2,
                      text_encoder_lr=2e-2, conv_rank=2, conv_alpha=1)
    cfg.save(tmp_path / "c.toml")
    assert cli(["train", str(tmp_path / "c.toml")]) == 0
    sd = load_file(str(out / "lora.safetensors"))  # fp32: base_config saves fp32
    m, state = trained(model_dir, out)
    up_attn = {int(k): v for k, v in state["up_has_attn"].items()}
    g = torch.Generator().manual_seed(0)
    checked = {"linear": 0, "conv": 0, "te": 0}
    for part, model in lora.part_modules(m).items():
        for name, mod in model.named_modules():
            if not isinstance(mod, LoraLayer):
                continue
            key = module_name(part, name, family, {**state, "up_has_attn": up_attn})
            up, down, alpha = sd[f"{key}.lora_up.weight"], sd[f"{key}.lora_down.weight"], float(sd[f"{key}.alpha"])
            dora_scale, w = sd[f"{key}.dora_scale"], mod.get_base_layer().weight
            assert dora_scale.shape == (1, w.shape[1], *[1] * (w.dim() - 2))
            comfy = comfyui_weight(w, up, down, alpha, dora_scale)
            a1111 = a1111_weight(w, up, down, alpha, dora_scale)
            assert torch.allclose(comfy, a1111, atol=1e-6), key
            shape = (2, w.shape[1]) if w.dim() == 2 else (1, w.shape[1], 6, 6)
            x = torch.randn(shape, generator=g)
            with torch.no_grad():
                assert torch.allclose(mod(x), apply(mod, x, comfy), atol=1e-5, rtol=1e-5), key
                # and the blend at another strength is what both loaders compute
                half = comfyui_weight(w, up, down, alpha, dora_scale, 0.5)
                assert torch.allclose(half, a1111_weight(w, up, down, alpha, dora_scale, 0.5), atol=1e-6)
            checked["te" if part != "unet" else "conv" if w.dim() == 4 else "linear"] += 1
    assert all(checked.values()), checked  # UNet linears, convs (LoCon, SD1's 1x1 proj), text encoders
    # the magnitudes were trained: they are no longer the base weight's column norms
    moved = [float((sd[k] - column_norm(w_).reshape(sd[k].shape)).abs().max()) for k, w_ in _bases(m, sd, family, state)]
    assert max(moved) > 1e-4


def _bases(m, sd, family, state):
    up_attn = {int(k): v for k, v in state["up_has_attn"].items()}
    for part, model in lora.part_modules(m).items():
        for name, mod in model.named_modules():
            if isinstance(mod, LoraLayer):
                yield f"{module_name(part, name, family, {**state, 'up_has_attn': up_attn})}.dora_scale", mod.get_base_layer().weight


@pytest.mark.slow  # a training or a worker: the fast tier stays under 3 minutes
def test_dora_trains_a_different_file_that_diffusers_and_preview_load(tiny_sd1, dataset, tmp_path):
    from diffusers import StableDiffusionPipeline

    from trainer.engine.preview import GenParams, LoraSpec, PreviewEngine

    files = {}
    for dora in (False, True):
        out = tmp_path / f"run_{dora}"
        base_config(tiny_sd1, dataset, out, use_dora=dora, max_steps=4, unet_lr=1e-2).save(tmp_path / f"{dora}.toml")
        assert cli(["train", str(tmp_path / f"{dora}.toml")]) == 0
        files[dora] = out / "lora.safetensors"
    a, b = load_file(str(files[False])), load_file(str(files[True]))
    assert not any(k.endswith(".dora_scale") for k in a) and any(k.endswith(".dora_scale") for k in b)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    pipe.load_lora_weights(str(files[True]))  # loads (dora_scale is dropped by diffusers, with a warning)

    e = PreviewEngine("cpu")
    e.set_base(str(tiny_sd1))
    p = dict(prompt="zwx, red square", seed=3, steps=2, cfg=5.0, width=64, height=64, sampler="Euler")
    arr = lambda img: np.asarray(img, dtype=np.float32)  # noqa: E731
    base = arr(e.generate(GenParams(**p))[0][0])
    at = {s: arr(e.generate(GenParams(**p, loras=[LoraSpec(str(files[True]), s)]))[0][0]) for s in (0.0, 1.0)}
    assert np.array_equal(at[0.0], base)  # strength 0 is the base model, as in ComfyUI and A1111
    own, _ = trained(tiny_sd1, tmp_path / "run_True")
    pipe = own.pipeline(scheduler=e.pipe.scheduler)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(p["prompt"], num_inference_steps=2, guidance_scale=5.0, width=64, height=64,
               generator=torch.Generator().manual_seed(3)).images[0]
    assert np.abs(arr(ref) - at[1.0]).max() <= 1.0  # Preview at strength 1 is the trained DoRA model
    assert np.abs(at[1.0] - base).mean() > 0


@pytest.mark.slow  # a longer training: the full suite runs it, the fast tier does not
def test_dora_resume_equals_an_uninterrupted_run(tiny_sd1, dataset, tmp_path):
    from trainer.events import request

    kw = dict(use_dora=True, max_steps=4, unet_lr=1e-2)
    a, b = tmp_path / "a", tmp_path / "b"
    base_config(tiny_sd1, dataset, a, **kw).save(tmp_path / "a.toml")
    assert cli(["train", str(tmp_path / "a.toml")]) == 0
    request(b, "stop")
    base_config(tiny_sd1, dataset, b, **kw).save(tmp_path / "b.toml")
    assert cli(["train", str(tmp_path / "b.toml")]) == 0
    assert cli(["train", str(tmp_path / "b.toml"), "--resume"]) == 0
    wa, wb = load_file(str(a / "lora.safetensors")), load_file(str(b / "lora.safetensors"))
    assert wa.keys() == wb.keys() and any(k.endswith(".dora_scale") for k in wa)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
