"""Outputs tab: every run with its settings; its LoRA files (final and checkpoints) to inspect, download, copy."""
from __future__ import annotations

import gradio as gr

from app.ui_util import friendly
from trainer.models.sniff import read_metadata

SHOWN_METADATA = ("ss_base_model_version", "ss_network_dim", "ss_network_alpha", "ss_steps", "ss_trigger_words",
                  "ss_output_name", "modelspec.architecture")


class OutputsTab:
    def __init__(self, studio):
        self.studio, self.ws = studio, studio.ws

    def file_metadata(self, path: str) -> tuple[dict, str | None]:
        if not path:
            return {}, None
        p = self.ws.resolve_file(path)
        md = read_metadata(p)
        return {k: md[k] for k in SHOWN_METADATA if k in md}, self.studio.download_copy(str(p))

    def build(self):
        studio, ws = self.studio, self.ws
        self.empty = gr.Markdown(self.empty_note(), elem_id="outputs-empty")
        self.table = gr.Dataframe(headers=["run", "status", "name", "base model", "rank/alpha", "steps", "trigger",
                                           "lowest validation loss"],
                                  value=studio.outputs_table(), interactive=False, elem_id="outputs-table")
        with gr.Row():
            self.pick = gr.Dropdown(choices=studio.run_choices(), label="Run", scale=3, elem_id="out-run")
            refresh = gr.Button("Refresh", scale=1, elem_id="out-refresh")
        files = gr.Dropdown(label="LoRA file (final or a checkpoint)", choices=[], elem_id="out-file")
        meta = gr.JSON(label="Metadata")
        with gr.Row():
            download = gr.DownloadButton("Download", elem_id="out-download")
            copy = gr.Button("Copy to my web UI's LoRA folder")
            open_folder = gr.Button("Show folder")
        msg = gr.Markdown()

        @friendly
        def on_pick(run_id):
            run = studio.runs.get(run_id) if run_id else None
            if not run:
                return gr.Dropdown(choices=[]), {}, None
            from app.services import run_metadata

            choices = studio.lora_file_choices(run_id)
            first = choices[0][1] if choices else None
            return (gr.Dropdown(choices=choices, value=first), run_metadata(run),
                    studio.download_copy(first) if first else None)

        refresh.click(self.lists, None, [self.table, self.pick, self.empty])
        shown = gr.State("")
        # the table, the run list and the picked run's files follow the runs by themselves (Refresh is a convenience)
        gr.Timer(2.0).tick(friendly(self.follow), [self.pick, files, shown],
                           [self.table, self.pick, files, shown, self.empty], show_progress="hidden")
        self.pick.change(on_pick, self.pick, [files, meta, download])
        files.change(friendly(self.file_metadata), files, [meta, download])
        copy.click(friendly(lambda p: studio.copy_to_webui(p) if p else "Pick a file."), files, msg)
        open_folder.click(friendly(lambda p: f"`{ws.resolve_file(p).parent}`" if p else "Pick a file."), files, msg)

    def follow(self, run_id: str | None, file: str | None, shown: str):
        """Updates only when a run was added, changed status or wrote a LoRA file since the page last looked."""
        sig = self.studio.runs_signature()
        if sig == shown:
            return gr.update(), gr.update(), gr.update(), shown, gr.update()
        choices = self.studio.lora_file_choices(run_id) if run_id else []
        paths = [path for _, path in choices]
        # choices only (a tick that left before the person picked something must not undo the pick), except
        # when the shown file is gone or none is shown yet
        files = gr.update()
        if run_id:
            files = (gr.Dropdown(choices=choices) if file in paths
                     else gr.Dropdown(choices=choices, value=paths[0] if paths else None))
        return self.studio.outputs_table(), gr.Dropdown(choices=self.studio.run_choices()), files, sig, self.empty_note()

    def lists(self):
        return self.studio.outputs_table(), gr.Dropdown(choices=self.studio.run_choices()), self.empty_note()

    def empty_note(self) -> str:
        """What an empty table means, and what to do: it says nothing itself."""
        return "" if self.studio.run_choices() else "No runs yet: train one in the *Train* tab, and it shows here."

    def register_load(self, ui) -> None:
        ui.load(self.lists, None, [self.table, self.pick, self.empty])
