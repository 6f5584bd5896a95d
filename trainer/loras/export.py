"""peft LoRA state -> the kohya `.safetensors` layout that A1111 / Forge / ComfyUI / diffusers load.

See shared/design/LORA_FORMAT.md. The trained alpha is stored per module; SDXL UNet names are written in
SGM/LDM form (`input_blocks_4_1_...`), SD1/SD2 UNet names in diffusers form.
"""
from __future__ import annotations

import json
import re
import time
from datetime import datetime, timezone

import torch

from trainer.loras.format import DTYPES, LYCO_KEYS, LycoModule, cp_rebuild, Module, module_name, pack, write
from trainer.loras.metadata import network_args, num
from trainer.models import families
from trainer.recipe.config import file_name


def to_kohya(parts: dict[str, tuple[dict, dict]], family: str, layout: dict,
             dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """parts: {'unet'|'te1'|'te2': (peft state dict, {module path: alpha})} -> kohya tensors.

    DoRA modules (a `lora_magnitude_vector`, trained column-wise: see models/lora.py) also get `dora_scale`,
    shaped [1, in] (conv: [1, in, 1, 1]) as ComfyUI and A1111 broadcast it, and their alpha / rank is folded into
    `lora_up` with alpha written = rank: A1111 applies alpha / rank after the decomposition and ComfyUI before
    it, so only a scale of 1 makes both compute the weight that was trained."""
    out: dict = {}
    lyco = "|".join(k for keys in LYCO_KEYS.values() for k in keys)
    for part, (state, alphas) in parts.items():
        modules = {}
        for key, tensor in state.items():
            m = re.match(rf"(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector|{lyco})$", key)
            if not m:
                raise ValueError(f"Unexpected LoRA key '{key}'")
            modules.setdefault(m[1], {})[m[2]] = tensor.detach().float()
        for module, t in modules.items():
            if module not in alphas:
                raise ValueError(f"No alpha recorded for module '{module}'")
            if "lora_A.weight" not in t:  # LoHa / LoKr: peft's tensors are LyCORIS' own, and so is the scale
                kind = "loha" if any(k.startswith("hada_") for k in t) else "lokr"  # (alpha / rank; 1 for whole LoKr)
                out[module_name(part, module, family, layout)] = whole_tucker_lokr(LycoModule(kind, t, float(alphas[module])))
                continue
            down, up, alpha = t["lora_A.weight"], t["lora_B.weight"], float(alphas[module])
            scale = None
            if "lora_magnitude_vector" in t:
                rank = down.shape[0]
                up, alpha = up * (alpha / rank), float(rank)
                scale = t["lora_magnitude_vector"].reshape(1, -1, *[1] * (down.dim() - 2))
            out[module_name(part, module, family, layout)] = Module(down, up, alpha, scale)
    return pack(out, dtype)


def whole_tucker_lokr(m: LycoModule) -> LycoModule:
    """A LoKr conv trained with a Tucker (CP) second factor is written with that factor rebuilt, as a whole 4-D
    `lokr_w2` (a few thousand numbers: LoKr's factors are small): ComfyUI fails on `lokr_t2` (its kron of the
    non-contiguous rebuild raises, and the module is skipped: ComfyUI #11245). Exact: when the first factor is
    low-rank, loaders still take the scale from its rank; when it is whole, the scale goes into `lokr_w2`, since
    loaders apply whole LoKr modules at scale 1."""
    if m.kind != "lokr" or "lokr_t2" not in m.weights:
        return m
    w = dict(m.weights)
    rank = w["lokr_t2"].shape[0]
    w2 = cp_rebuild(w.pop("lokr_t2"), w.pop("lokr_w2_a"), w.pop("lokr_w2_b"))
    w["lokr_w2"] = w2 if "lokr_w1_b" in w else w2 * (m.alpha / rank)
    return LycoModule("lokr", w, m.alpha if "lokr_w1_b" in w else float(rank))


def export_parts(parts, cfg, layout: dict, info: dict, path, precision: str | None = None) -> None:
    """Write the kohya file of checkpoint `parts` (see checkpoint.pack_parts) for a run of `cfg`.
    `layout` is the architecture facts a checkpoint's state.json keeps; `info` the run facts for the metadata."""
    family = layout["family"]
    layout = {**layout, "up_has_attn": {int(k): v for k, v in layout.get("up_has_attn", {}).items()}}
    tensors = to_kohya(parts, family, layout, DTYPES[precision or cfg.save_precision])
    info = {"finished_at": time.time(), **info}
    meta = build_metadata(cfg, family, info)
    meta["ss_save_precision"] = precision or cfg.save_precision
    meta["ss_lora_studio_config"] = json.dumps(cfg.public_dict(), ensure_ascii=False)
    write(path, tensors, meta, modelspec(cfg, family, info))


def build_metadata(cfg, family: str, info: dict) -> dict[str, str]:
    """The `ss_*` and `modelspec.*` metadata web UIs and model sites read. Every value a string."""
    triggers = cfg.trigger_words
    md = {
        "ss_network_module": "networks.lora" if cfg.network_type == "lora" else "lycoris.kohya",
        "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": num(cfg.alpha),
        "ss_network_args": json.dumps(network_args(cfg)) if network_args(cfg) else None,
        "ss_base_model_version": families.family(family).base_version,
        "ss_v2": str(families.family(family).is_v2),
        "ss_output_name": cfg.output_name,
        "ss_training_started_at": str(int(info.get("started_at", time.time()))),
        "ss_training_finished_at": str(int(info.get("finished_at", time.time()))),
        "ss_steps": str(info.get("steps", 0)),
        "ss_epoch": str(info.get("epoch", 0)),
        "ss_learning_rate": num(cfg.unet_lr),
        "ss_unet_lr": num(cfg.unet_lr),
        "ss_text_encoder_lr": num(cfg.text_encoder_lr if cfg.train_text_encoder else 0.0),
        "ss_optimizer": cfg.optimizer,
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": str(cfg.warmup_steps),
        "ss_num_train_images": str(info.get("num_train_images", 0)),
        "ss_num_reg_images": str(info.get("num_reg_images", 0)),
        "ss_prior_loss_weight": str(cfg.prior_loss_weight),
        "ss_min_timestep": str(cfg.min_timestep),
        "ss_max_timestep": str(cfg.max_timestep),
        "ss_masked_loss": str(cfg.masked_loss),
        "ss_fp8_base": str(cfg.base_quantization == "fp8"),  # kohya's key for its fp8 base
        "lora_studio_base_quantization": cfg.base_quantization,
        "ss_batch_size_per_device": str(cfg.batch_size),
        "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation),
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_seed": str(cfg.seed),
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_clip_skip": str(cfg.clip_skip),
        "ss_noise_offset": num(cfg.noise_offset) if cfg.noise_offset else None,
        "ss_min_snr_gamma": num(cfg.min_snr_gamma) if cfg.min_snr_gamma else None,
        "ss_network_dropout": num(cfg.dropout) if cfg.dropout else None,
        "ss_sd_model_name": file_name(info.get("model_name", cfg.base_model)),
        "ss_keep_tokens": str(cfg.keep_tokens),
        "ss_shuffle_caption": str(cfg.shuffle_tags),
        "ss_caption_dropout_rate": num(cfg.caption_dropout),
        "ss_flip_aug": str(cfg.flip),
        "ss_cache_latents": str(cfg.cache_latents),
        "ss_enable_bucket": str(cfg.enable_buckets),
        "ss_min_bucket_reso": str(cfg.bucket_range[0]),
        "ss_max_bucket_reso": str(cfg.bucket_range[1]),
        "ss_tag_frequency": json.dumps(info.get("tag_frequency", {}), ensure_ascii=False),
        "ss_dataset_dirs": json.dumps(info.get("dataset_dirs", {}), ensure_ascii=False),
        "ss_training_comment": f"trigger: {', '.join(triggers)}" if triggers else None,
        "ss_trigger_words": json.dumps(triggers, ensure_ascii=False),
        "ss_prediction_type": info.get("prediction_type", "epsilon"),
        "ss_v_parameterization": str(info.get("prediction_type") == "v_prediction"),
        "ss_zero_terminal_snr": str(bool(info.get("zero_terminal_snr", False))),
        # a sweep's variant: its name and the settings that set it apart from the run's others
        "ss_lora_studio_variant": json.dumps({"name": info["variant"], **info.get("variant_settings", {})})
        if info.get("variant") else None,
        "ss_ema": "True" if info.get("ema") else None,  # the EMA of the trained weights (OneTrainer's term)
        "ss_ema_decay": num(cfg.ema_decay) if info.get("ema") else None,
        **objective_metadata(cfg),
    }
    return {k: v for k, v in md.items() if v is not None}


def objective_metadata(cfg) -> dict[str, str]:
    """The loss and noise options under kohya's metadata keys (those that are off are left out, as kohya's are
    None then; the loss type and debiased estimation are always written, as kohya does)."""
    md = {"ss_loss_type": cfg.loss_type, "ss_debiased_estimation": str(cfg.debiased_estimation_loss)}
    if cfg.loss_type in ("huber", "smooth_l1"):
        md.update(ss_huber_schedule=cfg.huber_schedule, ss_huber_c=num(cfg.huber_c), ss_huber_scale=num(cfg.huber_scale))
    if cfg.multires_noise_iterations:
        md.update(ss_multires_noise_iterations=str(cfg.multires_noise_iterations),
                  ss_multires_noise_discount=num(cfg.multires_noise_discount))
    if cfg.adaptive_noise_scale:
        md["ss_adaptive_noise_scale"] = num(cfg.adaptive_noise_scale)
    if cfg.ip_noise_gamma:
        md.update(ss_ip_noise_gamma=num(cfg.ip_noise_gamma),
                  ss_ip_noise_gamma_random_strength=str(cfg.ip_noise_gamma_random_strength))
    if cfg.v_pred_like_loss:
        md["ss_v_pred_like_loss"] = num(cfg.v_pred_like_loss)
    return md


def modelspec(cfg, family: str, info: dict) -> dict[str, str]:
    return {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": families.family(family).architecture,
        "modelspec.implementation": families.family(family).implementation,
        "modelspec.title": cfg.output_name,
        "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
        "modelspec.date": datetime.fromtimestamp(info.get("finished_at", time.time()), timezone.utc).isoformat(timespec="seconds"),
        "modelspec.prediction_type": "v" if info.get("prediction_type") == "v_prediction" else "epsilon",
        "modelspec.trigger_phrase": ", ".join(cfg.trigger_words),
        "modelspec.tags": ", ".join(cfg.trigger_words),
    }
