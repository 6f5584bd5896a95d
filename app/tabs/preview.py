"""Preview tab (placeholder until the preview engine lands)."""
import gradio as gr


class PreviewTab:
    def __init__(self, ws, runs):
        self.ws, self.runs = ws, runs

    def build(self):
        gr.Markdown("Preview is coming: generate with your LoRA at several strengths.")
