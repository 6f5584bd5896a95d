"""Batches for training: one bucket per batch, an order fixed by (seed, epoch), shared out across ranks.

Everything random here is a function of (seed, position), not of a running RNG, so a resumed run sees
exactly the batches and captions the uninterrupted run would have seen.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import torch

from trainer.data.buckets import assign_bucket, make_buckets, resize_crop_box
from trainer.data.cache import LatentCache, encode_pixels, pixel_tensor
from trainer.data.captions import CaptionOptions, build_caption
from trainer.data.scan import ScanResult, file_hash


def mix(*xs: int) -> int:
    """A 63-bit seed from several ints (stable across runs and processes, unlike hash())."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = ((h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


@dataclass
class Batch:
    latents: torch.Tensor | None
    pixels: torch.Tensor | None
    captions: list[str]
    time_ids: torch.Tensor  # SDXL: original size, crop top-left, target size per image
    epoch: int


class TrainData:
    def __init__(self, scan: ScanResult, cfg, world_size: int = 1, rank: int = 0):
        if not scan.items:
            raise ValueError("no images")
        self.items = scan.items
        self.cfg = cfg
        self.opts = CaptionOptions.from_config(cfg)
        self.world_size, self.rank = world_size, rank
        if cfg.enable_buckets:
            self.bucket_list = make_buckets(cfg.resolution, cfg.min_bucket, cfg.max_bucket, cfg.bucket_step)
        else:
            self.bucket_list = [(cfg.resolution, cfg.resolution)]
        self.buckets = [
            assign_bucket(it.width, it.height, self.bucket_list, cfg.no_upscale, cfg.bucket_step) for it in self.items
        ]
        self.hashes = [file_hash(it.path) for it in self.items]
        self.cache: LatentCache | None = None
        self.text_cache: dict[str, tuple] | None = None
        n = len(self.global_batches(0))
        self.micro_per_epoch = n // world_size
        if self.micro_per_epoch == 0:
            raise ValueError(
                f"The dataset makes {n} batch(es) per epoch, fewer than the {world_size} processes: "
                "add images or repeats, lower batch_size, or use fewer GPUs."
            )

    # ------------------------------------------------------------- order
    @lru_cache(maxsize=2)
    def global_batches(self, epoch: int) -> list[list[tuple[int, bool]]]:
        """All batches of an epoch: lists of (item index, flip), each list within one bucket."""
        rng = random.Random(mix(self.cfg.seed, epoch, 17))
        by_bucket: dict[tuple[int, int], list[tuple[int, bool]]] = {}
        for i, it in enumerate(self.items):
            for _ in range(it.repeats):
                flip = self.cfg.flip and rng.random() < 0.5
                by_bucket.setdefault(self.buckets[i], []).append((i, flip))
        batches = []
        for b in sorted(by_bucket):
            entries = by_bucket[b]
            rng.shuffle(entries)
            bs = self.cfg.batch_size
            batches.extend(entries[k : k + bs] for k in range(0, len(entries), bs))
        rng.shuffle(batches)
        return batches

    def entries(self, micro: int) -> tuple[int, list[tuple[int, bool]]]:
        epoch, pos = divmod(micro, self.micro_per_epoch)
        return epoch, self.global_batches(epoch)[pos * self.world_size + self.rank]

    def all_jobs(self) -> list:
        """Every (path, hash, bucket, flip) the run can ask for: what the latent cache must hold."""
        flips = (False, True) if self.cfg.flip else (False,)
        return [(it.path, self.hashes[i], self.buckets[i], f) for i, it in enumerate(self.items) for f in flips]

    # ------------------------------------------------------------- data
    def caption(self, idx: int, micro: int, slot: int) -> str:
        rng = random.Random(mix(self.cfg.seed, micro, slot, self.rank, 29)) if self.opts.is_random else None
        return build_caption(self.items[idx].caption, self.opts, rng)

    def fixed_captions(self) -> list[str]:
        return [build_caption(it.caption, self.opts, None) for it in self.items]

    def batch(self, micro: int, vae=None) -> Batch:
        epoch, entries = self.entries(micro)
        captions = [self.caption(i, micro, k) for k, (i, _) in enumerate(entries)]
        time_ids = []
        for i, _ in entries:
            it, (bw, bh) = self.items[i], self.buckets[i]
            rw, rh, (left, top, _, _) = resize_crop_box(it.width, it.height, bw, bh)
            time_ids.append([it.height, it.width, top, left, bh, bw])
        time_ids = torch.tensor(time_ids, dtype=torch.float32)
        if self.cache is not None:
            lat = torch.stack([self.cache.get(self.hashes[i], self.buckets[i], f) for i, f in entries])
            return Batch(lat, None, captions, time_ids, epoch)
        pixels = torch.stack([pixel_tensor(self.items[i].path, self.buckets[i], f) for i, f in entries])
        if vae is not None:
            return Batch(encode_pixels(vae, pixels), None, captions, time_ids, epoch)
        return Batch(None, pixels, captions, time_ids, epoch)
