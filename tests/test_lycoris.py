"""LoHa and LoKr (LyCORIS) for real: trained with peft's layers, exported in LyCORIS' key layout, and the weight
ComfyUI and A1111 compute from the file is the weight that was trained, at strength 1 and 0.5.

The loaders' formulas are written here from reading their public source, not imported from them:
- ComfyUI `comfy/weight_adapter/loha.py` (`calculate_weight`): scale = alpha / hada_w1_b.shape[0] (1 without
  alpha); m1 = w1_a @ w1_b, or with hada_t1 einsum('i j k l, j r, i p -> p r k l', t1, w1_b, w1_a); the same for
  m2; weight += strength * scale * (m1 * m2).reshape(weight.shape).
- ComfyUI `comfy/weight_adapter/lokr.py`: w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b (dim = w1_b.shape[0]); w2 =
  lokr_w2, or lokr_w2_a @ lokr_w2_b, or with lokr_t2 the same einsum (dim = w2_b.shape[0]); a 4-D w2 makes w1
  [.., .., 1, 1]; scale = alpha / dim when a factor was low-rank and alpha is given, else 1;
  weight += strength * scale * kron(w1, w2).reshape(weight.shape).
- A1111 `extensions-builtin/Lora/network_hada.py`, `network_lokr.py`, `lyco_helpers.py`, `network.py`
  (`calc_scale`, `finalize_updown`): the same products (make_weight_cp: einsum('i j k l, j r -> i r k l', t, wb)
  then einsum('i j k l, i r -> r j k l', temp, wa)), dim = hada_w1_b.shape[0] for LoHa and the last low-rank
  factor's rank for LoKr (None otherwise), scale = alpha / dim when both are known, else 1; times the multiplier.
"""
from __future__ import annotations

import pytest
import torch
from peft.tuners.lycoris_utils import LycorisLayer
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import base_config
from test_dora import apply, trained  # the trained model rebuilt from its checkpoint; a weight applied to an input
from trainer.cli import main as cli
from trainer.loras import format as fmt
from trainer.loras.format import module_name
from trainer.models import lora
from trainer.recipe.config import ConfigError, TrainConfig


# ------------------------------------------------------------------------------ the loaders' formulas
def comfy_cp(t, wb, wa):
    return torch.einsum("i j k l, j r, i p -> p r k l", t, wb, wa)


def comfyui_loha(w, sd, key, strength):
    g = lambda n: sd.get(f"{key}.{n}")  # noqa: E731
    alpha = g("alpha")
    scale = float(alpha) / g("hada_w1_b").shape[0] if alpha is not None else 1.0
    if g("hada_t1") is not None:
        m1 = comfy_cp(g("hada_t1"), g("hada_w1_b"), g("hada_w1_a"))
        m2 = comfy_cp(g("hada_t2"), g("hada_w2_b"), g("hada_w2_a"))
    else:
        m1, m2 = g("hada_w1_a") @ g("hada_w1_b"), g("hada_w2_a") @ g("hada_w2_b")
    return w + (strength * scale) * (m1 * m2).reshape(w.shape)


def comfyui_lokr(w, sd, key, strength):
    g = lambda n: sd.get(f"{key}.{n}")  # noqa: E731
    dim = None
    w1 = g("lokr_w1")
    if w1 is None:
        dim = g("lokr_w1_b").shape[0]
        w1 = g("lokr_w1_a") @ g("lokr_w1_b")
    w2 = g("lokr_w2")
    if w2 is None:
        dim = g("lokr_w2_b").shape[0]
        w2 = g("lokr_w2_a") @ g("lokr_w2_b") if g("lokr_t2") is None else comfy_cp(g("lokr_t2"), g("lokr_w2_b"), g("lokr_w2_a"))
    if w2.dim() == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    scale = float(g("alpha")) / dim if g("alpha") is not None and dim is not None else 1.0
    return w + (strength * scale) * torch.kron(w1, w2).reshape(w.shape)


def a1111_cp(t, wa, wb):
    temp = torch.einsum("i j k l, j r -> i r k l", t, wb)
    return torch.einsum("i j k l, i r -> r j k l", temp, wa)


def a1111_finalize(w, updown, output_shape, dim, alpha, multiplier):
    if len(output_shape) == 4:
        updown = updown.reshape(output_shape)
    if w.numel() == updown.numel():
        updown = updown.reshape(w.shape)
    scale = alpha / dim if dim is not None and alpha is not None else 1.0
    return w + updown * scale * multiplier


def a1111_loha(w, sd, key, multiplier):
    g = lambda n: sd.get(f"{key}.{n}")  # noqa: E731
    w1a, w1b, w2a, w2b, t1, t2 = (g(n) for n in fmt.LYCO_KEYS["loha"])
    alpha = float(g("alpha")) if g("alpha") is not None else None
    output_shape = [w1a.size(0), w1b.size(1)]
    if t1 is not None:
        output_shape = [w1a.size(1), w1b.size(1)] + list(t1.shape[2:])
        up1 = a1111_cp(t1, w1a, w1b)
    else:
        up1 = (w1a.reshape(w1a.size(0), -1) @ w1b.reshape(w1b.size(0), -1)).reshape(output_shape)
    up2 = a1111_cp(t2, w2a, w2b) if t2 is not None else (w2a @ w2b.reshape(w2b.size(0), -1)).reshape(output_shape)
    return a1111_finalize(w, up1 * up2, output_shape, w1b.shape[0], alpha, multiplier)


def a1111_lokr(w, sd, key, multiplier):
    g = lambda n: sd.get(f"{key}.{n}")  # noqa: E731
    dim = g("lokr_w1_b").shape[0] if g("lokr_w1_b") is not None else None
    dim = g("lokr_w2_b").shape[0] if g("lokr_w2_b") is not None else dim
    alpha = float(g("alpha")) if g("alpha") is not None else None
    w1 = g("lokr_w1") if g("lokr_w1") is not None else g("lokr_w1_a") @ g("lokr_w1_b")
    if g("lokr_w2") is not None:
        w2 = g("lokr_w2")
    elif g("lokr_t2") is None:
        w2 = g("lokr_w2_a") @ g("lokr_w2_b")
    else:
        w2 = a1111_cp(g("lokr_t2"), g("lokr_w2_a"), g("lokr_w2_b"))
    output_shape = list(w.shape) if w.dim() == 4 else [w1.size(0) * w2.size(0), w1.size(1) * w2.size(1)]
    if w2.dim() == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    updown = torch.kron(w1, w2.contiguous()).reshape(output_shape)
    return a1111_finalize(w, updown, output_shape, dim, alpha, multiplier)


LOADERS = {"loha": (comfyui_loha, a1111_loha), "lokr": (comfyui_lokr, a1111_lokr)}


# ------------------------------------------------------------------------------ helpers
def adapted(m, state, family):
    up_attn = {int(k): v for k, v in state["up_has_attn"].items()}
    for part, model in lora.part_modules(m).items():
        for name, mod in model.named_modules():
            if isinstance(mod, LycorisLayer):
                yield part, mod, module_name(part, name, family, {**state, "up_has_attn": up_attn})


VARIANTS = {
    "loha": dict(network_type="loha"),
    "loha_tucker": dict(network_type="loha", use_tucker=True),
    "lokr": dict(network_type="lokr", lokr_factor=4),
    "lokr_both_tucker": dict(network_type="lokr", lokr_decompose_both=True, use_tucker=True, rank=1),
    "lokr_full": dict(network_type="lokr", lokr_full_matrix=True),
}


# ------------------------------------------------------------------------------ tests
@pytest.mark.slow
@pytest.mark.parametrize("family,variant", [("sd1", v) for v in VARIANTS] + [("sdxl", "loha"), ("sdxl", "lokr")])
def test_the_weight_comfyui_and_a1111_compute_from_the_file_is_the_trained_weight(family, variant, request, dataset,
                                                                                  tmp_path):
    model_dir = request.getfixturevalue(f"tiny_{family}")
    out = tmp_path / "run"
    kw = dict(rank=4, alpha=2, max_steps=3, unet_lr=2e-2, text_encoder_lr=2e-2, conv_rank=2, conv_alpha=1)
    kw.update(VARIANTS[variant])
    base_config(model_dir, dataset, out, **kw).save(tmp_path / "c.toml")
    assert cli(["train", str(tmp_path / "c.toml")]) == 0
    path = out / "lora.safetensors"
    sd = load_file(str(path))  # fp32: base_config saves fp32
    with safe_open(str(path), "pt") as f:
        md = f.metadata()
    assert md["ss_network_module"] == "lycoris.kohya" and f'"algo": "{kw["network_type"]}"' in md["ss_network_args"]
    m, state = trained(model_dir, out)
    comfy, a1111 = LOADERS[kw["network_type"]]
    g = torch.Generator().manual_seed(0)
    checked = dict.fromkeys(["linear", "conv", *m.spec.te_parts], 0)
    moved = 0.0
    for part, mod, key in adapted(m, state, family):
        w = mod.get_base_layer().weight.float()
        mine = comfy(w, sd, key, 1.0)
        assert torch.allclose(mine, a1111(w, sd, key, 1.0), atol=1e-6), key
        assert torch.allclose(comfy(w, sd, key, 0.5), a1111(w, sd, key, 0.5), atol=1e-6), key
        assert torch.allclose(comfy(w, sd, key, 0.5), w + 0.5 * (mine - w), atol=1e-6), key
        shape = (2, w.shape[1]) if w.dim() == 2 else (1, w.shape[1], 6, 6)
        x = torch.randn(shape, generator=g)
        mod.eval()
        with torch.no_grad():
            assert torch.allclose(mod(x), apply(mod, x, mine), atol=1e-5, rtol=1e-4), key
        # and our own reader (Info, Spectrum, Preview) computes the same update from the file
        lf_mod = fmt.unpack({k: v for k, v in sd.items() if k.startswith(key + ".")})[0][key]
        assert torch.allclose(lf_mod.update(), (mine - w).flatten(1), atol=1e-6), key
        moved = max(moved, float((mine - w).abs().max()))
        checked[part if part != "unet" else "conv" if w.dim() == 4 and w.shape[2] > 1 else "linear"] += 1
    assert all(checked.values()), checked  # UNet linears, 3x3 convs (LoCon), every text encoder
    assert moved > 1e-5  # it trained: the modules are no longer zero
    if variant == "loha_tucker":
        assert any(k.endswith(".hada_t1") for k in sd)
    if variant == "lokr_both_tucker":  # trained with a Tucker core, written whole (ComfyUI fails on lokr_t2)
        assert any(k.endswith(".lokr_w1_a") for k in sd) and not any(k.endswith(".lokr_t2") for k in sd)
        assert any(k.endswith(".lokr_w2") and sd[k].dim() == 4 for k in sd)
        assert any(n.endswith("lokr_t2.default") for n, _ in m.unet.named_parameters())
    if variant == "lokr_full":
        assert not any(k.endswith(("_a", "_b")) for k in sd)  # whole matrices only, scale 1


@pytest.mark.slow
def test_loha_and_lokr_train_other_files_than_lora_and_resume_exactly(tiny_sd1, dataset, tmp_path):
    """Each network type changes what is trained (other keys, other weights); a run stopped at a checkpoint and
    resumed writes the file an uninterrupted one writes."""
    files = {}
    for kind in ("lora", "loha", "lokr"):
        out = tmp_path / kind
        base_config(tiny_sd1, dataset, out, network_type=kind, max_steps=4, save_every_steps=2,
                    unet_lr=1e-2).save(tmp_path / f"{kind}.toml")
        assert cli(["train", str(tmp_path / f"{kind}.toml")]) == 0
        files[kind] = load_file(str(out / "lora.safetensors"))
    assert any(k.endswith(".lora_down.weight") for k in files["lora"])
    assert any(k.endswith(".hada_w1_a") for k in files["loha"]) and not any("lora_down" in k for k in files["loha"])
    assert any(k.startswith("lora_unet_") and ".lokr_w" in k for k in files["lokr"])
    assert any(k.startswith("lora_te_") and ".lokr_w" in k for k in files["lokr"])
    # the Kronecker split follows lokr_factor: a factor of 2 makes every first factor 2 rows high
    base_config(tiny_sd1, dataset, tmp_path / "f2", network_type="lokr", lokr_factor=2, max_steps=1).save(tmp_path / "f2.toml")
    assert cli(["train", str(tmp_path / "f2.toml")]) == 0
    f2 = load_file(str(tmp_path / "f2" / "lora.safetensors"))
    w1 = {k: v.shape for k, v in f2.items() if k.endswith(".lokr_w1")}
    assert w1 and all(s[0] == 2 for s in w1.values())
    assert {k: v.shape for k, v in files["lokr"].items() if k.endswith(".lokr_w1")} != w1
    # resume: the same run, stopped after step 2 and resumed from that checkpoint
    out = tmp_path / "resumed"
    cfg = base_config(tiny_sd1, dataset, out, network_type="lokr", max_steps=2, save_every_steps=2, unet_lr=1e-2)
    cfg.save(tmp_path / "r1.toml")
    assert cli(["train", str(tmp_path / "r1.toml")]) == 0
    cfg.replace(max_steps=4).save(tmp_path / "r2.toml")
    assert cli(["train", str(tmp_path / "r2.toml"), "--resume"]) == 0
    again = load_file(str(out / "lora.safetensors"))
    assert again.keys() == files["lokr"].keys()
    for k in again:
        assert torch.equal(again[k], files["lokr"][k]), k


@pytest.mark.parametrize("kw,words", [
    (dict(network_type="lokr", use_dora=True), "DoRA with LoKr"),
    (dict(network_type="loha", dropout=0.1), "rank_dropout or module_dropout"),
    (dict(network_type="loha", loraplus_lr_ratio=16), "no such pair"),
    (dict(network_type="lokr", base_quantization="nf4"), "Linear and Conv2d layers only"),
    (dict(network_type="loha", use_tucker=True), "no convolution is trained"),
    (dict(network_type="loha", use_tucker=True, conv_rank=4, conv_block_dims=",".join(["0"] * 25)),
     "no convolution is trained"),
    (dict(network_type="loha", lokr_factor=8), "apply to LoKr only"),
    (dict(network_type="lora", lokr_full_matrix=True), "LyCORIS network types only"),
    (dict(network_type="lokr", lokr_factor=0), "lokr_factor must be"),
])
def test_bad_network_combinations_get_one_sentence(kw, words, tmp_path):
    cfg = TrainConfig(base_model="m", dataset=str(tmp_path), **kw)
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert words in str(e.value)


def test_lyco_files_read_and_the_lora_only_tools_say_so(tmp_path):
    """A LoHa and a LoKr file (as LyCORIS writes them) read with their update; resize/merge say LoRA only."""
    from trainer.loras import tools

    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    loha = {f"{key}.hada_w1_a": r(8, 2), f"{key}.hada_w1_b": r(2, 768), f"{key}.hada_w2_a": r(8, 2),
            f"{key}.hada_w2_b": r(2, 768), f"{key}.alpha": torch.tensor(1.0)}
    path = tmp_path / "loha.safetensors"
    fmt.write(path, loha, {"ss_network_module": "lycoris.kohya"}, {})
    lf = fmt.read(path)
    m = lf.modules[key]
    assert m.kind == "loha" and m.rank == 2 and lf.family == "sd1"  # 768 wide: CLIP-L
    want = (loha[f"{key}.hada_w1_a"] @ loha[f"{key}.hada_w1_b"]) * (loha[f"{key}.hada_w2_a"] @ loha[f"{key}.hada_w2_b"]) / 2
    assert torch.allclose(m.update(), want)
    assert tools.info(path)["network"] == "LoHa"
    assert tools.spectrum(path)["modules"][key]["rank_99"] <= 4  # a Hadamard product of two rank-2: rank <= 4
    with pytest.raises(fmt.LoraFileError, match="LoHa .*LoRA and LoCon files only"):
        tools.resize(path, tmp_path / "small.safetensors", rank=1)
    with pytest.raises(fmt.LoraFileError, match="LoHa"):
        tools.merge([(str(path), 1.0), (str(path), 0.5)], tmp_path / "m.safetensors")
    # LoKr with both factors whole: scale 1 whatever alpha says; a missing factor is a damaged file
    lokr = {f"{key}.lokr_w1": r(2, 4), f"{key}.lokr_w2": r(4, 192), f"{key}.alpha": torch.tensor(7.0)}
    m = fmt.unpack(lokr)[0][key]
    assert m.rank is None and torch.allclose(m.update(), torch.kron(lokr[f"{key}.lokr_w1"], lokr[f"{key}.lokr_w2"]))
    with pytest.raises(fmt.LoraFileError, match="incomplete"):
        fmt.unpack({f"{key}.lokr_w1": r(2, 4)})


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_preview_shows_the_trained_loha_and_lokr(kind, tiny_sd1, dataset, tmp_path):
    """Preview (diffusers, which reads LoRA only) shows a LoHa / LoKr file as the trained model: strength 0 is the
    base, strength 1 the model the trainer had (its LoCon convs and text encoder included)."""
    import numpy as np

    from trainer.engine.preview import GenParams, LoraSpec, PreviewEngine

    out = tmp_path / "run"
    base_config(tiny_sd1, dataset, out, network_type=kind, max_steps=4, unet_lr=2e-2, text_encoder_lr=2e-2,
                conv_rank=2, conv_alpha=1, use_tucker=kind == "loha").save(tmp_path / "c.toml")
    assert cli(["train", str(tmp_path / "c.toml")]) == 0
    e = PreviewEngine("cpu")
    e.set_base(str(tiny_sd1))
    p = dict(prompt="zwx, red square", seed=3, steps=2, cfg=5.0, width=64, height=64, sampler="Euler")
    arr = lambda img: np.asarray(img, dtype=np.float32)  # noqa: E731
    base = arr(e.generate(GenParams(**p))[0][0])
    at = {s: arr(e.generate(GenParams(**p, loras=[LoraSpec(str(out / "lora.safetensors"), s)]))[0][0]) for s in (0.0, 1.0)}
    assert np.array_equal(at[0.0], base)
    own, _ = trained(tiny_sd1, out)
    pipe = own.pipeline(scheduler=e.pipe.scheduler)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(p["prompt"], num_inference_steps=2, guidance_scale=5.0, width=64, height=64,
               generator=torch.Generator().manual_seed(3)).images[0]
    assert np.abs(arr(ref) - at[1.0]).max() <= 1.0  # Preview at strength 1 is the trained model
    assert np.abs(at[1.0] - base).max() > 10  # which is not the base


def test_the_estimate_splits_dimensions_as_peft_lokr_does():
    """The torch-free parameter count factors each dimension with the rule of the layers we train."""
    from peft.tuners.lokr.layer import factorization as peft_factorization

    from trainer.recipe.estimate import factorization

    for dim in (1, 7, 64, 320, 768, 1024, 1280, 2048, 5120, 10240):
        for factor in (-1, 1, 2, 4, 8, 16, 3):
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


def test_kohya_ss_lycoris_presets_import_and_export_to_sd_scripts():
    """A kohya_ss LoKr preset (as the community shares them: conv_dim 512, network_dropout 0.3, factor 8) comes in
    as LoKr with its options, what cannot apply is said, and the sd-scripts TOML trains the same through LyCORIS."""
    import tomllib

    from trainer.recipe.kohya_ss import import_kohya, to_sd_scripts_toml

    preset = {"LoRA_type": "LyCORIS/LoKr", "network_dim": 1024, "network_alpha": 1024, "conv_dim": 512,
              "conv_alpha": 512, "network_dropout": 0.3, "factor": 8, "use_cp": True, "decompose_both": False,
              "learning_rate": 1.0, "optimizer": "Prodigy"}
    values, notes = import_kohya(preset)
    assert values["network_type"] == "lokr" and values["lokr_factor"] == 8 and values["use_tucker"] is True
    assert "dropout" not in values and any("network_dropout" in n for n in notes)
    cfg = TrainConfig.from_dict({"base_model": "m", "dataset": "d", **values})
    toml = tomllib.loads(to_sd_scripts_toml(cfg))
    assert toml["network_module"] == "lycoris.kohya"
    args = dict(a.split("=", 1) for a in toml["network_args"])
    assert args["algo"] == "lokr" and args["factor"] == "8" and args["use_tucker"] == "True" and args["conv_dim"] == "512"
    loha, _ = import_kohya({"LoRA_type": "LyCORIS/LoHa", "network_dim": 8, "use_tucker": "true", "conv_dim": 4})
    assert loha["network_type"] == "loha" and loha["use_tucker"] is True
    other, notes = import_kohya({"LoRA_type": "LyCORIS/iA3", "network_dim": 8})
    assert "network_type" not in other and any("iA3" in n for n in notes)
