"""Batches for training: one bucket per batch, an order fixed by (seed, epoch), through torch's DataLoader.

Everything random here is a function of (seed, position), not of a running RNG, so a resumed run sees
exactly the batches and captions the uninterrupted run would have seen. The batches are global: a group of
N processes with batch_size b per process takes the batches one process with batch N x b would take, and
process r trains on slots [r*b, (r+1)*b) of each. Every sample carries its global slot (its captions and, in
the loop, its noise and timestep are drawn from it) and its weight (N / the global batch's size), so the
group's averaged gradient is the one process's gradient. `BucketBatchSampler` yields every process's share
in turn (micro-step by micro-step); accelerate's `prepare` hands share number i to process `i % world`, as
kohya and the diffusers examples share a DataLoader.
"""
from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from trainer.data.buckets import assign_bucket, make_buckets, resize_crop_box
from trainer.data.cache import pixel_tensor
from trainer.data.captions import CaptionOptions, build_caption
from trainer.data.scan import ImageItem, file_hash


def mix(*xs: int) -> int:
    """A 63-bit seed from several ints (stable across runs and processes, unlike hash())."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = ((h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class TrainData(Dataset):
    """The images of a run with their buckets and content hashes. An index is (micro, slot, item, flip, weight),
    or (..., 1) for a class image of `reg`; a sample is {'latents' or 'pixels', 'caption', 'time_ids', 'slot',
    'weight'} (+ 'mask' with masked loss, + 'reg' for a class image). `reg` (class images) and `val` (validation images) are
    TrainData of their own, sharing the latent cache."""

    def __init__(self, items: list[ImageItem], cfg, root: str | Path | None = None, triggers: bool = True):
        if not items:
            raise ValueError("no images")
        self.cfg = cfg
        self.root = Path(root or cfg.dataset)
        self.opts = CaptionOptions.from_config(cfg)
        if not triggers:  # class images show the class, not the subject: no trigger words put in front
            self.opts = dataclasses.replace(self.opts, triggers=())
        self.reg: TrainData | None = None
        self.val: TrainData | None = None
        if cfg.enable_buckets:
            bucket_list = make_buckets(cfg.resolution, *cfg.bucket_range, cfg.bucket_step)
        else:
            bucket_list = [(cfg.resolution, cfg.resolution)]
        self.items = list(items)
        self.buckets = [assign_bucket(it.width, it.height, bucket_list, cfg.no_upscale, cfg.bucket_step) for it in items]
        self.hashes = [file_hash(it.path) for it in items]
        self.cache = None  # a LatentCache once latents are cached

    def drop(self, paths) -> None:
        """Forget the images at `paths` (files the latent cache could not decode)."""
        keep = [i for i, it in enumerate(self.items) if it.path not in paths]
        self.items = [self.items[i] for i in keep]
        self.buckets = [self.buckets[i] for i in keep]
        self.hashes = [self.hashes[i] for i in keep]

    # ------------------------------------------------------------- order
    def global_batches(self, epoch: int, world_size: int = 1) -> list[list[tuple[int, bool]]]:
        """All batches of an epoch for `world_size` processes of batch_size each: lists of (item index, flip),
        each list within one bucket."""
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
            bs = self.cfg.batch_size * world_size
            batches.extend(entries[k : k + bs] for k in range(0, len(entries), bs))
        rng.shuffle(batches)
        return batches

    def micro_per_epoch(self, world_size: int = 1) -> int:
        """Batches each process sees per epoch (the same every epoch: bucket sizes do not change)."""
        entries = sum(it.repeats for it in self.items)
        if entries < world_size:
            raise ValueError(
                f"The dataset has {entries} image(s) per epoch, fewer than the {world_size} processes: "
                "add images or repeats, or use fewer GPUs."
            )
        return len(self.global_batches(0, world_size))

    def all_jobs(self) -> list:
        """Every (path, hash, bucket, flip) the run can ask for: what the latent cache must hold."""
        flips = (False, True) if self.cfg.flip else (False,)
        return [(it.path, self.hashes[i], self.buckets[i], f) for i, it in enumerate(self.items) for f in flips]

    # ------------------------------------------------------------- data
    def caption(self, idx: int, micro: int, slot: int) -> str:
        rng = random.Random(mix(self.cfg.seed, micro, slot, 0, 29)) if self.opts.is_random else None
        return build_caption(self.items[idx].caption, self.opts, rng)

    def fixed_captions(self) -> list[str]:
        return [build_caption(it.caption, self.opts, None) for it in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def parts(self) -> list["TrainData"]:
        """This data and its class and validation images: what caches fill."""
        return [d for d in (self, self.reg, self.val) if d is not None]

    def __getitem__(self, index: tuple) -> dict:
        if len(index) == 6:  # a class image, paired with this training batch
            return {**self.reg[index[:5]], "reg": True}
        micro, slot, i, flip, weight = index
        it, (bw, bh) = self.items[i], self.buckets[i]
        _, _, (left, top, _, _) = resize_crop_box(it.width, it.height, bw, bh)
        sample = {"caption": self.caption(i, micro, slot), "slot": slot, "weight": torch.tensor(weight),
                  "time_ids": torch.tensor([it.height, it.width, top, left, bh, bw], dtype=torch.float32)}
        if self.cache is not None:
            sample["latents"] = self.cache.get(self.hashes[i], self.buckets[i], flip)
        else:
            sample["pixels"] = pixel_tensor(it.path, self.buckets[i], flip)
        if self.cfg.masked_loss:
            from trainer.data.masks import mask_tensor

            sample["mask"] = mask_tensor(it.path, self.root, self.buckets[i], flip)
        return sample


def collate(samples: list[dict]) -> dict:
    """A batch; with class images, {'train': batch, 'reg': batch} (their buckets may differ)."""
    is_reg = [s.pop("reg", False) for s in samples]
    if not any(is_reg):
        return default_collate(samples)
    return {"train": default_collate([s for s, r in zip(samples, is_reg) if not r]),
            "reg": default_collate([s for s, r in zip(samples, is_reg) if r])}


def shares(micro: int, entries: list[tuple[int, bool]], world_size: int, per_rank: int) -> list[list[tuple]]:
    """Each rank's part of a global batch: slots [r*per_rank, (r+1)*per_rank), weighted world / batch size so
    the ranks' averaged gradient is the gradient of the batch's mean loss. A rank left without an entry (the
    last batch of a small bucket) gets the first one at weight 0: every rank must run a step."""
    weight = world_size / len(entries)
    parts = [[(micro, slot, i, flip, weight) for slot, (i, flip) in enumerate(entries)
              if r * per_rank <= slot < (r + 1) * per_rank] for r in range(world_size)]
    return [part or [(micro, 0, *entries[0], 0.0)] for part in parts]


class BucketBatchSampler(Sampler):
    """Every rank's share of the batches of micro-steps [start, end), in the order (micro, rank)."""

    drop_last = True  # every process gets exactly end - start batches; accelerate need not pad

    def __init__(self, data: TrainData, world_size: int, start_micro: int, end_micro: int):
        self.data, self.world = data, world_size
        self.start, self.end = start_micro, end_micro
        self.per_epoch = data.micro_per_epoch(world_size)
        self.reg_per_epoch = data.reg.micro_per_epoch(world_size) if data.reg is not None else 0

    def __len__(self) -> int:
        return (self.end - self.start) * self.world

    def __iter__(self):
        epoch_batches, cached_epoch = None, None
        reg_batches, reg_epoch = None, None
        for micro in range(self.start, self.end):
            epoch, pos = divmod(micro, self.per_epoch)
            if epoch != cached_epoch:
                epoch_batches, cached_epoch = self.data.global_batches(epoch, self.world), epoch
            if self.reg_per_epoch:  # the class images run through their own epochs, one batch per step
                r_epoch, r_pos = divmod(micro, self.reg_per_epoch)
                if r_epoch != reg_epoch:
                    reg_batches, reg_epoch = self.data.reg.global_batches(r_epoch, self.world), r_epoch
            bs = self.data.cfg.batch_size
            mine = shares(micro, epoch_batches[pos], self.world, bs)
            reg = shares(micro, reg_batches[r_pos], self.world, bs) if self.reg_per_epoch else [[]] * self.world
            for rank in range(self.world):
                yield mine[rank] + [key + (1,) for key in reg[rank]]


def loader_workers() -> int:
    """Background processes that load batches ahead: about half the cores, at least one, at most four."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def make_loader(data: TrainData, world_size: int, start_micro: int, end_micro: int, pin_memory: bool = False) -> DataLoader:
    return DataLoader(data, batch_sampler=BucketBatchSampler(data, world_size, start_micro, end_micro),
                      num_workers=loader_workers(), pin_memory=pin_memory, collate_fn=collate)
