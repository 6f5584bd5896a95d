"""LoRA tools: the maths checked exactly on tiny models, and bad input answered in one sentence."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_preview import hand_made_kohya
from trainer.loras import tools as lt
from trainer.cli import main as cli


def updates(path) -> dict[str, torch.Tensor]:
    return {n: m.update() for n, m in lt.read(path).modules.items()}


def truncated(u: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(u.double(), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


@pytest.fixture
def sd1_lora(tiny_sd1, tmp_path):
    f = tmp_path / "a.safetensors"
    hand_made_kohya(tiny_sd1, "sd1", f, rank=4, alpha=2.0, seed=1, every=1)
    return f


def test_resize_at_full_rank_reproduces_the_update_and_to_k_is_the_truncated_svd(sd1_lora, tiny_sd1, tmp_path):
    before = updates(sd1_lora)
    full = tmp_path / "full.safetensors"
    assert cli(["lora", "resize", str(sd1_lora), "--rank", "4", "--out", str(full), "--precision", "fp32"]) == 0
    for n, u in updates(full).items():
        assert torch.allclose(u, before[n], atol=1e-5), n
    k2 = tmp_path / "k2.safetensors"
    rep = lt.resize(sd1_lora, k2, rank=2, precision="fp32")
    after = lt.read(k2)
    assert {m.rank for m in after.modules.values()} == {2} and all(m.alpha == 2.0 for m in after.modules.values())
    for n, m in after.modules.items():
        assert torch.allclose(m.update().double(), truncated(before[n], 2), atol=1e-5), n
    assert all(0 < v < 1 for v in rep["energy_kept"].values()) and rep["size_mb_after"] < rep["size_mb_before"]
    md = after.metadata
    assert md["ss_network_dim"] == "2" and json.loads(md["ss_lora_studio_tool"])["op"] == "resize"
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(tiny_sd1).load_lora_weights(str(k2))  # loads, every key placed


def test_resize_by_energy_picks_the_smallest_rank_per_module(tiny_sd1, tmp_path):
    f = tmp_path / "low.safetensors"
    hand_made_kohya(tiny_sd1, "sd1", f, rank=4, seed=2, every=2)
    sd = load_file(str(f))
    downs = [k for k in sd if k.endswith(".lora_down.weight")]
    sd[downs[0]][2:] = 0  # this module's update has rank 2 in a rank-4 file
    save_file(sd, str(f))
    spec = lt.spectrum(f)
    name = downs[0][: -len(".lora_down.weight")]
    assert spec["modules"][name]["rank_99"] <= 2 and spec["modules"][name]["energy"][1] == pytest.approx(1.0)
    out = tmp_path / "e.safetensors"
    lt.resize(f, out, energy=0.95, precision="fp32")
    after, before = lt.read(out), lt.read(f)
    for n, m in after.modules.items():
        e = lt.kept_energy(lt.singular_values(before.modules[n]))
        assert m.rank == lt.rank_for(e, 0.95), n
    assert after.modules[name].rank <= 2 and after.metadata["ss_network_dim"] in ("Dynamic", "2", "3", "4")
    assert set(spec["blocks"]) <= set(lt.BLOCKS) and {"IN", "MID", "OUT", "TE"} <= set(spec["blocks"])


def test_an_exact_merge_is_the_weighted_sum_and_a_ranked_one_its_svd(tiny_sd1, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    hand_made_kohya(tiny_sd1, "sd1", a, rank=4, alpha=2.0, seed=1, every=2)
    hand_made_kohya(tiny_sd1, "sd1", b, rank=2, alpha=4.0, seed=2, every=3)  # other ranks, partly other modules
    ua, ub = updates(a), updates(b)
    out = tmp_path / "m.safetensors"
    assert cli(["lora", "merge", f"{a}:0.7", f"{b}:-0.4", "--out", str(out), "--precision", "fp32"]) == 0
    merged = updates(out)
    assert set(merged) == set(ua) | set(ub)
    for n, u in merged.items():
        want = 0.7 * ua.get(n, 0) + -0.4 * ub.get(n, 0)
        assert torch.allclose(u, want, atol=1e-5), n
    r3 = tmp_path / "r3.safetensors"
    lt.merge([(str(a), 0.7), (str(b), -0.4)], r3, rank=3, precision="fp32")
    for n, u in updates(r3).items():
        want = 0.7 * ua.get(n, 0) + -0.4 * ub.get(n, 0)
        assert torch.allclose(u.double(), truncated(want, 3), atol=1e-5), n


def _planted(src, dst, family):
    """A copy of a tiny diffusers model with a known rank-2 change on a few targeted modules."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from trainer.models import lora

    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(5)
    unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet")
    attn, _ = lora.unet_targets(unet)
    planted = {}
    mods = dict(unet.named_modules())
    for n in attn[::4]:
        w = mods[n].weight
        d = (torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w[0].numel(), generator=g)).reshape(w.shape) * 0.05
        w.data += d
        planted[("unet", n)] = d.flatten(1)
    unet.save_pretrained(dst / "unet")
    te = CLIPTextModel.from_pretrained(src, subfolder="text_encoder")
    tm = dict(te.named_modules())
    for n in lora.text_encoder_targets(te)[:2]:
        d = torch.randn(tm[n].weight.shape[0], 1, generator=g) @ torch.randn(1, tm[n].weight.shape[1], generator=g) * 0.05
        tm[n].weight.data += d
        planted[("te1", n)] = d
    te.save_pretrained(dst / "text_encoder")
    return planted


@pytest.mark.parametrize("family,as_file", [("sd1", False), ("sdxl", True)])
def test_extract_recovers_a_planted_low_rank_difference(family, as_file, request, tmp_path):
    from ldm import save_single_file
    from trainer.loras.format import module_name

    base = request.getfixturevalue(f"tiny_{family}")
    tuned = tmp_path / "tuned"
    planted = _planted(base, tuned, family)
    a, b, extra = base, tuned, []
    if as_file:  # single files in the original layout (SGM UNet, CLIP-L and OpenCLIP text encoders)
        a, b = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
        save_single_file(base, a, family)
        save_single_file(tuned, b, family)
        extra = ["--model-config", str(base)]  # tiny models: the shipped configs describe the full-size ones
    out = tmp_path / "x.safetensors"
    assert cli(["lora", "extract", "--base", str(a), "--tuned", str(b), "--rank", "2", "--out", str(out),
                "--precision", "fp32", *extra]) == 0
    got = updates(out)
    from diffusers import UNet2DConditionModel

    cfg = UNet2DConditionModel.load_config(base, subfolder="unet")
    up_attn = {i: "CrossAttn" in t for i, t in enumerate(cfg["up_block_types"])}
    for (part, n), d in planted.items():
        key = module_name(part, n, family, {**cfg, "up_has_attn": up_attn})
        assert torch.allclose(got[key], d, atol=1e-5), key
    planted_keys = {module_name(p, n, family, {**cfg, "up_has_attn": up_attn}) for p, n in planted}
    for key, u in got.items():
        if key not in planted_keys:
            assert u.abs().max() < 1e-6, key  # untouched modules extract to nothing
    assert not any(k.startswith("lora_te2_") for k in got)  # an unchanged text encoder gets no LoRA
    md = lt.read(out).metadata
    assert md["ss_base_model_version"] == ("sdxl_base_v1-0" if family == "sdxl" else "sd_v1")


def test_bad_input_gets_one_plain_sentence(tiny_sd1, tiny_sdxl, sd1_lora, tmp_path, capsys):
    sdxl_lora = tmp_path / "x.safetensors"
    hand_made_kohya(tiny_sdxl, "sdxl", sdxl_lora, seed=3)
    not_lora = tmp_path / "ckpt.safetensors"
    save_file({"model.diffusion_model.x.weight": torch.zeros(2, 2)}, str(not_lora))
    corrupt = tmp_path / "broken.safetensors"
    corrupt.write_bytes(sd1_lora.read_bytes()[:300])
    cases = [
        (["lora", "info", str(not_lora)], "no kohya LoRA keys"),
        (["lora", "info", str(corrupt)], "not a readable .safetensors file"),
        (["lora", "resize", str(sd1_lora), "--rank", "9", "--out", str(tmp_path / "o.safetensors")], "rank 4 at most"),
        (["lora", "merge", f"{sd1_lora}:1", f"{sdxl_lora}:1", "--out", str(tmp_path / "o.safetensors")], "different model families"),
        (["lora", "merge", f"{sd1_lora}:x", f"{sd1_lora}:1", "--out", str(tmp_path / "o.safetensors")], "must be a number"),
        (["lora", "extract", "--base", str(tiny_sd1), "--tuned", str(tiny_sdxl), "--rank", "2", "--out", str(tmp_path / "o.safetensors")], "one family"),
        (["lora", "extract", "--base", str(tiny_sd1), "--tuned", str(tiny_sd1), "--rank", "2", "--out", str(tmp_path / "o.safetensors")], "nothing to extract"),
    ]
    capsys.readouterr()  # what building the files printed (progress bars)
    for argv, words in cases:
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.slow
def test_the_tools_tab_shows_a_spectrum_and_resizes_through_a_worker_process(tiny_sd1, tmp_path):
    """The tab's own handlers, as the page calls them: a worker process does the work, progress comes back."""
    import gradio as gr

    from app.main import build_ui

    ui = build_ui(tmp_path / "ws")
    lora_file = tmp_path / "ws" / "loras" / "mine.safetensors"
    hand_made_kohya(tiny_sd1, "sd1", lora_file, rank=4, seed=1, every=2)
    buttons = {b.value: i for i, b in ui.blocks.items() if isinstance(b, gr.Button)}

    def handler(label):
        return next(f.fn for f in ui.fns.values() if any(t[0] == buttons[label] for t in f.targets))

    shown = list(handler("Info and rank spectrum")(str(lora_file)))
    status, curve, rows, modules, info = shown[-1]
    assert "SD 1.x" in status and "ranks 4" in status and info["modules"] > 0
    assert len(modules) == info["modules"] and all(1 <= m[3] <= m[4] <= m[5] <= m[2] == 4 for m in modules)
    assert any("Spectrum:" in s[0] for s in shown[:-1])  # progress while it works
    assert {r[0] for r in rows} >= {"IN", "OUT", "TE"} and set(curve["block"]) >= {"IN", "OUT"}
    done = list(handler("Resize")(str(lora_file), 2, 0.95, "mine small"))
    assert "Wrote `mine small.safetensors`" in done[-1][0] and "Energy kept per block" in done[-1][0]
    small = lt.read(tmp_path / "ws" / "loras" / "mine small.safetensors")
    assert {m.rank for m in small.modules.values()} == {2}
    bad = list(handler("Resize")(str(lora_file), 9, 0.95, "too big"))
    assert bad[-1][0].startswith("**Resizing stopped:**") and "rank 4 at most" in bad[-1][0]


def test_preview_per_block_strength_applies_only_the_chosen_blocks(tiny_sd1, tmp_path):
    """Block weights (IN, MID, OUT) through diffusers' adapter scales: IN only equals the base UNet with only the
    IN modules' updates folded in, at the row's strength."""
    from diffusers import UNet2DConditionModel

    from trainer.engine.preview import LoraSpec, PreviewEngine

    f = tmp_path / "a.safetensors"
    deltas = hand_made_kohya(tiny_sd1, "sd1", f, rank=4, alpha=2.0, seed=4, every=1)
    e = PreviewEngine("cpu")
    e.set_base(str(tiny_sd1))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ehs = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    for blocks, keep in (((1, 0, 0), "down_blocks"), ((0, 0, 1), "up_blocks"), ((0, 1, 0), "mid_block")):
        e.apply([LoraSpec(str(f), 0.8, blocks=blocks)])
        ref = UNet2DConditionModel.from_pretrained(tiny_sd1, subfolder="unet")
        mods = dict(ref.named_modules())
        for m, d in deltas["unet"].items():
            if m.startswith(keep):
                mods[m].weight.data += 0.8 * d
        with torch.no_grad():
            assert torch.allclose(e.pipe.unet(x, 50, ehs).sample, ref(x, 50, ehs).sample, atol=1e-5), blocks
