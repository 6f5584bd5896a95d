"""LoRA tools on any kohya-format file (ours or anyone's; SD1/SD2/SDXL; LoRA and LoCon; DoRA where defined):
info, rank spectrum, resize by SVD, merge, extract from two checkpoints. Info and Spectrum read LyCORIS' LoHa and
LoKr files too; resize and merge work on LoRA factors and say so for those.

The update of a module is what loaders apply: `up @ down * alpha / rank` (conv shapes flattened to
[out, in * kh * kw]), times the strength. Every output is a normal kohya file written atomically, with the
source's metadata and what was done in `ss_lora_studio_tool`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from trainer.loras.format import (DTYPES, NETWORK_NAMES, LoraFileError, LycoModule, Module, layout_of, module_name,
                                  network_of, pack, read, require_lora, write)
from trainer.loras.metadata import num
from trainer.models import families

BLOCKS = ("IN", "MID", "OUT", "TE", "OTHER")
THRESHOLDS = (0.90, 0.95, 0.99)
LoraToolError = LoraFileError  # a problem with a LoRA file or a request, in one plain sentence


def block_of(name: str) -> str:
    """IN / MID / OUT for UNet modules (diffusers or SGM names), TE for text encoders: A1111's LoRA Block Weight groups."""
    if name.startswith("lora_te"):
        return "TE"
    if "down_blocks" in name or "input_blocks" in name:
        return "IN"
    if "mid_block" in name or "middle_block" in name:
        return "MID"
    if "up_blocks" in name or "output_blocks" in name:
        return "OUT"
    return "OTHER"


# --------------------------------------------------------------------------------------------- info / spectrum
def is_conv(m) -> bool:
    """A 3x3 (LoCon) module."""
    return m.conv if isinstance(m, LycoModule) else m.down.dim() == 4 and m.down.shape[2] > 1


def info(path) -> dict:
    lf = read(path)
    ranks = sorted({m.rank for m in lf.modules.values() if m.rank}) + (
        ["full"] if any(not m.rank for m in lf.modules.values()) else [])  # LoKr's whole factors have no rank
    alphas = sorted({m.alpha for m in lf.modules.values() if m.alpha is not None})
    blocks = {}
    for n in lf.modules:
        blocks[block_of(n)] = blocks.get(block_of(n), 0) + 1
    shown = ("ss_output_name", "ss_base_model_version", "ss_network_dim", "ss_network_alpha", "ss_network_args",
             "ss_steps", "ss_trigger_words", "ss_sd_model_name", "ss_lora_studio_tool", "modelspec.title")
    return {"file": lf.name, "family": families.group_name(lf.family), "network": NETWORK_NAMES[network_of(lf.modules)],
            "modules": len(lf.modules), "modules_per_block": blocks, "ranks": ranks, "alphas": alphas,
            "conv_modules": sum(is_conv(m) for m in lf.modules.values()),
            "dora": any(getattr(m, "dora_scale", None) is not None for m in lf.modules.values()),
            "dtype": str(lf.dtype).replace("torch.", ""), "size_mb": round(lf.size / 2**20, 2),
            "metadata": {k: lf.metadata[k] for k in shown if k in lf.metadata}}


def singular_values(m) -> torch.Tensor:
    """Singular values of a module's update (at most its rank are non-zero). Computed through the factors:
    the update is (up * s) @ down, so QR of each factor leaves an r x r core, which is cheap for any layer size.
    LoHa and LoKr updates have no such factors: their whole update is decomposed."""
    if isinstance(m, LycoModule):
        return torch.linalg.svdvals(m.update())
    up = m.up.float().flatten(1) * (m.alpha / m.rank)
    down = m.down.float().flatten(1)
    _, ru = torch.linalg.qr(up)
    _, rd = torch.linalg.qr(down.T)
    return torch.linalg.svdvals(ru @ rd.T)


def kept_energy(s: torch.Tensor) -> torch.Tensor:
    """Share of the squared Frobenius norm kept at rank 1, 2, ... (the last is 1)."""
    e = s.double() ** 2
    total = float(e.sum())
    return (torch.cumsum(e, 0) / total).float() if total > 0 else torch.ones_like(s)


def rank_for(energy: torch.Tensor, target: float) -> int:
    """The smallest rank whose kept energy reaches `target`."""
    return int((energy < target - 1e-7).sum().item()) + 1


def spectrum(path, on_progress=None) -> dict:
    """Per module: singular values, kept energy per rank, the smallest rank keeping 90/95/99%. Per block (IN, MID,
    OUT, TE): the energy kept when every module is cut to rank k, and the smallest such k for each threshold."""
    lf = read(path)
    mods, per_block = {}, {}
    for i, (name, m) in enumerate(lf.modules.items()):
        s = singular_values(m)
        e = kept_energy(s)
        mods[name] = {"block": block_of(name), "rank": m.rank or len(s), "singular_values": [round(float(x), 6) for x in s],
                      "energy": [round(float(x), 6) for x in e],
                      **{f"rank_{int(t * 100)}": rank_for(e, t) for t in THRESHOLDS}}
        b = per_block.setdefault(block_of(name), {"sq": [], "total": 0.0})
        b["sq"].append((s.double() ** 2))
        b["total"] += float((s.double() ** 2).sum())
        if on_progress:
            on_progress(i + 1, len(lf.modules))
    blocks = {}
    for name in BLOCKS:
        if name not in per_block:
            continue
        b = per_block[name]
        top = max(len(x) for x in b["sq"])
        kept = [sum(float(x[:k].sum()) for x in b["sq"]) / b["total"] if b["total"] else 1.0 for k in range(1, top + 1)]
        kept_t = torch.tensor(kept)
        blocks[name] = {"modules": len(b["sq"]), "energy": [round(x, 6) for x in kept],
                        **{f"rank_{int(t * 100)}": rank_for(kept_t, t) for t in THRESHOLDS}}
    return {"file": lf.name, "family": families.group_name(lf.family), "modules": mods, "blocks": blocks}


# --------------------------------------------------------------------------------------------- building files
def factorise(update: torch.Tensor, shape: tuple, rank: int | None = None, energy: float | None = None) -> tuple:
    """Best rank-k approximation of a flattened update (truncated SVD), as kohya factors with alpha = k, so a loader
    applies exactly that approximation. k is `rank` (capped at what the matrix has) or the smallest k keeping
    `energy`. Returns (down, up, alpha, kept energy)."""
    u, s, vh = torch.linalg.svd(update.float(), full_matrices=False)
    e = kept_energy(s)
    k = min(rank, len(s)) if rank else rank_for(e, energy)
    k = max(1, k)
    root = s[:k].sqrt()
    up = (u[:, :k] * root).reshape(shape[0], k, *[1] * (len(shape) - 2))
    down = (root[:, None] * vh[:k]).reshape(k, *shape[1:])
    return down, up, float(k), float(e[k - 1])


def save(modules: dict[str, Module], family: str, out: str | Path, base_meta: dict, tool: dict, dtype) -> Path:
    """Write a kohya file: the source's metadata, ranks and alphas as they now are, what was done."""
    ranks = {m.rank for m in modules.values()}
    alphas = {m.alpha for m in modules.values()}
    fam = families.family(family)
    md = {k: v for k, v in base_meta.items() if not k.startswith("sshs_")}
    md.update({
        "ss_network_module": md.get("ss_network_module", "networks.lora"),
        # kohya's resize writes "Dynamic" when modules have ranks of their own; loaders read rank per module
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": num(alphas.pop()) if len(alphas) == 1 else "Dynamic",
        "ss_base_model_version": md.get("ss_base_model_version", fam.base_version),
        "ss_v2": md.get("ss_v2", str(fam.is_v2)),
        "modelspec.sai_model_spec": md.get("modelspec.sai_model_spec", "1.0.1"),
        "modelspec.architecture": md.get("modelspec.architecture", fam.architecture),
        "modelspec.title": Path(out).stem,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "ss_output_name": Path(out).stem,
        "ss_lora_studio_tool": json.dumps(tool, ensure_ascii=False),
    })
    ss = {k: v for k, v in md.items() if k.startswith("ss_")}
    rest = {k: v for k, v in md.items() if not k.startswith("ss_")}
    write(Path(out), pack(modules, dtype), ss, rest)
    return Path(out)


def block_report(before: dict[str, Module], kept: dict[str, float], totals: dict[str, float]) -> dict:
    """Per block: the share of the update's energy the new file keeps."""
    rep = {}
    for name in before:
        b = rep.setdefault(block_of(name), {"kept": 0.0, "total": 0.0})
        b["kept"] += kept[name] * totals[name]
        b["total"] += totals[name]
    return {b: round(v["kept"] / v["total"], 6) if v["total"] else 1.0 for b, v in rep.items()}


# --------------------------------------------------------------------------------------------- resize
def resize(path, out, rank: int | None = None, energy: float | None = None, precision: str | None = None,
           on_progress=None) -> dict:
    if (rank is None) == (energy is None):
        raise LoraToolError("Give either a rank (--rank N) or an energy share to keep (--energy 0.95).")
    if energy is not None and not 0 < energy <= 1:
        raise LoraToolError(f"The energy to keep must be between 0 and 1 (got {energy}), e.g. 0.95.")
    lf = read(path)
    require_lora(lf, "resizing")
    top = max(m.rank for m in lf.modules.values())
    if rank is not None and not 1 <= rank <= top:
        raise LoraToolError(f"Rank {rank} is not possible for {lf.name}: its modules have rank {top} at most. "
                            f"Choose 1 to {top}.")
    new, kept, totals = {}, {}, {}
    for i, (name, m) in enumerate(lf.modules.items()):
        upd = m.update()
        totals[name] = float((upd.double() ** 2).sum())
        down, up, alpha, kept[name] = factorise(upd, m.shape, rank, energy)
        new[name] = Module(down, up, alpha, m.dora_scale)
        if on_progress:
            on_progress(i + 1, len(lf.modules))
    dtype = DTYPES[precision] if precision else lf.dtype
    tool = {"op": "resize", "from": lf.name, **({"rank": rank} if rank else {"energy": energy})}
    save(new, lf.family, out, lf.metadata, tool, dtype)
    return {"file": str(out), "energy_kept": block_report(lf.modules, kept, totals),
            "ranks": sorted({int(m.rank) for m in new.values()}),
            "size_mb_before": round(lf.size / 2**20, 3), "size_mb_after": round(Path(out).stat().st_size / 2**20, 3)}


# --------------------------------------------------------------------------------------------- merge
def merge(sources: list[tuple[str, float]], out, rank: int | None = None, precision: str | None = None) -> dict:
    """Weighted sum of LoRAs of one family. Exact by default (ranks concatenated: the merged update is the weighted
    sum of updates); with `rank`, re-factorised to that rank per module."""
    if len(sources) < 2:
        raise LoraToolError("Give at least two LoRA files to merge, each as FILE:WEIGHT.")
    files = [(read(p), float(w)) for p, w in sources]
    fams = {lf.family for lf, _ in files}
    if len(fams) > 1:
        raise LoraToolError("These LoRAs are for different model families (" + ", ".join(
            f"{lf.name}: {families.group_name(lf.family)}" for lf, _ in files) + "); only LoRAs of one family can be merged.")
    for lf, _ in files:
        require_lora(lf, "merging")
        if any(m.dora_scale is not None for m in lf.modules.values()):
            raise LoraToolError(f"{lf.name} is a DoRA LoRA: DoRA magnitudes do not add, so a merge is not defined.")
    names = list(dict.fromkeys(n for lf, _ in files for n in lf.modules))
    new, kept, totals = {}, {}, {}
    for name in names:
        present = [(lf.modules[name], w, lf) for lf, w in files if name in lf.modules]
        shapes = {m.shape for m, _, _ in present}
        if len(shapes) > 1:
            raise LoraToolError(f"Module {name} has different shapes in " + ", ".join(
                f"{lf.name} {tuple(m.shape)}" for m, _, lf in present) + ": these LoRAs are not for the same base model.")
        shape = shapes.pop()
        if rank is None:  # exact: [w1 s1 up1 | w2 s2 up2] @ [down1; down2], alpha = total rank (scale 1)
            down = torch.cat([m.down.float() for m, _, _ in present])
            up = torch.cat([m.up.float() * (w * m.alpha / m.rank) for m, w, _ in present], dim=1)
            new[name] = Module(down, up, float(down.shape[0]))
            kept[name], totals[name] = 1.0, 1.0
        else:
            upd = sum(m.update() * w for m, w, _ in present)
            totals[name] = float((upd.double() ** 2).sum())
            down, up, alpha, kept[name] = factorise(upd, shape, rank=rank)
            new[name] = Module(down, up, alpha)
    lf0 = files[0][0]
    dtype = DTYPES[precision] if precision else lf0.dtype
    tool = {"op": "merge", "from": {lf.name: w for lf, w in files}, **({"rank": rank} if rank else {"exact": True})}
    save(new, lf0.family, out, lf0.metadata, tool, dtype)
    return {"file": str(out), "modules": len(new), "energy_kept": block_report(new, kept, totals),
            "ranks": sorted({int(m.rank) for m in new.values()})}


# --------------------------------------------------------------------------------------------- extract
class Weights:
    """One checkpoint's weights, read tensor by tensor (never the whole model): a diffusers folder or a single
    .safetensors file in the original (LDM / SGM) layout. `get(part, module)` is a module's weight in diffusers
    / transformers naming."""

    def __init__(self, source: str | Path):
        self.path = Path(source)
        self.handles = []
        if self.path.is_dir():
            from trainer.models.sniff import family_from_folder

            if not (self.path / "model_index.json").is_file():
                raise LoraToolError(f"{self.path.name} is a folder but not a diffusers model (no model_index.json).")
            self.family = families.group(family_from_folder(self.path))
            self.files = {}
            for part, sub in (("unet", "unet"), ("te1", "text_encoder"), ("te2", "text_encoder_2")):
                found = sorted((self.path / sub).glob("*.safetensors")) if (self.path / sub).is_dir() else []
                found = [f for f in found if ".fp16." not in f.name] or found
                if found:
                    self.files[part] = [self._open(f) for f in found]
            self.single = None
        elif self.path.suffix.lower() == ".safetensors" and self.path.is_file():
            from trainer.models.load import family_of_file

            self.family = families.group(family_of_file(self.path))
            self.single = self._open(self.path)
            self.keys = set(self.single.keys())
        else:
            raise LoraToolError(f"{self.path.name}: give a diffusers folder or a single-file .safetensors checkpoint "
                                "(a .ckpt cannot be read tensor by tensor; convert it to .safetensors first).")

    def _open(self, f):
        from safetensors import safe_open

        try:
            h = safe_open(str(f), framework="pt")
        except Exception as e:
            raise LoraToolError(f"{Path(f).name} cannot be read ({str(e).splitlines()[0][:120]}); it may be damaged.") from None
        self.handles.append(h)
        return h

    def config_dir(self) -> Path:
        """Where the architecture is described: the folder itself, or the shipped configs of the family (a
        single file of an unusual size needs --model-config, as in training)."""
        from trainer.models.load import shipped_config_dir

        return self.path if self.path.is_dir() else shipped_config_dir(self.family)

    def get(self, part: str, module: str, layout: dict) -> torch.Tensor:
        if self.single is None:
            names = [module + ".weight", "text_model." + module + ".weight", module.removeprefix("text_model.") + ".weight"]
            for h in self.files.get(part, []):
                for n in names:
                    if n in h.keys():
                        return h.get_tensor(n).float()
            raise LoraToolError(f"{self.path.name} has no weight for {module}: the two checkpoints differ in architecture.")
        return self._ldm(part, module, layout)

    def _ldm(self, part: str, module: str, layout: dict) -> torch.Tensor:
        """A module's weight in the original layout: LDM UNet names, and each text encoder where the family keeps
        it (CLIP-L whole, OpenCLIP's attention as one in_proj for q, k and v)."""
        from trainer.models.ldm_names import clip_path, diffusers_to_sgm

        if part == "unet":
            key = "model.diffusion_model." + diffusers_to_sgm(module, layout["layers_per_block"], layout["up_has_attn"]) + ".weight"
            return self._tensor(key)
        path = clip_path(module)
        prefix, kind = families.family(self.family).checkpoint_te[part]
        if kind == "clip":
            return self._tensor(prefix + path + ".weight")
        i, rest = path.removeprefix("text_model.encoder.layers.").split(".", 1)
        base = f"{prefix}transformer.resblocks.{i}."
        if rest in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv = self._tensor(base + "attn.in_proj_weight")
            return qkv.chunk(3)["qkv".index(rest.split(".")[1][0])]
        return self._tensor(base + {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}[rest] + ".weight")

    def _tensor(self, key: str) -> torch.Tensor:
        if key not in self.keys:
            raise LoraToolError(f"{self.path.name} has no tensor {key}: the two checkpoints differ in architecture.")
        return self.single.get_tensor(key).float()


def target_modules(config_dir: Path, family: str, conv: bool) -> dict[str, dict[str, tuple]]:
    """The modules kohya targets, {part: {module: weight shape}}, from the model's configs (built on the meta
    device: no memory, no weights)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from trainer.models import lora

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((config_dir / "unet" / "config.json").read_text()))
        attn, convs = lora.unet_targets(unet, conv=conv)
        mods = dict(unet.named_modules())
        out = {"unet": {n: tuple(mods[n].weight.shape) for n in attn + convs}}
        for part, sub in (("te1", "text_encoder"), ("te2", "text_encoder_2")):
            if (config_dir / sub / "config.json").is_file():
                te = CLIPTextModel(CLIPTextConfig(**json.loads((config_dir / sub / "config.json").read_text())))
                tm = dict(te.named_modules())
                out[part] = {n: tuple(tm[n].weight.shape) for n in lora.text_encoder_targets(te)}
    return out, layout_of(unet.config)


def extract(base, tuned, out, rank: int | None = None, energy: float | None = None, conv: bool = False,
            precision: str = "fp16", on_progress=None, model_config: str | None = None) -> dict:
    """A LoRA of the difference between two checkpoints of one family, on the modules kohya targets (UNet, and the
    text encoders where they differ), factorised per module and read module by module."""
    if (rank is None) == (energy is None):
        raise LoraToolError("Give either a rank (--rank N) or an energy share to keep (--energy 0.95).")
    a, b = Weights(base), Weights(tuned)
    if a.family != b.family:
        raise LoraToolError(f"{a.path.name} is {families.group_name(a.family)} and {b.path.name} is "
                            f"{families.group_name(b.family)}: extract needs two checkpoints of one family.")
    targets, layout = target_modules(Path(model_config) if model_config else a.config_dir(), a.family, conv)
    total = sum(len(v) for v in targets.values())
    modules, kept, totals, done = {}, {}, {}, 0
    for part, mods in targets.items():
        for module, shape in mods.items():
            wa, wb = a.get(part, module, layout), b.get(part, module, layout)
            diff = (wb.reshape(shape) - wa.reshape(shape)).flatten(1)
            done += 1
            if on_progress:
                on_progress(done, total)
            sq = float((diff.double() ** 2).sum())
            if part != "unet" and sq == 0:
                continue  # an unchanged text encoder gets no LoRA
            name = module_name(part, module, a.family, layout)
            down, up, alpha, kept[name] = factorise(diff, shape, rank, energy)
            modules[name], totals[name] = Module(down, up, alpha), sq
    if not modules or all(v == 0 for v in totals.values()):
        raise LoraToolError(f"{a.path.name} and {b.path.name} have the same weights on every targeted module: "
                            "there is nothing to extract.")
    tool = {"op": "extract", "base": a.path.name, "tuned": b.path.name, **({"rank": rank} if rank else {"energy": energy})}
    save(modules, a.family, out, {"ss_sd_model_name": a.path.name}, tool, DTYPES[precision])
    return {"file": str(out), "modules": len(modules), "energy_kept": block_report(modules, kept, totals),
            "ranks": sorted({int(m.rank) for m in modules.values()})}
