"""The model families LoRA Studio trains, and every fact about them, in one table (torch-free).

Everyone else asks here: names shown to people, the base versions and architectures written into exported
files, native resolution and parameter counts for the estimate, the block numbering of the UNet.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    key: str  # sd1 | sd2 | sd2v | sdxl: what the engine and the config say
    name: str  # what a person reads
    group: str  # sd1 | sd2 | sdxl: families whose LoRAs fit each other's base models (SD2 and SD2-v do)
    base_version: str  # kohya's ss_base_model_version
    architecture: str  # modelspec.architecture of a LoRA for it
    prediction_type: str  # the model's own training target
    native_resolution: int
    params: tuple[float, float, float]  # UNet, text encoders (all), VAE: the released checkpoints' counts
    text_encoders: int = 1

    @property
    def is_sdxl(self) -> bool:
        return self.key == "sdxl"

    @property
    def is_v2(self) -> bool:
        return self.group == "sd2"

    @property
    def group_name(self) -> str:
        return FAMILIES[self.group].name.split(" (")[0]


FAMILIES: dict[str, Family] = {
    f.key: f
    for f in (
        Family("sd1", "SD 1.x", "sd1", "sd_v1", "stable-diffusion-v1/lora", "epsilon", 512, (860e6, 123e6, 84e6)),
        Family("sd2", "SD 2.x (epsilon)", "sd2", "sd_v2", "stable-diffusion-v2-512/lora", "epsilon", 768,
               (865e6, 340e6, 84e6)),
        Family("sd2v", "SD 2.x 768-v (v-prediction)", "sd2", "sd_v2_v", "stable-diffusion-v2-768-v/lora",
               "v_prediction", 768, (865e6, 340e6, 84e6)),
        Family("sdxl", "SDXL", "sdxl", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "epsilon", 1024,
               (2567e6, 123e6 + 695e6, 84e6), text_encoders=2),
    )
}
KEYS = tuple(FAMILIES)
# kohya's LoRA block names: SD1/SD2 UNets have 12 IN, 1 MID and 12 OUT blocks, SDXL 9 / 1 / 9
BLOCKS = {"sd1": (12, 1, 12), "sd2": (12, 1, 12), "sdxl": (9, 1, 9)}


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


def from_base_version(version: str) -> Family | None:
    """The family whose LoRAs say `ss_base_model_version = version`."""
    return next((f for f in FAMILIES.values() if f.base_version == version), None)
