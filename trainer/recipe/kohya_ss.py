"""A way in (and out) for kohya_ss users: import a kohya_ss preset/config JSON, export sd-scripts TOML."""
from __future__ import annotations

import json
from pathlib import Path

from trainer.loras.metadata import network_args
from trainer.models import blocks, families
from trainer.recipe import optimizers
from trainer.recipe.config import TrainConfig, dumps_toml
from trainer.runfiles import RunFiles

_SCHEDULERS = {"constant": "constant", "constant_with_warmup": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}
_PRECISION = {"no": "no", "fp16": "fp16", "bf16": "bf16", "float": "fp32", "fp32": "fp32"}
# keys that carry no training meaning for us, or are paths of the person's kohya install
_IGNORED_QUIETLY = {"model_list", "save_model_as"}
# kohya_ss's LoRA_type -> our network_type (LoCon is LoRA with conv_dim); other types are not trained here
_LORA_TYPES = {"Standard": "lora", "LoCon": "lora", "Kohya LoCon": "lora", "LyCORIS/LoCon": "lora",
               "LyCORIS/LoHa": "loha", "LyCORIS/LoKr": "lokr"}
# paths and names of the machine the preset came from: the person's own form keeps its values, and says so
_PERSONAL = {"output_dir", "train_data_dir", "pretrained_model_name_or_path", "output_name", "sample_prompts"}


# The one table of kohya keys that are plain values: (kohya key, TrainConfig field, type). kohya_ss's JSON and
# sd-scripts' TOML use the same names for these; import reads them, export writes them, `known` derives from them.
NUMBERS = (
    ("network_dim", "rank", int), ("network_alpha", "alpha", float), ("conv_dim", "conv_rank", int),
    ("conv_alpha", "conv_alpha", float), ("network_dropout", "dropout", float), ("train_batch_size", "batch_size", int),
    ("gradient_accumulation_steps", "gradient_accumulation", int), ("min_snr_gamma", "min_snr_gamma", float),
    ("noise_offset", "noise_offset", float), ("keep_tokens", "keep_tokens", int),
    ("caption_dropout_rate", "caption_dropout", float), ("min_bucket_reso", "min_bucket", int),
    ("max_bucket_reso", "max_bucket", int), ("seed", "seed", int), ("clip_skip", "clip_skip", int),
    ("save_every_n_steps", "save_every_steps", int), ("save_last_n_steps_state", "keep_last", int),
    ("prior_loss_weight", "prior_loss_weight", float), ("min_timestep", "min_timestep", int),
    ("max_timestep", "max_timestep", int), ("validation_split", "validation_split", float),
    ("validate_every_n_steps", "validation_every_steps", int), ("huber_c", "huber_c", float),
    ("huber_scale", "huber_scale", float), ("v_pred_like_loss", "v_pred_like_loss", float),
    ("multires_noise_iterations", "multires_noise_iterations", int),
    ("multires_noise_discount", "multires_noise_discount", float), ("ip_noise_gamma", "ip_noise_gamma", float),
    ("adaptive_noise_scale", "adaptive_noise_scale", float), ("rank_dropout", "rank_dropout", float),
    ("module_dropout", "module_dropout", float), ("loraplus_lr_ratio", "loraplus_lr_ratio", float),
    ("loraplus_unet_lr_ratio", "loraplus_unet_lr_ratio", float),
    ("loraplus_text_encoder_lr_ratio", "loraplus_text_encoder_lr_ratio", float),
)
FLAGS = (
    ("gradient_checkpointing", "gradient_checkpointing"), ("cache_latents", "cache_latents"),
    ("cache_latents_to_disk", "cache_latents_to_disk"), ("shuffle_caption", "shuffle_tags"), ("flip_aug", "flip"),
    ("enable_bucket", "enable_buckets"), ("bucket_no_upscale", "no_upscale"),
    ("cache_text_encoder_outputs", "cache_text_encoder_outputs"), ("masked_loss", "masked_loss"),
    ("debiased_estimation_loss", "debiased_estimation_loss"), ("zero_terminal_snr", "zero_terminal_snr"),
    ("ip_noise_gamma_random_strength", "ip_noise_gamma_random_strength"),
)
# keys that name one of a field's choices, spelled the same by kohya and by us
CHOICES = (("loss_type", "loss_type"), ("huber_schedule", "huber_schedule"))
# per-block settings: kohya_ss stores them as comma-separated strings, sd-scripts reads them from network_args
BLOCK_KEYS = blocks.FIELDS  # kohya's names are our field names
# keys with rules of their own (precedence, percentages, names), handled one by one in import_kohya
SPECIAL = {"learning_rate", "unet_lr", "text_encoder_lr", "network_train_unet_only", "optimizer", "lr_scheduler",
           "lr_warmup", "max_train_steps", "epoch", "max_resolution", "mixed_precision", "save_precision",
           "caption_extension", "v_parameterization", "reg_data_dir", "logging_dir", "log_with", "fp8_base",
           "optimizer_args", "LoRA_type", "factor", "decompose_both", "use_tucker", "use_cp", "full_matrix"}
KNOWN = {k for k, _, _ in NUMBERS} | {k for k, _ in FLAGS} | {k for k, _ in CHOICES} | SPECIAL | set(BLOCK_KEYS) | {"block_lr_zero_threshold"}
# written to sd-scripts only when set: 0 means "off" to us, but e.g. save_every_n_steps = 0 divides by zero there
TOML_ONLY_WHEN_SET = {"network_dropout", "min_snr_gamma", "noise_offset", "save_every_n_steps", "validate_every_n_steps",
                      "multires_noise_iterations", "ip_noise_gamma", "adaptive_noise_scale", "v_pred_like_loss",
                      "validation_split"}
TOML_ELSEWHERE = {"conv_dim", "conv_alpha", "save_last_n_steps_state", "rank_dropout", "module_dropout",
                  "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"}  # network_args; or not sd-scripts' meaning


def _num(v):
    if isinstance(v, str):
        v = v.strip()
        if v == "":
            return None
        return float(v) if any(c in v for c in ".eE") else int(v)
    return v


def import_kohya(data: dict) -> tuple[dict, list[str]]:
    """(partial TrainConfig dict, notes on what was ignored and why). Conflicts are resolved the way
    sd-scripts resolves them, and said."""
    out: dict = {}
    notes: list[str] = []
    _import_fields(data, out, notes)
    _import_network(data, out, notes)
    _import_rates(data, out, notes)
    _import_schedule(data, out, notes)
    _import_precision_and_files(data, out, notes)
    _import_logging(data, out, notes)
    personal = sorted(k for k in _PERSONAL if data.get(k) not in (None, "", []))
    if personal:
        notes.append("kept your own values for " + ", ".join(personal) + " (they name files on the machine the preset came from)")
    if out.get("min_snr_gamma") == 0:
        out.pop("min_snr_gamma")
    if out.get("cache_text_encoder_outputs") and out.get("train_text_encoder", True):
        out["cache_text_encoder_outputs"] = False
        notes.append("cache_text_encoder_outputs conflicts with training the text encoder: caching turned off")
    unknown = sorted(k for k in data if k not in KNOWN and k not in _IGNORED_QUIETLY and data[k] not in (None, "", False, 0))
    if unknown:
        notes.append("not used by LoRA Studio: " + ", ".join(unknown))
    TrainConfig.from_dict(out, source="kohya import")  # every mapped value must be valid here
    return out, notes


def _given(data: dict, key: str):
    """A kohya value as a number, None when absent or empty."""
    return _num(data.get(key)) if data.get(key) not in (None, "") else None


def _import_fields(data: dict, out: dict, notes: list[str]) -> None:
    """The keys that map one to one: numbers, flags, per-block strings."""
    def take(key, target, conv=lambda v: v):
        if key in data and data[key] not in (None, ""):
            try:
                out[target] = conv(_num(data[key]) if not isinstance(data[key], bool) else data[key])
            except (TypeError, ValueError):
                notes.append(f"{key} = {data[key]!r}: not a number, ignored")

    for key, target, conv in NUMBERS:
        take(key, target, conv)
    for key, target in FLAGS:
        if isinstance(data.get(key), bool):
            out[target] = data[key]
    for key, target in CHOICES:
        if data.get(key) not in (None, ""):
            value, choices = str(data[key]).lower(), TrainConfig.choices(target)
            if value in choices:
                out[target] = value
            else:
                notes.append(f"{key} = '{data[key]}' is not supported ({', '.join(choices)}): ignored")
    for key in BLOCK_KEYS:
        if data.get(key) not in (None, ""):
            out[key] = str(data[key]).strip()
    take("block_lr_zero_threshold", "block_lr_zero_threshold", float)


def _flag(v) -> bool:
    return v is True or str(v).strip().lower() == "true"


def _import_network(data: dict, out: dict, notes: list[str]) -> None:
    """LoRA_type and LyCORIS' options (kohya_ss writes LoKr's Tucker switch as use_cp, LoHa's as use_tucker)."""
    kind = data.get("LoRA_type")
    if kind in (None, ""):
        return
    if kind not in _LORA_TYPES:
        notes.append(f"LoRA_type '{kind}' is not trained here (LoRA, LoCon, LyCORIS LoHa and LoKr are): trained as LoRA")
        return
    out["network_type"] = _LORA_TYPES[kind]
    if out["network_type"] == "lora":
        return
    if _flag(data.get("use_tucker")) or _flag(data.get("use_cp")):
        out["use_tucker"] = True
    if out["network_type"] == "lokr":
        factor = _given(data, "factor")
        if factor not in (None, -1):
            out["lokr_factor"] = int(factor)
        out["lokr_decompose_both"] = _flag(data.get("decompose_both"))
        out["lokr_full_matrix"] = _flag(data.get("full_matrix"))
    if out.pop("dropout", 0):
        notes.append(f"network_dropout = {data['network_dropout']}: {kind} takes rank and module dropout only here, "
                     "ignored")
    if out.get("use_tucker") and not out.get("conv_rank"):
        out.pop("use_tucker")
        notes.append("use_tucker without conv_dim: no convolution is trained, ignored")
    for key in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
        if out.pop(key, 0):
            notes.append(f"{key}: LoRA+ applies to LoRA only, ignored for {kind}")


def _import_rates(data: dict, out: dict, notes: list[str]) -> None:
    """learning_rate / unet_lr / text_encoder_lr with sd-scripts' precedence, and a text encoder left untrained."""
    lr, unet, te = _given(data, "learning_rate"), _given(data, "unet_lr"), _given(data, "text_encoder_lr")
    if unet not in (None, 0):
        out["unet_lr"] = float(unet)
        if lr not in (None, 0) and lr != unet:
            notes.append(f"learning_rate {lr} and unet_lr {unet} both set: sd-scripts uses unet_lr for the UNet, so do we")
    elif lr not in (None, 0):
        out["unet_lr"] = float(lr)
    if te is not None:
        if te == 0:
            out["train_text_encoder"] = False
            notes.append("text_encoder_lr = 0: the text encoder is not trained")
        else:
            out["text_encoder_lr"] = float(te)
    elif lr not in (None, 0):
        out["text_encoder_lr"] = float(lr)
    if data.get("network_train_unet_only") is True:
        out["train_text_encoder"] = False


def _import_schedule(data: dict, out: dict, notes: list[str]) -> None:
    """Optimizer, LR scheduler, steps or epochs, and kohya_ss's warm-up percentage."""
    if str(data.get("optimizer", "")):
        opt = optimizers.from_kohya(data["optimizer"])
        if opt:
            out["optimizer"] = opt.key
            args = str(data.get("optimizer_args", "")).replace(",", " ").lower().split()
            if opt.key == "adafactor":  # kohya_ss's Adafactor runs with relative steps unless its args say not
                out["adafactor_relative_step"] = "relative_step=false" not in args
        else:
            notes.append(f"optimizer '{data['optimizer']}' is not supported ({', '.join(optimizers.KEYS)}): keeping adamw")
    sch = str(data.get("lr_scheduler", "")).lower()
    if sch:
        if sch in _SCHEDULERS:
            out["lr_scheduler"] = _SCHEDULERS[sch]
        else:
            notes.append(f"lr_scheduler '{data['lr_scheduler']}' is not supported: using cosine")
            out["lr_scheduler"] = "cosine"
    warm = data.get("lr_warmup")
    steps = _given(data, "max_train_steps")
    if steps:
        out["max_steps"] = int(steps)
    if data.get("epoch") not in (None, ""):
        out["epochs"] = int(_num(data["epoch"]))
    if warm not in (None, "", 0, "0"):
        w = _num(warm)
        # kohya_ss's lr_warmup is a percentage of the steps
        if steps:
            out["warmup_steps"] = int(round(steps * float(w) / 100))
        else:
            notes.append(f"lr_warmup {w}% needs max_train_steps to be turned into steps: ignored")


def _import_precision_and_files(data: dict, out: dict, notes: list[str]) -> None:
    """Resolution, precisions, caption extension, v-prediction, fp8 base, class images."""
    if data.get("max_resolution"):
        try:
            w, h = (int(x) for x in str(data["max_resolution"]).split(","))
            out["resolution"] = int((w * h) ** 0.5) // 8 * 8
            if w != h:
                notes.append(f"max_resolution {w},{h} is not square: using {out['resolution']} (same area)")
        except ValueError:
            notes.append(f"max_resolution '{data['max_resolution']}' not understood: ignored")
    mp = str(data.get("mixed_precision", "")).lower()
    if mp in _PRECISION and _PRECISION[mp] != "fp32":
        out["mixed_precision"] = _PRECISION[mp]
    sp = str(data.get("save_precision", "")).lower()
    if sp in _PRECISION and _PRECISION[sp] != "no":
        out["save_precision"] = _PRECISION[sp]
    if data.get("caption_extension"):
        ext = str(data["caption_extension"])
        out["caption_extension"] = ext if ext.startswith(".") else "." + ext
    if data.get("v_parameterization") is True:
        out["prediction_type"] = "v_prediction"
    if data.get("fp8_base") is True:
        out["base_quantization"] = "fp8"
    if data.get("reg_data_dir") not in (None, ""):
        out["reg_dataset"] = str(data["reg_data_dir"])
        notes.append(f"reg_data_dir: class images from {data['reg_data_dir']} (check that the folder exists here)")


def _import_logging(data: dict, out: dict, notes: list[str]) -> None:
    log_with = str(data.get("log_with", "")).lower()
    if log_with in ("tensorboard", "all") or (data.get("logging_dir") not in (None, "") and log_with in ("", "tensorboard")):
        out["tensorboard"] = True
        notes.append("logging_dir: TensorBoard logs go to the run's tensorboard/ folder")
    elif log_with not in ("", "none"):
        notes.append(f"log_with = '{data['log_with']}': only TensorBoard is supported, not turned on")


def import_kohya_file(path: str | Path) -> tuple[dict, list[str]]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{Path(path).name} is not a readable kohya_ss JSON file ({e}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"{Path(path).name} does not hold a kohya_ss config (expected a JSON object).")
    return import_kohya(data)


def sd_scripts_conditional(cfg: TrainConfig, fam) -> dict:
    """The sd-scripts keys a run has only in some cases: its length, network_args, v-prediction, Adafactor's mode, the
    regularisation folder, fp8, the VAE's precision and TensorBoard."""
    d: dict = {}
    if cfg.max_steps:
        d["max_train_steps"] = cfg.max_steps
    else:
        d["max_train_epochs"] = cfg.epochs
    # the file's own network_args (trainer/loras/format.py), less LyCORIS' dora_wd: sd-scripts' networks.lora has no DoRA
    args = [f"{k}={v}" for k, v in network_args(cfg).items() if k != "dora_wd"]
    if args:
        d["network_args"] = args
    if cfg.prediction_type == "v_prediction" or (cfg.prediction_type == "auto" and fam.prediction_type == "v_prediction"):
        d["v_parameterization"] = True
    if cfg.optimizer == "adafactor":  # sd-scripts' Adafactor defaults to relative steps; say which mode this is
        rel = cfg.adafactor_relative_step
        d["optimizer_args"] = [f"relative_step={rel}", f"scale_parameter={rel}", f"warmup_init={rel}"]
    if cfg.reg_dataset:
        d["reg_data_dir"] = cfg.reg_dataset
    if cfg.base_quantization == "fp8":
        d["fp8_base"] = True
    if cfg.mixed_precision != "no":  # sd-scripts' VAE takes the run's precision unless told otherwise
        d["no_half_vae"] = cfg.vae_precision == "fp32"
    if cfg.tensorboard:
        d["log_with"], d["logging_dir"] = "tensorboard", str(RunFiles(cfg.output_dir).tensorboard)
    return d


def to_sd_scripts_toml(cfg: TrainConfig) -> str:
    """An sd-scripts (train_network.py --config_file) TOML of the same run."""
    fam = families.resolve(cfg.model_family, cfg.resolution)
    values = {**cfg.to_dict(), "min_bucket": cfg.bucket_range[0], "max_bucket": cfg.bucket_range[1]}
    d = {
        "pretrained_model_name_or_path": cfg.base_model,
        "train_data_dir": cfg.dataset,
        "output_dir": cfg.output_dir,
        "output_name": cfg.output_name,
        "save_model_as": "safetensors",
        "network_module": "networks.lora" if cfg.network_type == "lora" else "lycoris.kohya",
        "resolution": f"{cfg.resolution},{cfg.resolution}",
        "bucket_reso_steps": cfg.bucket_step,
        "unet_lr": cfg.unet_lr,
        "text_encoder_lr": cfg.text_encoder_lr if cfg.train_text_encoder else 0.0,
        "network_train_unet_only": not cfg.train_text_encoder,
        "optimizer_type": optimizers.get(cfg.optimizer).sd_scripts,
        "lr_scheduler": cfg.lr_scheduler,
        "lr_warmup_steps": cfg.warmup_steps,
        "max_grad_norm": cfg.max_grad_norm,
        "mixed_precision": cfg.mixed_precision,
        "save_precision": {"fp16": "fp16", "bf16": "bf16", "fp32": "float"}[cfg.save_precision],
        "sdpa": True,
        "caption_extension": cfg.caption_extension,
    }
    for key, field, _ in NUMBERS:
        if key not in TOML_ELSEWHERE and (values[field] or key not in TOML_ONLY_WHEN_SET):
            d[key] = values[field]
    for key, field in CHOICES:
        d[key] = values[field]
    for key, field in FLAGS:
        if key == "cache_text_encoder_outputs":  # sd-scripts refuses it beside a trained text encoder
            if cfg.caches_text:
                d[key] = True
        else:
            d[key] = values[field]
    d.update(sd_scripts_conditional(cfg, fam))
    header = "# sd-scripts config exported by LoRA Studio. Run: accelerate launch "
    header += fam.sd_scripts_trainer + " --config_file THIS.toml\n"
    if cfg.network_type != "lora":
        header += "# LoHa / LoKr train through LyCORIS: pip install lycoris-lora in sd-scripts' environment.\n"
    return header + dumps_toml(d)
