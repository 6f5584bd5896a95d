"""Layer-wise rank: a rank, alpha and learning rate per UNet block (kohya's numbering)."""
from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import base_config
from trainer.cli import main as cli
from trainer.models import blocks
from trainer.models import lora as lora_mod


def values(family, fn):
    """A comma string with one value per block of `family`, from fn(block name)."""
    return ",".join(str(fn(b)) for b in blocks.names(family))


OFF = ("IN02", "IN05", "OUT01", "OUT04")  # blocks with attention in the tiny SD1 and SDXL models, switched off


def rank_of(b):  # IN blocks 2, MID 3, OUT 5, and the OFF blocks 0
    return 0 if b in OFF else 2 if b.startswith("IN") else 3 if b == "MID" else 5


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_per_block_ranks_and_alphas_are_written_per_module(family, request, dataset, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    model_dir = request.getfixturevalue(f"tiny_{family}")
    out = tmp_path / "run"
    cfg = base_config(model_dir, dataset, out, max_steps=1, rank=4, alpha=4,
                      block_dims=values(family, rank_of), block_alphas=values(family, lambda b: rank_of(b) / 2))
    cfg.save(tmp_path / "c.toml")
    assert cli(["train", str(tmp_path / "c.toml")]) == 0
    sd = load_file(str(out / "lora.safetensors"))
    seen = set()
    for key, t in sd.items():
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        b = blocks.of(name)
        if b is None:
            assert t.shape[0] == 4 and float(sd[f"{name}.alpha"]) == 4  # text encoders: the global rank
            continue
        seen.add(b)
        assert t.shape[0] == rank_of(b) and float(sd[f"{name}.alpha"]) == rank_of(b) / 2, name
    from trainer.models.load import load_model

    m = load_model(str(model_dir))
    attn, _ = lora_mod.unet_targets(m.unet)
    with_modules = set(lora_mod.unet_blocks(m, attn).values())
    assert with_modules & set(OFF) and not seen & set(OFF)  # blocks at rank 0 are not written
    assert "MID" in seen and any(b.startswith("IN") for b in seen) and any(b.startswith("OUT") for b in seen)
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        args = json.loads(f.metadata()["ss_network_args"])
    assert args["block_dims"] == cfg.block_dims and args["block_alphas"] == cfg.block_alphas
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    cls.from_pretrained(model_dir).load_lora_weights(str(out / "lora.safetensors"))  # no unplaced keys


def test_block_learning_rates_are_the_optimizer_group_rates(tiny_sd1, dataset, tmp_path):
    from trainer.engine.setup import setup

    down = ",".join(["0.5"] * 12)
    up = ",".join(["0", "2"] + ["1"] * 10)  # OUT00 not trained at all, OUT01 twice as fast
    cfg = base_config(tiny_sd1, dataset, tmp_path / "run", unet_lr=1e-3, text_encoder_lr=3e-4,
                      down_lr_weight=down, mid_lr_weight="0.25", up_lr_weight=up)
    run = setup(cfg, tmp_path / "run", echo=lambda m: None)
    where = lora_mod.unet_blocks(run.model, [n.split(".lora_")[0] for n, _ in run.model.unet.named_parameters() if "lora_" in n])
    assert "OUT00" not in where.values()  # weight 0 <= block_lr_zero_threshold: no LoRA there
    lr_of = {id(p): g["lr"] for g in run.optimizer.param_groups for p in g["params"]}
    want = {"MID": 0.25e-3, "OUT01": 2e-3, "OUT02": 1e-3}
    for n, p in run.model.unet.named_parameters():
        if "lora_" in n:
            b = where[n.split(".lora_")[0]]
            assert lr_of[id(p)] == pytest.approx(want.get(b, 0.5e-3 if b.startswith("IN") else 1e-3)), (n, b)
    te = [p for te in run.model.text_encoders for p in lora_mod.lora_parameters(te)]
    assert te and all(lr_of[id(p)] == pytest.approx(3e-4) for p in te)


def test_block_values_for_the_wrong_family_are_refused_in_words(tiny_sd1, dataset, tmp_path, capsys):
    cfg = base_config(tiny_sd1, dataset, tmp_path / "run", block_dims=values("sdxl", lambda b: 4))  # 19, not 25
    cfg.save(tmp_path / "c.toml")
    assert cli(["train", str(tmp_path / "c.toml")]) == 2
    err = capsys.readouterr().err
    assert "block_dims has 19 value(s); it needs 25" in err and "SD 1.x" in err and "Traceback" not in err
    bad = base_config(tiny_sd1, dataset, tmp_path / "run", block_dims="4,4,x")
    assert any("block_dims must be numbers" in e for e in bad.problems()[0])


def test_the_block_table_round_trips_through_a_kohya_ss_preset():
    from app.forms import block_rows, rows_to_values
    from trainer.recipe.config import TrainConfig, tomllib
    from trainer.recipe.kohya_ss import import_kohya, to_sd_scripts_toml

    kohya_ss = {"network_dim": 16, "network_alpha": 8, "block_dims": values("sd1", rank_of),
                "block_alphas": values("sd1", lambda b: 1), "down_lr_weight": ",".join(["1"] * 11 + ["0"]),
                "mid_lr_weight": "0.5", "up_lr_weight": ",".join(["1"] * 12), "block_lr_zero_threshold": "0.1"}
    mapped, notes = import_kohya(kohya_ss)
    assert not any("not used" in n for n in notes), notes
    cfg = TrainConfig.from_dict(mapped)
    rows = block_rows(cfg.to_dict(), "sd1")
    assert [r[0] for r in rows][:2] == ["IN00", "IN01"] and len(rows) == 25
    assert [r[1] for r in rows] == [rank_of(b) for b in blocks.names("sd1")] and rows[11][3] == 0 and rows[12][3] == 0.5
    back = rows_to_values(rows, "sd1")
    assert TrainConfig.from_dict({**mapped, **back}).to_dict() == cfg.to_dict()
    toml = tomllib.loads(to_sd_scripts_toml(cfg).split("\n", 1)[1])
    args = dict(a.split("=", 1) for a in toml["network_args"])
    assert args["block_dims"] == cfg.block_dims and args["mid_lr_weight"] == "0.5" and args["block_lr_zero_threshold"] == "0.1"
    again, _ = import_kohya({**kohya_ss, **{k: v for k, v in args.items()}})
    assert {k: again[k] for k in blocks.FIELDS if k in again} == {k: mapped[k] for k in blocks.FIELDS if k in mapped}


@pytest.mark.slow  # a training or a worker: the fast tier stays under 3 minutes
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_estimate_counts_the_real_per_block_lora_size(family, request):
    from trainer.recipe.config import TrainConfig
    from trainer.recipe.estimate import lora_param_count
    from trainer.models.load import load_model

    model_dir = request.getfixturevalue(f"tiny_{family}")
    for extra in ({}, {"block_dims": values(family, rank_of)}, {"network_target": "attention", "train_text_encoder": False},
                  {"network_type": "loha", "block_dims": values(family, rank_of)}, {"network_type": "lokr"},
                  {"network_type": "lokr", "lokr_factor": 4, "lokr_decompose_both": True, "rank": 2},
                  {"network_type": "lokr", "lokr_full_matrix": True}):
        cfg = TrainConfig(base_model="m", dataset="d", **{"rank": 4, "alpha": 4, **extra})
        m = load_model(str(model_dir))
        lora_mod.inject_for_config(m, cfg)
        real = sum(p.numel() for part in lora_mod.part_modules(m).values() for p in lora_mod.lora_parameters(part))
        if not cfg.train_text_encoder:
            real = sum(p.numel() for p in lora_mod.lora_parameters(m.unet))
        assert lora_param_count(cfg, family, config_dir=model_dir) == real, extra


def test_suggested_ranks_follow_where_a_trained_lora_keeps_its_update():
    from app.forms import suggest_ranks

    def module(svals):
        return {"singular_values": svals}

    spectrum = {"file": "wide.safetensors", "modules": {
        "lora_unet_down_blocks_0_attentions_0_proj_in": module([1.0, 0.01, 0.0, 0.0]),  # IN01: one direction
        "lora_unet_up_blocks_1_attentions_2_proj_out": module([1.0, 1.0, 1.0, 0.9]),   # OUT05: all four
        "lora_unet_mid_block_attentions_0_proj_in": module([1.0, 0.7, 0.0, 0.0]),       # MID: two
        "lora_te_text_model_encoder_layers_0_mlp_fc1": module([5.0, 5.0, 5.0, 5.0]),    # not a UNet block
    }}
    rows = {r[0]: r for r in suggest_ranks(spectrum, "sd1", 0.95, alpha_ratio=0.5)}
    assert rows["IN01"][1] == 1 and rows["MID"][1] == 2 and rows["OUT05"][1] == 4
    assert rows["OUT05"][2] == 2 and rows["IN00"][1] == 0  # alpha keeps the ratio; no modules there, no rank


@pytest.mark.slow  # trains: the fast tier stays under 3 minutes (the full suite runs it)
def test_the_train_tab_block_table_writes_the_block_fields(tmp_path):
    import gradio as gr

    from app.main import build_ui

    ui = build_ui(tmp_path / "ws")
    buttons = {b.value: i for i, b in ui.blocks.items() if isinstance(b, gr.Button)}

    def handler(label):
        return next(f.fn for f in ui.fns.values() if any(t[0] == buttons[label] for t in f.targets))

    rows = [[b, rank_of(b), rank_of(b) / 2, 0.0 if b == "MID" else 1.0] for b in blocks.names("sdxl")]
    dims, alphas, down, mid, up, note = handler("Use these values")(rows, "SDXL (19 blocks)")
    assert dims == values("sdxl", rank_of) and mid == "0" and len(down.split(",")) == 9 and "now hold" in note
    with pytest.raises(gr.Error, match="lacks IN00"):
        handler("Use these values")(rows[1:], "SDXL (19 blocks)")


@pytest.mark.slow  # a worker process (the spectrum tool): the fast tier stays under 3 minutes
def test_suggest_ranks_in_the_train_tab_reads_a_lora_through_the_spectrum_tool(tmp_path):
    import gradio as gr
    import torch
    from safetensors.torch import save_file

    from app.forms import block_families
    from app.main import build_ui

    ui = build_ui(tmp_path / "ws")
    button = next(i for i, b in ui.blocks.items() if isinstance(b, gr.Button) and b.value == "Suggest ranks")
    suggest = next(f.fn for f in ui.fns.values() if any(t[0] == button for t in f.targets))
    sd1 = next(label for label, fam in block_families().items() if fam == "sd1")
    assert "Pick a LoRA file" in list(suggest("", 0.95, sd1, 8, 4))[-1][1]
    # IN01's update has one direction, OUT05's four of equal size
    one = torch.zeros(32, 4)
    one[:, 0] = 1.0
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in": (one, torch.eye(4, 32)),
            "lora_unet_up_blocks_1_attentions_2_proj_out": (torch.eye(32, 4), torch.eye(4, 32))}
    tensors = {}
    for name, (up, down) in lora.items():
        tensors |= {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(4.0)}
    save_file(tensors, str(tmp_path / "wide.safetensors"))
    said = list(suggest(str(tmp_path / "wide.safetensors"), 0.95, sd1, 8, 4))
    table, note = said[-1]
    rows = {r[0]: r for r in table}
    assert rows["IN01"][1] == 1 and rows["OUT05"][1] == 4 and rows["OUT05"][2] == 2  # alpha keeps 4/8 of the rank
    assert note.startswith("Suggested from wide.safetensors") and "95% of its update" in note
