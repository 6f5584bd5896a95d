"""Rough peak-VRAM and time estimate from a config, before anything is loaded (torch-free).

Component sizes are the real architectures' parameter counts. Activation figures are per image at the
family's native resolution, scaled by pixel count and batch; they are starting figures to be replaced by
`python -m trainer bench` measurements on real GPUs (see BENCHMARKS.md).
"""
from __future__ import annotations

from trainer.models import families

GB = 1024**3
ACT_GB = {"sd1": (3.0, 0.9), "sd2": (5.5, 1.4), "sdxl": (9.0, 2.2)}  # (no checkpointing, checkpointing) per image
LORA_PER_RANK = {"sd1": 0.2e6, "sd2": 0.2e6, "sdxl": 0.72e6}  # LoRA params per unit of rank (UNet+TE)


def estimate_vram_gb(cfg, family: str) -> dict:
    fam = families.group(family)
    if fam not in families.FAMILIES:
        fam = "sdxl" if cfg.resolution >= 1024 else "sd1"
    unet, te, vae = families.family(fam).params
    wbytes = 2 if cfg.mixed_precision in ("fp16", "bf16") else 4
    weights = unet * wbytes
    if not cfg.cache_text_encoder_outputs:
        weights += te * wbytes
    if not cfg.cache_latents:
        weights += vae * 4
    lora = LORA_PER_RANK[fam] * cfg.rank * (1 if cfg.train_text_encoder else 0.8)
    opt_bytes = {"adamw": 8, "adamw8bit": 2, "prodigy": 16}[cfg.optimizer]
    train_state = lora * (4 + 4 + opt_bytes)  # weight, grad, optimizer state
    scale = (cfg.resolution / families.family(fam).native_resolution) ** 2 * cfg.batch_size
    act = ACT_GB[fam][1 if cfg.gradient_checkpointing else 0] * scale * GB
    if cfg.mixed_precision == "no":
        act *= 2
    total = weights + train_state + act + 0.6 * GB  # + CUDA context and allocator slack
    return {"total_gb": round(total / GB, 1), "weights_gb": round(weights / GB, 1),
            "activations_gb": round(act / GB, 1), "lora_params_m": round(lora / 1e6, 1)}
