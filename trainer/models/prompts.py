"""Captions -> the text conditioning the UNet sees, as the diffusers pipelines compute it."""
from __future__ import annotations


def encode_prompts(model, text_encoders, captions: list[str], clip_skip: int, device):
    """Encoder hidden states (and SDXL's pooled embedding). `text_encoders` may be accelerate-wrapped."""
    if model.spec.pooled_conditioning:
        hidden, pooled = [], None
        for tok, te in zip(model.tokenizers, text_encoders):
            ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
            out = te(ids.to(device), output_hidden_states=True)
            pooled = out[0]  # the last one wins: text_encoder_2's projected pooled output
            hidden.append(out.hidden_states[-(clip_skip + 1)])
        import torch

        return torch.cat(hidden, dim=-1), pooled
    tok, te = model.tokenizers[0], text_encoders[0]
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    if clip_skip <= 1:
        return te(ids.to(device))[0], None
    out = te(ids.to(device), output_hidden_states=True)
    inner = te.module if hasattr(te, "module") else te
    return getattr(inner, "text_model", inner).final_layer_norm(out.hidden_states[-clip_skip]), None
