"""`python -m trainer <command>`: train, export, dataset, caption, presets, bench. The UI runs exactly these."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

# Quiet the libraries' chatter before they are imported (progress bars, hub hints).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

EXIT_USER_ERROR = 2
EXIT_INTERNAL = 1


def _user_errors():
    from trainer.recipe.config import ConfigError
    from trainer.engine.setup import TrainingError
    from trainer.models.load import ModelError

    return (ConfigError, ModelError, TrainingError)


def _parse_set(pairs: list[str]) -> dict:
    """--set key=value overrides; values parsed as TOML scalars when they can be."""
    from trainer.recipe.config import tomllib

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"error: --set expects key=value, got '{pair}'")
        k, v = pair.split("=", 1)
        try:
            out[k.strip()] = tomllib.loads(f"x = {v}")["x"]
        except Exception:
            out[k.strip()] = v
    return out


def launch_with_accelerate(args) -> int:
    """`train CFG --accelerate-config FILE`: the same command under `accelerate launch --config_file FILE` (a
    config made by `accelerate config`: several GPUs, several machines; accelerate's own launcher, never ours)."""
    import subprocess

    conf = Path(args.accelerate_config)
    if not conf.is_file():
        print(f"error: accelerate config {conf} not found: make one with `accelerate config --config_file {conf}`.",
              file=sys.stderr)
        return EXIT_USER_ERROR
    rest = ["train", str(args.config)] + (["--run-dir", str(args.run_dir)] if args.run_dir else [])
    rest += (["--resume"] if args.resume else []) + [x for kv in args.set for x in ("--set", kv)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(conf), "-m", "trainer", *rest]
    return subprocess.call(cmd)


def cmd_train(args) -> int:
    from trainer.recipe.config import TrainConfig
    from trainer.engine.loop import train
    from trainer.runfiles import RunFiles

    if getattr(args, "accelerate_config", None):
        return launch_with_accelerate(args)
    cfg = TrainConfig.load(args.config)
    if args.set:
        cfg = TrainConfig.from_dict({**cfg.to_dict(), **_parse_set(args.set)}, source="--set")
    run_dir = Path(args.run_dir or cfg.output_dir)
    try:
        cfg.validate()
        if int(os.environ.get("RANK", "0")) == 0:
            from trainer.engine.setup import check_output_dir

            check_output_dir(run_dir)
            saved = RunFiles(run_dir).config
            if not saved.exists() or Path(args.config).resolve() != saved.resolve():
                cfg.save(saved)
        out = train(cfg, run_dir, resume=args.resume, echo=lambda m: print(m, file=sys.stderr))
    except _user_errors() as e:
        _fail(run_dir, str(e), internal=False)
        return EXIT_USER_ERROR
    except OSError as e:
        msg = f"A file operation failed: {e.strerror or e} ({e.filename or ''}). Check free disk space and permissions; the last checkpoint is kept."
        _fail(run_dir, msg, internal=False)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        _fail(run_dir, "Interrupted. Resume to continue from the last checkpoint.", internal=False)
        return 130
    except Exception as e:  # an engine bug: say so plainly, keep the traceback for a report
        tb = traceback.format_exc()
        from trainer.runfiles import RunFiles

        log_path = RunFiles(run_dir).error_log
        try:
            log_path.write_text(tb)
        except OSError:
            pass
        _fail(run_dir, f"Unexpected {type(e).__name__}: {str(e)[:300]}. Details in {log_path}.", internal=True)
        return EXIT_INTERNAL
    print(out)
    return 0


def _fail(run_dir: Path, message: str, internal: bool) -> None:
    from trainer.events import EventLog

    print(f"error: {message}", file=sys.stderr)
    if int(os.environ.get("RANK", "0")) == 0:
        try:
            EventLog(run_dir).emit("error", message=message, internal=internal)
        except OSError:
            pass


def cmd_export(args) -> int:
    from trainer.engine import checkpoint as ckpt
    from trainer.recipe.config import TrainConfig
    from trainer.loras.export import export_parts
    from trainer.runfiles import RunFiles

    src = Path(args.checkpoint)
    folder = src if (src / "state.json").is_file() else ckpt.latest_checkpoint(src)
    if folder is None:
        print(f"error: no checkpoint in {src}. Give a run folder or a checkpoints/step-N folder.", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        parts, state, _ = ckpt.read_checkpoint(folder)
        cfg = TrainConfig.from_dict(state["config"])
    except (ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    out = Path(args.out) if args.out else RunFiles.of_checkpoint(folder).final(f"{cfg.output_name}-{args.precision}")
    info = {"steps": state["step"], "prediction_type": state.get("prediction_type", "epsilon"),
            "zero_terminal_snr": state.get("zero_terminal_snr", False), "model_name": cfg.base_model}
    export_parts(parts, cfg, state, info, out, precision=args.precision)
    print(out)
    return 0


def cmd_dataset(args) -> int:
    from trainer.data.report import dataset_report, format_report

    try:
        rep = dataset_report(args.path, resolution=args.resolution, trigger=args.trigger)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(json.dumps(rep, indent=1, default=str) if args.json else format_report(rep))
    return 0


def config_reference() -> str:
    """Markdown table of every TrainConfig field, from the help texts (the README embeds this)."""
    from trainer.recipe.config import field_help

    rows = ["| key | default | what it does |", "|---|---|---|"]
    for f in field_help():
        default = json.dumps(f["default"]) if not isinstance(f["default"], str) else f'"{f["default"]}"'
        choices = f" One of: {', '.join(f['choices'])}." if f["choices"] else ""
        rows.append(f"| `{f['name']}` | `{default}` | {f['help']}{choices} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m trainer", description="LoRA Studio training engine")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a LoRA from a TOML config")
    t.add_argument("config", help="TrainConfig TOML file")
    t.add_argument("--run-dir", help="run folder (default: the config's output_dir)")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    t.add_argument("--accelerate-config", metavar="FILE", help="run under `accelerate launch --config_file FILE` "
                   "(a file `accelerate config` made: several GPUs or machines)")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("export", help="re-export a checkpoint as a kohya .safetensors")
    e.add_argument("checkpoint", help="run folder (its last checkpoint) or a checkpoints/step-N folder")
    e.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default="fp16")
    e.add_argument("--out", help="output file")
    e.set_defaults(fn=cmd_export)

    d = sub.add_parser("dataset", help="report on a dataset folder")
    d.add_argument("path")
    d.add_argument("--resolution", type=int, default=512)
    d.add_argument("--trigger", default="")
    d.add_argument("--json", action="store_true")
    d.set_defaults(fn=cmd_dataset)

    pw = sub.add_parser("preview-worker", help="serve preview requests (JSON lines on stdin/stdout); used by the app")
    pw.add_argument("--out", required=True, help="folder for generated images")
    pw.add_argument("--device", default="auto")
    pw.set_defaults(fn=lambda a: __import__("trainer.engine.preview", fromlist=["serve"]).serve(a.out, a.device))

    t = sub.add_parser("tiny-model", help="write the built-in tiny random-weight model (a diffusers folder) to try the "
                                          "whole journey in a minute on a CPU; its images are noise")
    t.add_argument("out")
    t.add_argument("--family", choices=["sd1", "sd2v", "sdxl"], default="sd1")
    t.set_defaults(fn=lambda a: print(__import__("trainer.models.tiny", fromlist=["save_tiny_model"]).save_tiny_model(
        a.out, a.family)) or 0)
    r = sub.add_parser("config-reference", help="print the TrainConfig reference (markdown) that the README embeds")
    r.set_defaults(fn=lambda a: print(config_reference()) or 0)

    from trainer.cli import lora as lora_cli, presets as presets_cli

    presets_cli.add_commands(sub)
    lora_cli.add_commands(sub)

    from trainer.engine import autocaption as caption
    from trainer.measure import bench, memory, reliability

    bench.add_command(sub)
    memory.add_command(sub)
    reliability.add_command(sub)
    caption.add_command(sub)

    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
