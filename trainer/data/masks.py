"""Masked loss: a weight per latent pixel from the image's alpha channel or a same-name file in a `masks/` folder.

White (255) = learn this area, black (0) = ignore it, grey in between (kohya's convention). The mask gets the
image's own resize, centre crop and flip, then is averaged down to the latent grid (1/8 of the bucket).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from trainer.data.buckets import resize_crop_box
from trainer.data.images import is_image_name

MASK_DIR = "masks"  # never read as training images (trainer/data/scan.py)


def mask_file(image: Path, root: Path) -> Path | None:
    """`<image folder>/masks/<stem>.*`, else `<dataset>/masks/<stem>.*`."""
    for folder in dict.fromkeys([image.parent / MASK_DIR, Path(root) / MASK_DIR]):
        if folder.is_dir():
            for p in sorted(folder.glob(image.stem + ".*")):
                if is_image_name(p.name):
                    return p
    return None


def has_alpha(image: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(image) as im:
            return im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    except OSError:
        return False


def mask_source(image: Path, root: Path) -> str | None:
    """Where an image's mask comes from: 'file', 'alpha', or None (the whole image counts)."""
    return "file" if mask_file(image, root) else ("alpha" if has_alpha(image) else None)


def mask_tensor(image: Path, root: Path, bucket: tuple[int, int], flip: bool):
    """[1, bh/8, bw/8] float weights in [0, 1] for an image in `bucket`; all ones when it has no mask."""
    import torch
    from PIL import Image, ImageOps

    bw, bh = bucket
    src = mask_file(image, root)
    with Image.open(src or image) as im:
        im.load()
        im = ImageOps.exif_transpose(im) or im
        if src is not None:
            m = im.convert("L")
        elif has_alpha(image):
            m = im.convert("RGBA").getchannel("A")
        else:
            return torch.ones(1, bh // 8, bw // 8)
    # the image's own geometry (masks are expected at the image's size; another size is stretched to it)
    with Image.open(image) as ref:
        w, h = (ImageOps.exif_transpose(ref) or ref).size
    if m.size != (w, h):
        m = m.resize((w, h), Image.Resampling.BILINEAR)
    rw, rh, box = resize_crop_box(w, h, bw, bh)
    m = m.resize((rw, rh), Image.Resampling.BILINEAR).crop(box).resize((bw // 8, bh // 8), Image.Resampling.BOX)
    a = np.asarray(m, dtype=np.float32) / 255.0
    if flip:
        a = a[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(a))[None]
