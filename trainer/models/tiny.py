"""Tiny random-weight SD1 / SD2-v / SDXL pipelines from a few config numbers.

Used by the tests and by `python -m trainer bench --model tiny`. Nothing is
downloaded: the tokenizer is a byte-level CLIP BPE with no merges, built here.
"""
from __future__ import annotations

from pathlib import Path

import torch


def byte_level_vocab() -> dict[str, int]:
    """The first 512 entries of CLIP's vocab (bytes and bytes+'</w>') plus the two special tokens."""
    # GPT-2/CLIP's reversible byte -> printable-unicode table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def tiny_tokenizer(max_length: int = 77, pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(vocab=byte_level_vocab(), merges=[], pad_token=pad_token)
    tok.model_max_length = max_length
    return tok


def _text_encoder(tok, hidden: int, with_projection: bool, act: str, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=tok.model_max_length,
        projection_dim=hidden,
        hidden_act=act,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(cfg).eval()


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # 4 levels -> latents are 1/8 of the image side, as in the real SD VAE.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 16, 16],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    ).eval()


def build_tiny_pipeline(family: str = "sd1", seed: int = 0):
    """A complete tiny pipeline of the given family ('sd1', 'sd2v', 'sdxl') with random weights."""
    if family in ("sd1", "sd2", "sd2v"):
        return _tiny_sd_pipeline(family, seed)
    if family == "sdxl":
        return _tiny_sdxl_pipeline(seed)
    raise ValueError(f"unknown tiny family '{family}' (use sd1, sd2v or sdxl)")


def tiny_unet(seed: int, **family_config):
    """A two-level UNet (32 and 64 channels, 8 px latents) seeded with `seed`; the family's blocks, attention and
    conditioning in `family_config`."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=2, norm_num_groups=8, **family_config).eval()


def _tiny_sd_pipeline(family: str, seed: int):
    """SD 1.x or 2.x (sd2v: v-prediction): one CLIP text encoder, a two-level UNet, DDIM."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    sd2 = family != "sd1"
    tok = tiny_tokenizer(pad_token="!" if sd2 else "<|endoftext|>")
    te = _text_encoder(tok, 32, False, "gelu" if sd2 else "quick_gelu", seed + 1)
    unet = tiny_unet(
        seed,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4) if sd2 else 8,
        use_linear_projection=sd2,
    )
    sched = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if family == "sd2v" else "epsilon",
    )
    return StableDiffusionPipeline(
        vae=tiny_vae(seed + 2),
        text_encoder=te,
        tokenizer=tok,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _tiny_sdxl_pipeline(seed: int):
    """SDXL: two text encoders (the second wider, with a projection), the text-time conditioning, Euler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tok = tiny_tokenizer()
    tok2 = tiny_tokenizer(pad_token="!")
    te = _text_encoder(tok, 32, False, "quick_gelu", seed + 1)
    te2 = _text_encoder(tok2, 64, True, "gelu", seed + 3)  # wider than te1, as in SDXL (768 vs 1280)
    unet = tiny_unet(
        seed,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 64,
        cross_attention_dim=32 + 64,
    )
    sched = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    return StableDiffusionXLPipeline(
        vae=tiny_vae(seed + 2),
        text_encoder=te,
        text_encoder_2=te2,
        tokenizer=tok,
        tokenizer_2=tok2,
        unet=unet,
        scheduler=sched,
    )


def save_tiny_model(folder: str | Path, family: str = "sd1", seed: int = 0) -> Path:
    """Write a tiny pipeline as a diffusers folder and return its path."""
    folder = Path(folder)
    build_tiny_pipeline(family, seed).save_pretrained(folder, safe_serialization=True)
    return folder
