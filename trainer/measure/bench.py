"""`python -m trainer bench`: our training step against the plain diffusers+peft reference loop, in one process.

Measures steps/s, images/s, peak memory (CUDA max reserved, or peak RSS on CPU), time to first step, and
achieved TFLOP/s from a FLOP count of one step (MFU against the GPU's bf16 peak where known). Appends the
table, with device, versions and config, to BENCHMARKS.md. Never used for timed assertions in tests.
"""
from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from trainer.measure import ARCHITECTURES, family_of

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "A10G": 70.0}
# what --which can time (the last, dataset, is the data loader alone and not in the default)
VARIANTS = ("reference", "ours", "ours_text_cached", "ours_cached", "kohya_cached", "default", "lowvram", "dataset")


def add_command(sub) -> None:
    b = sub.add_parser("bench", help="measure training speed and memory against the reference loop")
    b.add_argument("--model", choices=["tiny", *ARCHITECTURES], default="tiny")
    b.add_argument("--steps", type=int, default=10, help="measured steps (after warm-up)")
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--batch", type=int, default=None)
    b.add_argument("--resolution", type=int, default=None)
    b.add_argument("--rank", type=int, default=16)
    b.add_argument("--precision", choices=["no", "fp16", "bf16"], default=None)
    b.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    b.add_argument("--which", default=",".join(VARIANTS[:-1]), help="comma list of: " + ", ".join(VARIANTS))
    b.add_argument("--repeats", type=int, default=5,
                   help="measure every variant this many times, interleaved (A B C A B C ...); report median and range")
    b.add_argument("--out", default="", help="also append the table to this file (e.g. BENCHMARKS.md); default: print only")
    b.add_argument("--sweep", type=int, default=0, metavar="K",
                   help="instead: a sweep of K variants in one run against K runs one after another (wall time with "
                        "the model build and caching) and the memory K runs side by side would need")
    b.set_defaults(fn=run_bench)


# ------------------------------------------------------------------------------------ helpers
class PeakRSS:
    """Peak resident memory of this process during a block: Linux's VmHWM, reset on entry via clear_refs.
    (A sampling thread would fight OpenMP's spinning threads for the cores and distort the timings.)"""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        return self

    def __exit__(self, *a):
        self.peak = 0
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        self.peak = int(line.split()[1]) * 1024
        except OSError:
            import resource

            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _mem_block(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return PeakRSS()


def _peak_gb(device, rss: PeakRSS) -> float:
    import torch

    if device == "cuda":  # what the allocator held (a card needs that, plus its context), not what tensors used
        return torch.cuda.max_memory_reserved() / 2**30
    return rss.peak / 2**30


def build_model(name: str, device: str, dtype):
    import torch

    from trainer.models.load import from_pipeline, random_full_size
    from trainer.models.tiny import build_tiny_pipeline

    torch.manual_seed(0)
    if name == "tiny":
        return from_pipeline(build_tiny_pipeline("sd1"), "sd1", "tiny sd1")
    return random_full_size(family_of(name), device=device, dtype=torch.float32)


def synthetic_dataset(folder: Path, n: int, res: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    for i in range(n):
        Image.fromarray((rng.rand(res, res, 3) * 255).astype("uint8")).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(f"zwx, photo {i}, red, blue")
    return folder


def count_step_flops(model, batch: int, res: int, device, dtype, train_te: bool) -> float:
    """FLOPs of one forward+backward of the UNet (and text encoder when trained) at this batch/resolution."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.models.prompts import encode_prompts

    f = model.vae_scale_factor
    for m in [model.unet, model.vae, *model.text_encoders]:
        m.requires_grad_(False)  # the base is frozen in LoRA training: no weight gradients to count
    if train_te:
        for m in model.text_encoders:
            m.get_input_embeddings().weight.requires_grad_(True)  # gradients flow back through the encoder
    # gradients flow back through every activation (to the LoRA inputs), but no frozen weight gets one
    lat = torch.randn(batch, 4, res // f, res // f, device=device, dtype=dtype, requires_grad=True)
    t = torch.randint(0, 1000, (batch,), device=device)
    with FlopCounterMode(display=False) as fc:
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            with torch.set_grad_enabled(True):
                hs, pooled = encode_prompts(model, model.text_encoders, ["zwx, a photo"] * batch, 1, device)
                kw = {}
                if model.spec.pooled_conditioning:
                    kw["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.tensor([[res, res, 0, 0, res, res]] * batch, device=device, dtype=dtype)}
                out = model.unet(lat, t, hs.to(dtype), **kw).sample
                out.float().pow(2).mean().backward()
    for m in [model.unet, *model.text_encoders]:
        m.zero_grad(set_to_none=True)
    return float(fc.get_total_flops())


# ------------------------------------------------------------------------------------ the reference
def _read_pixels(files: list, resolution: int):
    """The example script's images: decoded, squashed to a square and scaled to [-1, 1], every step."""
    import numpy as np
    import torch
    from PIL import Image

    return torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB").resize((resolution, resolution)),
                                                    dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1) for f in files])


def _reference_conditioning(model, captions: list, resolution: int, device, dtype):
    """The example scripts' text conditioning, encoded every step: (hidden states, the UNet's extra kwargs). SDXL
    (train_text_to_image_lora_sdxl.py) uses both encoders, pooled embeds and time ids."""
    import torch

    if not model.spec.pooled_conditioning:
        tok = model.tokenizers[0]
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        return model.text_encoders[0](ids)[0], {}
    from trainer.models.prompts import encode_prompts

    with torch.no_grad():
        hs, pooled = encode_prompts(model, model.text_encoders, captions, 1, device)
    r = resolution
    return hs, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": torch.tensor(
        [[r, r, 0, 0, r, r]] * len(captions), device=device, dtype=dtype)}}


def reference_loop(model, data_dir: Path, cfg, steps: int, warmup: int, device, dtype) -> dict:
    """What a user gets from diffusers' train_text_to_image_lora.py: images decoded and VAE-encoded and captions
    encoded every step, peft LoRA on the UNet attention (to_q/k/v/out.0), frozen text encoder, same precision,
    plain MSE; with our AdamW (fused on CUDA), so the optimizer is not what the rows compare."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig

    unet, vae, te = model.unet, model.vae, model.text_encoders[0]
    for m in (unet, vae, te):
        m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]), adapter_name="ref")
    unet.to(device, dtype=dtype)
    vae.to(device, dtype=torch.float32)  # fp32 as ours (an fp16 SDXL VAE makes NaNs): the same VAE work both sides
    for t_ in model.text_encoders:
        t_.to(device, dtype=dtype)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    from trainer.recipe import optimizers

    opt = optimizers.get("adamw").build([{"params": params, "lr": 1e-4}], cfg, device)  # our AdamW: like for like
    files = sorted(data_dir.glob("*.png"))
    caps = [(data_dir / f"{f.stem}.txt").read_text() for f in files]
    sched = model.noise_scheduler
    times = []
    t_load = time.perf_counter()
    for step in range(warmup + steps):
        t0 = time.perf_counter()  # a step includes reading its images, as the example's dataloader does
        idx = [(step * cfg.batch_size + k) % len(files) for k in range(cfg.batch_size)]
        px = _read_pixels([files[i] for i in idx], cfg.resolution).to(device, dtype)
        with torch.no_grad():
            latents = vae.encode(px.float()).latent_dist.sample() * vae.config.scaling_factor
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            noise = torch.randn_like(latents)
            ts = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=device)
            noisy = sched.add_noise(latents, noise, ts)
            hs, kw = _reference_conditioning(model, [caps[i] for i in idx], cfg.resolution, device, dtype)
            pred = unet(noisy, ts, hs, **kw).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        loss.item()  # the example script logs the loss every step
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if step == 0:
            first = time.perf_counter() - t_load
    unet.delete_adapters("ref")
    meas = times[warmup:]
    return {"step_s": sum(meas) / len(meas), "first_step_s": first}


def ours(model, data_dir: Path, cfg, steps: int, warmup: int, work: Path) -> dict:
    """Our engine's own loop (train()), timed from its event log."""
    from trainer.events import read_events
    from trainer.engine.loop import train
    from trainer.engine.setup import fresh_accelerate_state

    run = Path(tempfile.mkdtemp(dir=work))
    cfg = cfg.replace(max_steps=warmup + steps, output_dir=str(run), log_every_steps=1, save_every_steps=0,
                      sample_every_steps=0, dataset=str(data_dir))
    t0 = time.time()
    fresh_accelerate_state()
    train(cfg, run, echo=lambda m: None, model=model)
    ev = [e for e in read_events(run)[0] if e["type"] == "progress"]
    first = ev[0]["time"] - t0
    t_w, t_end = ev[warmup - 1]["time"], ev[-1]["time"]
    return {"step_s": (t_end - t_w) / steps, "first_step_s": first}


def timed_run(arch: str, cfg, device: str, dtype, work: Path) -> dict:
    """One whole run as a person starts it: the model built (random weights: the load), caching, the steps and
    the export, timed by the wall clock; with its peak memory (CUDA: max reserved; CPU: peak RSS)."""
    from trainer.engine.loop import train
    from trainer.engine.setup import fresh_accelerate_state

    run = Path(tempfile.mkdtemp(dir=work))
    t0 = time.time()
    with _mem_block(device) as rss:
        model = build_model(arch, device, dtype)
        fresh_accelerate_state()
        train(cfg.replace(output_dir=str(run)), run, echo=lambda m: None, model=model)
    del model
    return {"seconds": time.time() - t0, "peak_gb": _peak_gb(device, rss), "dir": run}


def grid_times(arch: str, files: list[Path], device: str, dtype, res: int, steps: int = 4) -> dict:
    """Seconds per cell of Preview's Variant grid (every file at strength 1, one seed): one generation per cell,
    against the cells in one batch with an adapter per sample."""
    from trainer.engine.preview import GenParams, PreviewEngine

    engine = PreviewEngine(device, dtype)
    engine.use_model(build_model(arch, device, dtype), "(random weights)")
    p = GenParams(prompt="zwx, a photo", seed=1, steps=steps, cfg=5.0, width=res, height=res, sampler="Euler")
    out = {}
    for batched in (False, True, False, True):  # each way twice, the second counted: the first loads the files
        t0 = time.time()
        engine.variant_grid(p, [str(f) for f in files], [f.stem for f in files], [1.0], batched=batched)
        out["batched" if batched else "one_at_a_time"] = (time.time() - t0) / len(files)
    return out


def sweep_bench(args, base, device: str, dtype, work: Path) -> list[str]:
    """K variants (the same network at K learning rates) in one sweep against the K runs one after another,
    each mode from an empty latent cache; memory: measured on CUDA, the estimate's projection on the CPU."""
    import shutil

    from trainer.recipe.estimate import estimate_vram_gb

    k = args.sweep
    variants = [{"name": f"lr{i + 1}", "unet_lr": 1e-4 * (i + 1)} for i in range(k)]
    cfg = base.replace(cache_latents=True, max_steps=args.steps, save_every_steps=0, sample_every_steps=0,
                       log_every_steps=1, network_target="kohya")
    cache = Path(os.environ["LORA_STUDIO_CACHE"])
    shutil.rmtree(cache, ignore_errors=True)
    sweep = timed_run(args.model, cfg.replace(variants=variants), device, dtype, work)
    shutil.rmtree(cache, ignore_errors=True)
    alone = [timed_run(args.model, cfg.replace(unet_lr=v["unet_lr"]), device, dtype, work) for v in variants]
    each = [r["seconds"] for r in alone]
    in_a_row = sum(each)
    if device == "cuda":
        mem_sweep, mem_one, how = sweep["peak_gb"], max(r["peak_gb"] for r in alone), "max reserved, measured"
    elif args.model != "tiny":
        family = family_of(args.model)
        mem_sweep = estimate_vram_gb(cfg.replace(variants=variants, mixed_precision="bf16"), family)["total_gb"]
        mem_one = estimate_vram_gb(cfg.replace(mixed_precision="bf16"), family)["total_gb"]
        how = "projected for a CUDA card in bf16 by the pre-flight estimate (no GPU here)"
    else:  # the estimate knows the real architectures' sizes, not the tiny model's
        mem_sweep, mem_one, how = sweep["peak_gb"], max(r["peak_gb"] for r in alone), "peak RSS of the process"
    files = sorted(sweep["dir"].glob("*.safetensors"))
    cells = grid_times(args.model, files, device, dtype, cfg.resolution)
    return ["| what | wall time s | memory GB |", "|---|---|---|",
            f"| sweep of {k} variants, one run | {sweep['seconds']:.1f} | {mem_sweep:.2f} |",
            f"| {k} runs one after another | {in_a_row:.1f} ({', '.join(f'{s:.0f}' for s in each)}) | "
            f"{mem_one:.2f} each |",
            f"| {k} runs side by side | - | {k * mem_one:.2f} |",
            "", f"The sweep takes {sweep['seconds'] / in_a_row:.0%} of the time of {k} runs in a row and "
            f"{mem_sweep / (k * mem_one):.0%} of the memory of {k} runs side by side (memory: {how}; wall time: "
            f"each from the model's build through caching, {args.steps} steps and the export, from an empty latent "
            "cache for the sweep and for the first run in a row; the later runs reuse the disk cache as they would "
            "on this machine).", "",
            f"Preview's Variant grid of the {k} files ({cfg.resolution} px, 4 Euler steps, guidance 5): "
            f"{cells['one_at_a_time']:.2f} s per cell one generation at a time, {cells['batched']:.2f} s per cell in "
            f"one batch with an adapter per image ({cells['one_at_a_time'] / cells['batched']:.1f}x)."]


# ------------------------------------------------------------------------------------ main
def timed_rows(args, timed: list, configs: dict, data: Path, device: str, dtype, work: Path) -> list[dict]:
    """Time each named variant (its config in `configs`; "reference" runs the example script's loop on it)
    args.repeats times, interleaved, each on a fresh model: a row each with the median s/step, its range and the
    peak memory."""
    import torch

    runs: dict[str, list[dict]] = {name: [] for name in timed}
    for _ in range(max(1, args.repeats)):
        for name in timed:  # interleaved: A B C A B C ..., so a slow minute of the machine hits every variant
            model = build_model(args.model, device, dtype)
            with _mem_block(device) as rss:  # peaks from here: the model's build is not in them
                if name == "reference":
                    r = reference_loop(model, data, configs[name], args.steps, args.warmup, device, dtype)
                else:
                    r = ours(model, data, configs[name], args.steps, args.warmup, work)
            r.update(peak_gb=_peak_gb(device, rss))
            runs[name].append(r)
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
    rows = []
    for name, rs in runs.items():
        steps_s = sorted(r["step_s"] for r in rs)
        rows.append({"name": name, "step_s": statistics.median(steps_s), "min_s": steps_s[0], "max_s": steps_s[-1],
                     "n": len(rs), "peak_gb": max(r["peak_gb"] for r in rs),
                     "first_step_s": statistics.median(r["first_step_s"] for r in rs)})
    return rows


def run_bench(args) -> int:
    import torch

    from trainer.recipe.config import TrainConfig

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    defaults = {"tiny": (64, 2), "sd15": (512, 4), "sdxl": (1024, 1)}[args.model]
    res = args.resolution or defaults[0]
    batch = args.batch or defaults[1]
    prec = args.precision or ("bf16" if device == "cuda" else "no")
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[prec]
    which = [w.strip() for w in args.which.split(",") if w.strip()]
    unknown = [w for w in which if w not in VARIANTS]
    if unknown or not which:
        raise SystemExit(f"error: --which {args.which!r}: {', '.join(unknown) or 'nothing'} is not a variant of the "
                         f"benchmark; choose from {', '.join(VARIANTS)}")
    work = Path(tempfile.mkdtemp(prefix="lora_bench_"))
    os.environ.setdefault("LORA_STUDIO_CACHE", str(work / "cache"))
    data = synthetic_dataset(work / "data", max(8, batch * 4), res)
    base = TrainConfig(base_model="(in memory)", dataset=str(data), resolution=res, rank=args.rank, alpha=args.rank, batch_size=batch,
                       mixed_precision=prec, device=device, train_text_encoder=False, cache_latents=False,
                       optimizer="adamw", seed=0)
    if args.sweep:
        lines = sweep_bench(args, base.replace(max_steps=args.steps), device, dtype, work)
        return report(args, device, batch, res, prec, lines, f"sweep of {args.sweep}: one network (kohya's module set, "
                      f"rank {args.rank}) at {args.sweep} learning rates, cached latents, text encoder frozen\n")
    variants = {
        # the reference's work: VAE and text encoder every step (only the data loader's prefetch differs)
        "ours": base.replace(network_target="attention", cache_text_encoder_outputs=False),
        "ours_text_cached": base.replace(network_target="attention"),  # + captions encoded once
        "ours_cached": base.replace(network_target="attention", cache_latents=True),  # + latents encoded once
        "kohya_cached": base.replace(cache_latents=True),
        "default": base.replace(cache_latents=True, train_text_encoder=True),
        "lowvram": base.replace(cache_latents=True, cache_text_encoder_outputs=True, gradient_checkpointing=True,
                                optimizer="adamw8bit" if device == "cuda" else "adamw"),
    }
    rows = [dataset_bench(work, res)] if "dataset" in which else []
    timed = [w for w in which if w != "dataset"]
    flops = None
    if timed:  # counted once, before any measured window, on a model of its own that is then freed
        model_f = build_model(args.model, device, dtype)
        for m in (model_f.unet, *model_f.text_encoders):
            m.to(device)
        flops = count_step_flops(model_f, batch, res, device, dtype, False)
        del model_f
    rows += timed_rows(args, timed, {**variants, "reference": base}, data, device, dtype, work)
    lines = timing_table(rows, flops, batch, device)
    return report(args, device, batch, res, prec, lines, (
            "reference = diffusers train_text_to_image_lora.py loop (images decoded, VAE and text encoder in the "
            "step, UNet attention LoRA, our AdamW); ours = our loop doing the same work (its data loader decodes the "
            "next images in a worker meanwhile: the one difference); ours_text_cached = + captions encoded once; "
            "ours_cached = + latents encoded once; "
            "kohya_cached = kohya's module set (adds proj_in/out, ff); default = kohya set + text-encoder LoRA, cached; "
            "lowvram = cached latents and TE outputs, gradient checkpointing, 8-bit AdamW on CUDA.\n"
            + (f"FLOPs per step (UNet forward + backward to the activations, frozen weights get no gradient; "
               f"counted with torch's FlopCounterMode outside the timed window): {flops / 1e9:.2f} GFLOP\n" if flops else "")
            + f"Each variant measured {max(1, args.repeats)} time(s), interleaved; peak memory from after the model build.\n"))


def timing_table(rows: list[dict], flops: float | None, batch: int, device: str) -> list[str]:
    """The bench's table: one line per timed variant (ratios against the reference where there is one), then the
    dataset stage's line."""
    import torch

    ref = next((r for r in rows if r.get("name") == "reference"), None)
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if device == "cuda" and k in torch.cuda.get_device_name()), None)
    lines = ["| variant | step s (median) | min-max s | steps/s | images/s | vs reference | peak mem GB | first step s | TFLOP/s | MFU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "step_s" not in r:
            continue
        sps = 1 / r["step_s"]
        tflops = flops * sps / 1e12 if flops else None
        # a ratio is decided only when the ranges do not overlap; else it says so
        ratio = "-"
        if ref:
            ratio = f"{ref['step_s'] / r['step_s']:.2f}x"
            if r is not ref and not (r["max_s"] < ref["min_s"] or r["min_s"] > ref["max_s"]):
                ratio += " (ranges overlap)"
        mfu = f"{100 * tflops / peak:.1f}%" if (tflops and peak) else "-"
        lines.append(f"| {r['name']} | {r['step_s']:.4f} | {r['min_s']:.4f}-{r['max_s']:.4f} (n={r['n']}) | {sps:.2f} | "
                     f"{sps * batch:.2f} | {ratio} | {r['peak_gb']:.2f} | {r['first_step_s']:.1f} | "
                     f"{f'{tflops:.3f}' if tflops is not None else '-'} | {mfu} |")
    for r in rows:
        if r.get("name") == "dataset":
            lines.append("")
            lines.append(f"Dataset stage ({r['images']} images): scan+report+buckets {r['scan_s']:.2f}s; latent caching "
                         f"{r['cache_ips']:.1f} images/s (tiny VAE, {r['cache_device']}); second caching run: "
                         f"{r['second_encoded']} VAE encodes in {r['second_s']:.2f}s")
    return lines


def report(args, device: str, batch: int, res: int, prec: str, lines: list[str], what: str) -> int:
    """Print the table under a heading with the machine, the settings and the versions; append it to --out."""
    import diffusers
    import peft
    import torch
    import transformers

    dev_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    head = (f"\n## {time.strftime('%Y-%m-%d %H:%M')} · {args.model} · {dev_name}\n"
            f"batch {batch}, resolution {res}, rank {args.rank}, precision {prec}, {args.steps} steps"
            + ("" if args.sweep else f" after {args.warmup} warm-up") + "; "
            f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, peft {peft.__version__}\n"
            + what)
    text = head + "\n" + "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write(text)
    return 0


def dataset_bench(work: Path, res: int, n: int = 1000) -> dict:
    """Scanning + report + bucketing of n images, and latent-caching throughput on a tiny VAE on the CPU."""
    import numpy as np
    import torch
    from PIL import Image

    from trainer.data.cache import LatentCache, vae_fingerprint
    from trainer.data.report import dataset_report
    from trainer.models.tiny import tiny_vae

    d = work / "ds1000"
    d.mkdir(exist_ok=True)
    rng = np.random.RandomState(0)
    sizes = [(512, 512), (640, 448), (448, 640), (768, 512)]
    for i in range(n):
        w, h = sizes[i % 4]
        Image.fromarray((rng.rand(h // 8, w // 8, 3) * 255).astype("uint8")).resize((w, h)).save(d / f"{i:04d}.jpg", quality=80)
        (d / f"{i:04d}.txt").write_text(f"zwx, tag{i % 17}, tag{i % 5}")
    t0 = time.perf_counter()
    rep = dataset_report(d, 512, "zwx")
    scan_s = time.perf_counter() - t0
    from trainer.recipe.config import TrainConfig
    from trainer.data.loader import TrainData
    from trainer.data.scan import scan_dataset

    cfg = TrainConfig(base_model="x", dataset=str(d), resolution=256, min_bucket=128, max_bucket=512)
    data = TrainData(scan_dataset(d).items, cfg)
    vae = tiny_vae()
    cache = LatentCache(work / "cache_ds", vae_fingerprint(vae))
    jobs = data.all_jobs()[:200]
    t0 = time.perf_counter()
    with torch.no_grad():
        cache.fill(vae, jobs, batch_size=8)
    ips = len(jobs) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    second = cache.fill(vae, jobs, batch_size=8)
    return {"name": "dataset", "images": rep["image_count"], "scan_s": scan_s, "cache_ips": ips, "cache_device": "cpu",
            "second_encoded": second, "second_s": time.perf_counter() - t0}
