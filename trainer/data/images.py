"""Safe image decoding: one bad file gives a reason, never a crash or a hang."""
from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageOps

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_PIXELS = 64_000_000  # ~8000 x 8000; bigger is a mistake or a decompression bomb
MIN_SIDE = 16


class ImageProblem(ValueError):
    """Why an image cannot be used, in plain words."""


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTS


def probe(path: str | Path) -> tuple[int, int]:
    """(width, height) after EXIF rotation, from the header only. Raise ImageProblem."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ImageProblem(f"cannot read the file ({e.strerror})") from None
    if size == 0:
        raise ImageProblem("the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                w, h = im.size
                orientation = im.getexif().get(0x0112, 1) if hasattr(im, "getexif") else 1
    except Image.DecompressionBombError:
        raise ImageProblem("the image is absurdly large (possible decompression bomb)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageProblem(f"not a readable image ({_short(e)})") from None
    except Exception as e:  # Pillow plugins raise odd types on hostile input
        raise ImageProblem(f"not a readable image ({type(e).__name__})") from None
    _check_size(w, h)
    _check_complete(path, size)
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return w, h


def load_rgb(path: str | Path) -> Image.Image:
    """Decode fully, apply EXIF orientation, flatten to 8-bit RGB. Raise ImageProblem."""
    path = Path(path)
    probe(path)  # size and header checks before any pixel is decoded
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                im.load()
                im = ImageOps.exif_transpose(im) or im
                return to_rgb(im)
    except Image.DecompressionBombError:
        raise ImageProblem("the image is absurdly large (possible decompression bomb)") from None
    except ImageProblem:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageProblem(f"the image is damaged or truncated ({_short(e)})") from None
    except Exception as e:
        raise ImageProblem(f"the image could not be decoded ({type(e).__name__})") from None


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grey: scale to 8 bits instead of clipping everything to white
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / hi * 255.0, 0, 255).astype("uint8"), "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        # transparent pixels become white, as they look in most viewers
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im


def _check_size(w: int, h: int) -> None:
    if w * h > MAX_PIXELS:
        raise ImageProblem(f"the image is {w}x{h}, over the {MAX_PIXELS // 1_000_000} megapixel limit; downscale it")
    if min(w, h) < MIN_SIDE:
        raise ImageProblem(f"the image is only {w}x{h} pixels")


def _check_complete(path: Path, size: int) -> None:
    """Cheap truncation check from the file's tail: JPEGs end with an EOI marker, PNGs with IEND.
    A download cut short fails here instead of hours later at decode time."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        fh.seek(max(0, size - 4096))
        tail = fh.read()
    if head[:2] == b"\xff\xd8" and b"\xff\xd9" not in tail:
        raise ImageProblem("the JPEG is truncated (incomplete download or copy)")
    if head == b"\x89PNG\r\n\x1a\n" and b"IEND" not in tail:
        raise ImageProblem("the PNG is truncated (incomplete download or copy)")


def _short(e: Exception) -> str:
    """The library's words without the file's path (PIL names it: a temp name, or a folder of this computer): the
    message's caller names the file itself."""
    import re

    s = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    s = re.sub(r"\s*['\"][^'\"]*[/\\.][^'\"]*['\"]", "", s).strip() or type(e).__name__
    return s[:120]
