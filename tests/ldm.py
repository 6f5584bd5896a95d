"""Test helper: write a tiny diffusers model as an original-layout ("LDM"/SGM) single-file checkpoint, the way
checkpoints are shared on model sites. Uses the engine's own diffusers->SGM UNet path mapping."""
from __future__ import annotations

import torch
from safetensors.torch import save_file

from trainer.models.ldm_names import diffusers_to_sgm

UNET_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_norm_out": "out.0", "conv_out": "out.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2"}


def unet_to_ldm(unet) -> dict:
    cfg = unet.config
    up_attn = {i: "CrossAttn" in t for i, t in enumerate(cfg.up_block_types)}
    out = {}
    for k, v in unet.state_dict().items():
        mod, _, leaf = k.rpartition(".")
        new = next((k.replace(a, b, 1) for a, b in UNET_TOP.items() if k.startswith(a + ".")), None)
        if new is None:
            new = diffusers_to_sgm(mod, cfg.layers_per_block, up_attn) + "." + leaf
        out["model.diffusion_model." + new] = v
    return out


def vae_to_ldm(vae) -> dict:
    n = len(vae.config.block_out_channels)
    out = {}
    for k, v in vae.state_dict().items():
        new = k
        for i in range(n):
            new = new.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            new = new.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            new = new.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block.")
            new = new.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.")
        for j in range(2):
            new = new.replace(f"mid_block.resnets.{j}.", f"mid.block_{j + 1}.")
        new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
        new = new.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if "mid.attn_1." in new:
            new = (new.replace("group_norm.", "norm.").replace("to_q.", "q.").replace("to_k.", "k.")
                   .replace("to_v.", "v.").replace("to_out.0.", "proj_out."))
            if v.dim() == 2:
                v = v[:, :, None, None]  # LDM attention uses 1x1 convs
        out["first_stage_model." + new] = v
    return out


def clip_to_ldm(te, prefix: str) -> dict:
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in te.state_dict().items()}


def openclip_to_ldm(te, prefix: str) -> dict:
    sd = {k if k.startswith("text_model.") or k == "text_projection.weight" else "text_model." + k: v
          for k, v in te.state_dict().items()}
    out = {prefix + "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           prefix + "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           prefix + "ln_final.bias": sd["text_model.final_layer_norm.bias"]}
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd["text_projection.weight"].T.contiguous()
    for i in range(te.config.num_hidden_layers):
        a, b = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[b + f"attn.in_proj_{part}"] = torch.cat([sd[a + f"self_attn.{x}_proj.{part}"] for x in "qkv"])
            out[b + f"attn.out_proj.{part}"] = sd[a + f"self_attn.out_proj.{part}"]
            out[b + f"ln_1.{part}"] = sd[a + f"layer_norm1.{part}"]
            out[b + f"ln_2.{part}"] = sd[a + f"layer_norm2.{part}"]
            out[b + f"mlp.c_fc.{part}"] = sd[a + f"mlp.fc1.{part}"]
            out[b + f"mlp.c_proj.{part}"] = sd[a + f"mlp.fc2.{part}"]
    return out


def save_single_file(model_dir, path, family: str) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    te = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
    sd = {**unet_to_ldm(unet), **vae_to_ldm(vae)}
    if family == "sdxl":
        te2 = CLIPTextModelWithProjection.from_pretrained(model_dir, subfolder="text_encoder_2")
        sd.update(clip_to_ldm(te, "conditioner.embedders.0.transformer."))
        sd.update(openclip_to_ldm(te2, "conditioner.embedders.1.model."))
    else:
        sd.update(clip_to_ldm(te, "cond_stage_model.transformer."))
    if str(path).endswith(".ckpt"):
        torch.save({"state_dict": sd}, path)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
