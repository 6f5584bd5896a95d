"""A base model given as a Hugging Face hub id ('org/name'): is it here, can it be fetched, and what to do if not.

No torch here: the UI's pre-flight check asks this, and the loader uses the same words when a fetch fails.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

HUB_TIMEOUT_S = 4.0


def is_hub_id(s: str) -> bool:
    """'org/name' (not a path: no leading / . ~, no backslash or drive colon, exactly one slash)."""
    parts = (s or "").split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~")) and "\\" not in s and ":" not in s


@dataclass
class HubStatus:
    state: str  # cached | reachable | missing | offline
    message: str

    @property
    def usable(self) -> bool:
        return self.state in ("cached", "reachable")


def how_to_get(repo_id: str) -> str:
    return (f"On a machine with internet run `hf download {repo_id}` (it fills the Hugging Face cache, "
            "`~/.cache/huggingface`; copy that folder here), or download the model's .safetensors file and give its path.")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_status(repo_id: str, cache_dir: str | None = None, timeout: float = HUB_TIMEOUT_S) -> HubStatus:
    """Where the model would come from: the local cache, the hub (with a download at Start), or nowhere."""
    from huggingface_hub import model_info, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        hit = try_to_load_from_cache(repo_id, "model_index.json", cache_dir=cache_dir)
    except ValueError:  # not a valid repo id
        hit = None
    if isinstance(hit, str):
        return HubStatus("cached", f"'{repo_id}' is in the local Hugging Face cache: no download needed.")
    if offline():
        return HubStatus("offline", f"'{repo_id}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set, "
                                    f"so it cannot be downloaded. {how_to_get(repo_id)}")
    try:
        model_info(repo_id, timeout=timeout)
    except RepositoryNotFoundError:
        return HubStatus("missing", f"There is no model '{repo_id}' on the Hugging Face hub (or it is private). "
                                    "Check the spelling, or give a local file or folder.")
    except GatedRepoError:
        return HubStatus("missing", f"'{repo_id}' is gated on the hub: accept its licence on its page and log in "
                                    "(`hf auth login`), or give a local copy.")
    except Exception as e:  # no network: DNS, refused, timeout (the HTTP client's own error types)
        return HubStatus("offline", f"'{repo_id}' is not in the local Hugging Face cache and the hub cannot be "
                                    f"reached ({type(e).__name__}). {how_to_get(repo_id)}")
    return HubStatus("reachable", f"'{repo_id}' is not downloaded yet: Start fetches it from the Hugging Face hub "
                                  "first (several GB for a full model).")


# Base models a new user can start from, with what the first use downloads (the weights the loader fetches:
# UNet, VAE and text encoders in fp32 safetensors, not the fp16 or EMA copies).
WELL_KNOWN = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "SD 1.5, about 4 GB to download once",
    "stabilityai/stable-diffusion-xl-base-1.0": "SDXL base 1.0, about 14 GB to download once",
}


def cached_models(cache_dir: str | None = None) -> list[str]:
    """Hub ids of diffusers models already in the Hugging Face cache (no network)."""
    root = Path(cache_dir or os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface"))
                .expanduser() / "hub")
    found = []
    for d in sorted(root.glob("models--*--*")) if root.is_dir() else []:
        if any(d.glob("snapshots/*/model_index.json")):
            found.append(d.name[len("models--"):].replace("--", "/", 1))
    return found
