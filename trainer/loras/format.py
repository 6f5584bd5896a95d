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
# LyCORIS' keys (its kohya-style files, `ss_network_module = lycoris.kohya`): the names peft's LoHa/LoKr layers use too
LYCO_KEYS = {"loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
             "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")}
LYCO_SUFFIXES = {f".{k}": kind for kind, keys in LYCO_KEYS.items() for k in keys}  # ".hada_w1_a" -> "loha"
NETWORK_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}


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
    kind = "lora"  # the network type (a class attribute: LycoModule's are loha / lokr)

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


def cp_rebuild(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS' CP (Tucker) rebuild of a conv weight from its core [r, r, kh, kw] and two [r, dim] factors."""
    return torch.einsum("i j k l, i p, j r -> p r k l", t.float(), wa.float(), wb.float())


@dataclass
class LycoModule:
    """One LoHa or LoKr module as LyCORIS' kohya-style file holds it: its weights under LyCORIS' names (the part
    after the module name) and its alpha (None when the file has none: every loader then applies scale 1)."""
    kind: str  # loha | lokr
    weights: dict[str, torch.Tensor]
    alpha: float | None

    @property
    def rank(self) -> int | None:
        """The rank a loader divides alpha by: LoHa's, or that of LoKr's low-rank factor (None when both of LoKr's
        factors are whole matrices, and loaders apply scale 1)."""
        w = self.weights
        if self.kind == "loha":
            return int(w["hada_w1_b"].shape[0])
        for key in ("lokr_w2_b", "lokr_w1_b"):  # ComfyUI and A1111 both end with w2's rank when both are low-rank
            if key in w:
                return int(w[key].shape[0])
        return None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.alpha is not None and self.rank else 1.0

    @property
    def conv(self) -> bool:
        """A 3x3 convolution (as far as the file tells: CP cores and LoKr's whole 4-D factors say so)."""
        return any(k in self.weights for k in ("hada_t1", "lokr_t2")) or self.weights.get("lokr_w2", torch.empty(0)).dim() == 4

    def update(self) -> torch.Tensor:
        """What a loader adds to the weight at strength 1, flattened to [out, in * k] (LyCORIS', ComfyUI's and
        A1111's rule: LoHa (w1a @ w1b) * (w2a @ w2b), LoKr kron(w1, w2), each times the scale)."""
        w = {k: v.float() for k, v in self.weights.items()}
        if self.kind == "loha":
            if "hada_t1" in w:
                d = cp_rebuild(w["hada_t1"], w["hada_w1_a"], w["hada_w1_b"]) * cp_rebuild(w["hada_t2"], w["hada_w2_a"], w["hada_w2_b"])
            else:
                d = (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"])
        else:
            w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
            if "lokr_w2" in w:
                w2 = w["lokr_w2"]
            elif "lokr_t2" in w:
                w2 = cp_rebuild(w["lokr_t2"], w["lokr_w2_a"], w["lokr_w2_b"])
            else:
                w2 = w["lokr_w2_a"] @ w["lokr_w2_b"]
            d = torch.kron(w1[:, :, None, None] if w2.dim() == 4 else w1, w2)
        return d.flatten(1) * self.scale


def pack(modules: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Module objects -> the file's tensors (`alpha` a 0-dim tensor in the file's dtype, as kohya writes it)."""
    out = {}
    for name, m in modules.items():
        if isinstance(m, LycoModule):
            out.update({f"{name}.{k}": v.to("cpu", dtype).contiguous() for k, v in m.weights.items()})
            if m.alpha is not None:
                out[f"{name}.alpha"] = torch.tensor(m.alpha, dtype=dtype)
            continue
        out[f"{name}.lora_down.weight"] = m.down.to("cpu", dtype).contiguous()
        out[f"{name}.lora_up.weight"] = m.up.to("cpu", dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(m.alpha, dtype=dtype)
        if m.dora_scale is not None:
            out[f"{name}.dora_scale"] = m.dora_scale.to("cpu", dtype).contiguous()
    return out


def unpack(tensors: dict[str, torch.Tensor], name: str = "the file") -> tuple[dict, dict]:
    """The file's tensors -> (Module / LycoModule objects, tensors that are not modules). Raise LoraFileError when
    a module is incomplete."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    lyco: dict[str, dict[str, torch.Tensor]] = {}
    extra = {}
    for k, v in tensors.items():
        suffix = next((s for s in SUFFIXES if k.endswith(s)), None)
        lsuffix = next((s for s in LYCO_SUFFIXES if k.endswith(s)), None)
        if not k.startswith("lora_") or (suffix is None and lsuffix is None):
            extra[k] = v
        elif lsuffix is not None:
            lyco.setdefault(k[: -len(lsuffix)], {})[lsuffix[1:]] = v
        else:
            parts.setdefault(k[: -len(suffix)], {})[suffix] = v
    modules: dict = {}
    for mod, w in lyco.items():
        kinds = {LYCO_SUFFIXES["." + k] for k in w}
        if len(kinds) > 1 or not _complete(kinds.pop(), w):
            raise LoraFileError(f"{name}: module {mod} has an incomplete or mixed set of LoHa/LoKr weights "
                                f"({', '.join(sorted(w))}); the file is damaged.")
        alpha = parts.pop(mod, {}).get(".alpha")
        kind = LYCO_SUFFIXES["." + next(iter(w))]
        modules[mod] = LycoModule(kind, w, float(alpha) if alpha is not None else None)
    for mod, t in parts.items():
        if ".lora_down.weight" not in t or ".lora_up.weight" not in t:
            raise LoraFileError(f"{name}: module {mod} lacks its lora_down or lora_up weight; the file is damaged.")
        down, up = t[".lora_down.weight"], t[".lora_up.weight"]
        alpha = float(t[".alpha"]) if ".alpha" in t else float(down.shape[0])  # no alpha: read as alpha = rank
        modules[mod] = Module(down, up, alpha, t.get(".dora_scale"))
    return modules, extra


def _complete(kind: str, w: dict) -> bool:
    if kind == "loha":
        cp = "hada_t1" in w or "hada_t2" in w
        return all(k in w for k in LYCO_KEYS["loha"][:4]) and (not cp or ("hada_t1" in w and "hada_t2" in w))
    one = "lokr_w1" in w or ("lokr_w1_a" in w and "lokr_w1_b" in w)
    two = "lokr_w2" in w or ("lokr_w2_a" in w and "lokr_w2_b" in w)
    return one and two


def lyco_as_lora(modules: dict, shapes: dict[str, tuple], rtol: float = 1e-6) -> dict:
    """LoHa / LoKr modules as LoRA factors of the same update, for a loader that reads LoRA only (Preview's
    diffusers): the SVD of each module's update cut at its numerical rank (singular values above `rtol` x the
    largest), so the weight it applies equals the LyCORIS one to float precision. `shapes` {kohya name: the
    adapted weight's shape} gives conv factors their 4-D form. LoRA modules pass through."""
    out = {}
    for name, m in modules.items():
        if not isinstance(m, LycoModule):
            out[name] = m
            continue
        shape = tuple(shapes[name])
        u, s, vh = torch.linalg.svd(m.update().double(), full_matrices=False)
        k = max(1, int((s > s[0] * rtol).sum())) if len(s) and s[0] > 0 else 1
        root = s[:k].sqrt()
        up = (u[:, :k] * root).float().reshape(shape[0], k, *[1] * (len(shape) - 2))
        down = (root[:, None] * vh[:k]).float().reshape(k, *shape[1:])
        out[name] = Module(down, up, float(k))
    return out


def network_of(modules: dict) -> str:
    """'lora', 'loha' or 'lokr': the network type of a file's modules (the first LyCORIS one decides)."""
    return next((m.kind for m in modules.values() if isinstance(m, LycoModule)), "lora")


def require_lora(lf, what: str) -> None:
    """Raise LoraFileError when a tool that works on LoRA factors is given a LoHa or LoKr file."""
    kind = network_of(lf.modules)
    if kind != "lora":
        raise LoraFileError(f"{lf.name} is a {NETWORK_NAMES[kind]} (LyCORIS) file: {what} works on LoRA and LoCon "
                            "files only (its factors are not LoRA's up and down). Info, Spectrum and Preview read it.")


# --------------------------------------------------------------------------------------------- files
@dataclass
class LoraFile:
    path: Path
    modules: dict  # name -> Module (LoRA, LoCon, DoRA) or LycoModule (LoHa, LoKr)
    metadata: dict[str, str]
    family: str  # the group: sd1 | sd2 | sdxl
    dtype: torch.dtype
    size: int = 0
    extra: dict = field(default_factory=dict)  # tensors that are not LoRA modules (kept as they are)

    @property
    def name(self) -> str:
        return self.path.name


def read(path: str | Path) -> LoraFile:
    """Read a kohya LoRA / LoCon / DoRA file, or LyCORIS' LoHa / LoKr. Raise LoraFileError naming the problem."""
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
    dtype = next(iter(tensors[k].dtype for k in tensors if k.startswith("lora_")))
    fam = family_of({k: tuple(v.shape) for k, v in tensors.items()}, metadata) or "sd1"
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

    te = any(k.startswith("lora_te_") for k in shapes)
    w = (width("q_proj.lora_down.weight") or width("q_proj.hada_w1_b")) if te else None
    w = w or width("attn2_to_k.lora_down.weight") or width("attn2_to_k.hada_w1_b")
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
