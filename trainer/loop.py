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
from trainer import placement
from trainer.config import TrainConfig
from trainer.data.cache import encode_pixels
from trainer.data.captions import tag_frequency
from trainer.data.loader import TrainData, make_loader, mix
from trainer.data.scan import ScanResult, file_hash, folder_caption, holdout_count, scan_dataset
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
    sample_cond: dict | None = None  # sample prompt -> the pipeline's embeddings, when frozen encoders are parked

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
    reported: float = 0.0  # time of the last progress report


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
                run.accelerator.end_training()  # flushes the TensorBoard writer
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
    files = RunFiles(run_dir)
    trackers = {"log_with": "tensorboard", "project_dir": str(files.tensorboard)} if cfg.tensorboard else {}
    accelerator = Accelerator(mixed_precision=mp, gradient_accumulation_steps=cfg.gradient_accumulation,
                              cpu=(device == "cpu"), **trackers)
    if cfg.tensorboard:
        # scalar settings only (TensorBoard's hparams take no lists), names only for paths
        hparams = {k: v for k, v in cfg.public_dict().items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("lora", config=hparams)
    if accelerator.is_main_process:
        check_output_dir(run_dir)
        ckpt.remove_stale_temp(run_dir)
    ev = EventLog(run_dir, enabled=accelerator.is_main_process, echo=echo if accelerator.is_main_process else None)
    for w in config_warnings + dev_warns:
        ev.emit("warning", message=w)
    started_at = time.time()
    ev.emit("status", state="starting", message=f"Starting run in {run_dir}")
    scan = scan_for_training(cfg, ev)
    sets = split_sets(cfg, scan, ev)

    ev.emit("status", state="loading", message=f"Loading base model {cfg.base_model}")
    model = model or load_model(cfg.base_model, cfg.model_family, cfg.model_config or None)
    if cfg.prediction_type != "auto" and cfg.prediction_type != model.prediction_type:
        from diffusers import DDPMScheduler

        model.noise_scheduler = DDPMScheduler.from_config(model.noise_scheduler.config, prediction_type=cfg.prediction_type)
    ev.emit("log", message=f"Model: {families.name(model.family)}, prediction type {model.prediction_type}")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp, torch.float32)
    # one big part on the device at a time, so the first run peaks no higher than the steps: the VAE alone
    # while latents are cached, the text encoders alone while their outputs are cached, then the UNet
    data = prepare_data(cfg, sets, model, accelerator, ev)
    text_cache, sample_cond = cache_text(cfg, model, data, accelerator.device, weight_dtype)
    alphas = add_lora(cfg, model, accelerator.device, weight_dtype, ev, parked_text_encoders=text_cache is not None)
    micro_per_epoch = data.micro_per_epoch(accelerator.num_processes)

    optimizer, scheduler, total_steps, steps_per_epoch = make_schedule(cfg, model, accelerator, micro_per_epoch, device)
    trainable = [model.unet] + (list(model.text_encoders) if cfg.train_text_encoder else [])
    prepared = accelerator.prepare(*trainable, optimizer, scheduler)
    for m in prepared[:-2]:
        m.train()  # LoRA dropout is active in train mode only
    info = {
        "started_at": started_at,
        "num_train_images": sum(it.repeats for it in data.items),
        "num_reg_images": sum(it.repeats for it in data.reg.items) if data.reg else 0,
        "tag_frequency": {name: tag_frequency([it.caption for it in data.items if it.subset == name]) for name in scan.subsets},
        "dataset_dirs": scan.subsets,
        "model_name": cfg.base_model,
        "prediction_type": model.prediction_type,
    }
    return Run(cfg, files, accelerator, ev, model, alphas, data, text_cache, list(prepared[:-2]), prepared[-2],
               prepared[-1], total_steps, steps_per_epoch, micro_per_epoch, weight_dtype, info, sample_cond)


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


def scan_for_training(cfg: TrainConfig, ev: EventLog, folder: str = "", what: str = "Dataset") -> ScanResult:
    """The images of the dataset (or of the class / validation folder), captioned from folder names when asked."""
    folder = folder or cfg.dataset
    try:
        scan = scan_dataset(folder, cfg.caption_extension)
    except FileNotFoundError:
        raise TrainingError(f"{what} folder not found: {folder}. Check the path.") from None
    for s in scan.skipped:
        ev.emit("warning", message=f"Skipped {s.path.name}: {s.reason}")
    if not scan.items:
        raise TrainingError(
            f"No usable images in {folder}. Put .png/.jpg/.webp/.bmp files in the folder itself or in "
            "sub-folders named like '10_name' (10 = repeats)."
        )
    if cfg.caption_from_folder:
        for it in scan.items:
            if it.caption is None:
                it.caption = folder_caption(it)
    return scan


def split_sets(cfg: TrainConfig, scan: ScanResult, ev: EventLog) -> tuple[list, list, list]:
    """(training, class, validation) images. Held-out images are chosen by content and seed, so the same
    dataset and seed hold out the same images in every run."""
    train, val = list(scan.items), []
    if cfg.validation_split > 0:
        k = holdout_count(cfg.validation_split, len(train))
        if k >= len(train):
            raise TrainingError(f"validation_split = {cfg.validation_split} would hold out all {len(train)} image(s): "
                                "add images or lower it.")
        order = sorted(train, key=lambda it: mix(cfg.seed, int(file_hash(it.path)[:15], 16)))
        held = {id(it) for it in order[:k]}
        val = [it for it in train if id(it) in held]
        train = [it for it in train if id(it) not in held]
        ev.emit("log", message=f"Validation: {len(val)} image(s) held out: " + ", ".join(it.path.name for it in val[:10]))
    if cfg.validation_dataset:
        val += scan_for_training(cfg, ev, cfg.validation_dataset, "Validation").items
    reg = scan_for_training(cfg, ev, cfg.reg_dataset, "Class-image").items if cfg.reg_dataset else []
    if reg:
        ev.emit("log", message=f"Prior preservation: {len(reg)} class image(s), prior_loss_weight {cfg.prior_loss_weight:g}")
    return train, reg, val


def add_lora(cfg: TrainConfig, model: LoadedModel, dev, weight_dtype, ev: EventLog,
             parked_text_encoders: bool = False) -> dict:
    """Freeze the base, inject LoRA with peft (fp32 weights), move the networks to the device (text encoders
    whose outputs are cached stay parked on the CPU; so does the VAE when latents are cached)."""
    placement.phase("load")
    for m in [model.unet, model.vae, *model.text_encoders]:
        m.requires_grad_(False)
    if not cfg.cache_latents:  # the VAE encodes every batch; it stays fp32 (an fp16 SDXL VAE makes NaNs)
        placement.to_device(model.vae, dev, torch.float32)
    on_device = [model.unet] + ([] if parked_text_encoders else list(model.text_encoders))
    quant = cfg.base_quantization
    if quant != "none":  # cast and quantise on the host: the device never holds the full-precision base
        with placement.host_side():
            for m in on_device:
                m.to(dtype=weight_dtype)
    frozen = [model.unet] + ([] if cfg.train_text_encoder else list(model.text_encoders))
    if quant in ("int8", "nf4"):
        from trainer.models.quantize import quantize_linears

        for m in frozen:  # parked text encoders are not used again: nothing to quantise there
            if m in on_device:
                quantize_linears(m, quant, weight_dtype, dev)
    torch.manual_seed(cfg.seed)  # LoRA init draws from the global RNG: same seed, same starting weights
    try:
        alphas = lora.inject_for_config(model, cfg)
    except ValueError as e:  # per-block values that do not fit this family's blocks
        raise TrainingError(f"{e} The base model is {families.name(model.family)}.") from None
    if not any(alphas.values()):
        raise TrainingError("No module gets a LoRA: every block has rank 0 (or a learning-rate weight at or below "
                            "block_lr_zero_threshold). Give some blocks a rank.")
    for m in [model.unet, *model.text_encoders]:
        if quant == "none" and m in on_device:
            placement.to_device(m, dev, weight_dtype)
        for p in lora.lora_parameters(m):
            p.data = p.data.float()  # LoRA weights train in fp32 whatever the compute precision
    if quant == "fp8":
        from trainer.models.quantize import store_fp8

        for m in frozen:
            if m in on_device:
                store_fp8(m, weight_dtype)
    if quant != "none":
        for m in on_device:  # quantised weights, norms and LoRA go to the device as they are
            placement.to_device(m, dev)
    if weight_dtype != torch.float32 and not cfg.use_dora:  # under autocast: two casts per LoRA layer saved
        for m in [model.unet, *model.text_encoders]:
            lora.skip_input_casting(m)
    if quant != "none":
        from trainer.models.quantize import frozen_bytes

        ev.emit("log", message=f"Base stored as {quant}: frozen weights {frozen_bytes(model.unet) / 2**20:.0f} MiB (UNet)")
    if cfg.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            for te in model.text_encoders:
                te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_te = sum(len(a) for k, a in alphas.items() if k != "unet")
    ev.emit("log", message=f"LoRA on {len(alphas['unet'])} UNet modules" + (f" and {n_te} text-encoder modules" if n_te else "")
            + f", rank {cfg.rank}, alpha {cfg.alpha:g}" + (" (per-block ranks)" if cfg.block_dims else ""))
    return alphas


def prepare_data(cfg: TrainConfig, sets: tuple[list, list, list], model: LoadedModel, accelerator, ev: EventLog) -> TrainData:
    """The run's images with buckets (and its class and validation images), their latents cached (files that
    fail to decode are left out)."""
    train, reg, val = sets
    data = TrainData(train, cfg)
    if reg:
        data.reg = TrainData(reg, cfg, cfg.reg_dataset, triggers=False)
    if val:
        data.val = TrainData(val, cfg.replace(flip=False))
    if not cfg.cache_latents:
        return data
    from trainer.data.cache import LatentCache, MemoryLatentCache, default_cache_dir, vae_fingerprint

    vae_id = vae_fingerprint(model.vae)
    cache = LatentCache(default_cache_dir(), vae_id) if cfg.cache_latents_to_disk else MemoryLatentCache(vae_id)
    placement.phase("cache latents")
    placement.to_device(model.vae, accelerator.device, torch.float32)  # alone on the device: nothing else is there yet
    with accelerator.main_process_first():
        t0 = time.time()
        jobs = [j for part in data.parts() for j in part.all_jobs()]
        n = cache.fill(model.vae, jobs, on_progress=lambda d, t: ev.emit(
            "status", state="caching", message=f"Caching latents {d}/{t}", done=d, count=t))
        ev.emit("log", message=f"Latent cache: {n} image(s) encoded in {time.time() - t0:.1f}s, {len(jobs) - n} reused")
    for path, reason in cache.failed.items():
        ev.emit("warning", message=f"Skipped {path.name}: {reason}")
    for part in data.parts():
        part.drop(set(cache.failed))
        part.cache = cache
    if not data.items:
        raise TrainingError(f"No image in {cfg.dataset} could be decoded. See the skipped files above.")
    for name in ("reg", "val"):  # a class or validation set whose every file failed is dropped, said above
        if getattr(data, name) is not None and not getattr(data, name).items:
            setattr(data, name, None)
    placement.to_host(model.vae)  # free VRAM; samples move it back
    return data


@torch.no_grad()
def cache_text(cfg: TrainConfig, model: LoadedModel, data: TrainData, dev, weight_dtype=torch.float32):
    """Text-encoder outputs of every (fixed) caption, when the encoders are not trained: the encoders come to the
    device alone (before the UNet), encode, and leave again. The sample prompts are encoded then too, the way
    the pipeline does, so that sampling never brings them back. Returns (caption cache, sample conditioning),
    both None when nothing is cached."""
    if not cfg.caches_text:
        return None, None
    placement.phase("cache text encoders")
    for te in model.text_encoders:
        te.requires_grad_(False)
        placement.to_device(te, dev, weight_dtype)
    cache = {}
    for c in sorted({c for part in data.parts() for c in part.fixed_captions()}):
        h, p = encode_prompts(model, model.text_encoders, [c], cfg.clip_skip, dev)
        cache[c] = (placement.to_host(h[0]), None if p is None else placement.to_host(p[0]))
    samples = sample_conditioning(model, [sample_text(cfg, p) for p in cfg.sample_prompts], dev)
    for te in model.text_encoders:
        placement.to_host(te)
    return cache, samples


def sample_text(cfg: TrainConfig, prompt: str) -> str:
    return prompt.replace("{trigger}", ", ".join(cfg.trigger_words))


def sample_conditioning(model: LoadedModel, prompts: list[str], dev) -> dict:
    """Each prompt's embeddings (and the unconditional ones for guidance) from the pipeline's own encode_prompt,
    parked on the host: the same numbers the pipeline would make while sampling."""
    pipe = model.pipeline()
    out = {}
    for text in dict.fromkeys(prompts):
        got = pipe.encode_prompt(text, device=dev, num_images_per_prompt=1, do_classifier_free_guidance=True)
        names = (["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
                 if model.is_sdxl else ["prompt_embeds", "negative_prompt_embeds"])
        out[text] = {k: placement.to_host(v) for k, v in zip(names, got)}
    return out


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
    """One batch forward and backward (with class images: their loss too, weighted by prior_loss_weight, so
    each step sees both), then the optimizer when the accumulation is complete. Returns the training loss."""
    cfg, acc = run.cfg, run.accelerator
    g = torch.Generator().manual_seed(mix(cfg.seed, micro, acc.process_index))
    torch.manual_seed(mix(cfg.seed, micro, acc.process_index, 1))  # LoRA dropout
    reg = batch.get("reg") if "train" in batch else None
    batch = batch["train"] if "train" in batch else batch
    with acc.accumulate(*run.trainable):
        placement.phase("forward")
        loss = batch_loss(run, batch, g)
        placement.phase("backward")
        acc.backward(loss)
        if reg is not None and cfg.prior_loss_weight > 0:
            # a second backward adds its gradient to the first: the gradient of loss + w * prior loss, with one
            # batch's activations in memory at a time
            acc.backward(cfg.prior_loss_weight * batch_loss(run, reg, torch.Generator().manual_seed(
                mix(cfg.seed, micro, acc.process_index, 7))))
        placement.phase("optimizer")
        if acc.sync_gradients and cfg.max_grad_norm > 0:
            acc.clip_grad_norm_([p for g_ in run.optimizer.param_groups for p in g_["params"]], cfg.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def batch_loss(run: Run, batch: dict, g: torch.Generator, timesteps: torch.Tensor | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
    """The diffusion loss of a batch: noise at random timesteps in [min_timestep, max_timestep) drawn from `g`
    (or the given ones, for validation), predicted by the UNet, weighted by min-SNR and by the masks."""
    cfg, acc, model = run.cfg, run.accelerator, run.model
    dev, sched = acc.device, model.noise_scheduler
    latents = batch["latents"] if "latents" in batch else encode_pixels(model.vae, batch["pixels"])
    latents = latents.to(dev)
    if noise is None:
        noise = torch.randn(latents.shape, generator=g)
        if cfg.noise_offset:
            noise += cfg.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=g)
    if timesteps is None:
        high = min(cfg.max_timestep, sched.config.num_train_timesteps)
        timesteps = torch.randint(cfg.min_timestep, high, (latents.shape[0],), generator=g)
    noise, timesteps = noise.to(dev), timesteps.to(dev)
    noisy = sched.add_noise(latents, noise, timesteps)
    v_pred = model.prediction_type == "v_prediction"
    target = sched.get_velocity(latents, noise, timesteps) if v_pred else noise
    hs, pooled = conditioning(run, batch["caption"])
    kwargs = {}
    if model.is_sdxl:
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": batch["time_ids"].to(dev)}
    with acc.autocast():
        pred = run.unet(noisy.to(run.weight_dtype), timesteps, hs.to(run.weight_dtype), **kwargs).sample
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    if "mask" in batch:  # kohya's masked loss: weight each latent pixel, then average as before
        loss = loss * batch["mask"].to(dev)
    loss = loss.mean(dim=[1, 2, 3])
    if cfg.min_snr_gamma:
        loss = loss * snr_weights(sched, timesteps, cfg.min_snr_gamma, v_pred)
    return loss.mean()


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
    if report_due(cfg.log_every_steps, state, total):
        report_progress(run, state)
    if every(cfg.sample_every_steps, step, total):
        render_samples(run, step)
    want_save, want_stop = poll_requests(run.accelerator, run.files.root)
    saving = want_save or want_stop or every(cfg.save_every_steps, step, total)
    if every(cfg.validation_every_steps, step, total) or (saving and not cfg.validation_every_steps):
        validate(run, step)
    if saving:
        ckpt.save(run, step)
    if want_stop:
        run.ev.emit("stopped", step=step, message=f"Stopped at step {step}; resume to continue.")
    return want_stop


LOG_INTERVAL_S = 2.0  # log_every_steps = 0: a report about this often (host clock: no wait for the device)


def report_due(every_n: int, state: State, total: int) -> bool:
    """Every n steps when n is set; else the first step of this attempt, then every LOG_INTERVAL_S. The last
    step always reports."""
    if state.step == total:
        return True
    if every_n:
        return state.step % every_n == 0
    return state.step == state.step0 + 1 or time.time() - state.reported >= LOG_INTERVAL_S


def report_progress(run: Run, state: State) -> None:
    if bool(state.nonfinite):  # the only host sync: at log intervals
        raise TrainingError(
            f"The loss became NaN/inf at step {state.step}. Likely causes: learning rate too high "
            f"(unet_lr={run.cfg.unet_lr:g}), fp16 overflow (try bf16 or fp32), or a broken base model. "
            "Lower the learning rate and resume from the last checkpoint."
        )
    avg = float(state.loss_sum) / max(1, state.loss_n)
    state.loss_sum, state.loss_n, state.reported = 0.0, 0, time.time()
    elapsed = time.time() - state.t0
    its = (state.step - state.step0) / elapsed if elapsed > 0 else 0.0
    eta = (run.total_steps - state.step) / its if its > 0 else None
    lr = run.scheduler.get_last_lr()[0]
    run.ev.emit("progress", step=state.step, total=run.total_steps, epoch=state.epoch, loss=avg, lr=lr, its=its, eta=eta)
    if run.cfg.tensorboard:
        run.accelerator.log({"loss": avg, "lr": lr}, step=state.step)


VALIDATION_TIMESTEPS = 4  # per image, spread evenly over [min_timestep, max_timestep)


@torch.no_grad()
def validate(run: Run, step: int) -> float | None:
    """The loss on the held-out images with the same noise and timesteps every time (seeded by each image's
    content, not by the run's seed), so the curve compares across steps and across runs. Every rank runs it
    (the model may be DDP-wrapped); rank 0 reports it."""
    from trainer.data.loader import collate

    val, cfg = run.data.val, run.cfg
    if val is None:
        return None
    modes = [m.training for m in run.trainable]
    for m in run.trainable:
        m.eval()  # no LoRA dropout while measuring
    losses = []
    try:
        captions = val.fixed_captions()
        channels = run.model.unet.config.in_channels
        for i, it in enumerate(val.items):
            batch = collate([val[(0, 0, 0, i, False)]])
            batch["caption"] = [captions[i]]
            g = torch.Generator().manual_seed(mix(int(val.hashes[i][:15], 16), 43))
            bw, bh = val.buckets[i]
            for k in range(VALIDATION_TIMESTEPS):
                t = cfg.min_timestep + int((k + 0.5) * (cfg.max_timestep - cfg.min_timestep) / VALIDATION_TIMESTEPS)
                noise = torch.randn((1, channels, bh // 8, bw // 8), generator=g)
                losses.append(float(batch_loss(run, batch, g, torch.tensor([t]), noise)))
    finally:
        for m, was in zip(run.trainable, modes):
            m.train(was)
    mean = sum(losses) / len(losses)
    run.ev.emit("validation", step=step, loss=mean, images=len(val.items),
                message=f"Validation loss {mean:.4f} at step {step} ({len(val.items)} image(s))")
    if cfg.tensorboard:
        run.accelerator.log({"val_loss": mean}, step=step)
    return mean


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
    parked on the host stay out of VRAM for the rest of the run)."""
    homes = [placement.on_device_now(m) for m in modules]
    try:
        yield [placement.to_device(m, dev) for m in modules]
    finally:
        for m, home in zip(modules, homes):
            if not home:
                placement.to_host(m)


def render_samples(run: Run, step: int) -> None:
    """Sample images with fixed prompts and seed, from the modules being trained. Frozen text encoders whose
    prompts were encoded at set-up stay parked; above 512 px the VAE decodes in 512 px tiles (an SDXL decode at
    1024 px needs 3 GB of activations whole, 1 GB tiled). With a quantised base (`TrainConfig.samples_lean`) one
    big part is on the device at a time: the UNet denoises while a VAE of cached latents waits in RAM, then the
    VAE decodes while the UNet waits, so sampling peaks no higher than the steps."""
    cfg, acc, model = run.cfg, run.accelerator, run.model
    if not run.main or not cfg.sample_prompts:
        return
    run.files.samples.mkdir(parents=True, exist_ok=True)
    placement.phase("sample")
    text_encoders = [acc.unwrap_model(t) for t in run.text_encoders]
    saved = model.unet, model.text_encoders
    cond = run.sample_cond
    unet = acc.unwrap_model(run.unet)
    lean = cfg.samples_lean and acc.num_processes == 1  # DDP keeps its parameters where it found them
    vae_parked = not placement.on_device_now(model.vae)  # latents cached: the VAE waits in RAM

    def decode_alone(pipe, i, t, kwargs):  # after the last denoising step the VAE comes, and the UNet goes
        if lean and i == pipe.num_timesteps - 1:
            placement.to_host(unet)
            placement.to_device(model.vae, acc.device)
        return kwargs

    with on_device(([] if lean else [model.vae]) + ([] if cond else text_encoders), acc.device), \
            tiled_decode(model.vae, cfg.resolution):
        model.unet, model.text_encoders = unet, text_encoders
        pipe = model.pipeline()
        pipe.set_progress_bar_config(disable=True)
        try:
            n = len(cfg.sample_prompts)
            for i, prompt in enumerate(cfg.sample_prompts):
                run.ev.emit("status", state="sampling", index=i, count=n, step=step,
                            message=f"Rendering sample {i + 1}/{n} at step {step}")
                text = sample_text(cfg, prompt)
                what = ({k: v.to(acc.device) for k, v in cond[text].items()} if cond else {"prompt": text})
                g = torch.Generator(device="cpu").manual_seed(cfg.sample_seed + i)
                try:
                    with torch.no_grad(), acc.autocast():
                        img = pipe(**what, num_inference_steps=cfg.sample_steps, generator=g, height=cfg.resolution,
                                   width=cfg.resolution, callback_on_step_end=decode_alone).images[0]
                finally:
                    if lean and vae_parked:
                        placement.to_host(model.vae)
                    if lean and not placement.on_device_now(unet):
                        placement.to_device(unet, acc.device)
                p = run.files.sample(step, i)
                img.save(p)
                if cfg.tensorboard:
                    import numpy as np

                    acc.get_tracker("tensorboard", unwrap=True).add_image(f"sample_{i}", np.asarray(img), step,
                                                                          dataformats="HWC")
                run.ev.emit("sample", step=step, path=str(p), prompt=text, index=i, count=n)
        finally:
            model.unet, model.text_encoders = saved
            for m in run.trainable:
                m.train()


TILE_PX = 512


@contextmanager
def tiled_decode(vae, resolution: int):
    """The VAE decodes in TILE_PX tiles (overlapping, blended: diffusers' own tiling) for larger images."""
    if resolution <= TILE_PX:
        yield
        return
    saved = vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = True, TILE_PX, TILE_PX // scale
    try:
        yield
    finally:
        vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = saved


# ----------------------------------------------------------------------------- the end
def finish(run: Run, state: State) -> Path:
    """Final checkpoint, final samples, the exported file in the run folder, the done event."""
    validate(run, run.total_steps)
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
