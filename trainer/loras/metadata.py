"""Values of a kohya LoRA file's metadata that a config decides (torch-free: the page's kohya_ss export uses them)."""
from __future__ import annotations


def num(x: float) -> str:
    """A number as kohya's metadata writes it ('16', '0.0001')."""
    return repr(float(x)) if not float(x).is_integer() else str(int(x)) if abs(x) >= 1 else repr(float(x))


def network_args(cfg) -> dict[str, str]:
    """kohya's network_args of a config: LyCORIS' algo and its options for LoHa / LoKr, LoCon's conv_dim / conv_alpha, LyCORIS' dora_wd for DoRA, the per-block
    settings (as kohya_ss writes them, strings) and their zero threshold. The file's ss_network_args and the
    sd-scripts config both take them from here."""
    from trainer.models import blocks

    args = {}
    if cfg.network_type != "lora":  # LyCORIS' network_args (lycoris.kohya reads algo and these names)
        args["algo"] = cfg.network_type
        if cfg.use_tucker:
            args["use_tucker"] = "True"
        if cfg.network_type == "lokr":
            args["factor"] = str(cfg.lokr_factor)
            if cfg.lokr_decompose_both:
                args["decompose_both"] = "True"
            if cfg.lokr_full_matrix:
                args["full_matrix"] = "True"
    if cfg.conv_rank:
        args.update(conv_dim=str(cfg.conv_rank), conv_alpha=num(cfg.conv_alpha))
    if cfg.use_dora:
        args["dora_wd"] = "True"
    for name in ("rank_dropout", "module_dropout", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
                 "loraplus_text_encoder_lr_ratio"):  # kohya's network_args of the same names
        if getattr(cfg, name):
            args[name] = num(getattr(cfg, name))
    for name in blocks.FIELDS:
        if getattr(cfg, name):
            args[name] = getattr(cfg, name)
    if any(getattr(cfg, n) for n in blocks.LR_FIELDS):
        args["block_lr_zero_threshold"] = num(cfg.block_lr_zero_threshold)
    return args
