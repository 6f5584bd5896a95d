"""Set-up of a run: accelerator, model with LoRA, data and caches, optimizer and schedule, in one `Run` object.

Ordered by memory: the VAE alone on the device while latents are cached, the text encoders alone while their
outputs are cached, then the UNet, so the first run never peaks above the steady state.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.data.captions import tag_frequency
from trainer.data.loader import TrainData, mix
from trainer.data.scan import ScanResult, file_hash, folder_caption, holdout_count, holdout_error, scan_dataset
from trainer.engine import checkpoint as ckpt
from trainer import placement
from trainer.events import EventLog
from trainer.models import families, lora, quantize
from trainer.models.load import LoadedModel, load_model
from trainer.models.prompts import encode_prompts
from trainer.recipe import optimizers
from trainer.recipe.config import TrainConfig
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
    ema: object | None = None  # engine.ema.LoraEMA when cfg.ema

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
        from trainer.loras.format import layout_of

        return {"family": self.model.family, **layout_of(self.model.unet.config),
                "prediction_type": self.model.prediction_type, "zero_terminal_snr": self.model.zero_terminal_snr}

    def parts(self) -> dict[str, tuple[dict, dict]]:
        """The LoRA weights of each part with their alphas: what checkpoints and exports hold."""
        unwrap = self.accelerator.unwrap_model
        return {k: (lora.lora_state(unwrap(m)), self.alphas[k]) for k, m in zip(self.alphas, self.trainable)}

    def epoch_of(self, micro: int) -> int:
        return micro // self.micro_per_epoch + 1


def fresh_accelerate_state() -> None:
    """accelerate keeps process-wide singletons; each variant measured in this one process starts clean."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@dataclass
class Base:
    """What set-up makes once for a run, before any LoRA: a sweep's variants share all of it (the loaded base with
    its caches on one accelerator)."""
    cfg: TrainConfig
    files: RunFiles
    accelerator: object
    ev: EventLog
    model: LoadedModel
    data: TrainData
    text_cache: dict | None
    sample_cond: dict | None
    weight_dtype: torch.dtype
    device: str
    info: dict


def setup(cfg: TrainConfig, run_dir: str | Path, echo=print, model: LoadedModel | None = None) -> Run:
    """Accelerator, model with LoRA, data and caches, optimizer and schedule: everything the steps need."""
    base = setup_base(cfg, run_dir, echo, model)
    return add_network(base, cfg, base.model, base.files, base.ev)


def setup_base(cfg: TrainConfig, run_dir: str | Path, echo=print, model: LoadedModel | None = None) -> Base:
    """Accelerator, model, data and caches, the base frozen and stored (quantised when asked): all but the LoRA."""
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
    set_objective(cfg, model)
    ev.emit("log", message=f"Model: {families.name(model.family)}, prediction type {model.prediction_type}")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp, torch.float32)
    # one big part on the device at a time, so the first run peaks no higher than the steps: the VAE alone
    # while latents are cached, the text encoders alone while their outputs are cached, then the UNet
    data = prepare_data(cfg, sets, model, accelerator, ev)
    text_cache, sample_cond = cache_text(cfg, model, data, accelerator.device, weight_dtype)
    store_frozen_base(cfg, model, accelerator.device, weight_dtype, parked_text_encoders=text_cache is not None)
    info = {
        "started_at": started_at,
        "num_train_images": sum(it.repeats for it in data.items),
        "num_reg_images": sum(it.repeats for it in data.reg.items) if data.reg else 0,
        "tag_frequency": {name: tag_frequency([it.caption for it in data.items if it.subset == name]) for name in scan.subsets},
        "dataset_dirs": scan.subsets,
        "model_name": cfg.base_model,
        "prediction_type": model.prediction_type,
        "zero_terminal_snr": model.zero_terminal_snr,
    }
    return Base(cfg, files, accelerator, ev, model, data, text_cache, sample_cond, weight_dtype, device, info)


def add_network(base: Base, cfg: TrainConfig, model: LoadedModel, files: RunFiles, ev, alphas: dict | None = None) -> Run:
    """The LoRA of `cfg` on `model` (the base's, or a sweep variant's copy sharing its weights; `alphas` when it
    was injected already), with its optimizer, schedule and EMA, prepared by the base's accelerator: one trainable
    network of a run."""
    accelerator = base.accelerator
    alphas = place_lora(cfg, model, accelerator.device, base.weight_dtype, ev, alphas or inject_lora(cfg, model),
                        parked_text_encoders=base.text_cache is not None)
    micro_per_epoch = base.data.micro_per_epoch(accelerator.num_processes)
    optimizer, scheduler, total_steps, steps_per_epoch = make_schedule(cfg, model, accelerator, micro_per_epoch,
                                                                       base.device)
    trainable = [model.unet] + (list(model.text_encoders) if cfg.train_text_encoder else [])
    prepared = accelerator.prepare(*trainable, optimizer, scheduler)
    for m in prepared[:-2]:
        m.train()  # LoRA dropout is active in train mode only
    return Run(cfg, files, accelerator, ev, model, alphas, base.data, base.text_cache, list(prepared[:-2]),
               prepared[-2], prepared[-1], total_steps, steps_per_epoch, micro_per_epoch, base.weight_dtype,
               dict(base.info), base.sample_cond,
               make_ema(cfg, [accelerator.unwrap_model(m) for m in prepared[:-2]], accelerator.device, ev))


def make_ema(cfg: TrainConfig, trainable: list, device, ev: EventLog):
    """The EMA of the LoRA weights when asked (engine/ema.py), and a line that says what uses it."""
    if not cfg.ema:
        return None
    from trainer.engine.ema import LoraEMA, ema_device

    ema = LoraEMA(cfg, [p for m in trainable for p in lora.lora_parameters(m)], ema_device(cfg, device))
    ev.emit("log", message=f"EMA of the LoRA weights (decay {cfg.ema_decay:g}, on the {ema.device.type}): samples and "
                           "validation use it, and the exported file holds it"
                           + (" (the trained weights beside it, as -raw)" if cfg.ema_export == "both" else ""))
    return ema


def set_objective(cfg: TrainConfig, model: LoadedModel) -> None:
    """The noise schedule the run trains on: the model's own prediction type unless the config names one, and
    zero-terminal SNR (rescaled betas, with 'trailing' timesteps for sampling) when asked or when the model was
    trained so. Zero-terminal SNR with an epsilon target is refused: the last timestep has no signal to predict."""
    changes = {}
    if cfg.prediction_type != "auto" and cfg.prediction_type != model.prediction_type:
        changes["prediction_type"] = cfg.prediction_type
    if cfg.zero_terminal_snr and not model.zero_terminal_snr:
        changes.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    if changes:
        from diffusers import DDPMScheduler

        model.noise_scheduler = DDPMScheduler.from_config(model.noise_scheduler.config, **changes)
    if model.zero_terminal_snr and model.prediction_type != "v_prediction":
        raise TrainingError("zero_terminal_snr needs v-prediction, but this run trains "
                            f"{families.name(model.family)} with the {model.prediction_type} target. Set "
                            "prediction_type = 'v_prediction', or turn zero_terminal_snr off.")


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
    training, val = list(scan.items), []
    if cfg.validation_split > 0:
        if holdout_error(cfg.validation_split, len(training)):
            raise TrainingError(holdout_error(cfg.validation_split, len(training)))
        k = holdout_count(cfg.validation_split, len(training))
        order = sorted(training, key=lambda it: mix(cfg.seed, int(file_hash(it.path)[:15], 16)))
        held = {id(it) for it in order[:k]}
        val = [it for it in training if id(it) in held]
        training = [it for it in training if id(it) not in held]
        ev.emit("log", message=f"Validation: {len(val)} image(s) held out: " + ", ".join(it.path.name for it in val[:10]))
    if cfg.validation_dataset:
        val += scan_for_training(cfg, ev, cfg.validation_dataset, "Validation").items
    reg = scan_for_training(cfg, ev, cfg.reg_dataset, "Class-image").items if cfg.reg_dataset else []
    if reg:
        ev.emit("log", message=f"Prior preservation: {len(reg)} class image(s), prior_loss_weight {cfg.prior_loss_weight:g}")
    return training, reg, val


def vae_dtype(cfg: TrainConfig) -> torch.dtype:
    """The VAE's dtype on the device (TrainConfig.vae_precision): it keeps it for the samples too."""
    return {"bf16": torch.bfloat16}.get(cfg.vae_precision, torch.float32)


def resident_and_frozen(cfg: TrainConfig, model: LoadedModel, parked_text_encoders: bool) -> tuple[list, list]:
    """(the parts that live on the device while training, the parts that are not trained)."""
    resident = [model.unet] + ([] if parked_text_encoders else list(model.text_encoders))
    frozen = [model.unet] + ([] if cfg.train_text_encoder else list(model.text_encoders))
    return resident, frozen


def store_frozen_base(cfg: TrainConfig, model: LoadedModel, dev, weight_dtype, parked_text_encoders: bool = False) -> None:
    """Freeze the base and store it as it will train (cast, or quantised to int8 / nf4), before any LoRA goes in;
    the VAE to the device when it encodes every batch."""
    placement.phase("load")
    for m in [model.unet, model.vae, *model.text_encoders]:
        m.requires_grad_(False)
    if not cfg.cache_latents:  # the VAE encodes every batch (never fp16: an fp16 SDXL VAE makes NaNs)
        placement.to_device(model.vae, dev, vae_dtype(cfg))
    quantize.store_base(cfg.base_quantization, *resident_and_frozen(cfg, model, parked_text_encoders), weight_dtype, dev)


def add_lora(cfg: TrainConfig, model: LoadedModel, dev, weight_dtype, ev: EventLog,
             parked_text_encoders: bool = False) -> dict:
    """Inject LoRA with peft (fp32 weights) into the stored base, move the networks to the device (text encoders
    whose outputs are cached stay parked on the CPU; so does the VAE when latents are cached)."""
    return place_lora(cfg, model, dev, weight_dtype, ev, inject_lora(cfg, model), parked_text_encoders)


def inject_lora(cfg: TrainConfig, model: LoadedModel) -> dict:
    """The network of `cfg` into `model`, from the run's seed; returns part -> {module: alpha}. (Before the base
    is stored in fp8: peft's DoRA reads the base weights as it goes in.)"""
    torch.manual_seed(cfg.seed)  # LoRA init draws from the global RNG: same seed, same starting weights
    try:
        alphas = lora.inject_for_config(model, cfg)
    except ValueError as e:  # per-block values that do not fit this family's blocks
        raise TrainingError(f"{e} The base model is {families.name(model.family)}.") from None
    if not any(alphas.values()):
        raise TrainingError("No module gets a LoRA: every block has rank 0 (or a learning-rate weight at or below "
                            "block_lr_zero_threshold). Give some blocks a rank.")
    return alphas


def place_lora(cfg: TrainConfig, model: LoadedModel, dev, weight_dtype, ev: EventLog, alphas: dict,
               parked_text_encoders: bool = False) -> dict:
    """After injection: the base stored (fp8 when asked) and placed, the LoRA in fp32, checkpointing on, a log line."""
    resident, frozen = resident_and_frozen(cfg, model, parked_text_encoders)
    stored = quantize.place_base(cfg.base_quantization, [model.unet, *model.text_encoders], resident, frozen,
                                 weight_dtype, dev)
    if weight_dtype != torch.float32 and not cfg.use_dora:  # under autocast: two casts per LoRA layer saved
        for m in [model.unet, *model.text_encoders]:
            lora.skip_input_casting(m)
    if stored:
        ev.emit("log", message=stored)
    if cfg.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            for te in model.text_encoders:
                te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_te = sum(len(a) for k, a in alphas.items() if k != "unet")
    from trainer.loras.format import NETWORK_NAMES

    kind = NETWORK_NAMES[cfg.network_type] + (" (whole Kronecker factors)" if cfg.lokr_full_matrix else "")
    ev.emit("log", message=f"{kind} on {len(alphas['unet'])} UNet modules" + (f" and {n_te} text-encoder modules" if n_te else "")
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

    vae_id = vae_fingerprint(model.vae) + ("" if cfg.vae_precision == "fp32" else f"-{cfg.vae_precision}")
    cache = LatentCache(default_cache_dir(), vae_id) if cfg.cache_latents_to_disk else MemoryLatentCache(vae_id)
    placement.phase("cache latents")
    placement.to_device(model.vae, accelerator.device, vae_dtype(cfg))  # alone on the device: nothing else is there yet
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
    placement.release()
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
    placement.release()
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
                 if model.spec.pooled_conditioning else ["prompt_embeds", "negative_prompt_embeds"])
        out[text] = {k: placement.to_host(v) for k, v in zip(names, got)}
    return out


def make_schedule(cfg: TrainConfig, model: LoadedModel, accelerator, micro_per_epoch: int, device: str):
    """(optimizer, LR scheduler, total steps, steps per epoch)."""
    from diffusers.optimization import get_scheduler

    groups = lora.loraplus_groups(lora.unet_param_groups(model, cfg), lora.up_parameters(model.unet),
                                  cfg.loraplus_ratio("unet"))
    if cfg.train_text_encoder and cfg.text_encoder_lr > 0:
        te_group = {"params": [p for te in model.text_encoders for p in lora.lora_parameters(te)], "lr": cfg.text_encoder_lr}
        ups = set().union(*(lora.up_parameters(te) for te in model.text_encoders))
        groups += lora.loraplus_groups([te_group], ups, cfg.loraplus_ratio("te1"))
    elif cfg.train_text_encoder:
        for te in model.text_encoders:
            for p in lora.lora_parameters(te):
                p.requires_grad_(False)
    optimizer = make_optimizer(cfg, groups, device)
    steps_per_epoch = max(1, micro_per_epoch // cfg.gradient_accumulation)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch
    n_proc = accelerator.num_processes  # accelerate steps the scheduler once per process
    if cfg.adafactor_relative_step:  # Adafactor's own step size: its schedule only reports it
        from transformers.optimization import AdafactorSchedule

        return optimizer, AdafactorSchedule(optimizer), total_steps, steps_per_epoch
    # a schedule-free optimizer warms up itself (the config check keeps its schedule constant)
    warmup = 0 if optimizers.get(cfg.optimizer).schedule_free else cfg.warmup_steps
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup * n_proc,
                              num_training_steps=total_steps * n_proc)
    return optimizer, scheduler, total_steps, steps_per_epoch


def make_optimizer(cfg: TrainConfig, groups: list[dict], device: str):
    try:
        return optimizers.get(cfg.optimizer).build(groups, cfg, device)
    except optimizers.OptimizerError as e:
        raise TrainingError(str(e)) from None
