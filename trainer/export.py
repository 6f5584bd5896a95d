"""peft LoRA state -> the kohya `.safetensors` layout that A1111 / Forge / ComfyUI / diffusers load.

See shared/design/LORA_FORMAT.md. The trained alpha is stored per module; SDXL UNet names are written in
SGM/LDM form (`input_blocks_4_1_...`), SD1/SD2 UNet names in diffusers form.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import time
from datetime import datetime, timezone

import torch

from trainer.config import file_name
from trainer.fsutil import atomic_write_bytes
from trainer.models import families

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "conv_shortcut": "skip_connection", "time_emb_proj": "emb_layers.1"}


def part_prefix(family: str, part: str) -> str:
    if part == "unet":
        return "lora_unet_"
    if family == "sdxl":
        return {"te1": "lora_te1_", "te2": "lora_te2_"}[part]
    return "lora_te_"


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return _RESNET.get(head, head) + (("." + tail) if tail else "")


def diffusers_to_sgm(path: str, layers_per_block: int, up_has_attn: dict[int, bool] | None = None) -> str:
    """Map a diffusers SDXL UNet module path to the SGM path kohya writes (input/middle/output_blocks)."""
    n = layers_per_block + 1
    m = re.match(r"down_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)", path)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = i * n + j + 1
        return f"input_blocks.{idx}.1.{rest}" if kind == "attentions" else f"input_blocks.{idx}.0.{_resnet(rest)}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv(.*)", path)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * n}.0.op{m[2]}"
    m = re.match(r"mid_block\.(attentions|resnets)\.(\d+)\.(.+)", path)
    if m:
        if m[1] == "attentions":
            return f"middle_block.1.{m[3]}"
        return f"middle_block.{0 if m[2] == '0' else 2}.{_resnet(m[3])}"
    m = re.match(r"up_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)", path)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = i * n + j
        return f"output_blocks.{idx}.1.{rest}" if kind == "attentions" else f"output_blocks.{idx}.0.{_resnet(rest)}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv(.*)", path)
    if m:
        i = int(m[1])
        pos = 2 if (up_has_attn or {}).get(i, True) else 1
        return f"output_blocks.{i * n + layers_per_block}.{pos}.conv{m[2]}"
    return path  # conv_in, time_embedding, ... are not targeted by default


def clip_path(module: str) -> str:
    """CLIP module path as in the original CLIP / transformers<5 layout ('text_model.encoder...').
    transformers 5's CLIPTextModel drops the 'text_model.' level; kohya names keep it."""
    return module if module.startswith("text_model.") else "text_model." + module


def kohya_name(part: str, module: str, family: str, layers_per_block: int = 2,
               up_has_attn: dict[int, bool] | None = None) -> str:
    """The kohya name of a module: prefix + module path (SGM names for the SDXL UNet) with '.' -> '_'."""
    if part == "unet":
        path = diffusers_to_sgm(module, layers_per_block, up_has_attn) if family == "sdxl" else module
    else:
        path = clip_path(module)
    return part_prefix(family, part) + path.replace(".", "_")


def to_kohya(parts: dict[str, tuple[dict, dict]], family: str, layers_per_block: int = 2,
             up_has_attn: dict[int, bool] | None = None, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """parts: {'unet'|'te1'|'te2': (peft state dict, {module path: alpha})} -> kohya tensors.

    DoRA modules (a `lora_magnitude_vector`, trained column-wise: see models/lora.py) also get `dora_scale`,
    shaped [1, in] (conv: [1, in, 1, 1]) as ComfyUI and A1111 broadcast it, and their alpha / rank is folded into
    `lora_up` with alpha written = rank: A1111 applies alpha / rank after the decomposition and ComfyUI before
    it, so only a scale of 1 makes both compute the weight that was trained."""
    out: dict[str, torch.Tensor] = {}
    for part, (state, alphas) in parts.items():
        modules = {}
        for key, tensor in state.items():
            m = re.match(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$", key)
            if not m:
                raise ValueError(f"Unexpected LoRA key '{key}'")
            modules.setdefault(m[1], {})[m[2]] = tensor.detach().float()
        for module, t in modules.items():
            if module not in alphas:
                raise ValueError(f"No alpha recorded for module '{module}'")
            name = kohya_name(part, module, family, layers_per_block, up_has_attn)
            down, up, alpha = t["lora_A.weight"], t["lora_B.weight"], float(alphas[module])
            if "lora_magnitude_vector" in t:
                rank = down.shape[0]
                up, alpha = up * (alpha / rank), float(rank)
                out[f"{name}.dora_scale"] = t["lora_magnitude_vector"].reshape(1, -1, *[1] * (down.dim() - 2)).to(dtype).contiguous()
            out[f"{name}.lora_down.weight"] = down.to("cpu", dtype).contiguous()
            out[f"{name}.lora_up.weight"] = up.to("cpu", dtype).contiguous()
            out[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return out


def export_parts(parts, cfg, layout: dict, info: dict, path, precision: str | None = None) -> None:
    """Write the kohya file of checkpoint `parts` (see checkpoint.pack_parts) for a run of `cfg`.
    `layout` is the architecture facts a checkpoint's state.json keeps; `info` the run facts for the metadata."""
    family = layout["family"]
    up_has_attn = {int(k): v for k, v in layout.get("up_has_attn", {}).items()}
    tensors = to_kohya(parts, family, layout["layers_per_block"], up_has_attn, DTYPES[precision or cfg.save_precision])
    info = {"finished_at": time.time(), **info}
    meta = build_metadata(cfg, family, info)
    meta["ss_save_precision"] = precision or cfg.save_precision
    meta["ss_lora_studio_config"] = json.dumps(cfg.public_dict(), ensure_ascii=False)
    write_lora(path, tensors, meta, modelspec(cfg, family, info))


def _hashes(tensors: dict[str, torch.Tensor], ss_metadata: dict[str, str]) -> tuple[str, str]:
    """kohya's sshs_model_hash (bytes after the header) and sshs_legacy_hash (64 KiB at 1 MiB)."""
    from safetensors.torch import save

    data = save(tensors, metadata=ss_metadata)
    n = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + n :]).hexdigest()
    legacy = hashlib.sha256(io.BytesIO(data).getbuffer()[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy


def build_metadata(cfg, family: str, info: dict) -> dict[str, str]:
    """The `ss_*` and `modelspec.*` metadata web UIs and model sites read. Every value a string."""
    triggers = cfg.trigger_words
    md = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": _num(cfg.alpha),
        "ss_network_args": network_args(cfg),
        "ss_base_model_version": families.family(family).base_version,
        "ss_v2": str(families.family(family).is_v2),
        "ss_output_name": cfg.output_name,
        "ss_training_started_at": str(int(info.get("started_at", time.time()))),
        "ss_training_finished_at": str(int(info.get("finished_at", time.time()))),
        "ss_steps": str(info.get("steps", 0)),
        "ss_epoch": str(info.get("epoch", 0)),
        "ss_learning_rate": _num(cfg.unet_lr),
        "ss_unet_lr": _num(cfg.unet_lr),
        "ss_text_encoder_lr": _num(cfg.text_encoder_lr if cfg.train_text_encoder else 0.0),
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
        "ss_noise_offset": _num(cfg.noise_offset) if cfg.noise_offset else None,
        "ss_min_snr_gamma": _num(cfg.min_snr_gamma) if cfg.min_snr_gamma else None,
        "ss_network_dropout": _num(cfg.dropout) if cfg.dropout else None,
        "ss_sd_model_name": file_name(info.get("model_name", cfg.base_model)),
        "ss_keep_tokens": str(cfg.keep_tokens),
        "ss_shuffle_caption": str(cfg.shuffle_tags),
        "ss_caption_dropout_rate": _num(cfg.caption_dropout),
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
    }
    return {k: v for k, v in md.items() if v is not None}


def network_args(cfg) -> str | None:
    """kohya's ss_network_args: LoCon's conv_dim / conv_alpha, LyCORIS' dora_wd for DoRA."""
    args = {}
    if cfg.conv_rank:
        args.update(conv_dim=str(cfg.conv_rank), conv_alpha=_num(cfg.conv_alpha))
    if cfg.use_dora:
        args["dora_wd"] = "True"
    from trainer.models import blocks

    for name in blocks.FIELDS:  # kohya writes per-block settings into network_args, as strings
        if getattr(cfg, name):
            args[name] = getattr(cfg, name)
    if any(getattr(cfg, n) for n in ("down_lr_weight", "mid_lr_weight", "up_lr_weight")):
        args["block_lr_zero_threshold"] = _num(cfg.block_lr_zero_threshold)
    return json.dumps(args) if args else None


def modelspec(cfg, family: str, info: dict) -> dict[str, str]:
    return {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": families.family(family).architecture,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if family == "sdxl" else "diffusers",
        "modelspec.title": cfg.output_name,
        "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
        "modelspec.date": datetime.fromtimestamp(info.get("finished_at", time.time()), timezone.utc).isoformat(timespec="seconds"),
        "modelspec.prediction_type": "v" if info.get("prediction_type") == "v_prediction" else "epsilon",
        "modelspec.trigger_phrase": ", ".join(cfg.trigger_words),
        "modelspec.tags": ", ".join(cfg.trigger_words),
    }


def write_lora(path, tensors: dict[str, torch.Tensor], ss_meta: dict[str, str], extra_meta: dict[str, str]) -> None:
    """Write atomically, with kohya's hashes computed over the file with the ss_* metadata only."""
    from safetensors.torch import save

    ss_only = {k: v for k, v in ss_meta.items() if k.startswith("ss_")}
    model_hash, legacy = _hashes(tensors, ss_only)
    meta = {**ss_meta, **extra_meta, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def _num(x: float) -> str:
    return repr(float(x)) if not float(x).is_integer() else str(int(x)) if abs(x) >= 1 else repr(float(x))
