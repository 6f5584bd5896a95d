"""Compose the tabs into one Gradio app."""
from __future__ import annotations

import gradio as gr

from app.gpu import gpu_present
from app.runs import RunManager
from app.tabs.dataset import DatasetTab
from app.tabs.preview import PreviewTab
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
                pv_tab = PreviewTab(ws, runs)
                pv_tab.build()
            with gr.Tab("Settings", id="settings"):
                train_tab.build_settings()
        register_api(ws, runs, train_tab)
        # a reloaded page gets fresh lists and re-attaches to the running run
        ui.load(train_tab.on_page_load, None, train_tab.load_outputs())
        ui.load(lambda: gr.Dropdown(choices=ws.list_datasets()), None, ds_dropdown)
        ui.load(pv_tab.on_page_load, None, [pv_tab.base_dd] + pv_tab.files)
    ui.lora_studio = {"workspace": ws, "runs": runs}
    return ui


def register_api(ws: Workspace, runs: RunManager, train_tab: TrainTab) -> None:
    """Scriptable endpoints (gradio_client): the same pre-flight and run manager the page uses."""
    import json

    def start_run(config_json: str) -> str:
        """Start (or re-find) a run from TrainConfig values as JSON. Returns {run_id, created, message}."""
        values = json.loads(config_json)
        run_id, text = train_tab.start(values, values.pop("preset", "") if isinstance(values, dict) else "")
        return json.dumps({"run_id": run_id, "message": text})

    def run_status(run_id: str) -> str:
        run = runs.get(run_id)
        if run is None:
            return json.dumps({"error": f"no run {run_id}"})
        v = runs.view(run_id)
        return json.dumps({"status": run["status"], "state": v.state, "step": v.step, "total": v.total,
                           "loss": v.losses[-1][1] if v.losses else None, "error": v.error, "output": v.output})

    def list_runs() -> str:
        return json.dumps([{k: r[k] for k in ("id", "name", "status", "dir")} for r in runs.list()])

    def stop_run(run_id: str) -> str:
        return runs.stop(run_id)

    gr.api(start_run, api_name="start_run")
    gr.api(run_status, api_name="run_status")
    gr.api(list_runs, api_name="list_runs")
    gr.api(stop_run, api_name="stop_run")
