"""LoRA Studio web UI (Gradio). Never imports torch at start-up: the GPU belongs to the worker processes."""
