"""The training loop, in phases: `setup` builds one `Run`, `train_step` is the maths, `after_step` decides
(log, sample, save, stop) with small predicates, `finish` saves and exports. `train()` reads top to bottom.

Randomness is a function of (seed, micro-step, rank): noise, timesteps, dropout and captions of step N are
the same whether the run got there in one go or was stopped and resumed.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer import checkpoint as ckpt
from trainer.config import TrainConfig
from trainer.data.cache import encode_pixels
from trainer.data.captions import tag_frequency
from trainer.data.loader import TrainData, make_loader, mix
from trainer.data.scan import ScanResult, scan_dataset
from trainer.events import EventLog, take_request
from trainer.faults import maybe_inject
from trainer.models import families, lora
from trainer.models.load import LoadedModel, load_model
from trainer.models.prompts import encode_prompts
from trainer.runfiles import RunFiles

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """A failure with a plain-language message and what to change."""


@dataclass
class Run:
    """Everything set-up made, in one object: what the step, the predicates and the savers read."""
    cfg: TrainConfig
    files: RunFiles
    accelerator: object
    ev: EventLog
    model: LoadedModel
    alphas: dict  # part -> {module: alpha}, for export
    data: TrainData
    text_cache: dict | None
    trainable: list  # prepared modules, in the order of `alphas` (unet, te1, te2)
    optimizer: object
    scheduler: object
    total_steps: int
    steps_per_epoch: int
    micro_per_epoch: int
    weight_dtype: torch.dtype
    info: dict  # facts for the exported metadata

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def unet(self):
        return self.trainable[0]

    @property
    def text_encoders(self) -> list:
        return self.trainable[1:] if self.cfg.train_text_encoder else self.model.text_encoders

    @property
    def layout(self) -> dict:
        """What export needs to know of the architecture (kept in each checkpoint's state.json)."""
        unet_cfg = self.model.unet.config
        return {"family": self.model.family, "layers_per_block": unet_cfg.layers_per_block,
                "up_has_attn": {i: "CrossAttn" in t for i, t in enumerate(unet_cfg.up_block_types)},
                "prediction_type": self.model.prediction_type}

    def parts(self) -> dict[str, tuple[dict, dict]]:
        """The LoRA weights of each part with their alphas: what checkpoints and exports hold."""
        unwrap = self.accelerator.unwrap_model
        return {k: (lora.lora_state(unwrap(m)), self.alphas[k]) for k, m in zip(self.alphas, self.trainable)}

    def epoch_of(self, micro: int) -> int:
        return micro // self.micro_per_epoch + 1


@dataclass
class State:
    step: int = 0
    epoch: int = 1
    loss_sum: float | torch.Tensor = 0.0
    loss_n: int = 0
    nonfinite: bool | torch.Tensor = False  # kept on the device: read only at log intervals
    t0: float = field(default_factory=time.time)
    step0: int = 0


def train(cfg: TrainConfig, run_dir: str | Path | None = None, resume: bool = False, echo=print,
          model: LoadedModel | None = None) -> Path:
    """Train a LoRA; return the exported file (the run folder when stopped). Raise TrainingError on failure.
    `model` skips loading (the benchmark passes random-weight full-size models built in memory)."""
    run = setup(cfg, Path(run_dir or cfg.output_dir), echo, model)
    state = restore(run) if resume else State()
    batches = batch_iterator(run, state.step)
    run.ev.emit("status", state="training", message=f"Training {run.total_steps} steps ({run.steps_per_epoch} per epoch)",
                total=run.total_steps, device=run.accelerator.device.type, precision=run.accelerator.mixed_precision,
                family=run.model.family)  # what the app's duration estimates are keyed by (trainer/timing.py)
    from tqdm.auto import tqdm

    bar = tqdm(total=run.total_steps, initial=state.step, disable=not run.main, desc="train", dynamic_ncols=True)
    try:
        while state.step < run.total_steps:
            train_step(run, state, batches)
            bar.update(1)
            if after_step(run, state):
                return run.files.root
    except torch.cuda.OutOfMemoryError:
        raise TrainingError(
            "The GPU ran out of memory. Lower batch_size or resolution, turn on gradient_checkpointing, use "
            "optimizer = 'adamw8bit', cache latents, or pick the low-VRAM preset. The last checkpoint is kept."
        ) from None
    finally:
        bar.close()  # ends the progress line, so an error message starts on a line of its own
    return finish(run, state)


# ----------------------------------------------------------------------------- set-up
def setup(cfg: TrainConfig, run_dir: str | Path, echo=print, model: LoadedModel | None = None) -> Run:
    """Accelerator, model with LoRA, data and caches, optimizer and schedule: everything the steps need."""
    from accelerate import Accelerator

    run_dir = Path(run_dir)
    config_warnings = cfg.validate()
    device, mp, dev_warns = resolve_device_and_precision(cfg)
    accelerator = Accelerator(mixed_precision=mp, gradient_accumulation_steps=cfg.gradient_accumulation,
                              cpu=(device == "cpu"))
    files = RunFiles(run_dir)
    if accelerator.is_main_process:
        check_output_dir(run_dir)
        ckpt.remove_stale_temp(run_dir)
    ev = EventLog(run_dir, enabled=accelerator.is_main_process, echo=echo if accelerator.is_main_process else None)
    for w in config_warnings + dev_warns:
        ev.emit("warning", message=w)
    started_at = time.time()
    ev.emit("status", state="starting", message=f"Starting run in {run_dir}")
    scan = scan_for_training(cfg, ev)

    ev.emit("status", state="loading", message=f"Loading base model {cfg.base_model}")
    model = model or load_model(cfg.base_model, cfg.model_family, cfg.model_config or None)
    if cfg.prediction_type != "auto" and cfg.prediction_type != model.prediction_type:
        from diffusers import DDPMScheduler

        model.noise_scheduler = DDPMScheduler.from_config(model.noise_scheduler.config, prediction_type=cfg.prediction_type)
    ev.emit("log", message=f"Model: {families.name(model.family)}, prediction type {model.prediction_type}")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp, torch.float32)
    alphas = add_lora(cfg, model, accelerator.device, weight_dtype, ev)

    data = prepare_data(cfg, scan, model, accelerator, ev)
    text_cache = cache_text(cfg, model, data, accelerator.device)
    micro_per_epoch = data.micro_per_epoch(accelerator.num_processes)

    optimizer, scheduler, total_steps, steps_per_epoch = make_schedule(cfg, model, accelerator, micro_per_epoch, device)
    trainable = [model.unet] + (list(model.text_encoders) if cfg.train_text_encoder else [])
    prepared = accelerator.prepare(*trainable, optimizer, scheduler)
    for m in prepared[:-2]:
        m.train()  # LoRA dropout is active in train mode only
    info = {
        "started_at": started_at,
        "num_train_images": sum(it.repeats for it in data.items),
        "tag_frequency": {name: tag_frequency([it.caption for it in data.items if it.subset == name]) for name in scan.subsets},
        "dataset_dirs": scan.subsets,
        "model_name": cfg.base_model,
        "prediction_type": model.prediction_type,
    }
    return Run(cfg, files, accelerator, ev, model, alphas, data, text_cache, list(prepared[:-2]), prepared[-2],
               prepared[-1], total_steps, steps_per_epoch, micro_per_epoch, weight_dtype, info)


def resolve_device_and_precision(cfg: TrainConfig) -> tuple[str, str, list[str]]:
    warns = []
    has_cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not has_cuda:
        raise TrainingError("device = 'cuda' but no CUDA GPU is visible. Install a CUDA build of torch, or set device = 'cpu'.")
    device = "cuda" if (cfg.device == "cuda" or (cfg.device == "auto" and has_cuda)) else "cpu"
    mp = cfg.mixed_precision
    if device == "cpu" and mp != "no":
        # the same code a GPU runs, for real: only slower (CPUs without bf16/fp16 units emulate them)
        warns.append(f"mixed_precision = '{mp}' on the CPU: it runs, but slow; 'no' (fp32) is usually faster here.")
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


def scan_for_training(cfg: TrainConfig, ev: EventLog) -> ScanResult:
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
    return scan


def add_lora(cfg: TrainConfig, model: LoadedModel, dev, weight_dtype, ev: EventLog) -> dict:
    """Freeze the base, inject LoRA with peft (fp32 weights), move the networks to the device."""
    for m in [model.unet, model.vae, *model.text_encoders]:
        m.requires_grad_(False)
    model.vae.to(dev, dtype=torch.float32)  # the VAE stays fp32: an fp16 SDXL VAE produces NaNs/black images
    torch.manual_seed(cfg.seed)  # LoRA init draws from the global RNG: same seed, same starting weights
    try:
        alphas = lora.inject_for_config(model, cfg)
    except ValueError as e:  # per-block values that do not fit this family's blocks
        raise TrainingError(f"{e} The base model is {families.name(model.family)}.") from None
    if not any(alphas.values()):
        raise TrainingError("No module gets a LoRA: every block has rank 0 (or a learning-rate weight at or below "
                            "block_lr_zero_threshold). Give some blocks a rank.")
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
            + f", rank {cfg.rank}, alpha {cfg.alpha:g}" + (" (per-block ranks)" if cfg.block_dims else ""))
    return alphas


def prepare_data(cfg: TrainConfig, scan: ScanResult, model: LoadedModel, accelerator, ev: EventLog) -> TrainData:
    """The run's images with buckets, and their latents cached (files that fail to decode are left out)."""
    data = TrainData(scan.items, cfg)
    if not cfg.cache_latents:
        return data
    from trainer.data.cache import LatentCache, MemoryLatentCache, default_cache_dir, vae_fingerprint

    vae_id = vae_fingerprint(model.vae)
    cache = LatentCache(default_cache_dir(), vae_id) if cfg.cache_latents_to_disk else MemoryLatentCache(vae_id)
    with accelerator.main_process_first():
        t0 = time.time()
        jobs = data.all_jobs()
        n = cache.fill(model.vae, jobs, on_progress=lambda d, t: ev.emit(
            "status", state="caching", message=f"Caching latents {d}/{t}", done=d, count=t))
        ev.emit("log", message=f"Latent cache: {n} image(s) encoded in {time.time() - t0:.1f}s, {len(jobs) - n} reused")
    for path, reason in cache.failed.items():
        ev.emit("warning", message=f"Skipped {path.name}: {reason}")
    data.drop(set(cache.failed))
    if not data.items:
        raise TrainingError(f"No image in {cfg.dataset} could be decoded. See the skipped files above.")
    data.cache = cache
    model.vae.to("cpu")  # free VRAM; samples move it back
    return data


@torch.no_grad()
def cache_text(cfg: TrainConfig, model: LoadedModel, data: TrainData, dev) -> dict | None:
    """Text-encoder outputs of every (fixed) caption, when the encoders are not trained; then the encoders leave."""
    if not (cfg.cache_text_encoder_outputs and not cfg.train_text_encoder):
        return None
    cache = {}
    for c in sorted(set(data.fixed_captions())):
        h, p = encode_prompts(model, model.text_encoders, [c], cfg.clip_skip, dev)
        cache[c] = (h[0].cpu(), None if p is None else p[0].cpu())
    for te in model.text_encoders:
        te.to("cpu")
    return cache


def make_schedule(cfg: TrainConfig, model: LoadedModel, accelerator, micro_per_epoch: int, device: str):
    """(optimizer, LR scheduler, total steps, steps per epoch)."""
    from diffusers.optimization import get_scheduler

    groups = lora.unet_param_groups(model, cfg)
    if cfg.train_text_encoder and cfg.text_encoder_lr > 0:
        groups.append({"params": [p for te in model.text_encoders for p in lora.lora_parameters(te)], "lr": cfg.text_encoder_lr})
    elif cfg.train_text_encoder:
        for te in model.text_encoders:
            for p in lora.lora_parameters(te):
                p.requires_grad_(False)
    optimizer = make_optimizer(cfg, groups, device)
    steps_per_epoch = max(1, micro_per_epoch // cfg.gradient_accumulation)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch
    n_proc = accelerator.num_processes  # accelerate steps the scheduler once per process
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps * n_proc,
                              num_training_steps=total_steps * n_proc)
    return optimizer, scheduler, total_steps, steps_per_epoch


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


def restore(run: Run) -> State:
    """The state of the last checkpoint (weights, optimizer, schedule, step), or step 0 if there is none."""
    last = run.files.latest_checkpoint()
    if last is None:
        run.ev.emit("warning", message="--resume given but no checkpoint found: starting from step 0.")
        return State()
    try:
        saved_parts, saved, opt_state = ckpt.read_checkpoint(last)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    for name, m in zip(run.alphas, run.trainable):
        lora.load_lora_state(run.accelerator.unwrap_model(m), saved_parts[name][0])
    if opt_state is not None:
        run.optimizer.load_state_dict(opt_state)
    run.scheduler.load_state_dict(saved["scheduler"])
    step = int(saved["step"])
    run.ev.emit("log", message=f"Resumed from {last.name} at step {step}/{run.total_steps}")
    return State(step=step, step0=step)


def batch_iterator(run: Run, step: int):
    """Batches from optimizer step `step` to the end, loaded ahead by DataLoader workers."""
    ga, acc = run.cfg.gradient_accumulation, run.accelerator
    loader = make_loader(run.data, acc.num_processes, step * ga, run.total_steps * ga, pin_memory=acc.device.type == "cuda")
    return iter(acc.prepare(loader))


# ----------------------------------------------------------------------------- one step
def train_step(run: Run, state: State, batches) -> None:
    """One optimizer step: `gradient_accumulation` batches through noise, conditioning, loss and backward."""
    ga = run.cfg.gradient_accumulation
    maybe_inject(state.step + 1, "step")
    for micro in range(state.step * ga, (state.step + 1) * ga):
        loss = micro_step(run, next(batches), micro)
        state.nonfinite |= ~torch.isfinite(loss)
        state.loss_sum += loss
        state.loss_n += 1
    state.epoch = run.epoch_of(micro)
    state.step += 1


def micro_step(run: Run, batch: dict, micro: int) -> torch.Tensor:
    cfg, acc, model = run.cfg, run.accelerator, run.model
    dev, sched = acc.device, model.noise_scheduler
    g = torch.Generator().manual_seed(mix(cfg.seed, micro, acc.process_index))
    torch.manual_seed(mix(cfg.seed, micro, acc.process_index, 1))  # LoRA dropout
    latents = batch["latents"] if "latents" in batch else encode_pixels(model.vae, batch["pixels"])
    latents = latents.to(dev)
    noise = torch.randn(latents.shape, generator=g)
    if cfg.noise_offset:
        noise += cfg.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=g)
    timesteps = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=g)
    noise, timesteps = noise.to(dev), timesteps.to(dev)
    noisy = sched.add_noise(latents, noise, timesteps)
    v_pred = model.prediction_type == "v_prediction"
    target = sched.get_velocity(latents, noise, timesteps) if v_pred else noise
    with acc.accumulate(*run.trainable):
        hs, pooled = conditioning(run, batch["caption"])
        kwargs = {}
        if model.is_sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": batch["time_ids"].to(dev)}
        with acc.autocast():
            pred = run.unet(noisy.to(run.weight_dtype), timesteps, hs.to(run.weight_dtype), **kwargs).sample
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
        if cfg.min_snr_gamma:
            loss = loss * snr_weights(sched, timesteps, cfg.min_snr_gamma, v_pred)
        loss = loss.mean()
        acc.backward(loss)
        if acc.sync_gradients and cfg.max_grad_norm > 0:
            acc.clip_grad_norm_([p for g_ in run.optimizer.param_groups for p in g_["params"]], cfg.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def conditioning(run: Run, captions: list[str]):
    """(encoder hidden states, SDXL pooled embedding) of a batch's captions: from the cache or the encoders."""
    dev = run.accelerator.device
    if run.text_cache is not None:
        hs = torch.stack([run.text_cache[c][0] for c in captions]).to(dev)
        pooled = torch.stack([run.text_cache[c][1] for c in captions]).to(dev) if run.model.is_sdxl else None
        return hs, pooled
    with torch.set_grad_enabled(run.cfg.train_text_encoder):
        return encode_prompts(run.model, run.text_encoders, captions, run.cfg.clip_skip, dev)


def snr_weights(noise_scheduler, timesteps, gamma: float, v_pred: bool) -> torch.Tensor:
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    w = torch.minimum(snr, torch.full_like(snr, gamma))
    return w / (snr + 1) if v_pred else w / snr


# ----------------------------------------------------------------------------- between steps
def every(n: int, step: int, total: int) -> bool:
    """True at multiples of n before the last step (the last step has its own save and samples)."""
    return bool(n) and step % n == 0 and step < total


def after_step(run: Run, state: State) -> bool:
    """Log, sample, save and poll the user's requests. True when the run should stop now."""
    cfg, step, total = run.cfg, state.step, run.total_steps
    if step % cfg.log_every_steps == 0 or step == total:
        report_progress(run, state)
    if every(cfg.sample_every_steps, step, total):
        render_samples(run, step)
    want_save, want_stop = poll_requests(run.accelerator, run.files.root)
    if want_save or want_stop or every(cfg.save_every_steps, step, total):
        ckpt.save(run, step)
    if want_stop:
        run.ev.emit("stopped", step=step, message=f"Stopped at step {step}; resume to continue.")
    return want_stop


def report_progress(run: Run, state: State) -> None:
    if bool(state.nonfinite):  # the only host sync: at log intervals
        raise TrainingError(
            f"The loss became NaN/inf at step {state.step}. Likely causes: learning rate too high "
            f"(unet_lr={run.cfg.unet_lr:g}), fp16 overflow (try bf16 or fp32), or a broken base model. "
            "Lower the learning rate and resume from the last checkpoint."
        )
    avg = float(state.loss_sum) / max(1, state.loss_n)
    state.loss_sum, state.loss_n = 0.0, 0
    elapsed = time.time() - state.t0
    its = (state.step - state.step0) / elapsed if elapsed > 0 else 0.0
    eta = (run.total_steps - state.step) / its if its > 0 else None
    run.ev.emit("progress", step=state.step, total=run.total_steps, epoch=state.epoch, loss=avg,
                lr=run.scheduler.get_last_lr()[0], its=its, eta=eta)


def poll_requests(accelerator, run_dir: Path) -> tuple[bool, bool]:
    """(save now, stop) as decided by rank 0, so every rank acts on the same step."""
    flags = [False, False]
    if accelerator.is_main_process:
        flags = [take_request(run_dir, "save"), take_request(run_dir, "stop")]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        flags = broadcast_object_list(flags, from_process=0)
    return bool(flags[0]), bool(flags[1])


@contextmanager
def on_device(modules, dev):
    """Move modules to `dev` for a phase and each back to where it was afterwards (frozen parts that were
    parked on the CPU stay out of VRAM for the rest of the run)."""
    homes = [next(m.parameters()).device for m in modules]
    try:
        yield [m.to(dev) for m in modules]
    finally:
        for m, home in zip(modules, homes):
            m.to(home)


def render_samples(run: Run, step: int) -> None:
    """Sample images with fixed prompts and seed, from the modules being trained."""
    cfg, acc, model = run.cfg, run.accelerator, run.model
    if not run.main or not cfg.sample_prompts:
        return
    run.files.samples.mkdir(parents=True, exist_ok=True)
    text_encoders = [acc.unwrap_model(t) for t in run.text_encoders]
    saved = model.unet, model.text_encoders
    with on_device([model.vae, *text_encoders], acc.device):
        model.unet, model.text_encoders = acc.unwrap_model(run.unet), text_encoders
        pipe = model.pipeline()
        pipe.set_progress_bar_config(disable=True)
        try:
            n = len(cfg.sample_prompts)
            for i, prompt in enumerate(cfg.sample_prompts):
                run.ev.emit("status", state="sampling", index=i, count=n, step=step,
                            message=f"Rendering sample {i + 1}/{n} at step {step}")
                text = prompt.replace("{trigger}", ", ".join(cfg.trigger_words))
                g = torch.Generator(device="cpu").manual_seed(cfg.sample_seed + i)
                with torch.no_grad(), acc.autocast():
                    img = pipe(text, num_inference_steps=cfg.sample_steps, generator=g, height=cfg.resolution,
                               width=cfg.resolution).images[0]
                p = run.files.sample(step, i)
                img.save(p)
                run.ev.emit("sample", step=step, path=str(p), prompt=text, index=i, count=n)
        finally:
            model.unet, model.text_encoders = saved
            for m in run.trainable:
                m.train()


# ----------------------------------------------------------------------------- the end
def finish(run: Run, state: State) -> Path:
    """Final checkpoint, final samples, the exported file in the run folder, the done event."""
    final = ckpt.save(run, run.total_steps)
    render_samples(run, run.total_steps)
    out = run.files.final(run.cfg.output_name)
    if run.main:
        run.ev.emit("status", state="exporting", message=f"Writing {out.name}")
        tmp = out.with_suffix(".tmp")
        shutil.copyfile(final / out.name, tmp)
        os.replace(tmp, out)
        run.ev.emit("done", path=str(out), step=run.total_steps, message=f"Finished: {out}")
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return out
