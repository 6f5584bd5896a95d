"""UNet blocks as kohya numbers them, for per-block rank, alpha and learning rate (torch-free: the UI uses it).

SD1 / SD2: IN00-IN11, MID, OUT00-OUT11 (25 blocks: kohya's block_dims has 25 values); SDXL: IN00-IN08, MID,
OUT00-OUT08 (19). A block's number is its index in the original (LDM/SGM) UNet: `input_blocks.4` is IN04,
`output_blocks.2` is OUT02, `middle_block` is MID. In diffusers names, down_blocks.i.attentions.j and
resnets.j are IN(3i + j + 1), downsamplers IN(3i + 3); up_blocks.i.attentions.j / resnets.j are OUT(3i + j),
upsamplers OUT(3i + 2), exactly kohya's get_block_index. Text-encoder modules are in no block.
"""
from __future__ import annotations

import re

from trainer.models import families

_SGM = re.compile(r"^lora_unet_(input_blocks|output_blocks)_(\d+)_")
_DIFFUSERS = re.compile(r"^lora_unet_(down|up)_blocks_(\d+)_(attentions|resnets|downsamplers|upsamplers)_(\d+)_")
# the kohya_ss / sd-scripts keys, as TrainConfig fields of the same names
LR_FIELDS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
FIELDS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas") + LR_FIELDS


def names(family: str) -> list[str]:
    return families.family(family).block_names


def of(kohya_name: str) -> str | None:
    """The block of a kohya module name (diffusers or SGM style), None for text-encoder and other modules."""
    m = _SGM.match(kohya_name)
    if m:
        return ("IN" if m[1] == "input_blocks" else "OUT") + f"{int(m[2]):02d}"
    if kohya_name.startswith(("lora_unet_mid_block_", "lora_unet_middle_block_")):
        return "MID"
    m = _DIFFUSERS.match(kohya_name)
    if m:
        i, kind, j = int(m[2]), m[3], int(m[4])
        idx = 3 * i + (2 if kind in ("downsamplers", "upsamplers") else j)
        return f"IN{idx + 1:02d}" if m[1] == "down" else f"OUT{idx:02d}"
    return None


def parse(text: str, count: int | tuple, what: str, integer: bool = False) -> list[float] | None:
    """'4,8,8,...' -> numbers (None when empty). Raise ValueError with the expected count in words."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        values = [float(x) for x in text.replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be numbers separated by commas (got '{text[:60]}').") from None
    counts = count if isinstance(count, tuple) else (count,)
    if len(values) not in counts:
        raise ValueError(f"{what} has {len(values)} value(s); it needs " + " or ".join(map(str, counts))
                         + " (one per block in kohya's order: IN00..., MID, OUT...).")
    if any(v < 0 for v in values) or (integer and any(not v.is_integer() for v in values)):
        raise ValueError(f"{what} must be " + ("whole numbers" if integer else "numbers") + " of 0 or more.")
    return [int(v) for v in values] if integer else values


def lengths(kind: str) -> tuple:
    """How many values a field may hold, over the families (25 or 19 blocks; 12 or 9 IN / OUT weights)."""
    if kind == "mid_lr_weight":
        return (1,)
    layouts = {f.blocks for f in families.FAMILIES.values()}
    if kind in ("down_lr_weight", "up_lr_weight"):
        return tuple(sorted({b[0] for b in layouts}, reverse=True))
    return tuple(sorted({sum(b) for b in layouts}, reverse=True))


class Plan:
    """Per-block rank, alpha and learning-rate weight for one family, from a config. A block with rank 0 or
    an LR weight at or below block_lr_zero_threshold gets no LoRA."""

    def __init__(self, cfg, family: str):
        self.blocks = names(family)
        n = len(self.blocks)
        n_side = families.family(family).blocks[0]
        self.dims = parse(cfg.block_dims, n, "block_dims", integer=True)
        self.alphas = parse(cfg.block_alphas, n, "block_alphas")
        self.conv_dims = parse(cfg.conv_block_dims, n, "conv_block_dims", integer=True)
        self.conv_alphas = parse(cfg.conv_block_alphas, n, "conv_block_alphas")
        down = parse(cfg.down_lr_weight, n_side, "down_lr_weight")
        mid = parse(cfg.mid_lr_weight, 1, "mid_lr_weight")
        up = parse(cfg.up_lr_weight, n_side, "up_lr_weight")
        self.lr = None
        if down or mid or up:
            self.lr = (down or [1.0] * n_side) + (mid or [1.0]) + (up or [1.0] * n_side)
        self.cfg = cfg
        self.threshold = cfg.block_lr_zero_threshold

    @property
    def active(self) -> bool:
        return any(x is not None for x in (self.dims, self.alphas, self.conv_dims, self.conv_alphas, self.lr))

    def _at(self, values, block, default):
        return default if values is None or block is None else values[self.blocks.index(block)]

    def lr_weight(self, block: str | None) -> float:
        return self._at(self.lr, block, 1.0)

    def rank(self, block: str | None, conv: bool = False) -> tuple[int, float]:
        """(rank, alpha) of a module in `block`; rank 0 = not trained, not written."""
        if self.lr is not None and block is not None and self.lr_weight(block) <= self.threshold:
            return 0, 0.0
        if conv:
            return int(self._at(self.conv_dims, block, self.cfg.conv_rank)), float(self._at(self.conv_alphas, block, self.cfg.conv_alpha))
        return int(self._at(self.dims, block, self.cfg.rank)), float(self._at(self.alphas, block, self.cfg.alpha))
