"""A quantised frozen base under the LoRA (QLoRA): fp8 storage, or bitsandbytes int8 / NF4 layers.

- fp8: every frozen Linear and Conv2d keeps its weight as float8_e4m3fn and computes in the run's precision
  (kohya's --fp8_base; OneTrainer's fp8 weight dtype). A small autograd function upcasts the weight for the
  product and again in backward, so autograd keeps the fp8 weight rather than a full-precision copy per layer
  (diffusers' layerwise-casting hooks swap the weight in place, which breaks backward, so they serve
  inference only). Applied after the LoRA is injected, to the base layers only: LoRA weights stay fp32.
- int8 / nf4: every Linear becomes a bitsandbytes Linear8bitLt / Linear4bit (NF4) before the LoRA is injected,
  so peft puts its bitsandbytes LoRA layers on top. Convolutions stay in the run's precision (bitsandbytes has
  no quantised convolution).
Only the frozen weights change: the trained LoRA and the exported file are the same kind as without it.
"""
from __future__ import annotations

import torch

# never stored as fp8: LoRA, normalisations, embeddings and the first and last layers (as diffusers' own list)
FP8_SKIP = ("lora_", "norm", "pos_embed", "patch_embed", "proj_in", "proj_out", "conv_in", "conv_out",
            "time_embedding", "add_embedding", "embeddings")


def quantize_linears(model: torch.nn.Module, kind: str, compute_dtype: torch.dtype, device) -> int:
    """Replace every torch Linear of `model` by a bitsandbytes int8 / NF4 layer on `device`. Returns the count."""
    import bitsandbytes as bnb

    targets = [(name, m) for name, m in model.named_modules() if type(m) is torch.nn.Linear]
    for name, lin in targets:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        weight = lin.weight.data.to("cpu", torch.float32)  # bitsandbytes quantises on the move to the device
        if kind == "int8":
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                    has_fp16_weights=False, threshold=6.0)
            q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=compute_dtype, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        if lin.bias is not None:
            q.bias = torch.nn.Parameter(lin.bias.data.to("cpu", compute_dtype), requires_grad=False)
        q.register_forward_pre_hook(_follow_autocast)
        setattr(parent, name.rsplit(".", 1)[-1], q.to(device))
    return len(targets)


def _follow_autocast(module, args):
    """bitsandbytes layers answer in their input's dtype, also under autocast, where a torch Linear answers in
    the autocast dtype: an fp32 input (a sampler's upcast latents, its time embedding) would then meet bf16
    weights further on. Cast the input as autocast casts a Linear's."""
    x = args[0]
    dev = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        if x.dtype != dt:
            return (x.to(dt), *args[1:])
    return None


class _Fp8Linear(torch.autograd.Function):
    """y = x W^T + b with W stored in fp8: upcast for the product, and again in backward (the fp8 weight is what
    autograd keeps, not a full-precision copy per layer)."""

    @staticmethod
    def forward(ctx, x, w8, bias, dtype):
        ctx.save_for_backward(w8)
        ctx.in_dtype = x.dtype
        return torch.nn.functional.linear(x.to(dtype), w8.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        (w8,) = ctx.saved_tensors
        return (grad @ w8.to(grad.dtype)).to(ctx.in_dtype), None, None, None


class _Fp8Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w8, bias, dtype, stride, padding, dilation, groups):
        ctx.save_for_backward(w8)
        ctx.conf = (x.shape, x.dtype, stride, padding, dilation, groups)
        return torch.nn.functional.conv2d(x.to(dtype), w8.to(dtype), None if bias is None else bias.to(dtype),
                                          stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (w8,) = ctx.saved_tensors
        shape, in_dtype, stride, padding, dilation, groups = ctx.conf
        gx = torch.nn.grad.conv2d_input(shape, w8.to(grad.dtype), grad, stride, padding, dilation, groups)
        return gx.to(in_dtype), None, None, None, None, None, None, None


class Fp8Linear(torch.nn.Linear):
    """A frozen Linear whose weight is stored as float8_e4m3fn (`compute_dtype` set by `store_fp8`)."""
    compute_dtype = torch.float32

    def forward(self, x):
        return _Fp8Linear.apply(x, self.weight, self.bias, self.compute_dtype)


class Fp8Conv2d(torch.nn.Conv2d):
    compute_dtype = torch.float32

    def forward(self, x):
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(x.to(self.compute_dtype))
        return _Fp8Conv2d.apply(x, self.weight, self.bias, self.compute_dtype, self.stride, self.padding,
                                self.dilation, self.groups)


def store_fp8(model: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Keep the frozen Linear / Conv2d weights of `model` in float8_e4m3fn, computed in `compute_dtype` (after the
    LoRA is injected: its own layers, normalisations and embeddings stay as they are). Returns the count."""
    import re

    skip = re.compile("|".join(FP8_SKIP))
    n = 0
    for name, m in model.named_modules():
        if skip.search(name) or type(m) not in (torch.nn.Linear, torch.nn.Conv2d):
            continue
        if any(p.requires_grad for p in m.parameters()):
            continue  # never a trained layer
        m.__class__ = Fp8Linear if type(m) is torch.nn.Linear else Fp8Conv2d  # same parameters, fp8 forward
        m.compute_dtype = compute_dtype
        m.weight.data = m.weight.data.to(torch.float8_e4m3fn)
        n += 1
    return n


def frozen_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's frozen (non-LoRA) weights take where they are stored."""
    from trainer.models.lora import is_adapter_param

    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not is_adapter_param(n))


# ----------------------------------------------------------------------------- storing and placing the frozen base
def store_base(quant: str, resident: list, frozen: list, weight_dtype: torch.dtype, dev) -> None:
    """Before the LoRA goes in: cast the parts that will live on the device (`resident`) to the compute dtype and
    quantise the frozen ones (int8 / nf4), all on the host: the device never holds the full-precision base. Parked
    text encoders are not used again: nothing to quantise there. Nothing happens without quantisation."""
    from trainer import placement

    if quant == "none":
        return
    with placement.host_side():
        for m in resident:
            m.to(dtype=weight_dtype)
    if quant in ("int8", "nf4"):
        for m in frozen:
            if m in resident:
                quantize_linears(m, quant, weight_dtype, dev)


def place_base(quant: str, parts: list, resident: list, frozen: list, weight_dtype: torch.dtype, dev) -> str | None:
    """After the LoRA went in: LoRA weights in fp32 (they train in fp32 whatever the compute precision), the resident
    parts on the device (cast to the compute dtype without quantisation; as they are with it, after fp8 storage of
    the frozen ones). Returns the line to log about the stored base, or None."""
    from trainer import placement
    from trainer.models.lora import lora_parameters

    for m in parts:
        if quant == "none" and m in resident:
            placement.to_device(m, dev, weight_dtype)
        for p in lora_parameters(m):
            p.data = p.data.float()
    if quant == "none":
        return None
    if quant == "fp8":
        for m in frozen:
            if m in resident:
                store_fp8(m, weight_dtype)
    for m in resident:  # quantised weights, norms and LoRA go to the device as they are
        placement.to_device(m, dev)
    return f"Base stored as {quant}: frozen weights {frozen_bytes(parts[0]) / 2**20:.0f} MiB (UNet)"
