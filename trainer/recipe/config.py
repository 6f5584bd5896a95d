"""TrainConfig: the one object that carries a run from the form to the export.

Every field has a one-line help text (shown as the UI tooltip and in the
README's generated reference). The config is versioned; `migrate()` upgrades
older files. `validate()` checks everything that can be checked before a model
is loaded and reports problems in plain words.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from trainer.models import families
from trainer.recipe import optimizers

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

CONFIG_VERSION = 1

OPTIMIZERS = optimizers.KEYS
SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")
PRECISIONS = ("no", "fp16", "bf16")
SAVE_PRECISIONS = ("fp16", "bf16", "fp32")
VAE_PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cuda", "cpu")
FAMILIES = ("auto",) + families.KEYS
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")


PATH_FIELDS = ("base_model", "model_config", "dataset", "output_dir", "reg_dataset", "validation_dataset")


def file_name(path: str) -> str:
    """The last part of a path, on any platform ('C:\\Users\\me\\model.safetensors' -> 'model.safetensors')."""
    return str(path).replace("\\", "/").rstrip("/").split("/")[-1]


class ConfigError(ValueError):
    """A config problem a user can fix; the message says what and how."""


def unknown_keys(unknown, known) -> str:
    """'a', 'b' (did you mean 'c'?): unknown keys, each with the known one its spelling is nearest, if any."""
    hints = []
    for k in unknown:
        close = difflib.get_close_matches(k, known, n=1)
        hints.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    return ", ".join(hints)


def _f(default, help: str, choices: tuple | None = None, section: str = "basic"):
    meta = {"help": help, "section": section}
    if choices:
        meta["choices"] = choices
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # --- what to train on
    base_model: str = _f("", "Base model: a single-file .safetensors/.ckpt checkpoint, a diffusers folder, or a hub id.")
    model_family: str = _f("auto", "Model family; 'auto' detects SD1 / SD2 / SD2-v / SDXL from the weights.", FAMILIES, "advanced")
    model_config: str = _f("", "For a single-file checkpoint of an unusual size: a diffusers folder holding its configs (empty = the built-in SD1/SD2/SDXL configs).", None, "advanced")
    dataset: str = _f("", "Dataset folder: images with same-name .txt captions, or kohya '<repeats>_<name>' sub-folders.")
    trigger: str = _f("", "Trigger word(s), comma-separated; put at the front of every caption that lacks them.")
    # --- captions
    class_caption: str = _f("", "Caption used for images that have no caption file (e.g. 'a photo of a person').", None, "captions")
    caption_prefix: str = _f("", "Text added before every caption (after the trigger words).", None, "captions")
    caption_suffix: str = _f("", "Text added after every caption.", None, "captions")
    shuffle_tags: bool = _f(False, "Shuffle the comma-separated tags of each caption every time it is used.", None, "captions")
    keep_tokens: int = _f(1, "With shuffle or tag dropout: keep the first N tags in place (trigger words always stay first).", None, "captions")
    caption_dropout: float = _f(0.0, "Probability of training an image with an empty caption (0-1).", None, "captions")
    tag_dropout: float = _f(0.0, "Probability of dropping each tag (except the kept ones) from a caption (0-1).", None, "captions")
    caption_extension: str = _f(".txt", "Extension of caption files next to the images.", None, "captions")
    caption_from_folder: bool = _f(False, "Images without a caption file in a kohya '<repeats>_<name>' folder are captioned '<name>' (e.g. 10_zwx woman: 'zwx woman'), as kohya's DreamBooth folders.", None, "captions")
    # --- images and buckets
    resolution: int = _f(512, "Training resolution: buckets have about resolution x resolution pixels.")
    enable_buckets: bool = _f(True, "Aspect-ratio buckets: train each image near its own aspect ratio instead of cropping to a square.", None, "images")
    min_bucket: int = _f(0, "Smallest bucket side in pixels; 0 = follow the resolution (256, or the resolution when it is lower).", None, "images")
    max_bucket: int = _f(0, "Largest bucket side in pixels (at least the resolution); 0 = follow the resolution (1024, or the resolution when it is higher).", None, "images")
    bucket_step: int = _f(64, "Bucket sides are multiples of this many pixels.", None, "images")
    no_upscale: bool = _f(False, "Never upscale small images: they get a smaller bucket instead.", None, "images")
    flip: bool = _f(False, "Random horizontal flip (do not use for asymmetric subjects or text).", None, "images")
    cache_latents: bool = _f(True, "Encode every image with the VAE once and reuse the latents (faster, less VRAM).", None, "images")
    cache_latents_to_disk: bool = _f(True, "Keep cached latents on disk so later runs skip the VAE entirely.", None, "images")
    cache_text_encoder_outputs: bool = _f(True, "Encode each caption once and let the text encoders leave the GPU, when they are not trained and captions are fixed (no tag shuffle or dropout); otherwise captions are encoded every step.", None, "images")
    vae_precision: str = _f("fp32", "Precision of the VAE, which encodes the latents and decodes the samples: fp32, or bf16 (half the VAE's memory; in fp32, encoding SDXL's 1024 px images for the latent cache needs 2.8 GB, more than the 4 GB preset's training steps). bf16 latents differ from fp32's by about 2% (RMS); fp16 is not offered, SDXL's VAE overflows in it.", VAE_PRECISIONS, "images")
    # --- network
    network_type: str = _f("lora", "Network type: 'lora' (LoRA; LoCon with conv_rank, DoRA with use_dora), 'loha' (LyCORIS LoHa: the Hadamard product of two low-rank pairs, more capacity for the same rank) or 'lokr' (LyCORIS LoKr: a Kronecker product, very small files). A1111, Forge and ComfyUI load all three.", ("lora", "loha", "lokr"), "network")
    rank: int = _f(16, "LoRA rank (dim): the capacity of the update. 8-32 for characters, 32-128 for styles.")
    alpha: float = _f(16.0, "LoRA alpha: the update is scaled by alpha/rank. Changing rank without alpha changes the effective learning rate.")
    network_target: str = _f("kohya", "Which UNet layers get LoRA: 'kohya' (all transformer-block linears, as kohya_ss) or 'attention' (q/k/v/out only, as diffusers' example; smaller and faster).", ("kohya", "attention"), "network")
    conv_rank: int = _f(0, "LoCon: rank for the ResNet convolutions too (0 = off).", None, "network")
    conv_alpha: float = _f(1.0, "LoCon alpha for the convolution layers.", None, "network")
    dropout: float = _f(0.0, "Dropout on the LoRA path (0-1).", None, "network")
    rank_dropout: float = _f(0.0, "Rank dropout (kohya's): each step drops this share of each module's rank channels, per image (0-1; 0.1 is common; 0 = off). Off when sampling, validating and in the file.", None, "network")
    module_dropout: float = _f(0.0, "Module dropout (kohya's): each step leaves out a whole LoRA module with this probability (0-1; 0 = off). Off when sampling, validating and in the file.", None, "network")
    ema: bool = _f(False, "Keep an exponential moving average (EMA) of the LoRA weights: samples and validation use it, and the exported file holds it. Smoother results, the more so the higher ema_decay.", None, "network")
    ema_decay: float = _f(0.999, "EMA decay per update (0.99-0.9999): how slowly the average follows the training weights (diffusers' EMAModel: it warms up over the first steps).", None, "network")
    ema_update_every: int = _f(1, "Update the EMA every N optimizer steps.", None, "network")
    ema_device: str = _f("auto", "Where the EMA copy lives: auto (the CPU on cards under 12 GB, else the GPU), cpu, or device (beside the LoRA).", ("auto", "cpu", "device"), "network")
    ema_export: str = _f("ema", "With ema: the exported file holds the EMA weights (ema), or the trained ones are written beside it as <name>-raw.safetensors (both).", ("ema", "both"), "network")
    loraplus_lr_ratio: float = _f(0.0, "LoRA+: the up (B) matrices learn this many times faster than the down (A) ones (16 is the paper's; 0 = off). Not with Prodigy.", None, "network")
    loraplus_unet_lr_ratio: float = _f(0.0, "LoRA+ ratio for the UNet only (0 = loraplus_lr_ratio).", None, "network")
    loraplus_text_encoder_lr_ratio: float = _f(0.0, "LoRA+ ratio for the text encoder(s) only (0 = loraplus_lr_ratio).", None, "network")
    use_tucker: bool = _f(False, "LoHa/LoKr: CP (Tucker) decomposition of the 3x3 convolutions (LyCORIS' use_tucker; needs conv_rank): fewer parameters for the LoCon layers.", None, "network")
    lokr_factor: int = _f(-1, "LoKr: split each dimension into two factors near this number (LyCORIS' factor; -1 = as square as possible). A larger factor gives a larger first and a smaller second Kronecker factor.", None, "network")
    lokr_decompose_both: bool = _f(False, "LoKr: make the first Kronecker factor a low-rank pair too, not only the second (LyCORIS' decompose_both).", None, "network")
    lokr_full_matrix: bool = _f(False, "LoKr: train both Kronecker factors as full matrices, with no rank (LyCORIS' full_matrix); rank and alpha then only say which modules train.", None, "network")
    use_dora: bool = _f(False, "DoRA: weight-decomposed LoRA, its magnitude written as kohya's dora_scale (ComfyUI, A1111 and Forge apply it; diffusers loads the file as plain LoRA). Slower to train.", None, "network")
    # --- per block (kohya's numbering: see trainer/models/blocks.py and the README)
    block_dims: str = _f("", "Rank per UNet block, comma-separated in kohya's order: SD1/SD2 IN00-IN11, MID, OUT00-OUT11 (25 values); SDXL IN00-IN08, MID, OUT00-OUT08 (19). 0 = no LoRA in that block. Empty = rank everywhere.", None, "blocks")
    block_alphas: str = _f("", "Alpha per UNet block, in the same order as block_dims. Empty = alpha everywhere.", None, "blocks")
    conv_block_dims: str = _f("", "LoCon rank per UNet block (same order). Empty = conv_rank everywhere.", None, "blocks")
    conv_block_alphas: str = _f("", "LoCon alpha per UNet block (same order). Empty = conv_alpha everywhere.", None, "blocks")
    down_lr_weight: str = _f("", "Learning-rate weight of each IN block (IN00..., 12 values for SD1/SD2, 9 for SDXL): the block trains at unet_lr x weight. Empty = 1.", None, "blocks")
    mid_lr_weight: str = _f("", "Learning-rate weight of the MID block (one value). Empty = 1.", None, "blocks")
    up_lr_weight: str = _f("", "Learning-rate weight of each OUT block (OUT00..., 12 or 9 values). Empty = 1.", None, "blocks")
    block_lr_zero_threshold: float = _f(0.0, "Blocks whose learning-rate weight is at or below this are not trained and not written.", None, "blocks")
    # --- schedule
    max_steps: int = _f(0, "Total optimizer steps; 0 = use epochs.")
    epochs: int = _f(10, "Passes over the dataset (each image counted 'repeats' times) when max_steps is 0.")
    batch_size: int = _f(1, "Images per step.")
    gradient_accumulation: int = _f(1, "Add up gradients over this many batches before each optimizer step.", None, "training")
    unet_lr: float = _f(1e-4, "Learning rate for the UNet LoRA.")
    text_encoder_lr: float = _f(5e-5, "Learning rate for the text-encoder LoRA.")
    train_text_encoder: bool = _f(True, "Train LoRA on the text encoder(s) too.")
    optimizer: str = _f("adamw", "Optimizer: " + "; ".join(f"{o.key}: {o.label}" for o in optimizers.OPTIMIZERS.values()) + ".", OPTIMIZERS)
    adafactor_relative_step: bool = _f(False, "Adafactor only: let it find its own step size from the step count (relative_step, scale_parameter, warmup_init); the learning rates are then not used, and lr_scheduler must be 'constant'.", None, "training")
    weight_decay: float = _f(0.01, "Weight decay of the optimizer.", None, "training")
    lr_scheduler: str = _f("constant", "Learning-rate schedule.", SCHEDULERS, "training")
    warmup_steps: int = _f(0, "Steps of linear warm-up at the start of the schedule.", None, "training")
    max_grad_norm: float = _f(1.0, "Clip gradients to this norm (0 = off).", None, "training")
    seed: int = _f(42, "Random seed: the same seed and data give the same LoRA.", None, "training")
    mixed_precision: str = _f("bf16", "Compute precision: bf16 (recent GPUs), fp16, or no (fp32). LoRA weights stay fp32.", PRECISIONS)
    save_precision: str = _f("fp16", "Precision of the exported file.", SAVE_PRECISIONS, "output")
    base_quantization: str = _f("none", "Store the frozen base model quantised (QLoRA): fp8 (weights as float8, computed in the run's precision; kohya's fp8_base), int8 or nf4 (bitsandbytes layers). Much less VRAM for the weights; the LoRA trains and exports as usual. Samples take turns on the GPU: the UNet denoises while the VAE waits in RAM, then the other way round.", ("none", "fp8", "int8", "nf4"), "training")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass: much less VRAM, about 20-30% slower.", None, "training")
    min_snr_gamma: float = _f(0.0, "Min-SNR loss weighting gamma (5 is common; 0 = off).", None, "training")
    prediction_type: str = _f("auto", "Training target; 'auto' uses the model's own (v_prediction for SD2-768-v and SDXL v-prediction models such as NoobAI-XL V-Pred).", PREDICTION_TYPES, "training")
    zero_terminal_snr: bool = _f(False, "Zero-terminal SNR (rescaled betas, diffusers' rescale_zero_terminal_snr): the last timestep is pure noise, so the model learns true black and white. v-prediction only; models marked 'ztsnr' use it already.", None, "training")
    # --- loss (kohya sd-scripts' names and defaults)
    loss_type: str = _f("l2", "Loss: l2 (MSE, the usual), l1, huber or smooth_l1 (robust to outliers: large errors count linearly, see huber_c).", LOSS_TYPES, "loss")
    huber_schedule: str = _f("snr", "With huber / smooth_l1: how huber_c changes over timesteps: constant, exponential (from 1 at t=0 down to huber_c), or snr (by the noise level; kohya's default).", HUBER_SCHEDULES, "loss")
    huber_c: float = _f(0.1, "With huber / smooth_l1: where the loss turns from quadratic to linear (smaller: more robust).", None, "loss")
    huber_scale: float = _f(1.0, "With huber / smooth_l1 and the constant or exponential schedule: a factor on huber_c.", None, "loss")
    debiased_estimation_loss: bool = _f(False, "Debiased estimation: weight each timestep's loss by 1/sqrt(SNR) (1/(SNR+1) with v-prediction), so the low-noise steps that add detail weigh less.", None, "loss")
    v_pred_like_loss: float = _f(0.0, "Add this share of a v-prediction-like loss (kohya's v_pred_like_loss; 0 = off): lets an epsilon model learn more from high-noise steps.", None, "loss")
    # --- noise (kohya sd-scripts' names and defaults)
    noise_offset: float = _f(0.0, "Noise offset (0.05-0.1 helps very dark/bright images; 0 = off).", None, "noise")
    adaptive_noise_scale: float = _f(0.0, "With noise_offset: add this x the latent's mean absolute value per channel to the offset (0 = off).", None, "noise")
    multires_noise_iterations: int = _f(0, "Multi-resolution (pyramid) noise: add lower-resolution noise this many times (6-10 is common; 0 = off). Helps large areas of one colour.", None, "noise")
    multires_noise_discount: float = _f(0.3, "Multi-resolution noise: weight of each coarser level (0.1-0.3; kohya's default 0.3).", None, "noise")
    ip_noise_gamma: float = _f(0.0, "Input perturbation: add this much extra noise to the model's input but not to its target (0.1 is common; 0 = off). A regulariser against exposure bias.", None, "noise")
    ip_noise_gamma_random_strength: bool = _f(False, "Input perturbation at a random strength between 0 and ip_noise_gamma each step.", None, "noise")
    clip_skip: int = _f(1, "Use the output of the N-th last text-encoder layer (2 is common for anime models).", None, "training")
    min_timestep: int = _f(0, "Train on noise timesteps from this one (0-999; kohya's min_timestep).", None, "training")
    max_timestep: int = _f(1000, "Train on noise timesteps below this one (1-1000; kohya's max_timestep); 1000 = the whole range.", None, "training")
    # --- quality tools
    reg_dataset: str = _f("", "Class (regularisation) images for prior preservation, kohya layout ('<repeats>_<name>' folders; captions from .txt files, class_caption or the folder name). Each step trains a batch of them beside the training batch. Empty = none.", None, "quality")
    prior_loss_weight: float = _f(1.0, "Weight of the class images' loss against the training images' (kohya's prior_loss_weight).", None, "quality")
    masked_loss: bool = _f(False, "Weight the loss by a mask per image: its alpha channel, or a same-name image in a 'masks' folder (white = learn, black = ignore).", None, "quality")
    validation_split: float = _f(0.0, "Hold out this fraction of the dataset (0-0.5) to measure a validation loss with fixed noise and timesteps.", None, "quality")
    validation_dataset: str = _f("", "A separate folder of validation images (instead of, or besides, validation_split).", None, "quality")
    validation_every_steps: int = _f(0, "Measure the validation loss every N steps (0 = with each checkpoint and at the end).", None, "quality")
    tensorboard: bool = _f(False, "Log loss, validation loss, learning rate and samples for TensorBoard, in the run's tensorboard/ folder.", None, "quality")
    variants: list = _f([], "A sweep: train several LoRAs in one run, on one loaded base and one set of caches, each with its own settings ([[variants]] tables of LoRA-side fields such as rank, alpha, network_type, unet_lr, optimizer, dropout, block_dims; up to 8; an optional name). Every variant sees the same batches and noise and is written as <output_name>-<variant>.safetensors. Empty = one LoRA.", None, "quality")
    # --- output
    output_dir: str = _f("output", "Folder for the run: checkpoints, samples, events and the final LoRA.")
    output_name: str = _f("lora", "File name of the exported LoRA (without .safetensors).")
    save_every_steps: int = _f(0, "Save a checkpoint every N steps (0 = only at the end).", None, "output")
    keep_last: int = _f(3, "Keep only the last K checkpoints (0 = keep all).", None, "output")
    sample_every_steps: int = _f(0, "Render sample images every N steps (0 = off).", None, "output")
    sample_prompts: list = _f([], "Prompts for sample images ({trigger} is replaced by the trigger words).", None, "output")
    sample_steps: int = _f(20, "Denoising steps for sample images.", None, "output")
    sample_seed: int = _f(1234, "Seed for sample images (fixed, so samples are comparable across steps).", None, "output")
    log_every_steps: int = _f(0, "Report loss every N steps; 0: at the first step, then about every 2 seconds, and at the last (each report waits for the GPU, so reporting every step slows a fast GPU).", None, "output")
    device: str = _f("auto", "Where to train: auto (CUDA if present), cuda or cpu.", DEVICES, "advanced")
    config_version: int = _f(CONFIG_VERSION, "Version of this config format.", None, "advanced")

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def public_dict(self) -> dict[str, Any]:
        """to_dict() fit to publish inside a LoRA file: folders and files by name only (as kohya writes
        ss_sd_model_name), never a path that shows a user name or where things live on this computer."""
        d = self.to_dict()
        for k in PATH_FIELDS:
            d[k] = file_name(d[k])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "TrainConfig":
        data = migrate(dict(data))
        known = {f.name: f for f in fields(cls)}
        unknown = [k for k in data if k not in known]
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown_keys(unknown, known)}. Remove them or fix the spelling.")
        kwargs = {}
        for k, v in data.items():
            kwargs[k] = _coerce(known[k], v, source)
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid TOML ({e}). Check quotes and '=' signs on that line.") from None
        return cls.from_dict(data, source=str(path))

    def save(self, path: str | os.PathLike) -> None:
        from trainer.fsutil import atomic_write_text

        atomic_write_text(path, dumps_toml(self.to_dict()))

    @staticmethod
    def choices(name: str) -> tuple:
        """The values a field offers (its one owner of the list)."""
        return next(f.metadata.get("choices") or () for f in fields(TrainConfig) if f.name == name)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------- derived
    @property
    def bucket_range(self) -> tuple[int, int]:
        """(smallest, largest) bucket side: the values set, or defaults that follow the resolution."""
        step = max(self.bucket_step, 8)
        low = self.min_bucket or max(step, min(256, self.resolution) // step * step)
        return low, self.max_bucket or max(1024, self.resolution)

    @property
    def trigger_words(self) -> list[str]:
        from trainer.data.captions import split_tags

        return split_tags(self.trigger)

    # ---------------------------------------------------------- checking
    def problems(self) -> tuple[list[str], list[str]]:
        """(errors, warnings) in plain words. Errors stop a run; warnings do not."""
        errors: list[str] = []
        warns: list[str] = []
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                errors.append(f"{f.name} = '{getattr(self, f.name)}' is not one of: {', '.join(choices)}.")
        if not self.base_model:
            errors.append("base_model is empty: choose a checkpoint file, a diffusers folder or a hub id.")
        if not self.dataset:
            errors.append("dataset is empty: choose a folder of images.")
        errors += self.number_problems()
        errors += self.bucket_problems()
        if not self.output_name or any(c in self.output_name for c in '/\\:*?"<>|') or self.output_name in (".", ".."):
            errors.append(f"output_name '{self.output_name}' must be a plain file name (no slashes or : * ? \" < > |).")
        if self.clip_skip < 1:
            errors.append(f"clip_skip must be 1 or more (got {self.clip_skip}).")
        warns += self.conflict_warnings()
        errors += self.schedule_problems()
        errors += self.recipe_problems()
        if self.base_quantization in ("int8", "nf4") and self.use_dora:
            errors.append(f"use_dora with base_quantization = '{self.base_quantization}' is not supported (DoRA needs "
                          "the base weights in full). Use base_quantization = 'fp8' or 'none', or turn DoRA off.")
        errors += self.block_problems()
        errors += self.network_problems()
        if self.variants:
            from trainer.recipe import sweep

            errors += sweep.problems(self)
        return errors, warns

    def number_problems(self) -> list[str]:
        """Ranks, sizes, steps, learning rates and dropouts that are out of range."""
        errors: list[str] = []
        if self.rank <= 0:
            errors.append(f"rank must be a positive whole number (got {self.rank}); 16 is a good start.")
        if self.alpha <= 0:
            errors.append(f"alpha must be positive (got {self.alpha}); set it equal to rank for scale 1.")
        if self.conv_rank < 0:
            errors.append(f"conv_rank must be 0 (off) or positive (got {self.conv_rank}).")
        if self.resolution < 64 or self.resolution % 8:
            errors.append(f"resolution must be a multiple of 8 and at least 64 (got {self.resolution}).")
        if self.batch_size < 1:
            errors.append(f"batch_size must be at least 1 (got {self.batch_size}).")
        if self.gradient_accumulation < 1:
            errors.append(f"gradient_accumulation must be at least 1 (got {self.gradient_accumulation}).")
        if self.max_steps < 0 or self.epochs < 0 or (self.max_steps == 0 and self.epochs == 0):
            errors.append("Set max_steps or epochs to a positive number.")
        if self.unet_lr <= 0:
            errors.append(f"unet_lr must be positive (got {self.unet_lr}).")
        if self.train_text_encoder and self.text_encoder_lr < 0:
            errors.append(f"text_encoder_lr must not be negative (got {self.text_encoder_lr}).")
        for name in ("caption_dropout", "tag_dropout", "dropout", "rank_dropout", "module_dropout"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                errors.append(f"{name} must be between 0 and 1 (got {v}).")
        return errors

    def bucket_problems(self) -> list[str]:
        """Aspect-ratio bucket sizes that no image could use."""
        errors: list[str] = []
        if self.bucket_step <= 0 or self.bucket_step % 8:
            errors.append(f"bucket_step must be a positive multiple of 8 (got {self.bucket_step}).")
        low, high = self.bucket_range
        if self.min_bucket < 0 or self.max_bucket < 0:
            errors.append("min_bucket and max_bucket must be 0 (follow the resolution) or a size in pixels.")
        if self.enable_buckets and high < self.resolution:
            errors.append(
                f"max_bucket ({high}) is below the resolution ({self.resolution}): no bucket could hold "
                f"a square image. Raise max_bucket to at least {self.resolution}, or set it to 0."
            )
        if self.enable_buckets and low > self.resolution:
            errors.append(f"min_bucket ({low}) is above the resolution ({self.resolution}). Lower min_bucket, or set it to 0.")
        return errors

    def schedule_problems(self) -> list[str]:
        """When to save, sample, log and validate, the timestep range and the prior-loss weight."""
        errors: list[str] = []
        if self.save_every_steps < 0 or self.sample_every_steps < 0 or self.keep_last < 0:
            errors.append("save_every_steps, sample_every_steps and keep_last must not be negative.")
        if self.log_every_steps < 0:
            errors.append("log_every_steps must be 0 (about every 2 seconds) or a number of steps.")
        if not 0 <= self.min_timestep < self.max_timestep <= 1000:
            errors.append(f"min_timestep ({self.min_timestep}) and max_timestep ({self.max_timestep}) must satisfy "
                          "0 <= min_timestep < max_timestep <= 1000.")
        if not 0 <= self.validation_split <= 0.5:
            errors.append(f"validation_split must be between 0 and 0.5 (got {self.validation_split}).")
        if self.prior_loss_weight < 0:
            errors.append(f"prior_loss_weight must not be negative (got {self.prior_loss_weight}).")
        if self.validation_every_steps < 0:
            errors.append("validation_every_steps must not be negative.")
        return errors

    def network_problems(self) -> list[str]:
        """The LyCORIS network types and the options that do not go with them, each in one sentence."""
        if self.network_type == "lora":
            lyco = [n for n in ("use_tucker", "lokr_decompose_both", "lokr_full_matrix") if getattr(self, n)]
            lyco += ["lokr_factor"] if self.lokr_factor != -1 else []
            return [f"{', '.join(lyco)} apply to the LyCORIS network types only: set network_type to 'loha' or "
                    "'lokr', or leave them at their defaults."] if lyco else []
        name, errors = {"loha": "LoHa", "lokr": "LoKr"}[self.network_type], []
        if self.use_dora:
            errors.append(f"DoRA with {name}: our DoRA is LoRA's (the file's dora_scale over lora_up/lora_down). "
                          "Turn use_dora off, or set network_type to 'lora'.")
        if self.dropout:
            errors.append(f"dropout (kohya's dropout on LoRA's down output) has no place in {name}: use rank_dropout "
                          "or module_dropout (LyCORIS' own), or set dropout to 0.")
        if any((self.loraplus_lr_ratio, self.loraplus_unet_lr_ratio, self.loraplus_text_encoder_lr_ratio)):
            errors.append(f"LoRA+ speeds up LoRA's up (B) matrices; {name} has no such pair. Set the LoRA+ ratios "
                          "to 0, or network_type to 'lora'.")
        if self.base_quantization in ("int8", "nf4"):
            errors.append(f"{name} on a base quantised to {self.base_quantization}: peft's {name} layers wrap plain "
                          "Linear and Conv2d layers only. Use base_quantization 'fp8' or 'none', or network_type 'lora'.")
        if self.use_tucker and not self.trains_convs:
            errors.append("use_tucker decomposes 3x3 convolutions, and no convolution is trained (conv_rank is 0, or "
                          "conv_block_dims is 0 in every block): set conv_rank (LoCon) or turn use_tucker off.")
        if self.network_type == "loha":
            lokr = [n for n in ("lokr_decompose_both", "lokr_full_matrix") if getattr(self, n)]
            lokr += ["lokr_factor"] if self.lokr_factor != -1 else []
            if lokr:
                errors.append(f"{', '.join(lokr)} apply to LoKr only: set network_type to 'lokr', or leave them at "
                              "their defaults.")
        elif self.lokr_factor == 0 or self.lokr_factor < -1:
            errors.append(f"lokr_factor must be -1 (as square as possible) or a positive number (got {self.lokr_factor}).")
        return errors

    def conflict_warnings(self) -> list[str]:
        """Options that would silently work against each other elsewhere."""
        warns = []
        if self.cache_latents and self.flip:
            warns.append("flip with cached latents: both flipped and unflipped latents are cached (twice the cache).")
        adaptive = self.optimizer in optimizers.OPTIMIZERS and optimizers.get(self.optimizer).adaptive
        if adaptive and (self.unet_lr < 0.1 or (self.train_text_encoder and 0 < self.text_encoder_lr < 0.1)):
            warns.append(
                f"Prodigy finds its own step size and expects learning rates near 1.0, but unet_lr={self.unet_lr} "
                f"and text_encoder_lr={self.text_encoder_lr}: it will barely learn. Use 1.0."
            )
        if not adaptive and self.unet_lr >= 0.01:
            warns.append(f"unet_lr={self.unet_lr} is very high for {self.optimizer}; 1e-4 is typical. Expect NaN loss.")
        return warns

    def recipe_problems(self) -> list[str]:
        """Loss, noise and optimizer options: their ranges, and the pairs that cannot go together."""
        errors = []
        opt = optimizers.OPTIMIZERS.get(self.optimizer)
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            errors.append("zero_terminal_snr needs v-prediction: at the last timestep there is no signal left to "
                          "predict noise from. Set prediction_type to 'v_prediction' (or 'auto' with a v-prediction "
                          "model), or turn zero_terminal_snr off.")
        if self.huber_c <= 0 or self.huber_scale <= 0:
            errors.append(f"huber_c and huber_scale must be positive (got {self.huber_c:g} and {self.huber_scale:g}).")
        if self.multires_noise_iterations < 0 or not 0 <= self.multires_noise_discount <= 1:
            errors.append("multires_noise_iterations must be 0 or more, and multires_noise_discount between 0 and 1.")
        for name in ("ip_noise_gamma", "adaptive_noise_scale", "v_pred_like_loss", "noise_offset"):
            if getattr(self, name) < 0:
                errors.append(f"{name} must not be negative (got {getattr(self, name):g}).")
        if opt and opt.schedule_free and self.lr_scheduler != "constant":
            errors.append(f"{self.optimizer} makes its own schedule: set lr_scheduler = 'constant' (its warm-up comes "
                          f"from warmup_steps), or choose another optimizer for a '{self.lr_scheduler}' schedule.")
        ratios = (self.loraplus_lr_ratio, self.loraplus_unet_lr_ratio, self.loraplus_text_encoder_lr_ratio)
        if any(r < 0 for r in ratios):
            errors.append("LoRA+ ratios must be 0 (off) or positive.")
        elif any(ratios) and opt and opt.adaptive:
            errors.append(f"LoRA+ with {self.optimizer}: it runs every parameter group at one learning rate (prodigyopt "
                          "refuses different ones, the crash of sd-scripts #1929), and LoRA+ needs the up matrices at "
                          "a higher one. Use AdamW or another optimizer with LoRA+, or set the LoRA+ ratios to 0.")
        if opt and opt.adaptive and ((self.train_text_encoder and 0 < self.text_encoder_lr != self.unet_lr)
                                     or any(getattr(self, n) for n in ("down_lr_weight", "mid_lr_weight", "up_lr_weight"))):
            errors.append(f"{self.optimizer} runs every parameter group at one learning rate (prodigyopt refuses "
                          "different ones): give text_encoder_lr the value of unet_lr (or 0 to leave the text encoder "
                          "alone), and leave the per-block learning-rate weights empty.")
        if any(ratios) and self.adafactor_relative_step:
            errors.append("LoRA+ with Adafactor's relative steps: the learning rates it would multiply are not used. "
                          "Turn adafactor_relative_step off, or the LoRA+ ratios.")
        if self.ema and not (0 <= self.ema_decay < 1) or self.ema_update_every < 1:
            errors.append(f"ema_decay must be at least 0 and below 1 (got {self.ema_decay:g}), and ema_update_every at "
                          f"least 1 (got {self.ema_update_every}).")
        if self.adafactor_relative_step and self.optimizer != "adafactor":
            errors.append("adafactor_relative_step applies to optimizer = 'adafactor' only: choose Adafactor or turn it off.")
        if self.adafactor_relative_step and (self.lr_scheduler != "constant" or self.warmup_steps):
            errors.append("Adafactor with relative steps makes its own schedule and warm-up: set lr_scheduler = "
                          "'constant' and warmup_steps = 0, or turn adafactor_relative_step off.")
        return errors

    def loraplus_ratio(self, part: str) -> float:
        """The LoRA+ ratio of a part ('unet' or a text encoder), 0 when off."""
        own = self.loraplus_unet_lr_ratio if part == "unet" else self.loraplus_text_encoder_lr_ratio
        return own or self.loraplus_lr_ratio

    @property
    def trains_convs(self) -> bool:
        """Whether any 3x3 convolution gets a LoCon module: conv_rank, or a block's conv dim when they are given."""
        from trainer.models import blocks

        try:
            dims = blocks.parse(self.conv_block_dims, blocks.lengths("conv_block_dims"), "conv_block_dims", integer=True)
        except ValueError:
            dims = None  # said by block_problems
        return any(dims) if dims is not None else self.conv_rank > 0

    @property
    def caches_text(self) -> bool:
        """Whether the text encoders' outputs are cached: asked for, encoders frozen, captions fixed."""
        return (self.cache_text_encoder_outputs and not self.train_text_encoder
                and not (self.shuffle_tags or self.caption_dropout or self.tag_dropout))

    @property
    def samples_lean(self) -> bool:
        """Whether samples bring one big part to the device at a time (the UNet to denoise, then the VAE to
        decode): with a quantised base, whose runner chose memory over speed, and whose small UNet moves in a
        fraction of a second."""
        return self.base_quantization != "none"

    def block_problems(self) -> list[str]:
        """The per-block fields in kohya's format (their count per family is checked once the model is known)."""
        from trainer.models import blocks

        errors = []
        for name in blocks.FIELDS:
            try:
                blocks.parse(getattr(self, name), blocks.lengths(name), name, integer=name.endswith("dims"))
            except ValueError as e:
                errors.append(str(e))
        return errors

    def validate(self) -> list[str]:
        """Raise ConfigError listing every error; return the warnings."""
        errors, warns = self.problems()
        if errors:
            raise ConfigError("\n".join(errors))
        return warns


def field_help() -> list[dict[str, Any]]:
    """Name, default, help, choices, section of each field: for the UI and the README."""
    out = []
    for f in fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append(
            {
                "name": f.name,
                "type": f.type if isinstance(f.type, str) else f.type.__name__,
                "default": default,
                "help": f.metadata["help"],
                "choices": f.metadata.get("choices"),
                "section": f.metadata["section"],
            }
        )
    return out


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Upgrade an older config dict to CONFIG_VERSION."""
    version = data.get("config_version", CONFIG_VERSION)
    if not isinstance(version, int) or version > CONFIG_VERSION:
        raise ConfigError(
            f"config_version {version!r} is newer than this LoRA Studio understands ({CONFIG_VERSION}). Update the app."
        )
    # Version 1 is the first format; future renames go here as `if version < 2: ...`.
    data["config_version"] = CONFIG_VERSION
    return data


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    typ = f.type if isinstance(f.type, str) else f.type.__name__
    try:
        if typ == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise ValueError
        if typ == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if typ == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if f.name == "variants":  # tables of settings (or the page's lines), each checked by recipe/sweep.py
            if isinstance(value, str):
                from trainer.recipe.sweep import parse_lines

                return parse_lines(value)
            return [dict(v) if isinstance(v, dict) else v for v in value]
        if typ == "list":
            if isinstance(value, str):
                return [line.strip() for line in value.splitlines() if line.strip()]
            return [str(v) for v in value]
        return str(value)
    except ConfigError:  # already in words (a variants line)
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {f.name} = {value!r} is not a valid {typ}.") from None


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return json.dumps(str(v), ensure_ascii=False)  # a JSON string is a valid TOML basic string


def dumps_toml(data: dict[str, Any]) -> str:
    """Flat TOML writer (our configs have no tables)."""
    return "".join(f"{k} = {_toml_value(v)}\n" for k, v in data.items())
