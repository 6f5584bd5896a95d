"""Aspect-ratio buckets: sides in steps of 64, area close to resolution^2."""
from __future__ import annotations

import math


def make_buckets(resolution: int, min_side: int = 256, max_side: int = 1024, step: int = 64) -> list[tuple[int, int]]:
    """All (width, height) with sides in [min_side, max_side], multiples of `step`, area <= resolution^2,
    each as large as it can be for its width (the kohya/NovelAI scheme)."""
    area = resolution * resolution
    min_side = max(step, (min_side // step) * step)
    max_side = max(min_side, (max_side // step) * step)
    out = set()
    w = min_side
    while w <= max_side:
        h = min(max_side, (area // w) // step * step)
        if h >= min_side:
            out.add((w, h))
            out.add((h, w))
        w += step
    sq = min(max_side, resolution // step * step)
    out.add((sq, sq))
    return sorted(out)


def assign_bucket(
    width: int, height: int, buckets: list[tuple[int, int]], no_upscale: bool = False, step: int = 64
) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's. With no_upscale, an image smaller than that
    bucket gets its own smaller bucket (its size rounded down to `step`) instead of being enlarged."""
    ar = math.log(width / height)
    bw, bh = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ar), -b[0] * b[1]))
    if no_upscale and width * height < bw * bh:
        scale = 1.0
        w = max(step, int(width * scale) // step * step)
        h = max(step, int(height * scale) // step * step)
        return w, h
    return bw, bh


def resize_crop_box(width: int, height: int, bw: int, bh: int) -> tuple[int, int, tuple[int, int, int, int]]:
    """Size to resize the image to (covering the bucket) and the centre crop box to cut out of it."""
    scale = max(bw / width, bh / height)
    rw, rh = max(bw, round(width * scale)), max(bh, round(height * scale))
    left, top = (rw - bw) // 2, (rh - bh) // 2
    return rw, rh, (left, top, left + bw, top + bh)


ENCODE_PIXELS = 2 * 512 * 512  # pixels per VAE batch while caching latents


def encode_batch(width: int, height: int) -> int:
    """Images of one bucket the VAE encodes at once while caching latents: 2 at 512 px, 1 at 1024 px. The fp32
    VAE's activations grow with the pixels, and caching must not peak above a low-VRAM run's steps."""
    return max(1, ENCODE_PIXELS // (width * height))
