"""Start LoRA Studio: python launch.py [--host 127.0.0.1] [--port 7860] [--workspace DIR] [--no-browser] [--listen] [--share]"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="LoRA Studio: train Stable Diffusion LoRAs on your own GPU")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this computer only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--workspace", default=os.environ.get("LORA_STUDIO_WORKSPACE", str(Path.home() / "LoRA-Studio")),
                   help="folder for datasets, runs and settings")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser window")
    p.add_argument("--listen", action="store_true", help="accept connections from other computers (binds 0.0.0.0)")
    p.add_argument("--share", action="store_true", help="create a public Gradio share link (off by default)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from app.main import build_ui
    from app.workspace import Workspace

    try:
        ws = Workspace(args.workspace)
    except OSError as e:
        print(f"error: cannot use the workspace folder {args.workspace} ({e.strerror}). Pass --workspace DIR.", file=sys.stderr)
        return 2
    host = "0.0.0.0" if args.listen and args.host == "127.0.0.1" else args.host
    ui = build_ui(ws)
    print(f"LoRA Studio: workspace {ws.root}", flush=True)
    ui.queue(default_concurrency_limit=4).launch(
        server_name=host, server_port=args.port, share=args.share, inbrowser=not args.no_browser,
        allowed_paths=[str(ws.root)], show_error=False, quiet=False, footer_links=[],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
