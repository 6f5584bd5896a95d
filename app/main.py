"""Compose the tabs into one Gradio app."""
from __future__ import annotations

import shutil
import subprocess

import gradio as gr

from app.runs import RunManager
from app.tabs.dataset import DatasetTab
from app.tabs.train import TrainTab
from app.workspace import Workspace


def gpu_banner() -> str | None:
    """A plain banner when no NVIDIA GPU is visible; found without importing torch."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=5)
            if out.returncode == 0 and "GPU" in out.stdout:
                return None
        except (OSError, subprocess.TimeoutExpired):
            pass
    return ("**No NVIDIA GPU found:** training will run on the CPU and be very slow. Fine for trying the app "
            "with the Quick test preset; for real LoRAs install the NVIDIA driver and a CUDA build of torch.")


def build_ui(workspace: str | Workspace, runs: RunManager | None = None) -> gr.Blocks:
    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    runs = runs or RunManager(ws)
    ds_tab, train_tab = DatasetTab(ws), TrainTab(ws, runs)
    with gr.Blocks(title="LoRA Studio") as ui:
        gr.Markdown("# LoRA Studio")
        banner = gpu_banner()
        if banner:
            gr.Markdown(banner, elem_id="gpu-banner")
        with gr.Tabs():
            with gr.Tab("Dataset", id="dataset"):
                ds_dropdown = ds_tab.build()
            with gr.Tab("Train", id="train"):
                train_tab.build(ds_dropdown)
            with gr.Tab("Outputs", id="outputs"):
                train_tab.build_outputs()
            with gr.Tab("Preview", id="preview"):
                from app.tabs.preview import PreviewTab

                PreviewTab(ws, runs).build()
            with gr.Tab("Settings", id="settings"):
                train_tab.build_settings()
    ui.lora_studio = {"workspace": ws, "runs": runs}
    return ui
