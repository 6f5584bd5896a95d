"""Compose the tabs into one Gradio app. Each tab lives in its own room under app/tabs/ and registers its own
page-load refresh; the tabs and the scripting API call the same `Studio` (app/services.py)."""
from __future__ import annotations

import json

import gradio as gr

from app.captioning import CaptionJobs
from app.gpu import gpu_present
from app.runs import RunManager
from app.services import Studio
from app.tabs.dataset import DatasetTab
from app.tabs.outputs import OutputsTab
from app.tabs.preview import PreviewTab
from app.tabs.settings import SettingsTab
from app.tabs.tools import ToolsTab
from app.tabs.train import TrainTab
from app.workspace import Workspace


def gpu_banner() -> str | None:
    """A plain banner when no NVIDIA GPU is visible."""
    if gpu_present():
        return None
    return ("**No NVIDIA GPU found:** training will run on the CPU and be very slow. Fine for trying the app "
            "with the Quick test preset; for real LoRAs install the NVIDIA driver and a CUDA build of torch.")


def build_ui(workspace: str | Workspace, runs: RunManager | None = None) -> gr.Blocks:
    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    runs = runs or RunManager(ws)
    studio = Studio(ws, runs, CaptionJobs(ws, runs))
    dataset, train, outputs = DatasetTab(studio), TrainTab(studio), OutputsTab(studio)
    preview, tools, settings = PreviewTab(studio), ToolsTab(studio), SettingsTab(studio)
    with gr.Blocks(title="LoRA Studio") as ui:
        gr.Markdown("# LoRA Studio")
        gr.Markdown("**Start here:** *Dataset*: make a dataset and drop your images in, caption them → *Train*: pick a "
                    "base model and a preset, *Check setup*, *Start* → *Outputs* and *Preview*: try the LoRA at "
                    "several strengths, then copy it to your web UI.", elem_id="start-here")
        banner = gpu_banner()
        if banner:
            gr.Markdown(banner, elem_id="gpu-banner")
        with gr.Tabs():
            with gr.Tab("Dataset", id="dataset"):
                ds_dropdown = dataset.build()
            with gr.Tab("Train", id="train"):
                train.build(ds_dropdown)
            with gr.Tab("Outputs", id="outputs"):
                outputs.build()
            with gr.Tab("Preview", id="preview"):
                preview.build()
            with gr.Tab("Tools", id="tools"):
                tools.build()
            with gr.Tab("Settings", id="settings") as settings_tab:
                settings.build()
            settings.follow(settings_tab)
        for tab in (dataset, train, outputs, preview, tools, settings):
            tab.register_load(ui)
        register_api(studio)
    ui.lora_studio = {"workspace": ws, "runs": studio.runs, "tabs": {"dataset": dataset, "train": train,
                      "outputs": outputs, "preview": preview, "tools": tools, "settings": settings}}
    return ui


def register_api(studio: Studio) -> None:
    """Scriptable endpoints (gradio_client): the same pre-flight and run manager the page uses."""

    def start_run(config_json: str) -> str:
        """Start (or re-find) a run from TrainConfig values as JSON. Returns {run_id, message}."""
        values = json.loads(config_json)
        run_id, text = studio.start(values, values.pop("preset", "") if isinstance(values, dict) else "")
        return json.dumps({"run_id": run_id, "message": text})

    def run_status(run_id: str) -> str:
        return json.dumps(studio.status(run_id))

    def list_runs() -> str:
        return json.dumps(studio.list_runs())

    def stop_run(run_id: str) -> str:
        return studio.runs.stop(run_id)

    gr.api(start_run, api_name="start_run")
    gr.api(run_status, api_name="run_status")
    gr.api(list_runs, api_name="list_runs")
    gr.api(stop_run, api_name="stop_run")
