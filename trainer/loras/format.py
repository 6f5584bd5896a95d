"""The kohya LoRA file that web UIs load (shared/design/LORA_FORMAT.md): the one owner of its module names,
its tensors, its reading and writing, and of telling which model family a file is for.

Export (peft state -> file), the LoRA tools and Preview all go through here; a new network type adds its
writer and reader here, nowhere else.
"""
from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.fsutil import atomic_write_bytes
from trainer.models import families
from trainer.models.ldm_names import clip_path

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale")


class LoraFileError(ValueError):
    """A problem with a LoRA file, in one plain sentence."""


# --------------------------------------------------------------------------------------------- names
def layout_of(unet_config) -> dict:
    """The architecture facts a module's kohya name depends on (kept in each checkpoint's state.json)."""
    return {"layers_per_block": unet_config.layers_per_block,
            "up_has_attn": {i: "CrossAttn" in t for i, t in enumerate(unet_config.up_block_types)}}


def module_name(part: str, module: str, family: str, layout: dict) -> str:
    """The kohya name of a module: the family's prefix for the part, then its path (SGM names for SDXL's UNet,
    CLIP names with 'text_model.' for text encoders) with '.' -> '_'."""
    spec = families.family(family)
    path = spec.unet_path(module, layout) if part == "unet" else clip_path(module)
    return spec.part_prefix(part) + path.replace(".", "_")


def module_names(part: str, modules, family: str, layout: dict) -> dict[str, str]:
    """{module path: kohya name} for the modules of one part: named once, when the LoRA is injected."""
    return {m: module_name(part, m, family, layout) for m in modules}


# --------------------------------------------------------------------------------------------- tensors
@dataclass
class Module:
    """One adapted module as the file holds it."""
    down: torch.Tensor  # [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    alpha: float
    dora_scale: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def shape(self) -> tuple:
        """The adapted weight's shape."""
        return (self.up.shape[0], *self.down.shape[1:])

    def update(self) -> torch.Tensor:
        """What a loader adds to the weight at strength 1, flattened to [out, in * k]."""
        return (self.up.float().flatten(1) @ self.down.float().flatten(1)) * (self.alpha / self.rank)


def pack(modules: dict[str, Module], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Module objects -> the file's tensors (`alpha` a 0-dim tensor in the file's dtype, as kohya writes it)."""
    out = {}
    for name, m in modules.items():
        out[f"{name}.lora_down.weight"] = m.down.to("cpu", dtype).contiguous()
        out[f"{name}.lora_up.weight"] = m.up.to("cpu", dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(m.alpha, dtype=dtype)
        if m.dora_scale is not None:
            out[f"{name}.dora_scale"] = m.dora_scale.to("cpu", dtype).contiguous()
    return out


def unpack(tensors: dict[str, torch.Tensor], name: str = "the file") -> tuple[dict[str, Module], dict]:
    """The file's tensors -> (Module objects, tensors that are not LoRA modules). Raise LoraFileError when the
    file is a network type these modules cannot hold, or a module is incomplete."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    extra = {}
    for k, v in tensors.items():
        suffix = next((s for s in SUFFIXES if k.endswith(s)), None)
        if suffix is None or not k.startswith("lora_"):
            extra[k] = v
            continue
        parts.setdefault(k[: -len(suffix)], {})[suffix] = v
    if any(k.endswith((".hada_w1_a", ".lokr_w1")) for k in extra):
        raise LoraFileError(f"{name} is a LoHa/LoKr (LyCORIS) file; these tools work on LoRA and LoCon files.")
    modules = {}
    for mod, t in parts.items():
        if ".lora_down.weight" not in t or ".lora_up.weight" not in t:
            raise LoraFileError(f"{name}: module {mod} lacks its lora_down or lora_up weight; the file is damaged.")
        down, up = t[".lora_down.weight"], t[".lora_up.weight"]
        alpha = float(t[".alpha"]) if ".alpha" in t else float(down.shape[0])  # no alpha: read as alpha = rank
        modules[mod] = Module(down, up, alpha, t.get(".dora_scale"))
    return modules, extra


# --------------------------------------------------------------------------------------------- files
@dataclass
class LoraFile:
    path: Path
    modules: dict[str, Module]
    metadata: dict[str, str]
    family: str  # the group: sd1 | sd2 | sdxl
    dtype: torch.dtype
    size: int = 0
    extra: dict = field(default_factory=dict)  # tensors that are not LoRA modules (kept as they are)

    @property
    def name(self) -> str:
        return self.path.name


def read(path: str | Path) -> LoraFile:
    """Read a kohya LoRA / LoCon file. Raise LoraFileError naming the problem."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"{path.name}: no such file.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a damaged or foreign file
        raise LoraFileError(f"{path.name} is not a readable .safetensors file ({str(e).splitlines()[0][:120]}); "
                            "it may be damaged or incomplete: download it again.") from None
    modules, extra = unpack(tensors, path.name)
    if not modules:
        raise LoraFileError(f"{path.name} has no kohya LoRA keys (lora_unet_..., lora_te_...). Is it a LoRA?")
    dtype = next(iter(modules.values())).down.dtype
    shapes = {f"{n}.lora_down.weight": tuple(m.down.shape) for n, m in modules.items()}
    fam = family_of(shapes, metadata) or "sd1"
    return LoraFile(path, modules, metadata, fam, dtype, path.stat().st_size, extra)


def family_of(shapes: dict[str, tuple], metadata: dict) -> str | None:
    """The family group a LoRA file is for: from `ss_base_model_version`, else its key names (SDXL), else the
    width of its text-encoder or cross-attention modules (CLIP-L 768: SD 1.x, OpenCLIP-H 1024: SD 2.x).
    `shapes` maps each key to its shape (a safetensors header has them without reading a tensor). None when
    nothing tells."""
    fam = families.from_base_version(metadata.get("ss_base_model_version", ""))
    if fam:
        return fam.group
    sdxl = families.family("sdxl")
    if any(k.startswith(tuple(sdxl.te_prefixes.values())) or re.match(r"lora_unet_(input|output)_blocks_", k)
           for k in shapes):
        return sdxl.group

    def width(suffix: str) -> int | None:
        return next((s[1] for k, s in shapes.items() if k.endswith(suffix) and len(s) > 1), None)

    w = width("q_proj.lora_down.weight") if any(k.startswith("lora_te_") for k in shapes) else None
    w = w or width("attn2_to_k.lora_down.weight")
    if w is None:
        return None
    return "sd2" if w == 1024 else "sd1"


def header_shapes(path: str | Path) -> tuple[dict[str, tuple], dict]:
    """({key: shape}, metadata) of a .safetensors file from its header alone. Raise LoraFileError."""
    from trainer.models.sniff import safetensors_header

    try:
        header = safetensors_header(path)
    except (OSError, ValueError) as e:
        raise LoraFileError(f"{Path(path).name} is not a readable LoRA file ({e}).") from None
    md = header.pop("__metadata__", None) or {}
    return {k: tuple(v.get("shape", ())) for k, v in header.items() if isinstance(v, dict)}, md


def _hashes(tensors: dict[str, torch.Tensor], ss_metadata: dict[str, str]) -> tuple[str, str]:
    """kohya's sshs_model_hash (bytes after the header) and sshs_legacy_hash (64 KiB at 1 MiB)."""
    from safetensors.torch import save

    data = save(tensors, metadata=ss_metadata)
    n = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + n :]).hexdigest()
    legacy = hashlib.sha256(io.BytesIO(data).getbuffer()[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy


def write(path, tensors: dict[str, torch.Tensor], ss_meta: dict[str, str], extra_meta: dict[str, str]) -> None:
    """Write atomically, with kohya's hashes computed over the file with the ss_* metadata only."""
    from safetensors.torch import save

    ss_only = {k: v for k, v in ss_meta.items() if k.startswith("ss_")}
    model_hash, legacy = _hashes(tensors, ss_only)
    meta = {**ss_meta, **extra_meta, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy}
    atomic_write_bytes(path, save(tensors, metadata=meta))
