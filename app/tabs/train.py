"""Train tab: preset, model, dataset, rank/alpha and friends; pre-flight; start/stop/save/resume; live view.
Also the Outputs and Settings sections."""
from __future__ import annotations

import shutil
from pathlib import Path

import gradio as gr

from app.forms import ADVANCED, BASIC, FIELDS, config_to_values, preflight, values_to_config
from app.ui_util import friendly
from trainer.config import TrainConfig
from trainer.presets import delete_user_preset, find_preset, list_presets, save_user_preset

LABELS = {"base_model": "Base model (checkpoint file, diffusers folder or hub id)", "unet_lr": "UNet learning rate",
          "text_encoder_lr": "Text-encoder learning rate", "max_steps": "Max steps (0 = use epochs)"}


def fmt_eta(s):
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def progress_markdown(run: dict | None, v) -> str:
    if run is None or v is None:
        return "No run selected."
    state = {"training": "training", "loading": "loading the model", "caching": "caching latents",
             "starting": "starting", "queued": "waiting in the queue", "failed": "failed", "stopped": "stopped",
             "finished": "finished"}.get(v.state, v.state)
    pct = (100 * v.step / v.total) if v.total else 0
    bar = f'<progress value="{v.step}" max="{max(v.total, 1)}" style="width:100%"></progress>'
    lines = [f"**Run `{run['id']}`: {state}**", bar,
             f"step {v.step}/{v.total} ({pct:.0f}%) · epoch {v.epoch} · {v.its:.2f} it/s · ETA {fmt_eta(v.eta)}"]
    if v.losses:
        lines.append(f"loss {v.losses[-1][1]:.4f}")
    if v.error:
        lines.append(f"\n**What happened:** {v.error}")
    if v.output:
        lines.append(f"\nLoRA written to `{v.output}`")
    return "\n\n".join(lines)


def run_metadata(run: dict) -> dict:
    try:
        cfg = TrainConfig.load(Path(run["dir"]) / "config.toml")
    except (ValueError, OSError):
        return {}
    return {"base": Path(cfg.base_model).name or cfg.base_model, "rank/alpha": f"{cfg.rank}/{cfg.alpha:g}",
            "trigger": cfg.trigger, "steps": cfg.max_steps or f"{cfg.epochs} epochs", "name": cfg.output_name}


def lora_files(run: dict) -> list[str]:
    """Final LoRA first, then each checkpoint's, newest first."""
    d = Path(run["dir"])
    out = sorted(d.glob("*.safetensors"))
    out += sorted((d / "checkpoints").glob("step-*/*.safetensors"), reverse=True)
    return [str(p) for p in out if p.name != "lora_state.safetensors"]


class TrainTab:
    def __init__(self, ws, runs):
        self.ws, self.runs = ws, runs

    # ------------------------------------------------------------------ handlers
    def preset_choices(self):
        return [(("" if p.shipped else "★ ") + p.name, p.key) for p in list_presets(self.ws.presets_dir)]

    def apply_preset(self, key: str, values: dict) -> tuple[dict, str]:
        if not key:
            return values, ""
        p = find_preset(key, self.ws.presets_dir)
        cfg = values_to_config(values, self.ws.datasets_dir) if values else TrainConfig()
        cfg = p.apply(cfg)
        info = f"**{p.name}** ({p.family}) — {p.description}"
        if p.steps:
            info += f"\n\n*Typical length:* {p.steps}"
        return config_to_values(cfg), info

    def check(self, values: dict, preset_key: str = "") -> tuple[bool, str]:
        preset = find_preset(preset_key, self.ws.presets_dir) if preset_key else None
        return preflight(values, self.ws.datasets_dir, preset)

    def start(self, values: dict, preset_key: str = "") -> tuple[str | None, str]:
        ok, text = self.check(values, preset_key)
        if not ok:
            return None, text
        cfg = values_to_config(values, self.ws.datasets_dir)
        self.ws.remember_model(cfg.base_model)
        run_id, created = self.runs.create(cfg)
        return run_id, ("Started." if created else "This run is already queued or running; showing it.") + "\n\n" + text

    def live(self, run_id: str | None):
        run = self.runs.get(run_id) if run_id else None
        if not run:
            return "No run selected.", None, [], ""
        v = self.runs.view(run_id)
        import pandas as pd

        plot = pd.DataFrame(v.losses, columns=["step", "loss"]) if v.losses else pd.DataFrame({"step": [], "loss": []})
        return progress_markdown(run, v), plot, list(v.samples[-12:]), "\n".join(v.log[-30:])

    def run_choices(self):
        return [(f"{r['id']} · {r['name']} · {r['status']}", r["id"]) for r in self.runs.list()]

    def outputs_table(self):
        rows = []
        for r in self.runs.list():
            md = run_metadata(r)
            rows.append([r["id"], r["status"], md.get("name", ""), md.get("base", ""), md.get("rank/alpha", ""),
                         str(md.get("steps", "")), md.get("trigger", "")])
        return rows

    def copy_to_webui(self, path: str) -> str:
        target = self.ws.settings().get("webui_lora_dir")
        if not target:
            return "Set your web UI's LoRA folder in Settings first."
        src = self.ws.resolve_file(path)
        dst_dir = Path(target).expanduser()
        if not dst_dir.is_dir():
            return f"The LoRA folder {dst_dir} does not exist."
        dst = dst_dir / src.name
        if src.name == "lora.safetensors" or src.parent.name.startswith("step-"):
            run = src.parents[2].name if src.parent.name.startswith("step-") else src.parent.name
            step = f"-{src.parent.name}" if src.parent.name.startswith("step-") else ""
            dst = dst_dir / f"{src.stem}-{run}{step}.safetensors"
        tmp = dst.with_suffix(".partial")
        shutil.copyfile(src, tmp)
        tmp.replace(dst)
        return f"Copied to {dst}"

    # ------------------------------------------------------------------ layout
    def build(self, dataset_dropdown=None):
        ws, runs = self.ws, self.runs
        comps: dict[str, gr.components.Component] = {}
        defaults = config_to_values(TrainConfig())

        def make(name):
            f = FIELDS[name]
            label = LABELS.get(name, name.replace("_", " ").capitalize())
            kw = dict(label=label, info=f["help"], value=defaults[name], elem_id=f"f-{name}")
            if name == "base_model":
                return gr.Dropdown(choices=ws.settings().get("recent_models", []), allow_custom_value=True, **kw)
            if name == "dataset":
                return gr.Dropdown(choices=ws.list_datasets(), allow_custom_value=True, **kw)
            if f["choices"]:
                return gr.Dropdown(choices=list(f["choices"]), **kw)
            if f["type"] == "bool":
                return gr.Checkbox(**kw)
            if f["type"] in ("int", "float"):
                return gr.Number(precision=0 if f["type"] == "int" else None, **kw)
            if f["type"] == "list":
                return gr.Textbox(lines=3, placeholder="one prompt per line; {trigger} = your trigger words", **kw)
            return gr.Textbox(**kw)

        with gr.Row():
            preset = gr.Dropdown(choices=self.preset_choices(), label="Preset", value=None, scale=3, elem_id="preset")
            preset_info = gr.Markdown()
        with gr.Row():
            for n in BASIC[:3]:
                comps[n] = make(n)
        with gr.Row():
            for n in BASIC[3:9]:
                comps[n] = make(n)
        with gr.Row():
            for n in BASIC[9:]:
                comps[n] = make(n)
        with gr.Accordion("Advanced", open=False):
            sections: dict[str, list[str]] = {}
            for n in ADVANCED:
                sections.setdefault(FIELDS[n]["section"], []).append(n)
            for sec, names in sections.items():
                gr.Markdown(f"**{sec.capitalize()}**")
                for i in range(0, len(names), 4):
                    with gr.Row():
                        for n in names[i : i + 4]:
                            comps[n] = make(n)
        with gr.Accordion("Presets: save yours, import from kohya_ss", open=False):
            with gr.Row():
                preset_name = gr.Textbox(label="Save these settings as a preset named", scale=3)
                save_preset = gr.Button("Save preset", scale=1)
                delete_preset = gr.Button("Delete selected preset", scale=1)
            kohya_file = gr.File(label="Import a kohya_ss preset / config .json", file_types=[".json"])
            export_btn = gr.Button("Show an sd-scripts TOML of these settings")
            export_text = gr.Code(label="sd-scripts TOML", language=None, visible=False)
            preset_msg = gr.Markdown()
        with gr.Row():
            check = gr.Button("Check setup", elem_id="check")
            start = gr.Button("Start", variant="primary", elem_id="start")
            stop = gr.Button("Stop (saves first)", elem_id="stop")
            save_now = gr.Button("Save now", elem_id="save-now")
            resume = gr.Button("Resume", elem_id="resume")
        preflight_md = gr.Markdown(elem_id="preflight")
        with gr.Row():
            run_pick = gr.Dropdown(choices=self.run_choices(), label="Run", scale=4, elem_id="run-pick")
            refresh_runs = gr.Button("Refresh list", scale=1)
        progress = gr.Markdown("No run selected.", elem_id="progress")
        with gr.Row():
            loss_plot = gr.LinePlot(x="step", y="loss", title="Loss", height=260, elem_id="loss-plot")
            samples = gr.Gallery(label="Samples", columns=4, height=260, elem_id="samples")
        logs = gr.Textbox(label="Log", lines=8, max_lines=8, elem_id="log", autoscroll=True)
        timer = gr.Timer(1.0)

        fields = set(comps.values())
        order = list(comps)

        def values_of(data):
            return {n: data[comps[n]] for n in order}

        @friendly
        def on_preset(data):
            vals, info = self.apply_preset(data[preset], values_of(data))
            return [vals[n] for n in order] + [info]

        preset.change(on_preset, fields | {preset}, [comps[n] for n in order] + [preset_info])

        @friendly
        def on_check(data):
            return self.check(values_of(data), data[preset])[1]

        check.click(on_check, fields | {preset}, preflight_md)

        @friendly
        def on_start(data):
            run_id, text = self.start(values_of(data), data[preset])
            if run_id is None:
                return gr.Dropdown(), text
            return gr.Dropdown(choices=self.run_choices(), value=run_id), text

        start.click(on_start, fields | {preset}, [run_pick, preflight_md])
        stop.click(friendly(lambda r: runs.stop(r) if r else "Pick a run."), run_pick, preflight_md)
        save_now.click(friendly(lambda r: runs.save_now(r) if r else "Pick a run."), run_pick, preflight_md)
        resume.click(friendly(lambda r: runs.resume(r) if r else "Pick a run."), run_pick, preflight_md)
        refresh_runs.click(lambda: gr.Dropdown(choices=self.run_choices()), None, run_pick)
        live_out = [progress, loss_plot, samples, logs]
        run_pick.change(friendly(self.live), run_pick, live_out)
        timer.tick(friendly(self.live), run_pick, live_out, show_progress="hidden")

        @friendly
        def on_save_preset(data):
            cfg = values_to_config(values_of(data), ws.datasets_dir)
            p = save_user_preset(ws.presets_dir, data[preset_name], cfg)
            return gr.Dropdown(choices=self.preset_choices(), value=p.key), f"Saved preset '{p.name}'."

        save_preset.click(on_save_preset, fields | {preset_name}, [preset, preset_msg])

        @friendly
        def on_delete_preset(key):
            if not key:
                return gr.Dropdown(), "Pick a preset."
            delete_user_preset(ws.presets_dir, key)
            return gr.Dropdown(choices=self.preset_choices(), value=None), "Deleted."

        delete_preset.click(on_delete_preset, preset, [preset, preset_msg])

        @friendly
        def on_kohya(data):
            from trainer.kohya import import_kohya_file

            f = data[kohya_file]
            if not f:
                return [data[comps[n]] for n in order] + [""]
            mapped, notes = import_kohya_file(f)
            vals = {**values_of(data), **config_to_values(TrainConfig.from_dict({**values_to_config(values_of(data), ws.datasets_dir).to_dict(), **mapped}))}
            msg = f"Imported {len(mapped)} setting(s) from {Path(f).name}."
            if notes:
                msg += "\n" + "\n".join(f"- {n}" for n in notes)
            return [vals[n] for n in order] + [msg]

        kohya_file.upload(on_kohya, fields | {kohya_file}, [comps[n] for n in order] + [preset_msg])

        @friendly
        def on_export(data):
            from trainer.kohya import to_sd_scripts_toml

            return gr.Code(value=to_sd_scripts_toml(values_to_config(values_of(data), ws.datasets_dir)), visible=True)

        export_btn.click(on_export, fields, export_text)
        if dataset_dropdown is not None:
            dataset_dropdown.change(lambda v: gr.Dropdown(choices=ws.list_datasets(), value=v), dataset_dropdown, comps["dataset"])
        self.comps, self.run_pick = comps, run_pick
        self.preset_dd = preset
        return comps

    def on_page_load(self):
        """Fresh lists for a (re)loaded page, and the live view re-attached to the active run."""
        runs = self.runs.list()
        active = next((r["id"] for r in runs if r["status"] == "running"), None) or next(
            (r["id"] for r in runs if r["status"] == "queued"), None)
        return (gr.Dropdown(choices=self.run_choices(), value=active) if active else gr.Dropdown(choices=self.run_choices()),
                gr.Dropdown(choices=self.ws.list_datasets()),
                gr.Dropdown(choices=self.ws.settings().get("recent_models", [])),
                gr.Dropdown(choices=self.preset_choices()),
                gr.Dropdown(choices=self.run_choices()))

    def load_outputs(self):
        return [self.run_pick, self.comps["dataset"], self.comps["base_model"], self.preset_dd, self.out_pick]

    def build_outputs(self):
        ws = self.ws
        table = gr.Dataframe(headers=["run", "status", "name", "base model", "rank/alpha", "steps", "trigger"],
                             value=self.outputs_table(), interactive=False, elem_id="outputs-table")
        with gr.Row():
            pick = gr.Dropdown(choices=self.run_choices(), label="Run", scale=3, elem_id="out-run")
            refresh = gr.Button("Refresh", scale=1, elem_id="out-refresh")
        self.out_pick = pick
        files = gr.Dropdown(label="LoRA file (final or a checkpoint)", choices=[], elem_id="out-file")
        meta = gr.JSON(label="Metadata")
        with gr.Row():
            download = gr.DownloadButton("Download", elem_id="out-download")
            copy = gr.Button("Copy to my web UI's LoRA folder")
            open_folder = gr.Button("Show folder")
        msg = gr.Markdown()

        def on_refresh():
            return self.outputs_table(), gr.Dropdown(choices=self.run_choices())

        @friendly
        def on_pick(run_id):
            run = self.runs.get(run_id) if run_id else None
            if not run:
                return gr.Dropdown(choices=[]), {}, None
            fl = lora_files(run)
            return gr.Dropdown(choices=fl, value=fl[0] if fl else None), run_metadata(run), fl[0] if fl else None

        @friendly
        def on_file(path):
            if not path:
                return {}, None
            p = ws.resolve_file(path)
            from trainer.models.sniff import read_metadata

            md = read_metadata(p)
            shown = {k: md[k] for k in ("ss_base_model_version", "ss_network_dim", "ss_network_alpha", "ss_steps",
                                        "ss_trigger_words", "ss_output_name", "modelspec.architecture") if k in md}
            return shown, str(p)

        refresh.click(on_refresh, None, [table, pick])
        pick.change(on_pick, pick, [files, meta, download])
        files.change(on_file, files, [meta, download])
        copy.click(friendly(lambda p: self.copy_to_webui(p) if p else "Pick a file."), files, msg)
        open_folder.click(friendly(lambda p: f"`{ws.resolve_file(p).parent}`" if p else "Pick a file."), files, msg)
        return table

    def build_settings(self):
        ws = self.ws
        lora_dir = gr.Textbox(label="Your web UI's LoRA folder (A1111/Forge: models/Lora, ComfyUI: models/loras)",
                              value=ws.settings().get("webui_lora_dir", ""))
        save = gr.Button("Save settings")
        msg = gr.Markdown()

        @friendly
        def on_save(path):
            p = Path(path).expanduser() if path else None
            if p and not p.is_dir():
                return f"{p} is not a folder."
            ws.update_settings(webui_lora_dir=str(p) if p else "")
            return "Saved."

        save.click(on_save, lora_dir, msg)
