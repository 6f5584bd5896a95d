"""Latent cache on disk: one safetensors file per (image content, VAE, bucket, flip).

An edited image has a new content hash and is encoded again; an unchanged one never is.
Files are read back memory-mapped, so a big dataset does not sit in RAM.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from trainer.data.buckets import encode_batch, resize_crop_box
from trainer.data.images import ImageProblem, load_rgb
from trainer.fsutil import atomic_save_safetensors


def default_cache_dir() -> Path:
    base = os.environ.get("LORA_STUDIO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lora_studio"
    )
    return Path(base)


def vae_fingerprint(vae) -> str:
    """Identifies a VAE by its config and a sample of its weights (cheap, stable across runs)."""
    h = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for i, p in enumerate(vae.parameters()):
        if i % 16 == 0:
            h.update(p.detach().float().cpu().flatten()[:256].numpy().tobytes())
    return h.hexdigest()[:16]


def pixel_tensor(path: Path, bucket: tuple[int, int], flip: bool) -> torch.Tensor:
    """Image -> [3, H, W] float in [-1, 1], resized to cover the bucket and centre-cropped."""
    from PIL import Image

    im = load_rgb(path)
    bw, bh = bucket
    rw, rh, box = resize_crop_box(im.width, im.height, bw, bh)
    im = im.resize((rw, rh), Image.Resampling.LANCZOS).crop(box)
    a = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    if flip:
        a = a[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor) -> torch.Tensor:
    """VAE latents (the distribution mean), scaled as the UNet expects."""
    pixels = pixels.to(vae.device, dtype=vae.dtype)
    lat = vae.encode(pixels).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((lat - shift) * vae.config.scaling_factor).float()


class LatentCache:
    """On disk, shared by every run (cache_latents_to_disk = true): a second run never runs the VAE."""

    def __init__(self, folder: Path, vae_id: str):
        self.folder = Path(folder) / "latents" / vae_id
        self.vae_id = vae_id

    def key(self, content_hash: str, bucket: tuple[int, int], flip: bool) -> Path:
        return self.folder / content_hash[:2] / f"{content_hash}_{bucket[0]}x{bucket[1]}_{int(flip)}.safetensors"

    def has(self, content_hash: str, bucket, flip) -> bool:
        return self.key(content_hash, bucket, flip).is_file()

    def put(self, content_hash: str, bucket, flip, latent: torch.Tensor) -> None:
        atomic_save_safetensors({"latent": latent.contiguous().cpu()}, self.key(content_hash, bucket, flip))

    def get(self, content_hash: str, bucket, flip) -> torch.Tensor:
        with safe_open(str(self.key(content_hash, bucket, flip)), framework="pt") as f:
            return f.get_tensor("latent")

    def fill(self, vae, jobs: list[tuple[Path, str, tuple[int, int], bool]], batch_size: int | None = None,
             on_progress=None) -> int:
        """Encode every job not cached yet, images of one bucket at a time: `batch_size` of them, or by default
        as many as buckets.encode_batch allows. Returns how many images went through the VAE (0 on a second run)."""
        pending = [j for j in dict.fromkeys(jobs) if not self.has(j[1], j[2], j[3])]
        self.failed: dict[Path, str] = {}
        by_bucket: dict[tuple[int, int], list] = {}
        for j in pending:
            by_bucket.setdefault(j[2], []).append(j)
        done = 0
        for bucket, js in by_bucket.items():
            n = batch_size or encode_batch(*bucket)
            for i in range(0, len(js), n):
                chunk, tensors = [], []
                for job in js[i : i + n]:
                    try:
                        tensors.append(pixel_tensor(job[0], bucket, job[3]))
                        chunk.append(job)
                    except ImageProblem as e:  # one bad file never stops a run
                        self.failed[job[0]] = str(e)
                if not chunk:
                    continue
                pixels = torch.stack(tensors)
                lats = encode_pixels(vae, pixels)
                for (p, h, b, flip), lat in zip(chunk, lats):
                    self.put(h, b, flip, lat)
                done += len(chunk)
                if on_progress:
                    on_progress(done, len(pending))
        return done


class MemoryLatentCache(LatentCache):
    """In this run's memory only (cache_latents_to_disk = false): nothing is written anywhere."""

    def __init__(self, vae_id: str = ""):
        self.vae_id = vae_id
        self.latents: dict[tuple, torch.Tensor] = {}

    def has(self, content_hash: str, bucket, flip) -> bool:
        return (content_hash, tuple(bucket), bool(flip)) in self.latents

    def put(self, content_hash: str, bucket, flip, latent: torch.Tensor) -> None:
        from trainer import placement

        self.latents[(content_hash, tuple(bucket), bool(flip))] = placement.to_host(latent.contiguous())

    def get(self, content_hash: str, bucket, flip) -> torch.Tensor:
        return self.latents[(content_hash, tuple(bucket), bool(flip))]
