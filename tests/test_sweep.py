"""Sweeps (issue 30): several LoRAs in one run on one loaded base and one set of caches. Each variant must come out
as the LoRA a run of its settings alone trains (the sharing changes the cost, nothing else); a resumed sweep
equals an uninterrupted one; a bad variant is refused before Start, in words that name it."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import base_config, make_images
from trainer.engine.loop import train
from trainer.events import read_events
from trainer.recipe.config import ConfigError, TrainConfig
from trainer.recipe.sweep import variant_name

# three networks that share nothing but the base: LoRA, LoHa at another rate, LoRA with dropout on 8-bit AdamW
VARIANTS = [{"rank": 4}, {"network_type": "loha", "rank": 2, "unet_lr": 2e-3},
            {"rank": 8, "alpha": 2, "optimizer": "adamw8bit", "dropout": 0.1}]
# accumulation, batches of two, class-free validation and a checkpoint on the way: the loop's every branch
SETTINGS = dict(max_steps=3, gradient_accumulation=2, batch_size=2, save_every_steps=2, validation_split=0.25)


def tensors(path) -> dict:
    return load_file(str(path))


@pytest.mark.slow
def test_each_variant_of_a_sweep_is_the_lora_its_settings_train_alone(tiny_sd1, tmp_path):
    data = tmp_path / "data"
    make_images(data, 4)
    out = train(base_config(tiny_sd1, data, tmp_path / "sweep", variants=VARIANTS, **SETTINGS), echo=lambda m: None)
    names = [variant_name(v) for v in VARIANTS]
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(f"lora-{n}.safetensors" for n in names)
    for v, name in zip(VARIANTS, names):
        alone = train(base_config(tiny_sd1, data, tmp_path / name, **{**SETTINGS, **v}), echo=lambda m: None)
        a, b = tensors(out / f"lora-{name}.safetensors"), tensors(alone)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name  # bit for bit: same draws, same order of work
        ups = [k for k in a if k.endswith(("lora_up.weight", "hada_w1_a", "hada_w2_a"))]
        assert ups and any(float(a[k].abs().max()) > 0 for k in ups)  # and they trained
        with safe_open(str(out / f"lora-{name}.safetensors"), "pt") as f:
            md = f.metadata()
        assert json.loads(md["ss_lora_studio_variant"]) == {"name": name, **v}
        assert md["ss_output_name"] == f"lora-{name}" and str(tmp_path) not in json.dumps(md)
    # one event log: a loss per variant in each report, a validation loss per variant at each checkpoint
    events, _ = read_events(out)
    progress = [e for e in events if e["type"] == "progress"]
    assert progress and all(set(e["losses"]) == set(names) for e in progress)
    val = {(e["step"], e["variant"]) for e in events if e["type"] == "validation"}
    assert val == {(s, n) for s in (2, 3) for n in names}
    assert [e["type"] for e in events].count("done") == 1
    # each variant's checkpoints in its own folder
    assert all((out / "variants" / n / "checkpoints" / "step-000002").is_dir() for n in names)
    check_the_page_side(out, names, tiny_sd1, tmp_path)


def check_the_page_side(out, names, model, tmp_path):
    """What the page makes of a finished sweep: the validation table with each variant's lowest marked, the
    variant files for Preview's Variant grid, each variant's own checkpoint series, and the grid itself."""
    import numpy as np

    from app.runs import RunView
    from app.services import Studio
    from app.workspace import Workspace
    from trainer.engine.preview import GenParams, PreviewEngine

    view = RunView()
    view.fold(read_events(out)[0])
    headers, rows, best = view.comparison()
    assert headers == ["step"] + names and [r[0] for r in rows] == [2, 3]
    assert all(sum("★" in r[i] for r in rows) == 1 for i in range(1, len(headers)))  # one lowest per variant
    lowest = min((float(r[i].split()[0]), r[0], headers[i]) for r in rows for i in range(1, len(headers)))
    assert best == (lowest[2], lowest[1], pytest.approx(lowest[0], abs=1e-4))
    assert set(view.variant_losses) == set(names)

    from app.tabs.train import TrainTab

    class Runs:  # the run manager's answer for this run: its folder, and its events folded
        def get(self, run_id):
            return {"id": "s", "name": "sweep", "status": "finished", "dir": str(out)}

        def view(self, run_id):
            return view

    progress, _, single_val, by_variant, table, _, _ = TrainTab(Studio(Workspace(tmp_path), Runs())).live("s")
    assert single_val.visible is False and by_variant.visible is True and table["visible"] is True
    assert f"lowest validation loss so far: **{best[0]}** at step {best[1]}" in progress
    assert "loss by variant (the plot draws the first): " + names[0] in progress

    studio = Studio(Workspace(tmp_path), None)  # the runs are inside the workspace, as the page makes them
    files, labels = studio.variant_series(str(out / f"lora-{names[0]}.safetensors"))
    assert labels == sorted(names) and files == [str(out / f"lora-{n}.safetensors") for n in labels]
    series, steps = studio.checkpoint_series(str(out / f"lora-{names[1]}.safetensors"))
    assert steps == ["step 2", "step 3", "final"]
    assert series[0] == str(out / "variants" / names[1] / "checkpoints" / "step-000002" / f"lora-{names[1]}.safetensors")
    with pytest.raises(ValueError, match="not one of a finished sweep"):
        studio.variant_series(str(tmp_path / names[0] / "lora.safetensors"))  # the run of that variant alone

    engine = PreviewEngine("cpu")
    engine.set_base(str(model))
    p = GenParams(prompt="zwx, red square", seed=3, steps=2, cfg=5.0, width=64, height=64, sampler="Euler")
    grid, cells = engine.variant_grid(p, files[:2], labels[:2], [0.0, 1.0])
    cells = [np.asarray(c, dtype=np.float32) for c in cells]
    assert len(cells) == 4 and grid.size[0] == 2 * 64
    assert np.array_equal(cells[0], cells[2])  # strength 0: the base, whichever variant
    assert not np.array_equal(cells[1], cells[3])  # strength 1: each variant its own

    # the Preview tab's Variant grid, its requests answered by the worker's own handler in this process
    from PIL import Image

    from app.tabs.preview import PreviewTab
    from trainer.engine.preview import handle

    class InProcess:
        def request(self, req, on_progress=None):
            return handle(engine, req, tmp_path / "pv")

    tab = PreviewTab(studio, client=InProcess())
    v = {"base_model": str(model), "prompt": "zwx, red square", "negative": "", "seed": 3, "steps": 2, "cfg": 5.0,
         "width": 64, "height": 64, "sampler": "Euler", "batch": 1, "mode": "Variant grid", "strengths": "0.5, 1",
         "loras": [[str(out / f"lora-{names[0]}.safetensors"), True, 1.0]]}
    images, said = tab.generate(v)
    assert said == "Done (seed 3)." and len(images) == 1
    assert Image.open(images[0]).size[0] == 2 * 64  # a column per strength, a row per variant


@pytest.mark.slow
def test_a_resumed_sweep_equals_an_uninterrupted_one(tiny_sd1, tmp_path, monkeypatch):
    from trainer.engine.faults import FAULT_ENV
    from trainer.engine.setup import TrainingError

    data = tmp_path / "data"
    make_images(data, 4)
    kw = dict(SETTINGS, max_steps=4, validation_split=0.0)
    whole = train(base_config(tiny_sd1, data, tmp_path / "whole", variants=VARIANTS[:2], **kw), echo=lambda m: None)
    cut = base_config(tiny_sd1, data, tmp_path / "cut", variants=VARIANTS[:2], **kw)
    monkeypatch.setenv(FAULT_ENV, "oom@3")  # step 3 fails after the checkpoint of step 2
    with pytest.raises(TrainingError, match="out of memory"):
        train(cut, echo=lambda m: None)
    monkeypatch.delenv(FAULT_ENV)
    resumed = train(cut, resume=True, echo=lambda m: None)
    for v in VARIANTS[:2]:
        name = f"lora-{variant_name(v)}.safetensors"
        a, b = tensors(whole / name), tensors(resumed / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert any("Resumed from step-000002" in e.get("message", "") for e in read_events(resumed)[0])


def test_a_bad_variant_is_refused_before_start_in_words_that_name_it(tmp_path):
    from app.forms import preflight

    def errors(variants):
        return TrainConfig(base_model="m", dataset="d", variants=variants).problems()[0]

    assert errors([{"rank": 8}, {"rank": 16, "unet_lr": 2e-4}]) == []
    said = errors([{"rank": 8}, {"rank": -4}])
    assert said == ["variant 'rank-4': rank must be a positive whole number (got -4); 16 is a good start."]
    said = errors([{"rank": 8}, {"rank": 16, "resolution": 768}])
    assert len(said) == 1 and "variant 'rank16-resolution768' sets resolution, which every variant" in said[0]
    assert "unknown key(s) 'rnak' (did you mean 'rank'?)" in errors([{"rank": 8}, {"rnak": 16}])[0]
    assert "variant 'loha': use_dora" not in " ".join(errors([{"name": "loha", "network_type": "loha"}]))
    assert "DoRA with LoHa" in errors([{"name": "loha", "network_type": "loha", "use_dora": True}])[0]
    assert "at most 8 variants" in errors([{"rank": r} for r in range(1, 10)])[0]
    assert "both named rank8" in errors([{"rank": 8}, {"rank": 8}])[0]
    ok, text = preflight(TrainConfig(base_model=str(tmp_path / "m"), dataset=str(tmp_path),
                                     variants=[{"rank": 8}, {"rank": 0}]))
    assert not ok and "variant 'rank0': rank must be a positive whole number" in text
    with pytest.raises(ConfigError, match="variants, line 2: 'rank 16' is not 'key = value'"):
        TrainConfig.from_dict({"variants": "rank = 8\nrank 16"})


def test_compare_settings_makes_every_combination_and_the_box_reads_back(tmp_path):
    from app.forms import compare_grid, config_to_values, values_to_config

    lines = compare_grid("rank", "8, 16, 32", "unet_lr", "1e-4, 2e-4")
    assert lines.splitlines() == [f"rank = {r}, unet_lr = {lr}" for r in (8, 16, 32) for lr in (0.0001, 0.0002)]
    cfg = values_to_config({**config_to_values(TrainConfig()), "variants": lines})
    assert cfg.variants[1] == {"rank": 8, "unet_lr": 2e-4} and len(cfg.variants) == 6
    assert config_to_values(cfg)["variants"] == lines
    blocks = TrainConfig(variants=[{"name": "deep", "block_dims": "4,4,8", "optimizer": "adamw8bit", "ema": True}])
    assert values_to_config(config_to_values(blocks)).variants == blocks.variants  # commas inside a value survive
    with pytest.raises(ConfigError, match="at most 8"):
        compare_grid("rank", "4, 8, 16", "alpha", "1, 2, 4")
    with pytest.raises(ConfigError, match="seed is not a setting a variant can change"):
        compare_grid("seed", "1, 2")


def test_the_estimate_holds_the_base_once_and_each_variants_network(tmp_path):
    from trainer.recipe.estimate import estimate_vram_gb, network_state

    one = TrainConfig(base_model="m", dataset="d", rank=16)
    sweep = one.replace(variants=[{"rank": 16}, {"rank": 32, "optimizer": "adamw8bit"}])
    a, b = estimate_vram_gb(one, "sd1"), estimate_vram_gb(sweep, "sd1")
    assert a["terms_gb"]["UNet weights"] == b["terms_gb"]["UNet weights"] and a["activations_gb"] == b["activations_gb"]
    each = [network_state(one.replace(**v), "sd1")[1] for v in sweep.variants]
    assert network_state(sweep, "sd1")[1] == pytest.approx(sum(each))
    assert b["terms_gb"]["LoRA weights, gradients and optimizer state (2 variants)"] == round(sum(each) / 1024**3, 2)


def test_a_sweeps_time_is_each_variants_step_and_its_measure_is_one_networks():
    """A sweep's step trains every variant: its estimate counts K networks' steps, and what it measures is kept
    per network, so the next single run's estimate is not K times too long."""
    from trainer.recipe import timing

    one = TrainConfig(base_model="m", dataset="d", max_steps=100)
    sweep = one.replace(variants=[{"rank": 8}, {"rank": 16}, {"rank": 32}])
    a, b = (timing.estimate(c, "sd1", 100, "cuda", []) for c in (one, sweep))
    assert b["step_s"] == pytest.approx(3 * a["step_s"]) and b["startup_s"] == a["startup_s"]
    events = [{"type": "status", "state": "starting", "time": 0.0},
              {"type": "status", "state": "training", "device": "cuda", "variants": 3, "time": 20.0},
              {"type": "progress", "step": 1, "time": 23.0}, {"type": "progress", "step": 11, "time": 53.0}]
    m = timing.measure(events)
    assert m["step_s"] == pytest.approx(1.0) and m["startup_s"] == pytest.approx(20.0)  # 3 s a step, 3 networks


@pytest.mark.slow
def test_a_sweep_on_a_stored_base_equals_its_lone_runs_dora_after_fp8_too(tiny_sd1, tmp_path):
    """With an fp8 base, the first variant's placing stored the shared weights in fp8 before the next variant's
    network went in, and peft's DoRA, which reads the base weights as it goes in, failed on fp8 weights
    ('mul_cpu_reduced_float' not implemented for Float8_e4m3fn). Every network now goes in before any is placed.
    An nf4 base (quantised once, before the copies) is shared the same way."""
    data = tmp_path / "data"
    make_images(data, 4)
    for quant, variants in (("fp8", [{"rank": 4}, {"rank": 4, "use_dora": True}]), ("nf4", [{"rank": 4}, {"rank": 8}])):
        kw = dict(max_steps=2, base_quantization=quant, mixed_precision="bf16", train_text_encoder=False)
        out = train(base_config(tiny_sd1, data, tmp_path / quant, variants=variants, **kw), echo=lambda m: None)
        for v in variants:
            name = variant_name(v)
            alone = train(base_config(tiny_sd1, data, tmp_path / f"{quant}-{name}", **{**kw, **v}), echo=lambda m: None)
            a, b = tensors(out / f"lora-{name}.safetensors"), tensors(alone)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (quant, name)


def test_the_compare_panel_says_the_count_and_what_the_variants_need_together(tiny_sd1, tmp_path):
    from app.forms import config_to_values
    from app.services import Studio
    from app.tabs.train import TrainTab
    from app.workspace import Workspace
    from trainer.recipe.estimate import estimate_vram_gb

    tab = TrainTab(Studio(Workspace(tmp_path / "ws"), None))
    cfg = TrainConfig(base_model=str(tiny_sd1), dataset=str(tmp_path), variants=[{"rank": 8}, {"rank": 32}])
    said = tab.sweep_plan(config_to_values(cfg))
    both, one = estimate_vram_gb(cfg, "sd1")["total_gb"], estimate_vram_gb(cfg.replace(variants=[]), "sd1")["total_gb"]
    assert said.startswith(f"2 variants in one run: about {both} GB projected") and f"against {one} GB for one" in said
    assert both > one
    bad = tab.sweep_plan(config_to_values(cfg.replace(variants=[{"rank": 8}, {"rank": 0}])))
    assert bad == "Cannot start yet: variant 'rank0': rank must be a positive whole number (got 0); 16 is a good start."
    unknown = tab.sweep_plan(config_to_values(cfg.replace(base_model=str(tmp_path / "nothing.safetensors"))))
    assert unknown == "2 variants in one run. Pick the base model to see what they need together."
