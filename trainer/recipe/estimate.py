"""Peak-VRAM estimate from a config, before anything is loaded (torch-free).

Component sizes are the real architectures' parameter counts; LoRA sizes are counted from the targeted
modules' shapes. Activation figures are per image at the family's native resolution, scaled by pixel count
and batch, calibrated against `python -m trainer memory` (trainer/measure/memory.py, figures in BENCHMARKS.md).
"""
from __future__ import annotations

from trainer.models import families
from trainer.recipe import optimizers

GB = 1024**3
# Activation, sampling and linear-share figures are each family's own (trainer/models/families/, `calibration`).
VAE_ENCODE_GB_PER_MPIX = 2.5  # the fp32 VAE encoder's activations while caching latents, per megapixel (bf16: half)
# What a CUDA card needs beyond its tensors (trainer/measure/memory.py says how these were chosen). Both are
# assumptions, not measurements: `python -m trainer memory --cuda-check` (trainer/measure/cuda_check.py) reads them
# on a GPU, and no GPU has yet.
CUDA_CONTEXT_GB = 0.4  # the CUDA context, cuBLAS / cuDNN handles and kernels, outside torch's allocator: a floor
# (reports of 0.45-0.8 GB with cuDNN and bitsandbytes kernels loaded, issue 31)
# cuBLAS workspaces, in torch's allocator but made by no op the counter sees: one per (handle, stream), and a run
# has two handles (its own thread and autograd's backward thread). Each is cuBLAS's 8.125 MiB (PyTorch's
# default ":4096:2:16:8") plus cuBLASLt's 1-4 MiB (PyTorch #120925: 4 MiB on 24 GB Ampere cards; 32 MiB each on
# Hopper, whose cards are not this estimate's audience).
CUBLAS_WORKSPACE_GB = 2 * (8.125 + 4) / 1024
ALLOCATOR_SLACK = 0.08  # the caching allocator's block rounding and fragmentation, as a share of the peak: no source;
# with expandable segments (set in every engine process) fragmentation should be lower, which the check will show


def _modules(unet: dict, te_configs: list[dict], attention_only: bool):
    """(block, (in, out)) of every module kohya's LoRA targets, from the configs alone (no torch, no weights):
    a rank-r LoRA on such a module has r * (in + out) parameters."""
    tlpb = unet.get("transformer_layers_per_block", 1)
    boc, lpb, cross = unet["block_out_channels"], unet["layers_per_block"], unet["cross_attention_dim"]
    tl = tlpb if isinstance(tlpb, list) else [tlpb] * len(boc)

    def attention(c: int, blocks: int):
        per = [(c, c)] * 4 + [(c, c), (cross, c), (cross, c), (c, c)]  # attn1 q k v out, attn2 q k v out
        if not attention_only:
            per += [(c, 8 * c), (4 * c, c)]  # ff.net.0.proj (GEGLU: 2 x 4c out), ff.net.2
        return ([(c, c), (c, c)] if not attention_only else []) + per * blocks  # proj_in, proj_out

    for i, t in enumerate(unet["down_block_types"]):
        if "CrossAttn" in t:
            for j in range(lpb):
                yield from ((f"IN{3 * i + j + 1:02d}", n) for n in attention(boc[i], tl[i]))
    if "CrossAttn" in unet.get("mid_block_type", "UNetMidBlock2DCrossAttn"):
        yield from (("MID", n) for n in attention(boc[-1], tl[-1]))
    for i, t in enumerate(unet["up_block_types"]):
        if "CrossAttn" in t:
            c, tt = boc[::-1][i], tl[::-1][i]
            for j in range(lpb + 1):
                yield from ((f"OUT{3 * i + j:02d}", n) for n in attention(c, tt))
    for te in te_configs:
        d, m = te["hidden_size"], te["intermediate_size"]
        yield from ((None, n) for n in [(d, d)] * 4 * te["num_hidden_layers"] + [(d, m), (m, d)] * te["num_hidden_layers"])


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """LoKr's split of a dimension into (m, n) with m * n = dim, as peft's LoKr layers (which we train) make it:
    (factor, dim // factor) when `factor` divides dim (LyCORIS would put the smaller first), else the divisor
    pair nearest a square with m <= n and m at most `factor`."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = dim if factor < 0 else factor
    m, n = 1, dim
    while m < n:
        new_m = next(k for k in range(m + 1, dim + 1) if dim % k == 0)
        if new_m + dim // new_m > m + n or new_m > limit:
            break
        m, n = new_m, dim // new_m
    return (m, n) if m <= n else (n, m)


def module_params(cfg, r: int, fan_in: int, fan_out: int) -> int:
    """Parameters of one module of the config's network type at rank r (0: none)."""
    if r <= 0:
        return 0
    if cfg.network_type == "loha":
        return 2 * r * (fan_in + fan_out)
    if cfg.network_type == "lokr":
        (a, b), (c, d) = factorization(fan_out, cfg.lokr_factor), factorization(fan_in, cfg.lokr_factor)
        if cfg.lokr_full_matrix:
            return a * c + b * d
        w1 = r * (a + c) if cfg.lokr_decompose_both and r < max(a, c) / 2 else a * c
        w2 = r * (b + d) if r < max(b, d) / 2 else b * d
        return w1 + w2
    return r * (fan_in + fan_out)


def lora_param_count(cfg, family: str, config_dir=None) -> int:
    """Adapter parameters of this config on this family (UNet transformer modules and, when trained, the text
    encoders), counted from the targeted modules' shapes with per-block ranks, for LoRA, LoHa or LoKr. LoCon
    convolutions are not counted."""
    import json
    from pathlib import Path

    from trainer.models.blocks import Plan

    d = Path(config_dir) if config_dir else families.family(family).config_dir
    unet = json.loads((d / "unet" / "config.json").read_text())
    tes = [json.loads((d / s / "config.json").read_text()) for s in ("text_encoder", "text_encoder_2")
           if cfg.train_text_encoder and (d / s / "config.json").is_file()]
    plan = Plan(cfg, family)
    return sum(module_params(cfg, plan.rank(block)[0] if block else cfg.rank, fan_in, fan_out)
               for block, (fan_in, fan_out) in _modules(unet, tes, cfg.network_target == "attention"))


TE_LINEAR_SHARE = 0.95  # CLIP text encoders: all but the embeddings and norms
BYTES_PER_WEIGHT = {"fp8": 1.0, "int8": 1.0, "nf4": 0.5 + 4 / 64}  # nf4: 4 bits + an fp32 scale per 64 weights


def base_bytes(quantization: str, wbytes: float, linear_share: float) -> float:
    """Bytes per frozen weight: fp8 stores Linear and Conv weights in 1 byte; int8 / nf4 the Linear ones."""
    q = BYTES_PER_WEIGHT.get(quantization)
    if q is None:
        return wbytes
    if quantization == "fp8":
        return q
    return linear_share * q + (1 - linear_share) * wbytes


def estimate_vram_gb(cfg, family: str) -> dict:
    """Peak VRAM of a run, phase by phase as `python -m trainer memory` counts them (caching latents, caching
    text-encoder outputs, the steps, sampling), plus the CUDA terms. Returns total_gb, the peak phase, its
    terms in GB and the biggest of them, and the LoRA parameter count."""
    from trainer.data.buckets import encode_batch

    spec = families.resolve(family, cfg.resolution)
    group = families.family(spec.group)  # the calibration was measured on the group's own family
    cal = group.calibration
    unet, te, vae = group.params
    wbytes = 2 if cfg.mixed_precision in ("fp16", "bf16") else 4
    q = getattr(cfg, "base_quantization", "none")
    unet_w = unet * base_bytes(q, wbytes, cal.linear_share)
    te_w = te * (wbytes if cfg.train_text_encoder else base_bytes(q, wbytes, TE_LINEAR_SHARE))
    lora, lora_state = network_state(cfg, spec.key)
    pixels = cfg.resolution * cfg.resolution
    scale = pixels / group.native_resolution ** 2
    act = cal.act_gb[1 if cfg.gradient_checkpointing else 0] * scale * cfg.batch_size * GB
    if cfg.mixed_precision == "no":
        act *= 2
    nets = f" ({len(cfg.variants)} variants)" if getattr(cfg, "variants", None) else ""
    vae_bytes = 2 if getattr(cfg, "vae_precision", "fp32") == "bf16" else 4
    vae_w, vae_term = vae * vae_bytes, f"VAE ({'bf16' if vae_bytes == 2 else 'fp32'})"
    steps = {"UNet weights": unet_w, f"LoRA weights, gradients and optimizer state{nets}": lora_state,
             "activations": act}
    if not cfg.caches_text:
        steps["text encoders"] = te_w
    if not cfg.cache_latents:
        steps[vae_term] = vae_w
    phases = {"training steps": steps}
    if cfg.cache_latents:
        phases["caching latents"] = {vae_term: vae_w, "VAE activations": VAE_ENCODE_GB_PER_MPIX * vae_bytes / 4 * GB
                                     * encode_batch(cfg.resolution, cfg.resolution) * pixels / 1e6}
    if cfg.sample_prompts:  # frozen encoders whose outputs are cached stay parked (prompts encoded at set-up)
        if cfg.samples_lean:  # the UNet and the VAE take turns (a VAE of uncached latents stays all run)
            sampling = {"UNet weights": unet_w, "activations": cal.sample_denoise_act_gb * scale * GB}
            if not cfg.cache_latents:
                sampling[vae_term] = vae_w
            phases["decoding a sample"] = {vae_term: vae_w, "activations": cal.sample_decode_act_gb * scale * GB}
        else:
            sampling = {"UNet weights": unet_w, vae_term: vae_w, "activations": cal.sample_act_gb * scale * GB}
        if not cfg.caches_text:
            sampling["text encoders"] = te_w
        phases["sampling"] = sampling
    peak = max(phases, key=lambda p: sum(phases[p].values()))
    terms = phases[peak]
    counted = sum(terms.values())
    biggest = max(terms, key=terms.get)
    return {"total_gb": round(with_cuda_terms(counted), 1), "phase": peak, "biggest": biggest,
            "terms_gb": {k: round(v / GB, 2) for k, v in terms.items()},
            "weights_gb": round((unet_w + (te_w if not cfg.caches_text else 0)) / GB, 1),
            "activations_gb": round(act / GB, 1), "lora_params_m": round(lora / 1e6, 1)}


def network_state(cfg, family_key: str) -> tuple[int, float]:
    """(LoRA parameters, bytes of their weights, gradients, optimizer state and EMA on the device). A sweep holds
    every variant's (the base, and one pass's activations at a time, are shared)."""
    from trainer.recipe.config import ConfigError
    from trainer.recipe.sweep import variant_configs

    try:
        nets = [v for _, v in variant_configs(cfg)] if getattr(cfg, "variants", None) else [cfg]
    except ConfigError:  # a variant's bad value: the pre-flight check says so
        nets = [cfg]
    params, state = 0, 0.0
    for net in nets:
        try:
            n = lora_param_count(net, family_key)
        except ValueError:  # per-block values for another family: the pre-flight check says so
            n = 0
        ema_bytes = 4 if getattr(net, "ema", False) and net.ema_device == "device" else 0  # 'auto' parks it on small cards
        params += n
        state += n * (4 + 4 + optimizers.get(net.optimizer).state_bytes + ema_bytes)
    return params, state


def with_cuda_terms(counted_bytes: float) -> float:
    """GB a CUDA card needs for this many bytes of tensors: the allocator's slack, the context and the cuBLAS
    workspaces added."""
    return counted_bytes * (1 + ALLOCATOR_SLACK) / GB + CUDA_CONTEXT_GB + CUBLAS_WORKSPACE_GB
