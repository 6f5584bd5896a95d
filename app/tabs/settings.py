"""Settings tab: the person's choices that outlive a run (the web UI's LoRA folder)."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from app.ui_util import friendly


class SettingsTab:
    def __init__(self, ws):
        self.ws = ws

    def save(self, path: str) -> str:
        p = Path(path).expanduser() if path else None
        if p and not p.is_dir():
            return f"{p} is not a folder."
        self.ws.update_settings(webui_lora_dir=str(p) if p else "")
        return "Saved."

    def build(self):
        self.lora_dir = gr.Textbox(label="Your web UI's LoRA folder (A1111/Forge: models/Lora, ComfyUI: models/loras)",
                                   value=self.ws.settings().get("webui_lora_dir", ""))
        save = gr.Button("Save settings")
        msg = gr.Markdown()
        save.click(friendly(self.save), self.lora_dir, msg)

    def register_load(self, ui) -> None:
        ui.load(lambda: self.ws.settings().get("webui_lora_dir", ""), None, self.lora_dir)
