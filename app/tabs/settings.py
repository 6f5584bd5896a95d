"""Settings tab: the person's choices that outlive a run (the web UI's LoRA folder, the captioning model)."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from app.ui_util import friendly


class SettingsTab:
    def __init__(self, studio):
        self.studio, self.ws = studio, studio.ws

    def save(self, path: str, caption_model: str | None = None) -> str:
        p = Path(path).expanduser() if path else None
        if p and not p.is_dir():
            return f"{p} is not a folder."
        changes = {"webui_lora_dir": str(p) if p else ""}
        if caption_model is not None:
            changes["caption_model"] = caption_model.strip()
        self.ws.update_settings(**changes)
        return "Saved."

    def build(self):
        self.lora_dir = gr.Textbox(label="Your web UI's LoRA folder (A1111/Forge: models/Lora, ComfyUI: models/loras)",
                                   value=self.ws.settings().get("webui_lora_dir", ""))
        self.caption = gr.Textbox(label="Captioning model for the Dataset tab's auto-caption (hub id or local folder; "
                                        "the last one used is remembered)", value=self.ws.caption_model(),
                                  elem_id="settings-caption-model")
        save = gr.Button("Save settings")
        msg = gr.Markdown()
        save.click(friendly(self.save), [self.lora_dir, self.caption], msg)

    def values(self) -> tuple[str, str]:
        return self.ws.settings().get("webui_lora_dir", ""), self.ws.caption_model()

    def register_load(self, ui) -> None:
        ui.load(self.values, None, [self.lora_dir, self.caption])

    def follow(self, tab) -> None:
        """Opening the tab shows what other tabs remembered since the page loaded (the captioning model)."""
        tab.select(self.values, None, [self.lora_dir, self.caption])
