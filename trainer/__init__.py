"""LoRA Studio training engine. Never imports gradio; everything is reachable from `python -m trainer`."""
__version__ = "0.1.0"
