"""Load a base model from a diffusers folder, a single-file checkpoint (offline) or a hub id.

Single files are read with safetensors (or `torch.load(weights_only=True)` for .ckpt) and converted by
diffusers' own single-file loader against configs shipped in `trainer/models/configs/`, so no hub
request happens.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.models import families
from trainer.models.families import name as family_name
from trainer.models.hub import how_to_get, hub_status, is_hub_id
from trainer.models.sniff import family_from_folder

log = logging.getLogger(__name__)

CONFIG_ROOT = families.CONFIG_ROOT


class ModelError(ValueError):
    """A base-model problem a user can fix; the message says what and how."""


@dataclass
class LoadedModel:
    family: str  # sd1 | sd2 | sd2v | sdxl
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    noise_scheduler: object
    source: str
    lora_names: dict = field(default_factory=dict)  # part -> {module path: kohya name}, given at injection

    @property
    def spec(self) -> families.Family:
        """The family's facts and behaviour (key names, pipeline, calibration)."""
        return families.family(self.family)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def zero_terminal_snr(self) -> bool:
        """Whether the noise schedule ends in pure noise (rescaled betas)."""
        return bool(self.noise_scheduler.config.get("rescale_betas_zero_snr", False))

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def pipeline(self, scheduler=None):
        """A diffusers pipeline over these very modules (adapters included)."""
        import diffusers

        spec = self.spec
        sched = scheduler or getattr(diffusers, spec.sample_scheduler).from_config(self.noise_scheduler.config)
        parts = {}
        for i, (te, tok) in enumerate(zip(self.text_encoders, self.tokenizers)):
            suffix = f"_{i + 1}" if i else ""
            parts[f"text_encoder{suffix}"], parts[f"tokenizer{suffix}"] = te, tok
        return getattr(diffusers, spec.pipeline)(vae=self.vae, unet=self.unet, scheduler=sched, **parts,
                                                 **pipeline_extras(spec))


def pipeline_extras(spec: families.Family) -> dict:
    """What a family's pipeline needs beside its modules: SD 1.x / 2.x pipelines come with a safety checker
    slot, left empty (the trainer shows what the model makes)."""
    if spec.pooled_conditioning:
        return {}
    return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def text_encoder_names(spec: families.Family) -> list[str]:
    """The pipeline's attribute names of the text encoders: text_encoder, text_encoder_2, ..."""
    return ["text_encoder" + (f"_{i + 1}" if i else "") for i in range(spec.text_encoders)]


def from_pipeline(pipe, family: str, source: str = "memory") -> LoadedModel:
    """A LoadedModel over an existing pipeline's modules (single-file loads, tiny test and benchmark models)."""
    from diffusers import DDPMScheduler

    names = text_encoder_names(families.family(family))
    tes = [getattr(pipe, n) for n in names]
    toks = [getattr(pipe, n.replace("text_encoder", "tokenizer")) for n in names]
    pred = families.family(family).prediction_type
    return LoadedModel(family, pipe.unet, pipe.vae, tes, toks, DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=pred), source)


def random_full_size(family: str, device="cpu", dtype=torch.float32) -> LoadedModel:
    """The real SD1.5 / SDXL architecture from the shipped configs, random weights (for benchmarks)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = families.family(family)
    d = spec.config_dir
    rd = lambda p: json.loads((d / p).read_text())  # noqa: E731
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(rd("unet/config.json")).to(dtype)
        vae = AutoencoderKL.from_config(rd("vae/config.json")).to(dtype)
        tes = [(CLIPTextModelWithProjection if i else CLIPTextModel)(CLIPTextConfig(**rd(f"{n}/config.json"))).to(dtype)
               for i, n in enumerate(text_encoder_names(spec))]
    toks = [clip_tokenizer(pad=pad) for pad in spec.tokenizer_pads]
    sched = DDPMScheduler.from_config(rd("scheduler/scheduler_config.json"))
    return LoadedModel(family, unet, vae, tes, toks, sched, f"random {family}")


def read_checkpoint(path: Path) -> dict:
    """State dict of a single-file checkpoint, through safetensors or weights-only torch.load."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        if suffix in (".ckpt", ".pt", ".pth", ".bin"):
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
            return sd.get("state_dict", sd) if isinstance(sd, dict) else {}
    except Exception as e:  # safetensors/pickle raise many types for a damaged file
        raise ModelError(
            f"Could not read the checkpoint {path.name}: the file is damaged, incomplete or not a model "
            f"({str(e).splitlines()[0][:160] if str(e) else type(e).__name__}). Download it again."
        ) from None
    raise ModelError(f"{path.name}: unsupported file type '{suffix}'. Use a .safetensors (preferred) or .ckpt file.")


def family_from_checkpoint(sd: dict) -> str:
    return _family(sd.keys(), lambda k: sd[k] if k in sd else None, {})


def family_of_file(path: Path) -> str:
    """The family of a single-file checkpoint. A .safetensors file is told from its header and at most one small
    tensor, so the weights are read once, by the loader (an SDXL file is 7 GB: reading it twice doubles peak RAM)."""
    if path.suffix.lower() != ".safetensors":
        sd = read_checkpoint(path)
        if not sd:
            raise ModelError(f"{path.name} holds no weights. Download it again.")
        return family_from_checkpoint(sd)
    from safetensors import safe_open

    keys, metadata = _header(path)

    def tensor(k):
        if k not in keys:
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(k)
        except Exception:  # a damaged file is reported by the loader, with its own message
            return None

    return _family(keys, tensor, metadata)


def _header(path: Path) -> tuple[list[str], dict]:
    """(tensor keys, metadata) of a .safetensors checkpoint's header; ModelError when it is not one."""
    from trainer.models.sniff import safetensors_header

    try:
        header = safetensors_header(path)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"Could not read the checkpoint {path.name}: the file is damaged, incomplete or not a model "
                         f"({e}). Download it again.") from None
    keys = [k for k in header if k != "__metadata__"]
    if not keys:
        raise ModelError(f"{path.name} holds no weights. Download it again.")
    return keys, header.get("__metadata__") or {}


def zero_terminal_snr_marked(path: Path) -> bool:
    """Whether a single file says it was trained with zero-terminal SNR (a `ztsnr` key, as ComfyUI reads it)."""
    return path.suffix.lower() == ".safetensors" and "ztsnr" in _header(path)[0]


def _family(keys, tensor, metadata: dict) -> str:
    base = families.from_checkpoint_keys(keys)
    if base:
        return families.variant_of(base, keys, tensor, metadata).key
    raise ModelError(
        "Unknown architecture: the checkpoint has no SD 1.x, SD 2.x or SDXL text-encoder keys. "
        "LoRA Studio trains SD 1.5, SD 2.x and SDXL models; is this an inpainting, Flux or SD3 model, or a LoRA?"
    )


def load_model(base_model: str, family: str = "auto", config_dir: str | None = None, dtype=torch.float32) -> LoadedModel:
    """Load all parts of a base model. Raise ModelError with a plain message when that is not possible."""
    if not base_model:
        raise ModelError("No base model given: choose a .safetensors checkpoint, a diffusers folder or a hub id.")
    path = Path(os.path.expanduser(base_model))
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(
                f"{path} is a folder but not a diffusers model (no model_index.json). "
                "Pick the .safetensors file itself, or the folder that holds model_index.json."
            )
        detected = family_from_folder(path)
        return _from_pretrained(str(path), family if family != "auto" else detected, dtype, local_only=True)
    if path.is_file():
        return _from_single_file(path, family, config_dir, dtype)
    # 'org/name' is a hub id, even on Linux where it also reads as a relative path (it used to get "Check the path")
    if is_hub_id(base_model) and path.suffix.lower() not in (".safetensors", ".ckpt"):
        return _from_hub(base_model, family, dtype)
    if path.suffix.lower() in (".safetensors", ".ckpt") or os.sep in base_model or base_model.startswith("."):
        raise ModelError(f"Base model not found: {base_model}. Check the path.")
    raise ModelError(
        f"Base model '{base_model}' is neither an existing file or folder nor a hub id like 'org/name'."
    )


def _from_hub(repo_id: str, family: str, dtype) -> LoadedModel:
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id, allow_patterns=["*.json", "*.txt", "unet/*.safetensors", "vae/*.safetensors", "text_encoder*/*.safetensors"],
            ignore_patterns=["*.fp16.*", "*non_ema*", "*.ema.*"],
        )
    except Exception as e:
        status = hub_status(repo_id)
        raise ModelError(status.message if not status.usable else (
            f"Could not fetch '{repo_id}' from the hub ({type(e).__name__}: {str(e)[:200]}). {how_to_get(repo_id)}")) from None
    detected = family_from_folder(Path(folder))
    return _from_pretrained(folder, family if family != "auto" else detected, dtype, local_only=True)


def _from_pretrained(folder: str, family: str, dtype, local_only: bool) -> LoadedModel:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kw = {"local_files_only": local_only}
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, **kw)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, **kw)
        names = text_encoder_names(families.family(family))
        tes = [(CLIPTextModelWithProjection if i else CLIPTextModel).from_pretrained(folder, subfolder=n, torch_dtype=dtype, **kw)
               for i, n in enumerate(names)]
        toks = [CLIPTokenizer.from_pretrained(folder, subfolder=n.replace("text_encoder", "tokenizer"), **kw) for n in names]
        sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", **kw)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ModelError(
            f"The diffusers model in {folder} is incomplete or damaged ({str(e).splitlines()[0][:200]}). "
            "Download it again."
        ) from None
    if family == "sd2v" and sched.config.prediction_type != "v_prediction":
        sched = DDPMScheduler.from_config(sched.config, prediction_type="v_prediction")
    return LoadedModel(family, unet, vae, tes, toks, sched, folder)


def clip_tokenizer(pad: str | None = None):
    """OpenAI CLIP's BPE tokenizer from the files shipped with the package (SD2 / SDXL's second pads with '!')."""
    from transformers import CLIPTokenizer

    kw = {"pad_token": pad} if pad else {}
    return CLIPTokenizer.from_pretrained(str(CONFIG_ROOT / "clip_tokenizer"), **kw)


def shipped_config_dir(family: str) -> Path:
    return families.family(family).config_dir


def _from_single_file(path: Path, family: str, config_dir: str | None, dtype) -> LoadedModel:
    import diffusers

    detected = family_of_file(path)
    fam = detected if family == "auto" else family
    if families.group(fam) != families.group(detected):
        raise ModelError(
            f"{path.name} is a {family_name(detected)} checkpoint, but model_family is set to {family_name(fam)}. "
            "Set model_family to auto."
        )
    cfg_dir = Path(config_dir) if config_dir else shipped_config_dir(fam)
    if not (cfg_dir / "model_index.json").is_file():
        raise ModelError(f"No model configs for {family_name(fam)} at {cfg_dir}; the installation is incomplete.")
    spec = families.family(fam)
    cls = getattr(diffusers, spec.pipeline)
    extra = {k: v for k, v in pipeline_extras(spec).items() if k != "feature_extractor"}
    if not config_dir:  # the shipped configs carry no tokenizer files: use the one shipped CLIP BPE
        for n, pad in zip(text_encoder_names(spec), spec.tokenizer_pads):
            extra[n.replace("text_encoder", "tokenizer")] = clip_tokenizer(pad=pad)
    try:
        pipe = cls.from_single_file(
            str(path), config=str(cfg_dir), local_files_only=True, torch_dtype=dtype, **extra
        )
    except Exception as e:
        raise ModelError(
            f"Could not convert {path.name} as {family_name(fam)} ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__}). "
            "The file may be damaged, or of an architecture LoRA Studio does not train."
        ) from None
    model = from_pipeline(pipe, fam, str(path))
    if zero_terminal_snr_marked(path):  # the schedule the model was trained on: its last timestep is pure noise
        from diffusers import DDPMScheduler

        model.noise_scheduler = DDPMScheduler.from_config(model.noise_scheduler.config, rescale_betas_zero_snr=True,
                                                          timestep_spacing="trailing")
    return model
