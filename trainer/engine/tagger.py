"""Booru tags from a WD tagger (SmilingWolf's WD v3 and v1.4 taggers) through onnxruntime: no timm, no torchvision.

A tagger is a folder (or a hub id whose repository holds them) with exactly `model.onnx` and `selected_tags.csv`
(columns tag_id, name, category, count; category 9 = rating, 0 = general, 4 = character). Pre-processing is the
publishers' own (SmilingWolf's wd-tagger reference app; kohya's tag_images_by_wd14_tagger.py does the same):
transparency onto white, padded to a square on white (centred), resized to the model's input size, RGB -> BGR,
float32 in 0-255 with no normalisation, NHWC. The input size is read from the model.

The captioning run (trainer/engine/autocaption.py) uses a Tagger exactly as it uses a vision-language model:
`caption(images)` gives one text per image; the modes, trigger words, preview, cancel, provenance and report
are that run's.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

FILES = ("model.onnx", "selected_tags.csv")
WD_TAGGERS = ["SmilingWolf/wd-eva02-large-tagger-v3", "SmilingWolf/wd-vit-large-tagger-v3",
              "SmilingWolf/wd-vit-tagger-v3", "SmilingWolf/wd-swinv2-tagger-v3", "SmilingWolf/wd-convnext-tagger-v3"]
RATING, GENERAL, CHARACTER = 9, 0, 4
DEFAULT_SIZE = 448  # the WD taggers' input; a model with a fixed input size says its own


class TaggerError(Exception):
    """Something the person can fix about a tagger (missing files, a broken tag list): one plain sentence."""


@dataclass
class TagOptions:
    general_threshold: float = 0.35
    character_threshold: float = 0.85
    ratings: bool = False  # add the most likely rating tag (general, sensitive, questionable, explicit)
    blacklist: str = ""  # comma-separated tags never written
    keep_underscores: bool = False  # off: 'long_hair' -> 'long hair' (short emoticon tags such as ^_^ stay as they are)
    max_tags: int = 0  # at most this many tags per image, the most confident first (0 = no cap)

    def check(self) -> None:
        for name in ("general_threshold", "character_threshold"):
            if not 0 < float(getattr(self, name)) < 1:
                raise TaggerError(f"The {name.replace('_', ' ')} must be between 0 and 1 (got {getattr(self, name)}); "
                                  "0.35 (general) and 0.85 (character) are the usual ones.")
        if int(self.max_tags) < 0:
            raise TaggerError(f"The tag cap must be 0 (none) or a positive number (got {self.max_tags}).")


def looks_like_tagger(model: str) -> bool:
    """A folder with the two tagger files, or a WD tagger's hub id (no download needed to tell)."""
    p = Path(model).expanduser()
    if p.is_dir():
        return (p / FILES[0]).is_file() or (p / FILES[1]).is_file()
    return model.strip() in WD_TAGGERS or model.strip().lower().startswith("smilingwolf/wd-")


def tagger_folder(model: str, emit=lambda e: None) -> Path:
    """The folder holding the tagger's two files: a local folder, or the Hugging Face cache (fetched once)."""
    p = Path(model).expanduser()
    if p.is_dir():
        missing = [f for f in FILES if not (p / f).is_file()]
        if missing:
            raise TaggerError(f"The folder {p.name} lacks {' and '.join(missing)}: a WD tagger folder holds both "
                              f"{FILES[0]} and {FILES[1]} (what `hf download SmilingWolf/wd-vit-tagger-v3` fetches).")
        return p
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    from trainer.models.hub import how_to_get, offline

    cached = [try_to_load_from_cache(model, f) for f in FILES]
    if all(isinstance(c, str) for c in cached):
        return Path(cached[0]).parent
    if offline():
        raise TaggerError(f"The tagger '{model}' is not downloaded and this computer is offline. {how_to_get(model)} "
                          f"Or put a folder with {FILES[0]} and {FILES[1]} anywhere and give its path.")
    emit({"type": "status", "message": f"First use of '{model}': downloading it to the Hugging Face cache, once."})
    try:
        paths = [hf_hub_download(model, f) for f in FILES]
    except Exception as e:  # not found, no such file in the repository, network
        raise TaggerError(f"Could not fetch the tagger '{model}' ({str(e).splitlines()[0][:160]}): it must be a "
                          f"repository with {FILES[0]} and {FILES[1]}, such as {WD_TAGGERS[2]}.") from None
    return Path(paths[0]).parent


def read_tags(path: Path) -> list[tuple[str, int]]:
    """(name, category) per output of the model, from selected_tags.csv."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        tags = [(r["name"], int(r["category"])) for r in rows]
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise TaggerError(f"{path.name} is not a WD tag list (columns tag_id, name, category, count): {e}") from None
    if not tags:
        raise TaggerError(f"{path.name} lists no tags.")
    return tags


def prepare(image, size: int):
    """One image as the WD taggers take it: [size, size, 3] float32 BGR in 0-255 (see the module's notes)."""
    import numpy as np
    from PIL import Image

    img = image.convert("RGBA") if image.mode in ("RGBA", "LA", "P") or "transparency" in image.info else image.convert("RGB")
    if img.mode == "RGBA":
        canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
        canvas.alpha_composite(img)
        img = canvas.convert("RGB")
    side = max(img.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(img, ((side - img.size[0]) // 2, (side - img.size[1]) // 2))
    if side != size:
        square = square.resize((size, size), Image.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1].copy()


def tag_text(tag: str, keep_underscores: bool) -> str:
    """kohya's rule: underscores become spaces in tags longer than 3 characters (emoticons like ^_^ stay)."""
    return tag if keep_underscores or len(tag) <= 3 else tag.replace("_", " ")


class Tagger:
    """One ONNX tagger; `caption(images)` gives each image's tags, most confident first, as one caption."""

    def __init__(self, folder: Path, device: str = "auto", opts: TagOptions | None = None):
        import onnxruntime as ort

        self.opts = opts or TagOptions()
        self.tags = read_tags(folder / FILES[1])
        want_cuda = device in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers()
        providers = (["CUDAExecutionProvider"] if want_cuda else []) + ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(folder / FILES[0]), providers=providers)
        except Exception as e:  # onnxruntime raises its own types for a damaged or foreign file
            raise TaggerError(f"{FILES[0]} in {folder.name} does not load in onnxruntime "
                              f"({str(e).splitlines()[0][:160]}): download the tagger again.") from None
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        inp = self.session.get_inputs()[0]
        self.input = inp.name
        self.size = inp.shape[1] if isinstance(inp.shape[1], int) else DEFAULT_SIZE
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else 0
        outputs = self.session.get_outputs()[0].shape
        if isinstance(outputs[-1], int) and outputs[-1] != len(self.tags):
            raise TaggerError(f"The tagger's model gives {outputs[-1]} scores but {FILES[1]} lists {len(self.tags)} "
                              "tags: the two files are not from the same tagger.")

    def scores(self, images: list):
        """[N, tags] confidences in 0-1."""
        import numpy as np

        batch = np.stack([prepare(im, self.size) for im in images])
        if self.fixed_batch == 1 and len(images) > 1:  # an export with a fixed batch of one
            return np.concatenate([self.session.run(None, {self.input: batch[i:i + 1]})[0] for i in range(len(images))])
        return self.session.run(None, {self.input: batch})[0]

    def select(self, probs) -> list[str]:
        """The tags of one image: general and character tags over their thresholds, the top rating when asked,
        blacklisted ones left out, most confident first, capped."""
        o = self.opts
        banned = {t.strip().lower().replace(" ", "_") for t in o.blacklist.split(",") if t.strip()}
        picked = []
        ratings = [(float(p), name) for (name, cat), p in zip(self.tags, probs) if cat == RATING]
        if o.ratings and ratings:
            picked.append(max(ratings))
        for (name, cat), p in zip(self.tags, probs):
            if (cat == GENERAL and p >= o.general_threshold) or (cat == CHARACTER and p >= o.character_threshold):
                picked.append((float(p), name))
        picked = [(p, n) for p, n in picked if n.lower().replace(" ", "_") not in banned]
        picked.sort(key=lambda x: -x[0])
        if o.max_tags:
            picked = picked[: int(o.max_tags)]
        return [tag_text(n, o.keep_underscores) for _, n in picked]

    def caption(self, images: list, max_new_tokens: int | None = None) -> list[str]:
        return [", ".join(self.select(p)) for p in self.scores(images)] if images else []
