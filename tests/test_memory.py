"""`python -m trainer memory`: the counter of bytes that would sit on the GPU, on the CPU (issue 13.3/13.4)."""
from __future__ import annotations

import pytest
import torch

from trainer import placement
from trainer.recipe.config import TrainConfig
from trainer.measure.memory import DeviceMemory, measure

MB = 1024**2


def test_the_counter_follows_creation_freeing_parking_and_placed_modules():
    with DeviceMemory() as c:
        a = torch.empty(MB, dtype=torch.uint8)  # 1 MB made on the "device"
        b = torch.empty(2 * MB, dtype=torch.uint8)
        view = a[10:]  # a view shares its storage: not counted twice
        assert c.extra == 3 * MB
        del b
        assert c.extra == MB and c.peaks["load"] == 3 * MB
        placement.to_host(a)  # parked (a cache entry): no longer on the device
        assert c.extra == 0
        del view, a
        lin = torch.nn.Linear(256, 256)  # built while counting, but not placed: its weights are created tensors
        made = c.extra
        assert made == (256 * 256 + 256) * 4
        placement.phase("forward")
        placement.to_device(lin, "cpu")  # placed: counted once, as the module's
        assert c.resident_bytes == made and c.extra == 0
        placement.to_host(lin)
        assert c.resident_bytes == 0 and c.extra == 0
        placement.to_device(lin, "cpu", torch.bfloat16)  # a cast makes new storages: the module's, once
        assert c.resident_bytes == made // 2 and c.extra == 0
    assert c.peaks["forward"] >= made
    assert placement._watchers == []  # the counter leaves nothing behind


@pytest.fixture(scope="module")
def tiny_model():
    from trainer.measure.bench import build_model

    return lambda: build_model("tiny", "cpu", torch.float32)


def weight_bytes(module, dtype_bytes: int) -> int:
    return sum(p.numel() for p in module.parameters()) * dtype_bytes


@pytest.mark.slow
def test_a_run_is_counted_phase_by_phase_and_parked_parts_do_not_count(tiny_model, tmp_path):
    """Latent caching holds the fp32 VAE alone; cached text-encoder outputs take the encoders off the device for
    the steps; LoRA parameters are counted exactly from the modules peft made."""
    from trainer.recipe.estimate import lora_param_count

    base = TrainConfig(base_model="x", resolution=64, batch_size=2, rank=4, alpha=4, mixed_precision="bf16",
                       optimizer="adamw", train_text_encoder=False, cache_latents=True, min_bucket=64, max_bucket=64)
    m = tiny_model()
    vae, te = weight_bytes(m.vae, 4), weight_bytes(m.text_encoders[0], 2)
    cached = measure(base, m, steps=2, work=tmp_path / "a")
    assert list(cached["phases"])[:3] == ["load", "cache latents", "cache text encoders"]
    assert {"forward", "backward", "optimizer", "sample", "save"} <= set(cached["phases"])
    assert cached["phases"]["cache latents"] >= vae
    frozen = measure(base.replace(cache_text_encoder_outputs=False), tiny_model(), steps=2, work=tmp_path / "b")
    assert "cache text encoders" not in frozen["phases"]
    # the encoders (bf16) sit on the device through the steps only when their outputs are not cached
    assert frozen["phases"]["forward"] - cached["phases"]["forward"] >= 0.9 * te
    unet_mods = cached["lora_params"]
    assert unet_mods == lora_param_count(base, "sd1", config_dir=_tiny_configs(tmp_path)) > 0


def _tiny_configs(tmp_path):
    """The tiny model's configs in the layout estimate.lora_param_count reads."""
    import json

    from trainer.measure.bench import build_model

    m = build_model("tiny", "cpu", torch.float32)
    d = tmp_path / "configs"
    for name, module in (("unet", m.unet), ("text_encoder", m.text_encoders[0])):
        (d / name).mkdir(parents=True)
        cfg = module.config if isinstance(module.config, dict) else module.config.to_dict()
        (d / name / "config.json").write_text(json.dumps(dict(cfg), default=str))
    return d


@pytest.mark.slow
def test_a_quantised_base_counts_fewer_bytes(tiny_model, tmp_path):
    base = TrainConfig(base_model="x", resolution=64, batch_size=1, rank=4, alpha=4, mixed_precision="bf16",
                       optimizer="adamw", train_text_encoder=False, cache_latents=True, min_bucket=64, max_bucket=64)
    plain = measure(base, tiny_model(), steps=1, work=tmp_path / "a")
    m = tiny_model()
    unet_bf16 = weight_bytes(m.unet, 2)
    nf4 = measure(base.replace(base_quantization="nf4"), m, steps=1, work=tmp_path / "b")
    assert nf4["phases"]["forward"] < plain["phases"]["forward"]
    # cast and quantised on the host, then moved: the device never holds the bf16 UNet while loading (it did)
    assert nf4["phases"]["load"] < unet_bf16 < plain["phases"]["load"]


@pytest.mark.slow
def test_the_memory_command_writes_its_table(tmp_path, capsys):
    from trainer.cli import main

    out = tmp_path / "BENCH.md"
    assert main(["memory", "--model", "tiny", "--resolution", "64", "--batch-size", "1", "--steps", "1",
                 "--out", str(out)]) == 0
    text = out.read_text()
    assert "### `trainer memory`" in text and "torch " in text and "| tiny 64px b1" in text
    printed = capsys.readouterr().out
    assert "peak:" in printed and "on a CUDA card about" in printed and "estimate" in printed


@pytest.mark.slow
def test_measurement_commands_print_and_leave_tracked_files_alone(tmp_path, capsys, monkeypatch):
    """Run as the README says (no --out), `trainer memory` prints its table and writes no file: BENCHMARKS.md of the
    checkout stays as it is."""
    from conftest import ROOT
    from trainer.cli import main

    monkeypatch.chdir(tmp_path)
    before = (ROOT / "BENCHMARKS.md").read_bytes()
    assert main(["memory", "--model", "tiny", "--resolution", "64", "--batch-size", "1", "--steps", "1"]) == 0
    assert "### `trainer memory`" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == [] and (ROOT / "BENCHMARKS.md").read_bytes() == before


@pytest.mark.slow
def test_lora_parameter_counts_of_every_shipped_preset_are_exact():
    """The estimate counts LoRA parameters from the configs' shapes; peft, injecting into the full-size
    architecture (on the meta device: shapes only), makes exactly as many."""
    from trainer.recipe.estimate import lora_param_count
    from trainer.models import lora
    from trainer.models.load import random_full_size
    from trainer.recipe.presets import list_presets

    for p in list_presets(None):
        cfg = p.apply(TrainConfig(), True)
        fam = "sdxl" if p.family == "sdxl" else "sd1"
        m = random_full_size(fam, device="meta")
        lora.inject_for_config(m, cfg)
        made = sum(q.numel() for mod in [m.unet, *m.text_encoders] for q in lora.lora_parameters(mod))
        assert made == lora_param_count(cfg, fam), p.key


def measured_rows(text: str) -> dict[str, tuple[list[str], bool]]:
    """The newest `trainer memory` row of each preset in BENCHMARKS.md: key -> (cells, whether its table was counted
    under the counter's rules now: its header says COUNTED_AS, CUDA's autocast casts)."""
    from trainer.measure.memory import COUNTED_AS

    rows, current = {}, False
    for line in text.splitlines():
        if line.startswith("#"):
            current = False
        elif line.startswith("Projected (counted on the CPU"):
            current = COUNTED_AS in line
        elif line.startswith("| ") and line.rstrip().endswith("|") and ") |" in line:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells[0].endswith(")") and "(" in cells[0]:
                rows[cells[0].rsplit("(", 1)[1][:-1]] = (cells, current)
    return rows


def test_measured_presets_are_estimated_within_15_percent_and_card_presets_state_their_peak():
    """Issue 13.4/13.5 and 31: for each shipped preset counted with `trainer memory` as it counts now (CUDA's
    autocast casts; the same settings line in BENCHMARKS.md), the pre-flight estimate is within 15% of the count.
    Every preset named for a card size is counted, states its projected peak in its description, and fits the
    card: by its count, and by the estimate too where its newest count is from before the counter followed CUDA's
    casts. There is one for each card size: 4, 6, 8, 12 and 24 GB."""
    import re

    from conftest import ROOT
    from trainer.recipe.estimate import estimate_vram_gb
    from trainer.measure.memory import PHASES, measured_config, summary
    from trainer.recipe.presets import list_presets

    rows = measured_rows((ROOT / "BENCHMARKS.md").read_text())
    checked, cards = 0, set()
    for p in list_presets(None):
        cfg = p.apply(TrainConfig(), True)
        arch, fam = ("sdxl", "sdxl") if p.family == "sdxl" else ("sd15", "sd1")
        card = re.search(r"(\d+) GB card|\((\d+) GB\)", p.name)
        if p.key not in rows or rows[p.key][0][0] != summary(cfg, arch, p.key):
            assert not card, f"{p.key} names a card size but is not measured as it is now: run " \
                             f"`python -m trainer memory --preset {p.key}`"
            continue
        cells, current = rows[p.key]
        cuda = float(cells[len(PHASES) + 2])
        if "projected peak" in p.description:  # any preset that states its peak states its newest count
            assert f"projected peak (counted on the CPU) {cuda:.1f} GB" in p.description, p.key
        est = estimate_vram_gb(measured_config(cfg), fam)["total_gb"]
        if current:
            assert abs(est - cuda) <= 0.15 * cuda, (p.key, est, cuda)
            checked += 1
        if card:
            size = int(card.group(1) or card.group(2))
            assert cuda <= size and est <= size, (p.key, cuda, est)
            assert f"projected peak (counted on the CPU) {cuda:.1f} GB" in p.description, p.key
            cards.add(size)
    assert checked >= 3, checked
    assert cards >= {4, 6, 8, 12, 24}, cards  # a preset for each card size


def test_the_counter_lets_go_of_the_models_it_counted():
    """Storages made while counting carry finalizers that point at the counter, and the counter at the modules
    on the device: after counting, both must be collectable (`--preset all` ran out of memory without this)."""
    import gc
    import weakref

    lin = torch.nn.Linear(64, 64)
    ref = weakref.ref(lin)
    with DeviceMemory():
        placement.to_device(lin, "cpu", torch.bfloat16)  # new bf16 weights, made while counting
    del lin
    gc.collect()
    assert ref() is None


@pytest.mark.slow  # a training or a worker: the fast tier stays under 3 minutes
def test_every_engine_process_runs_with_expandable_segments_unless_the_user_chose(tmp_path):
    """Issue 31: the workers set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (before torch starts CUDA),
    and a value the person set is kept."""
    import os
    import subprocess
    import sys

    from app.workers import engine_command
    from conftest import ROOT

    probe = ("import os, runpy, sys\nsys.argv = ['trainer', 'config-reference']\n"
             "try:\n    runpy.run_module('trainer', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('ALLOC=' + os.environ.get('PYTORCH_CUDA_ALLOC_CONF', ''))")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=str(ROOT))
    assert "ALLOC=expandable_segments:True" in out.stdout, out.stderr[-500:]
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=str(ROOT),
                         env={**env, "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"})
    assert "ALLOC=max_split_size_mb:128" in out.stdout
    assert engine_command("x")[1:3] == ["-m", "trainer"]  # every worker starts through trainer/__main__.py


def test_the_page_says_when_memory_spills_out_of_the_card():
    """Issue 31.6, from readings a test can feed (the progress events of a CUDA run carry them): reserved memory
    over the card's dedicated memory, or steps several times slower right after memory rose, give one sentence
    with what to change; a steady run, a slow step without a memory rise, and a CPU run give none."""
    import time

    from app.runs import RunView
    from app.tabs.train import progress_markdown
    from trainer.measure.spill import spill_warning

    def readings(*rows):
        return [{"step": i + 1, "s_per_step": s, "reserved_gb": r} for i, (s, r) in enumerate(rows)]

    steady = readings((1.0, 10.0), (1.1, 10.1), (0.9, 10.1), (1.0, 10.1))
    assert spill_warning(steady, 12.0) is None
    over = readings((1.0, 10.0), (1.0, 12.4))
    assert "holds 12.4 GB and the card has 12.0 GB" in spill_warning(over, 12.0)
    jump = readings((1.0, 10.0), (1.1, 10.1), (0.9, 10.1), (1.0, 10.2), (20.0, 11.5))
    said = spill_warning(jump, 12.0)
    assert said.startswith("Steps slowed from 1.00 to 20.00 s right after memory rose to 11.5 GB")
    assert "nf4" in said and "Sysmem Fallback Policy" in said
    slow_only = readings((1.0, 10.0), (1.1, 10.1), (0.9, 10.1), (1.0, 10.1), (20.0, 10.1))  # a sample, a save...
    assert spill_warning(slow_only, 12.0) is None
    assert spill_warning(jump, None) is None  # no card: a CPU run

    v = RunView()
    now = time.time()
    v.fold([{"type": "progress", "time": now, "step": i + 1, "total": 100, "loss": 0.1, "its": 1 / s,
             "reserved_gb": r, "dedicated_gb": 12.0} for i, (s, r) in enumerate([(1.0, 10.0), (1.1, 10.1), (0.9, 10.1),
                                                                              (1.0, 10.2), (20.0, 11.5)])])
    page = progress_markdown({"id": "r1", "dir": ""}, v)
    assert "**Slow steps:** Steps slowed" in page


@pytest.mark.slow  # a training and a worker: the fast tier stays under 3 minutes
def test_the_cuda_check_reads_each_phase_and_compares_reserved_plus_context_to_the_projection(tiny_model, tmp_path):
    """`memory --cuda-check` can only run on a GPU. What runs here: its readings are taken at the engine's real phase
    changes (a reader that counts calls stands in for torch.cuda's), a phase met again keeps its highest, and the
    report compares reserved memory plus the context outside the allocator (never allocated memory alone) with the
    projection. Without a GPU the command says so and exits 2; every card preset states its card size."""
    import subprocess
    import sys

    from conftest import ROOT
    from trainer.engine.loop import train
    from trainer.measure.bench import synthetic_dataset
    from trainer.measure.cuda_check import GB, PhaseReadings, card_size, report
    from trainer.recipe.presets import find_preset, list_presets

    calls = []

    def reader():
        calls.append(len(calls))
        n = len(calls)  # every reading higher than the last: a repeated phase must keep the highest
        return {"allocated": n * GB, "reserved": (n + 0.5) * GB, "reserved_now": (n + 0.25) * GB,
                "card_used": (n + 0.75) * GB}

    readings = PhaseReadings(read=reader)
    cfg = TrainConfig(base_model="x", dataset=str(synthetic_dataset(tmp_path / "d", 2, 64)), resolution=64,
                      min_bucket=64, max_bucket=64, rank=4, alpha=4, max_steps=2, mixed_precision="no",
                      train_text_encoder=False, output_dir=str(tmp_path / "run"), device="cpu")
    with placement.watching(readings):
        train(cfg, tmp_path / "run", echo=lambda m: None, model=tiny_model())
    readings.close()
    assert {"load", "cache latents", "forward", "backward", "optimizer", "save"} <= set(readings.rows)
    assert len(calls) > len(readings.rows)  # forward, backward and optimizer came round twice: one row each
    assert readings.rows["save"]["allocated"] == len(calls) * GB  # the last reading (the final save's)
    top = max(readings.rows.values(), key=lambda r: r["reserved"])
    table, need = report(readings.rows, projected_gb=need_gb(top), card_gb=4)
    assert need == pytest.approx((top["reserved"] + 0.5 * GB) / GB)  # context = card used - reserved now
    assert "(ratio 1.00)" in table and "the 4 GB the preset promises" in table

    r = subprocess.run([sys.executable, "-m", "trainer", "memory", "--cuda-check", "--preset", "sdxl_4gb"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "none is visible here" in r.stdout
    assert card_size(find_preset("sdxl_4gb")) == 4 and card_size(find_preset("sdxl_12gb")) == 12
    assert all(card_size(p) for p in list_presets(None) if p.shipped and "GB card" in p.name)


def need_gb(reading: dict) -> float:
    from trainer.measure.cuda_check import GB

    return (reading["reserved"] + reading["card_used"] - reading["reserved_now"]) / GB


# ------------------------------------------------------------------------------------------ issue 31.1: CUDA's casts
def _count(fn, cuda_policy: bool) -> tuple[int, object]:
    """The peak bytes the counter sees while fn() runs under the CPU's bf16 autocast, with or without CUDA's policy."""
    import contextlib

    from trainer.measure.cuda_autocast import CudaAutocast

    with torch.autocast("cpu", torch.bfloat16), DeviceMemory() as c, \
            (CudaAutocast() if cuda_policy else contextlib.nullcontext()):
        out = fn()
    return c.peaks["load"], out


def test_the_counter_casts_as_cuda_autocast_does_read_from_torch():
    """Issue 31.1: CUDA's autocast runs group_norm, layer_norm and softmax in fp32 where the CPU's keeps bf16; the
    counter applies CUDA's policy, read from torch's own AutocastCUDA kernels, so a norm's input is copied to fp32
    and its output is fp32. Matmuls stay bf16, gradients flow, and the CPU's own policy is back afterwards."""
    import torch.nn.functional as F

    from trainer.measure.cuda_autocast import CudaAutocast

    x = torch.randn(1, 32, 64, 64).bfloat16()  # made before counting: not counted
    n = x.numel()
    cpu_peak, cpu_out = _count(lambda: F.group_norm(x, 8), False)
    cuda_peak, cuda_out = _count(lambda: F.group_norm(x, 8), True)
    assert cpu_out.dtype == torch.bfloat16 and cuda_out.dtype == torch.float32
    assert cpu_peak < 3 * n  # a bf16 output (and the small statistics)
    assert cuda_peak >= 8 * n  # an fp32 copy of the input and an fp32 output
    # the policy is torch's: every op torch registers a CUDA autocast kernel for gets the emulation
    assert "aten::group_norm" in CudaAutocast.ops() and "aten::layer_norm" in CudaAutocast.ops()
    assert set(torch._C._dispatch_get_registrations_for_dispatch_key("AutocastCUDA")) <= set(CudaAutocast.ops())

    lin = torch.nn.Linear(32, 16)
    inp = torch.randn(4, 32, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16), CudaAutocast():
        h = lin(inp)
        y = torch.softmax(h, -1)
        z = F.layer_norm(h, (16,))
        assert (h.dtype, y.dtype, z.dtype) == (torch.bfloat16, torch.float32, torch.float32)
        (y.sum() + z.sum()).backward()
    assert inp.grad.dtype == torch.float32 and lin.weight.grad is not None and torch.isfinite(inp.grad).all()
    with torch.autocast("cpu", torch.bfloat16):  # the CPU's own kernels are back
        assert F.group_norm(x, 8).dtype == torch.bfloat16 and torch.softmax(lin(inp), -1).dtype == torch.bfloat16


def test_the_nf4_matmul_counts_the_weight_cuda_dequantises_inside_it():
    """Issue 31.3: bitsandbytes' nf4 matmul on CUDA dequantises the weight into a buffer of the input's dtype for
    more than a few rows; the CPU kernel hides that buffer, so the counter adds it while the op runs."""
    import bitsandbytes as bnb

    lin = bnb.nn.Linear4bit(512, 1024, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(torch.randn(1024, 512), requires_grad=False, quant_type="nf4")
    lin = lin.to("cpu")
    weight_bf16 = 1024 * 512 * 2
    for rows, inside in ((64, True), (2, False)):
        x = torch.randn(rows, 512, dtype=torch.bfloat16, requires_grad=True)
        with DeviceMemory() as c:
            y = lin(x)
        out = rows * 1024 * 2
        assert y.shape == (rows, 1024)
        if inside:
            assert c.peaks["load"] >= weight_bf16 + out, c.peaks
        else:
            assert c.peaks["load"] < weight_bf16, c.peaks


@pytest.mark.slow  # two trainings
def test_a_bf16_vae_encodes_its_own_latents_within_three_percent_of_fp32(tiny_sd1, tmp_path, monkeypatch):
    """Issue 31.2: vae_precision = bf16 halves the VAE's memory while caching latents. Its latents go to their own
    cache entries (an fp32 run's are never reused for it, nor the other way round), they are within 3% (RMS) of
    the fp32 ones, and the run trains and samples with the bf16 VAE."""
    from safetensors.torch import load_file

    from conftest import base_config, make_images
    from trainer.engine.loop import train

    data = tmp_path / "data"
    make_images(data, 2, concept=True)
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORA_STUDIO_CACHE", str(cache))
    latents = {}
    for precision in ("fp32", "bf16"):
        cfg = base_config(tiny_sd1, data, tmp_path / precision, max_steps=1, vae_precision=precision,
                          sample_prompts=["zwx"], sample_steps=1)
        assert train(cfg, tmp_path / precision, echo=lambda m: None).is_file()
        assert list((tmp_path / precision).rglob("*.png"))  # a sample, decoded by the bf16 VAE
        latents[precision] = {p.name: load_file(p)["latent"] for p in cache.rglob("*.safetensors")
                              if p.parent.parent.name.endswith("-bf16") == (precision == "bf16")}
    assert len(latents["fp32"]) == len(latents["bf16"]) == 2  # encoded again, not reused
    for name, a in latents["fp32"].items():
        b = latents["bf16"][name]
        assert a.dtype == b.dtype == torch.float32
        rel = (a - b).pow(2).mean().sqrt() / a.pow(2).mean().sqrt()
        assert 0 < rel < 0.03, rel


def test_the_estimate_halves_the_vae_in_bf16_and_names_it():
    """Issue 31.2: the pre-flight estimate of a latent-caching phase follows vae_precision: bf16 halves the VAE's
    weights and activations, and the term says which precision it is."""
    from trainer.recipe.estimate import estimate_vram_gb
    from trainer.recipe.presets import find_preset

    cfg = find_preset("sdxl_4gb").apply(TrainConfig(), True)
    assert cfg.vae_precision == "bf16"  # the 4 GB preset encodes in bf16: its caching phase was its peak
    full, half = (estimate_vram_gb(cfg.replace(vae_precision=p), "sdxl") for p in ("fp32", "bf16"))
    assert full["phase"] == "caching latents" and "VAE (fp32)" in full["terms_gb"]
    assert half["phase"] == "training steps"  # the set-up no longer peaks above the steps
    # at 2048 px caching stays the peak in bf16 too: its terms are half the fp32 ones
    full, half = (estimate_vram_gb(cfg.replace(vae_precision=p, resolution=2048, max_bucket=2048), "sdxl")
                  for p in ("fp32", "bf16"))
    assert full["phase"] == half["phase"] == "caching latents"
    assert half["terms_gb"]["VAE (bf16)"] * 2 == pytest.approx(full["terms_gb"]["VAE (fp32)"], abs=0.02)
    assert half["terms_gb"]["VAE activations"] * 2 == pytest.approx(full["terms_gb"]["VAE activations"], abs=0.02)


def test_a_preset_is_counted_on_its_own_family_architecture():
    """`trainer memory --preset sdxl_4gb` without --model counted the SDXL preset on SD 1.5's architecture (the
    --model default) and labelled the row sdxl_4gb. A preset now picks its family's architecture, and another
    family's architecture is refused in one sentence."""
    import argparse

    from trainer.measure.memory import architecture

    def arch(preset=None, model=None):
        return architecture(argparse.Namespace(preset=preset, model=model))

    assert arch("sdxl_4gb") == "sdxl" and arch("sd15_character") == "sd15"
    assert arch() == "sd15" and arch(model="sdxl") == "sdxl" and arch("quick_test") == "sd15"
    assert arch("sdxl_4gb", "sdxl") == "sdxl" and arch("sdxl_4gb", "tiny") == "tiny"  # the tests' small model
    with pytest.raises(SystemExit, match="sdxl_4gb is a preset for sdxl, not sd15: count it with --model sdxl"):
        arch("sdxl_4gb", "sd15")
