"""A sweep's set-up (issue 30): one base, its caches and one accelerator; a network per variant.

Each variant gets a copy of the UNet and text encoders *structure* whose frozen weights are the base's own tensors
(deepcopy with every parameter and buffer in the memo), so peft injects its own network into each copy as it does
into a lone model: LoRA, LoHa and LoKr side by side, each variant's network, dropouts and hooks its own, and the
base held once. The loop (engine/loop.py) runs the variants one after another on each batch, with the same seeds,
so each variant trains what a run of its settings alone would. Each variant keeps its checkpoints and samples in
variants/<name>/ of the run folder; its file is <output_name>-<name>.safetensors in the run folder itself.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
from pathlib import Path

import torch

from trainer.engine import checkpoint as ckpt
from trainer.engine.setup import Base, Run, TrainingError, add_network, inject_lora, setup_base
from trainer.models.load import LoadedModel
from trainer.recipe import sweep
from trainer.runfiles import VARIANTS, RunFiles


def shared_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of a module's structure that holds the very same parameter and buffer tensors (no weight copied)."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


def variant_model(model: LoadedModel) -> LoadedModel:
    """The base with its own UNet and text-encoder modules for a variant's network to go into."""
    return dataclasses.replace(model, unet=shared_copy(model.unet),
                               text_encoders=[shared_copy(te) for te in model.text_encoders], lora_names={})


class VariantLog:
    """The run's event log, each event marked with the variant it is about (and its message with its name)."""

    def __init__(self, ev, name: str):
        self.ev, self.name = ev, name

    def emit(self, type: str, **data) -> dict:
        if data.get("message"):
            data["message"] = f"[{self.name}] {data['message']}"
        return self.ev.emit(type, variant=self.name, **data)


def setup_sweep(cfg, run_dir: str | Path, echo=print, model: LoadedModel | None = None) -> tuple[Base, list[Run]]:
    """(the shared base, a Run per variant) of a config with `variants`."""
    base = setup_base(cfg, run_dir, echo, model)
    if base.accelerator.num_processes > 1:
        raise TrainingError("A sweep trains its variants on one GPU: start it on one GPU (or run each variant as a "
                            "run of its own across GPUs).")
    variants = sweep.variant_configs(cfg)
    copies = [variant_model(base.model) for _ in variants]  # all taken from the base before any network goes in
    base.ev.emit("log", message=f"Sweep: {len(variants)} variants on one base ({', '.join(n for n, _ in variants)})")
    # every network goes in before any is placed: placing stores an fp8 base, and peft's DoRA reads the base's
    # weights as it goes in (in a lone run, too, the network goes in before the base is stored)
    alphas = [inject_lora(vcfg, vmodel) for (_, vcfg), vmodel in zip(variants, copies)]
    runs = []
    for (name, vcfg), vmodel, settings, injected in zip(variants, copies, cfg.variants, alphas):
        files = RunFiles(base.files.root / VARIANTS / name)
        if base.accelerator.is_main_process:
            files.root.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temp(files.root)
        run = add_network(base, vcfg, vmodel, files, VariantLog(base.ev, name), injected)
        run.info.update(variant=name, variant_settings={k: v for k, v in settings.items() if k != "name"})
        runs.append(run)
    return base, runs
