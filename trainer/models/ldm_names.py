"""Module paths of the original (LDM / SGM) UNet layout, from diffusers paths (torch-free).

Single-file checkpoints keep their UNet in this layout (`model.diffusion_model.input_blocks.4.1...`), and
kohya writes SDXL LoRA keys in it (`lora_unet_input_blocks_4_1_...`). kohya's block numbers (IN04, OUT02) are
the indices of this layout.
"""
from __future__ import annotations

import re

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "conv_shortcut": "skip_connection", "time_emb_proj": "emb_layers.1"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return _RESNET.get(head, head) + (("." + tail) if tail else "")


def diffusers_to_sgm(path: str, layers_per_block: int, up_has_attn: dict[int, bool] | None = None) -> str:
    """Map a diffusers UNet module path to the SGM / LDM path (input/middle/output_blocks)."""
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
