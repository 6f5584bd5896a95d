"""The training loop. Reads top to bottom: set up, cache, train, save. Fires events; polls stop/save.

Randomness is a function of (seed, micro-step, rank): noise, timesteps, dropout and captions of step N are
the same whether the run got there in one go or was stopped and resumed.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer import checkpoint as ckpt
from trainer.config import TrainConfig
from trainer.data.captions import tag_frequency
from trainer.data.loader import TrainData, mix
from trainer.data.scan import scan_dataset
from trainer.events import EventLog, take_request
from trainer.export import build_metadata, modelspec, to_kohya, write_lora, DTYPES
from trainer.fsutil import atomic_dir
from trainer.models import lora
from trainer.models.load import FAMILY_NAMES, LoadedModel, load_model
from trainer.reliability import maybe_inject

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """A failure with a plain-language message and what to change."""


class Stopped(Exception):
    pass


# ----------------------------------------------------------------------------- set-up helpers
def resolve_device_and_precision(cfg: TrainConfig) -> tuple[str, str, list[str]]:
    warns = []
    has_cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not has_cuda:
        raise TrainingError("device = 'cuda' but no CUDA GPU is visible. Install a CUDA build of torch, or set device = 'cpu'.")
    device = "cuda" if (cfg.device == "cuda" or (cfg.device == "auto" and has_cuda)) else "cpu"
    mp = cfg.mixed_precision
    if device == "cpu" and mp != "no":
        warns.append(f"mixed_precision = '{mp}' is not useful on the CPU: training in fp32 instead.")
        mp = "no"
    if device == "cuda" and mp == "bf16" and not torch.cuda.is_bf16_supported():
        warns.append("This GPU has no bf16 support: using fp16 mixed precision instead.")
        mp = "fp16"
    return device, mp, warns


def check_output_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"Cannot write to the output folder {run_dir} ({e.strerror}). Choose another output_dir.") from None


def make_optimizer(cfg: TrainConfig, groups: list[dict], device: str):
    if cfg.optimizer == "adamw":
        kw = {"fused": True} if device == "cuda" else {"foreach": True}
        return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, **kw)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(groups, weight_decay=cfg.weight_decay)
        except Exception as e:
            raise TrainingError(
                f"The 8-bit optimizer (bitsandbytes) is not usable here ({type(e).__name__}: {str(e)[:120]}). "
                "Use optimizer = 'adamw', or install a bitsandbytes build that matches your CUDA."
            ) from None
    if cfg.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise TrainingError("Prodigy needs the 'prodigyopt' package: pip install prodigyopt") from None
        return Prodigy(groups, weight_decay=cfg.weight_decay, safeguard_warmup=True, use_bias_correction=True)
    raise TrainingError(f"Unknown optimizer '{cfg.optimizer}'.")


def encode_prompts(model: LoadedModel, text_encoders, captions: list[str], clip_skip: int, device):
    """Encoder hidden states (and SDXL's pooled embedding) as the pipelines compute them."""
    if model.is_sdxl:
        hidden, pooled = [], None
        for tok, te in zip(model.tokenizers, text_encoders):
            ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
            out = te(ids.to(device), output_hidden_states=True)
            pooled = out[0]  # the last one wins: text_encoder_2's projected pooled output
            hidden.append(out.hidden_states[-(clip_skip + 1)])
        return torch.cat(hidden, dim=-1), pooled
    tok, te = model.tokenizers[0], text_encoders[0]
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    if clip_skip <= 1:
        return te(ids.to(device))[0], None
    out = te(ids.to(device), output_hidden_states=True)
    inner = te.module if hasattr(te, "module") else te
    return getattr(inner, "text_model", inner).final_layer_norm(out.hidden_states[-clip_skip]), None


def snr_weights(noise_scheduler, timesteps, gamma: float, v_pred: bool) -> torch.Tensor:
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    w = torch.minimum(snr, torch.full_like(snr, gamma))
    return w / (snr + 1) if v_pred else w / snr


# ----------------------------------------------------------------------------- the run
def train(cfg: TrainConfig, run_dir: str | Path | None = None, resume: bool = False, echo=print,
          model: LoadedModel | None = None) -> Path:
    """Train a LoRA; return the exported file. Raise TrainingError (and emit an 'error' event) on failure.
    `model` skips loading (the benchmark passes random-weight full-size models built in memory)."""
    from accelerate import Accelerator

    run_dir = Path(run_dir or cfg.output_dir)
    config_warnings = cfg.validate()
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # accelerate keeps process-wide singletons; a second run in one process (tests, the bench) starts clean
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    device, mp, dev_warns = resolve_device_and_precision(cfg)
    accelerator = Accelerator(
        mixed_precision=mp, gradient_accumulation_steps=cfg.gradient_accumulation, cpu=(device == "cpu")
    )
    main = accelerator.is_main_process
    if main:
        check_output_dir(run_dir)
        ckpt.remove_stale_temp(run_dir)
    ev = EventLog(run_dir, enabled=main, echo=echo if main else None)
    for w in config_warnings + dev_warns:
        ev.emit("warning", message=w)
    started_at = time.time()
    ev.emit("status", state="starting", message=f"Starting run in {run_dir}")

    # 1. dataset
    try:
        scan = scan_dataset(cfg.dataset, cfg.caption_extension)
    except FileNotFoundError:
        raise TrainingError(f"Dataset folder not found: {cfg.dataset}. Check the path.") from None
    for s in scan.skipped:
        ev.emit("warning", message=f"Skipped {s.path.name}: {s.reason}")
    if not scan.items:
        raise TrainingError(
            f"No usable images in {cfg.dataset}. Put .png/.jpg/.webp/.bmp files in the folder itself or in "
            "sub-folders named like '10_name' (10 = repeats)."
        )

    # 2. model
    ev.emit("status", state="loading", message=f"Loading base model {cfg.base_model}")
    model = model or load_model(cfg.base_model, cfg.model_family, cfg.model_config or None)
    if cfg.prediction_type != "auto" and cfg.prediction_type != model.prediction_type:
        from diffusers import DDPMScheduler

        model.noise_scheduler = DDPMScheduler.from_config(model.noise_scheduler.config, prediction_type=cfg.prediction_type)
    ev.emit("log", message=f"Model: {FAMILY_NAMES[model.family]}, prediction type {model.prediction_type}")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp, torch.float32)
    dev = accelerator.device
    for m in [model.unet, model.vae, *model.text_encoders]:
        m.requires_grad_(False)
    # The VAE stays fp32: an fp16 SDXL VAE produces NaNs/black images.
    model.vae.to(dev, dtype=torch.float32)

    # 3. LoRA
    torch.manual_seed(cfg.seed)  # LoRA init draws from the global RNG: same seed, same starting weights
    alphas = lora.inject_for_config(model, cfg)
    for m in [model.unet, *model.text_encoders]:
        m.to(dev, dtype=weight_dtype)
        for p in lora.lora_parameters(m):
            p.data = p.data.float()  # LoRA weights train in fp32 whatever the compute precision
    if cfg.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            for te in model.text_encoders:
                te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_te = sum(len(a) for k, a in alphas.items() if k != "unet")
    ev.emit("log", message=f"LoRA on {len(alphas['unet'])} UNet modules" + (f" and {n_te} text-encoder modules" if n_te else "")
            + f", rank {cfg.rank}, alpha {cfg.alpha:g}")

    # 4. data and caches
    try:
        data = TrainData(scan, cfg, accelerator.num_processes, accelerator.process_index)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    if cfg.cache_latents:
        from trainer.data.cache import LatentCache, default_cache_dir, vae_fingerprint

        cache = LatentCache(default_cache_dir(), vae_fingerprint(model.vae))
        with accelerator.main_process_first():
            t0 = time.time()
            n = cache.fill(model.vae, data.all_jobs(), on_progress=lambda d, t: ev.emit("status", state="caching", message=f"Caching latents {d}/{t}", done=d, total=t))
            ev.emit("log", message=f"Latent cache: {n} image(s) encoded in {time.time() - t0:.1f}s, {len(data.all_jobs()) - n} reused")
        if cache.failed:
            for path, reason in cache.failed.items():
                ev.emit("warning", message=f"Skipped {path.name}: {reason}")
            scan.items = [it for it in scan.items if it.path not in cache.failed]
            if not scan.items:
                raise TrainingError(f"No image in {cfg.dataset} could be decoded. See the skipped files above.")
            data = TrainData(scan, cfg, accelerator.num_processes, accelerator.process_index)
        data.cache = cache
        model.vae.to("cpu")  # free VRAM; samples move it back
    text_cache = None
    if cfg.cache_text_encoder_outputs and not cfg.train_text_encoder:
        with torch.no_grad():
            caps = sorted(set(data.fixed_captions()))
            text_cache = {}
            for c in caps:
                h, p = encode_prompts(model, model.text_encoders, [c], cfg.clip_skip, dev)
                text_cache[c] = (h[0].cpu(), None if p is None else p[0].cpu())
        for te in model.text_encoders:
            te.to("cpu")

    # 5. optimizer and schedule
    groups = [{"params": lora.lora_parameters(model.unet), "lr": cfg.unet_lr}]
    if cfg.train_text_encoder and cfg.text_encoder_lr > 0:
        groups.append({"params": [p for te in model.text_encoders for p in lora.lora_parameters(te)], "lr": cfg.text_encoder_lr})
    elif cfg.train_text_encoder:
        for te in model.text_encoders:
            for p in lora.lora_parameters(te):
                p.requires_grad_(False)
    optimizer = make_optimizer(cfg, groups, device)
    steps_per_epoch = max(1, data.micro_per_epoch // cfg.gradient_accumulation)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch
    from diffusers.optimization import get_scheduler

    n_proc = accelerator.num_processes  # accelerate steps the scheduler once per process
    scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps * n_proc, num_training_steps=total_steps * n_proc
    )
    trainable = [model.unet] + (list(model.text_encoders) if cfg.train_text_encoder else [])
    prepared = accelerator.prepare(*trainable, optimizer, scheduler)
    trainable = list(prepared[: len(trainable)])
    optimizer, scheduler = prepared[-2], prepared[-1]
    unet = trainable[0]
    text_encoders = trainable[1:] if cfg.train_text_encoder else model.text_encoders

    def parts() -> dict[str, tuple[dict, dict]]:
        mods = dict(zip(alphas, trainable))  # same order: unet, te1, te2
        return {k: (lora.lora_state(accelerator.unwrap_model(mods[k])), alphas[k]) for k in alphas}

    layout = {
        "family": model.family,
        "layers_per_block": model.unet.config.layers_per_block,
        "up_has_attn": {i: "CrossAttn" in t for i, t in enumerate(model.unet.config.up_block_types)},
        "prediction_type": model.prediction_type,
    }
    info = {
        "started_at": started_at,
        "num_train_images": sum(it.repeats for it in data.items),
        "tag_frequency": {name: tag_frequency([it.caption for it in data.items if it.subset == name]) for name in scan.subsets},
        "dataset_dirs": scan.subsets,
        "model_name": cfg.base_model,
        "prediction_type": model.prediction_type,
    }

    # 6. resume
    start_step = 0
    if resume:
        last = ckpt.latest_checkpoint(run_dir)
        if last is None:
            ev.emit("warning", message="--resume given but no checkpoint found: starting from step 0.")
        else:
            try:
                saved_parts, state, opt_state = ckpt.read_checkpoint(last)
            except ValueError as e:
                raise TrainingError(str(e)) from None
            for name, m in zip(alphas, trainable):
                lora.load_lora_state(accelerator.unwrap_model(m), saved_parts[name][0])
            if opt_state is not None:
                optimizer.load_state_dict(opt_state)
            scheduler.load_state_dict(state["scheduler"])
            start_step = int(state["step"])
            ev.emit("log", message=f"Resumed from {last.name} at step {start_step}/{total_steps}")

    def save(step: int, final: bool = False) -> Path | None:
        accelerator.wait_for_everyone()
        if not main:
            return None
        p = parts()
        state = {"step": step, "total_steps": total_steps, "scheduler": scheduler.state_dict(), "config": cfg.to_dict(), **layout}
        folder = run_dir / ckpt.CKPT_DIR / f"step-{step:06d}"
        with atomic_dir(folder) as tmp:
            maybe_inject(step, "save")
            ckpt.write_checkpoint(tmp, p, optimizer.state_dict(), state)
            export_parts(p, cfg, layout, {**info, "steps": step, "epoch": data.entries(max(0, step * cfg.gradient_accumulation - 1))[0] + 1},
                         tmp / f"{cfg.output_name}.safetensors")
        ckpt.prune(run_dir, cfg.keep_last)
        ev.emit("checkpoint", step=step, path=str(folder), message=f"Saved checkpoint at step {step}")
        return folder

    # 7. train
    ev.emit("status", state="training", message=f"Training {total_steps} steps ({steps_per_epoch} per epoch)", total=total_steps)
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=start_step, disable=not main, desc="train", dynamic_ncols=True)
    nonfinite = torch.zeros((), dtype=torch.bool, device=dev)
    loss_acc = torch.zeros((), device=dev)
    loss_n = 0
    t_start, s_start = time.time(), start_step
    v_pred = model.prediction_type == "v_prediction"
    for m in trainable:
        m.train()
    step = start_step
    try:
        while step < total_steps:
            maybe_inject(step + 1, "step")
            for micro in range(step * cfg.gradient_accumulation, (step + 1) * cfg.gradient_accumulation):
                batch = data.batch(micro, vae=None if data.cache is not None else model.vae)
                g = torch.Generator().manual_seed(mix(cfg.seed, micro, accelerator.process_index))
                torch.manual_seed(mix(cfg.seed, micro, accelerator.process_index, 1))  # LoRA dropout
                latents = batch.latents.to(dev)
                noise = torch.randn(latents.shape, generator=g)
                if cfg.noise_offset:
                    noise += cfg.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=g)
                timesteps = torch.randint(0, model.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=g)
                noise, timesteps = noise.to(dev), timesteps.to(dev)
                noisy = model.noise_scheduler.add_noise(latents, noise, timesteps)
                target = model.noise_scheduler.get_velocity(latents, noise, timesteps) if v_pred else noise
                with accelerator.accumulate(*trainable):
                    if text_cache is not None:
                        hs = torch.stack([text_cache[c][0] for c in batch.captions]).to(dev)
                        pooled = torch.stack([text_cache[c][1] for c in batch.captions]).to(dev) if model.is_sdxl else None
                    else:
                        with torch.set_grad_enabled(cfg.train_text_encoder):
                            hs, pooled = encode_prompts(model, text_encoders, batch.captions, cfg.clip_skip, dev)
                    kwargs = {}
                    if model.is_sdxl:
                        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": batch.time_ids.to(dev)}
                    with accelerator.autocast():
                        pred = unet(noisy.to(weight_dtype), timesteps, hs.to(weight_dtype), **kwargs).sample
                    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
                    if cfg.min_snr_gamma:
                        loss = loss * snr_weights(model.noise_scheduler, timesteps, cfg.min_snr_gamma, v_pred)
                    loss = loss.mean()
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_([p for g_ in groups for p in g_["params"]], cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                nonfinite |= ~torch.isfinite(loss.detach())
                loss_acc += loss.detach()
                loss_n += 1
            step += 1
            bar.update(1)
            if step % cfg.log_every_steps == 0 or step == total_steps:
                if bool(nonfinite):  # the only host sync: at log intervals
                    raise TrainingError(
                        f"The loss became NaN/inf at step {step}. Likely causes: learning rate too high "
                        f"(unet_lr={cfg.unet_lr:g}), fp16 overflow (try bf16 or fp32), or a broken base model. "
                        "Lower the learning rate and resume from the last checkpoint."
                    )
                avg = float(loss_acc) / max(1, loss_n)
                loss_acc.zero_()
                loss_n = 0
                elapsed = time.time() - t_start
                its = (step - s_start) / elapsed if elapsed > 0 else 0.0
                eta = (total_steps - step) / its if its > 0 else None
                bar.set_postfix(loss=f"{avg:.4f}")
                ev.emit("progress", step=step, total=total_steps, epoch=batch.epoch + 1, loss=avg,
                        lr=scheduler.get_last_lr()[0], its=its, eta=eta)
            if cfg.sample_every_steps and step % cfg.sample_every_steps == 0 and step < total_steps:
                render_samples(cfg, model, accelerator, unet, text_encoders, run_dir, step, ev)
            saving = bool(cfg.save_every_steps and step % cfg.save_every_steps == 0 and step < total_steps)
            want_save, want_stop = poll_requests(accelerator, run_dir)
            if want_save or saving:
                save(step)
            if want_stop:
                save(step)
                ev.emit("stopped", step=step, message=f"Stopped at step {step}; resume to continue.")
                raise Stopped()
    except Stopped:
        return run_dir
    except torch.cuda.OutOfMemoryError:
        raise TrainingError(
            "The GPU ran out of memory. Lower batch_size or resolution, turn on gradient_checkpointing, use "
            "optimizer = 'adamw8bit', cache latents, or pick the low-VRAM preset. The last checkpoint is kept."
        ) from None
    finally:
        bar.close()  # ends the progress line, so an error message starts on a line of its own

    # 8. finish
    final = save(total_steps, final=True)
    if cfg.sample_prompts and main:
        render_samples(cfg, model, accelerator, unet, text_encoders, run_dir, total_steps, ev)
    out = run_dir / f"{cfg.output_name}.safetensors"
    # every rank must hold the same weights after DDP; record each rank's checksum in the done event
    local = torch.stack([sum(p.detach().double().sum() for p in lora.lora_parameters(accelerator.unwrap_model(m))) for m in trainable])
    checksums = accelerator.gather(local.to(dev).reshape(1, -1)).cpu().tolist()
    if main:
        import shutil

        shutil.copyfile(final / f"{cfg.output_name}.safetensors", out.with_suffix(".tmp"))
        os.replace(out.with_suffix(".tmp"), out)
        ev.emit("done", path=str(out), step=total_steps, rank_checksums=checksums, message=f"Finished: {out}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def poll_requests(accelerator, run_dir: Path) -> tuple[bool, bool]:
    """(save now, stop) as decided by rank 0, so every rank acts on the same step."""
    flags = [False, False]
    if accelerator.is_main_process:
        flags = [take_request(run_dir, "save"), take_request(run_dir, "stop")]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        flags = broadcast_object_list(flags, from_process=0)
    return bool(flags[0]), bool(flags[1])


def export_parts(parts, cfg: TrainConfig, layout: dict, info: dict, path: Path, precision: str | None = None) -> None:
    family = layout["family"]
    up_has_attn = {int(k): v for k, v in layout.get("up_has_attn", {}).items()}
    tensors = to_kohya(parts, family, layout["layers_per_block"], up_has_attn, DTYPES[precision or cfg.save_precision])
    info = {"finished_at": time.time(), **info}
    meta = build_metadata(cfg, family, info)
    meta["ss_save_precision"] = precision or cfg.save_precision
    import json

    meta["ss_lora_studio_config"] = json.dumps(cfg.to_dict(), ensure_ascii=False)
    write_lora(path, tensors, meta, modelspec(cfg, family, info))


def render_samples(cfg, model: LoadedModel, accelerator, unet, text_encoders, run_dir: Path, step: int, ev: EventLog):
    """Sample images with fixed prompts and seed, from the modules being trained."""
    if not accelerator.is_main_process or not cfg.sample_prompts:
        return
    out_dir = run_dir / "samples"
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = accelerator.device
    vae_dev = model.vae.device
    model.vae.to(dev)
    model.unet = accelerator.unwrap_model(unet)
    tes = [accelerator.unwrap_model(t) for t in text_encoders]
    saved_tes = model.text_encoders
    model.text_encoders = [t.to(dev) for t in tes]
    pipe = model.pipeline()
    pipe.set_progress_bar_config(disable=True)
    try:
        for i, prompt in enumerate(cfg.sample_prompts):
            text = prompt.replace("{trigger}", ", ".join(cfg.trigger_words))
            g = torch.Generator(device="cpu").manual_seed(cfg.sample_seed + i)
            with torch.no_grad(), accelerator.autocast():
                img = pipe(text, num_inference_steps=cfg.sample_steps, generator=g, height=cfg.resolution, width=cfg.resolution).images[0]
            p = out_dir / f"step{step:06d}_{i:02d}.png"
            img.save(p)
            ev.emit("sample", step=step, path=str(p), prompt=text)
    finally:
        model.text_encoders = saved_tes
        model.vae.to(vae_dev)
        for m in [unet, *text_encoders]:
            m.train()
