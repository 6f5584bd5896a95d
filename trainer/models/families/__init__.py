"""The model families LoRA Studio trains: one `Family` object per family or variant, one file each in this
package (torch-free: the UI asks here too). Adding a family or a variant is a file here plus its tests.

Each object holds every fact and behaviour the rest of the code asks about: names shown to people, the base
version and architecture written into exported files, how its LoRA modules are named in a kohya file (key
style of the UNet, text-encoder prefixes), how its single-file checkpoints are told apart and laid out, the
pipeline it samples with, its UNet block layout, and its calibration (activation and timing constants).
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class Calibration:
    """What a run of this family costs, measured (BENCHMARKS.md says where each figure comes from).
    Activation GB are per image at the family's native resolution, bf16, SDPA."""
    act_gb: tuple[float, float]  # the training steps: (without, with gradient checkpointing)
    sample_act_gb: float  # a sample with guidance and its decode, UNet and VAE on the device together
    sample_denoise_act_gb: float  # lean samples (TrainConfig.samples_lean): the denoising steps beside the UNet
    sample_decode_act_gb: float  # ... and the decode beside the VAE alone
    linear_share: float  # share of the UNet's parameters in Linear layers (int8 / nf4 quantise only those)
    prior_step_s: dict  # {'cpu' | 'cuda': seconds per image per step at native resolution}, before a run measured


@dataclass(frozen=True)
class Family:
    key: str  # what the engine and the config say (sd1 | sd2 | sd2v | sdxl)
    name: str  # what a person reads
    group: str  # families whose LoRAs fit each other's base models share a group (SD2 and SD2-v do)
    base_version: str  # kohya's ss_base_model_version
    architecture: str  # modelspec.architecture of a LoRA for it
    implementation: str  # modelspec.implementation
    prediction_type: str  # the model's own training target
    native_resolution: int
    params: tuple[float, float, float]  # UNet, text encoders (all), VAE: the released checkpoints' counts
    blocks: tuple[int, int, int]  # kohya's UNet blocks: IN, MID, OUT
    calibration: Calibration
    resolutions: tuple[int, int]  # the training resolutions it takes (smallest: the config's; largest: twice native)
    # kohya file: the prefix of each text encoder's modules ('te1', 'te2'), and how UNet paths are written
    te_prefixes: dict = field(default_factory=lambda: {"te1": "lora_te_"})
    unet_key_style: str = "diffusers"  # 'diffusers' (down_blocks_0_...) or 'sgm' (input_blocks_1_1_...)
    # single-file checkpoints: the key prefix that tells the family apart (a variant shares its group's), and
    # where each text encoder lives in the original layout: part -> (prefix, 'clip' | 'openclip')
    checkpoint_marker: str | None = None
    checkpoint_te: dict = field(default_factory=dict)
    tokenizer_pads: tuple = (None,)  # pad token of each tokenizer (None: the tokenizer's own)
    pipeline: str = "StableDiffusionPipeline"  # the diffusers pipeline class it samples with
    sample_scheduler: str = "DDIMScheduler"  # the sampler of the training samples
    sd_scripts_trainer: str = "train_network.py"  # the kohya sd-scripts script that trains its LoRAs
    pooled_conditioning: bool = False  # the UNet also takes the pooled text embedding and size/crop time ids
    guessable: bool = False  # the family a bare resolution suggests, when nothing is loaded yet (see guess())
    # a variant (another family of the same group) tells itself apart in a single-file checkpoint:
    # detect(keys, tensor, metadata), tensor(key) -> the tensor or None, read only when asked
    detect: Callable | None = None

    @property
    def te_parts(self) -> tuple[str, ...]:
        return tuple(self.te_prefixes)

    @property
    def text_encoders(self) -> int:
        return len(self.te_prefixes)

    @property
    def is_v2(self) -> bool:
        return self.group == "sd2"

    @property
    def group_name(self) -> str:
        return FAMILIES[self.group].name.split(" (")[0]

    @property
    def config_dir(self) -> Path:
        """The shipped diffusers configs of this family's architecture (no weights): its own, or its group's for a
        variant that differs only in what the configs do not say."""
        own = CONFIG_ROOT / self.key
        return own if own.is_dir() else CONFIG_ROOT / self.group

    @property
    def block_names(self) -> list[str]:
        n_in, _, n_out = self.blocks
        return [f"IN{i:02d}" for i in range(n_in)] + ["MID"] + [f"OUT{i:02d}" for i in range(n_out)]

    def part_prefix(self, part: str) -> str:
        """The kohya prefix of a part's modules: 'lora_unet_', 'lora_te_', 'lora_te1_', 'lora_te2_'."""
        if part == "unet":
            return "lora_unet_"
        try:
            return self.te_prefixes[part]
        except KeyError:
            raise ValueError(f"{self.name} has no text encoder '{part}'.") from None

    def unet_path(self, module: str, layout: dict) -> str:
        """A diffusers UNet module path as this family's kohya files write it."""
        if self.unet_key_style == "sgm":
            from trainer.models.ldm_names import diffusers_to_sgm

            return diffusers_to_sgm(module, layout["layers_per_block"], layout.get("up_has_attn"))
        return module


def _discover() -> dict[str, Family]:
    found: list[Family] = []
    for info in pkgutil.iter_modules(__path__):
        found += importlib.import_module(f"{__name__}.{info.name}").FAMILIES
    return {f.key: f for f in sorted(found, key=lambda f: f.key)}


FAMILIES: dict[str, Family] = _discover()
KEYS = tuple(FAMILIES)


def family(key: str) -> Family:
    try:
        return FAMILIES[key]
    except KeyError:
        raise ValueError(f"Unknown model family '{key}'. Known: {', '.join(KEYS)}.") from None


def name(key: str, unknown: str = "unknown until loaded") -> str:
    """The name a person reads; `unknown` for 'auto' or anything not a family."""
    return FAMILIES[key].name if key in FAMILIES else unknown


def group(key: str) -> str:
    """The LoRA-compatibility group of a family key ('sd2v' -> 'sd2'); other strings come back unchanged."""
    return FAMILIES[key].group if key in FAMILIES else key


def group_name(key: str) -> str:
    return FAMILIES[group(key)].group_name if group(key) in FAMILIES else key


def groups() -> list[Family]:
    """One family per LoRA-compatibility group (the group's own)."""
    return [f for f in FAMILIES.values() if f.key == f.group]


def from_base_version(version: str) -> Family | None:
    """The family whose LoRAs say `ss_base_model_version = version`."""
    return next((f for f in FAMILIES.values() if f.base_version == version), None)


def guess(resolution: int) -> Family:
    """The family a training resolution suggests before a model is loaded: the guessable family with the largest
    native resolution at or below it (SDXL from 1024 px, SD 1.x below)."""
    pick = [f for f in FAMILIES.values() if f.guessable]
    fits = [f for f in pick if f.native_resolution <= resolution]
    return max(fits, key=lambda f: f.native_resolution) if fits else min(pick, key=lambda f: f.native_resolution)


def resolve(key: str, resolution: int) -> Family:
    """The family of `key`, or the one `guess` gives when the key is 'auto' or unknown (a hub id not fetched yet)."""
    return FAMILIES[key] if key in FAMILIES else guess(resolution)


def from_checkpoint_keys(keys) -> Family | None:
    """The family (group) of a single-file checkpoint, from the keys that only its text encoders have."""
    keys = list(keys)
    for f in FAMILIES.values():
        if f.checkpoint_marker and any(k.startswith(f.checkpoint_marker) for k in keys):
            return f
    return None


def variant_of(base: Family, keys, tensor=lambda k: None, metadata: dict | None = None) -> Family:
    """The variant of `base`'s group that a single-file checkpoint is (sd2 -> sd2v, sdxl -> sdxlv), else `base`."""
    keys, metadata = set(keys), metadata or {}
    return next((f for f in FAMILIES.values()
                 if f.group == base.group and f.detect and f.detect(keys, tensor, metadata)), base)


def with_prediction(group_key: str, prediction_type: str) -> Family:
    """The family of a group that trains with `prediction_type` (a diffusers folder's scheduler says which)."""
    base = family(group_key)
    return next((f for f in FAMILIES.values() if f.group == base.group and f.prediction_type == prediction_type), base)
