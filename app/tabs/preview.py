"""Preview tab: base model, several LoRAs with strength sliders, prompt and sampler, single / compare / grids."""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import gradio as gr

from app.gpu import gpu_present
from app.preview_client import PreviewClient
from app.ui_util import friendly, keep_edits
from trainer.fsutil import safe_name, unique_path
from trainer.models.sniff import trigger_words
from trainer.engine.samplers import DEFAULTS as D
from trainer.engine.samplers import SAMPLERS

MODES = ["Single image", "Base vs LoRA", "Strength grid", "Checkpoint grid", "Variant grid"]
ROWS = 4


def insert_triggers(prompt: str, words: list[str]) -> str:
    missing = [w for w in words if w.lower() not in (prompt or "").lower()]
    return ", ".join(missing + ([prompt] if prompt else [])) if missing else prompt


class PreviewTab:
    def __init__(self, studio, client: PreviewClient | None = None):
        self.studio, self.ws = studio, studio.ws
        self.client = client or PreviewClient(self.ws.previews_dir)

    # ------------------------------------------------------------------ handlers
    def add_lora_file(self, path: str) -> str:
        """A LoRA dropped in from elsewhere is copied into the workspace's loras/ folder."""
        src = Path(path)
        if src.suffix.lower() != ".safetensors":
            raise ValueError("Only .safetensors LoRA files can be added.")
        from trainer.models.sniff import safetensors_keys

        keys = safetensors_keys(src)
        if not any(k.startswith("lora_") for k in keys):
            raise ValueError(f"{src.name} has no kohya LoRA keys (lora_unet_..., lora_te_...).")
        dst = unique_path(self.ws.loras_dir, safe_name(src.name, "lora.safetensors"))
        shutil.copyfile(src, dst)
        return str(dst)

    def busy_message(self) -> str | None:
        if gpu_present() and self.studio.gpu_busy(asking="preview") == "training":
            return ("A training run is using the GPU. Preview waits for the GPU: stop the run or wait until it "
                    "finishes, so the two do not fight for VRAM.")
        return None

    def generate_live(self, v: dict):
        """generate(), yielding (images, status) while it works: the step it is at, a warning when this size will
        take minutes here; a closed tab (the generator is dropped) cancels the worker's job."""
        import queue
        import threading

        events: queue.Queue = queue.Queue()
        result: dict = {}

        def work():
            try:
                result["out"] = self.generate(v, on_progress=lambda d, t: events.put((d, t)))
            except Exception as e:  # said on the page by friendly(), as if generate() had raised it here
                result["error"] = e
            finally:
                events.put(None)

        warning = self.duration_warning(v)
        said = warning + "\n\n" if warning else ""
        threading.Thread(target=work, daemon=True).start()
        finished = False
        try:
            yield gr.update(), said + "Starting the preview worker..."
            while True:
                ev = events.get()
                if ev is None:
                    finished = True
                    break
                yield gr.update(), said + f"Generating: step {ev[0]} of {ev[1]}"
        finally:
            if not finished:  # the page went away mid-way: do not leave the worker busy for the next one
                self.client.cancel()
        if "error" in result:
            raise result["error"]
        yield result["out"]

    def duration_warning(self, v: dict) -> str:
        """One sentence when this generation will take minutes on this machine (from what its runs measured)."""
        from app.gpu import gpu_present
        from trainer.recipe import timing
        from trainer.recipe.config import TrainConfig

        try:
            side = max(64, int((int(v["width"]) * int(v["height"])) ** 0.5) // 8 * 8)
            grid_cells = len(str(v.get("strengths", "")).split(","))
            if v.get("mode") == "Variant grid":
                grid_cells *= len(self.studio.variant_series(next(row[0] for row in v["loras"] if row[0] and row[1]))[0])
            images = {"Base vs LoRA": 2, "Strength grid": grid_cells, "Variant grid": grid_cells}.get(
                v.get("mode"), int(v.get("batch") or 1))
            cfg = TrainConfig(base_model=v.get("base_model") or "", resolution=side, batch_size=1)
            device = "cuda" if gpu_present() else "cpu"
            est = timing.estimate(cfg, "auto", 1, device, timing.load(self.ws.timings_path))
        except (TypeError, ValueError, KeyError, StopIteration, OSError):
            return ""
        seconds = est["step_s"] * 2 / 3 * int(v.get("steps") or 1) * images  # a step with guidance, as samples
        if seconds < 60:
            return ""
        return (f"This will take about {timing.fmt_duration(seconds)} on this machine: lower the size or the steps "
                "for a quick look. *Cancel* stops it.")

    def generate(self, v: dict, on_progress=None) -> tuple[list[str], str]:
        """v: base_model, prompt, negative, seed, steps, cfg, width, height, sampler, batch, mode, strengths,
        loras: [(path, enabled, strength)]."""
        busy = self.busy_message()
        if busy:
            return [], busy
        if not v.get("base_model"):
            return [], "Pick a base model."
        loras = []
        for row in v["loras"]:  # (path, on, strength[, (IN, MID, OUT)])
            blocks = row[3] if len(row) > 3 else (1.0, 1.0, 1.0)
            if row[0]:
                loras.append({"path": row[0], "enabled": bool(row[1]), "strength": float(row[2]),
                              "blocks": [float(x) for x in blocks]})
        params = {k: v[k] for k in ("prompt", "negative", "steps", "cfg", "width", "height", "sampler", "batch")}
        params["seed"] = int(v["seed"])
        params["loras"] = loras
        req = {"base_model": v["base_model"], "params": params}
        mode = v.get("mode", "Single image")
        active = [lo for lo in loras if lo["enabled"]]
        if mode != "Single image" and not active:
            return [], "Enable at least one LoRA for this mode."
        if mode == "Base vs LoRA":
            req["mode"] = "compare"
        elif mode in ("Strength grid", "Variant grid"):
            try:
                req["strengths"] = [float(x) for x in str(v.get("strengths", "")).replace(";", ",").split(",") if x.strip()]
            except ValueError:
                return [], "Strengths must be numbers separated by commas, e.g. 0, 0.25, 0.5, 0.75, 1"
            if not req["strengths"]:
                return [], "Give the strengths for the grid, e.g. 0, 0.25, 0.5, 0.75, 1"
            if mode == "Strength grid":
                req.update(mode="strength_grid", lora_index=loras.index(active[0]))
            else:
                try:
                    files, labels = self.studio.variant_series(active[0]["path"])
                except ValueError as e:
                    return [], str(e)
                req.update(mode="variant_grid", files=files, labels=labels)
        elif mode == "Checkpoint grid":
            files, labels = self.studio.checkpoint_series(active[0]["path"])
            req.update(mode="checkpoint_grid", files=files, labels=labels, strength=active[0]["strength"])
        ans = self.client.request(req, on_progress)
        if not ans.get("ok"):
            return [], ans.get("error", "Preview failed.")
        return ans["images"], f"Done (seed {params['seed']})."

    def register_load(self, ui) -> None:
        """A reload shows the tab as the person left it (a LoRA file that is gone is dropped from its picker)."""
        def on_load():
            choices = self.studio.lora_choices()
            saved = self.ws.ui_state("preview")
            paths = {path for _, path in choices}
            out = []
            for key, comp in self.kept.items():
                value = saved.get(key, comp.value)  # never saved: the component's own default
                if comp is self.base_dd:
                    out.append(gr.Dropdown(choices=self.ws.settings().get("recent_models", []), value=value))
                elif comp in self.files:
                    out.append(gr.Dropdown(choices=choices, value=value if isinstance(value, str) and value in paths else None))
                else:
                    out.append(value)
            return out

        self.page_load = on_load
        ui.load(friendly(on_load), None, list(self.kept.values()))

    def remember(self, data) -> None:
        self.ws.save_ui_state("preview", {key: data[comp] for key, comp in self.kept.items()})

    # ------------------------------------------------------------------ layout
    def build_lora_rows(self) -> tuple[list, list]:
        """The LoRA pickers, each with on, strength, its trigger words and Insert; then, folded, each one's IN / MID /
        OUT strengths. Returns (rows of (file, on, strength, trigger, insert), rows of the three block sliders)."""
        rows = []
        for i in range(ROWS):
            with gr.Row():
                f = gr.Dropdown(choices=self.studio.lora_choices(), label=f"LoRA {i + 1}", scale=4, elem_id=f"pv-lora-{i}")
                en = gr.Checkbox(value=True, label="on", scale=1, elem_id=f"pv-on-{i}")
                st = gr.Slider(-2, 2, value=1.0, step=0.05, label="strength", scale=3, elem_id=f"pv-strength-{i}")
                trig = gr.Markdown(elem_id=f"pv-trig-{i}")
                ins = gr.Button("Insert trigger words", scale=1)
            rows.append((f, en, st, trig, ins))
        with gr.Accordion("Per-block strength (IN / MID / OUT of the UNet, as in A1111's LoRA Block Weight)", open=False):
            blocks = []
            for i in range(ROWS):
                with gr.Row():
                    gr.Markdown(f"LoRA {i + 1}")
                    blocks.append(tuple(gr.Slider(0, 2, value=1.0, step=0.05, label=b, elem_id=f"pv-block-{i}-{b}")
                                        for b in ("IN", "MID", "OUT")))
        return rows, blocks

    def build_settings(self) -> tuple:
        """Prompt, negative prompt, seed (with Random and Reuse, and the last seed used), steps, CFG, size, sampler,
        batch count, mode and the grid's strengths, in that order."""
        prompt = gr.Textbox(label="Prompt", lines=2, elem_id="pv-prompt")
        negative = gr.Textbox(label="Negative prompt", lines=1)
        with gr.Row():
            seed = gr.Number(value=D["seed"], precision=0, label="Seed", elem_id="pv-seed")
            rnd = gr.Button("Random seed")
            reuse = gr.Button("Reuse last seed")
            last_seed = gr.State(D["seed"])
            steps = gr.Slider(1, 100, value=D["steps"], step=1, label="Steps", elem_id="pv-steps")
            cfg = gr.Slider(1, 20, value=D["cfg"], step=0.5, label="CFG")
        with gr.Row():
            width = gr.Slider(64, 2048, value=D["width"], step=64, label="Width", elem_id="pv-width")
            height = gr.Slider(64, 2048, value=D["height"], step=64, label="Height", elem_id="pv-height")
            sampler = gr.Dropdown(list(SAMPLERS), value=D["sampler"], label="Sampler")
            batch = gr.Slider(1, 8, value=D["batch"], step=1, label="Batch count")
        with gr.Row():
            mode = gr.Radio(MODES, value="Single image", label="Mode", elem_id="pv-mode")
            strengths = gr.Textbox(value="0, 0.25, 0.5, 0.75, 1", label="Grid strengths")
        return (prompt, negative, seed, rnd, reuse, last_seed, steps, cfg, width, height, sampler, batch, mode,
                strengths)

    def on_add(self, path):
        """A LoRA file dropped in: copied into the workspace and picked in the first row, or why not."""
        if not path:
            return [gr.Dropdown() for _ in range(ROWS)] + [""]
        try:
            dst = self.add_lora_file(path)
        except (ValueError, OSError) as e:  # one bad file: its message, and the pickers stay as they were
            return [gr.update() for _ in range(ROWS)] + [f"**Not added:** {e}"]
        choices = self.studio.lora_choices()
        return ([gr.Dropdown(choices=choices, value=dst)] + [gr.Dropdown(choices=choices) for _ in range(ROWS - 1)]
                + [f"Added {Path(dst).name}."])

    def build(self):
        ws = self.ws
        with gr.Row():
            base = gr.Dropdown(choices=ws.settings().get("recent_models", []), allow_custom_value=True, scale=4,
                               label="Base model (checkpoint file, diffusers folder or hub id)", elem_id="pv-base")
            refresh = gr.Button("Refresh LoRA list", scale=1, elem_id="pv-refresh")
        rows, blocks = self.build_lora_rows()
        add = gr.File(label="Add a LoRA .safetensors from elsewhere", file_types=[".safetensors"], elem_id="pv-add")
        (prompt, negative, seed, rnd, reuse, last_seed, steps, cfg, width, height, sampler, batch, mode,
         strengths) = self.build_settings()
        with gr.Row():
            go = gr.Button("Generate", variant="primary", elem_id="pv-generate")
            cancel = gr.Button("Cancel", variant="stop", elem_id="pv-cancel")
        status = gr.Markdown(elem_id="pv-status")
        out = gr.Gallery(label="Result", columns=2, height=520, elem_id="pv-gallery", object_fit="contain")  # grids whole

        files = [r[0] for r in rows]
        self.files, self.base_dd = files, base
        # what the person sets here survives a reload (register_load)
        self.kept = {"base": base, "prompt": prompt, "negative": negative, "seed": seed, "steps": steps, "cfg": cfg,
                     "width": width, "height": height, "sampler": sampler, "batch": batch, "mode": mode,
                     "strengths": strengths}
        for i, ((f, en, st, _, _), bw) in enumerate(zip(rows, blocks)):
            self.kept |= {f"lora-{i}": f, f"on-{i}": en, f"strength-{i}": st}
            self.kept |= {f"block-{i}-{b}": x for b, x in zip(("IN", "MID", "OUT"), bw)}
        kept = set(self.kept.values())
        keep_edits(kept, self.remember, kept)
        refresh.click(lambda: [gr.Dropdown(choices=self.studio.lora_choices()) for _ in rows], None, files)
        for f, en, st, trig, ins in rows:
            f.change(lambda p: ", ".join(trigger_words(p)) and f"trigger: `{', '.join(trigger_words(p))}`" if p else "", f, trig)
            ins.click(lambda pr, p: insert_triggers(pr, trigger_words(p)) if p else pr, [prompt, f], prompt).then(
                self.remember, kept)

        add.upload(friendly(self.on_add), add, files + [status]).then(self.remember, kept)
        rnd.click(lambda: random.randint(0, 2**31 - 1), None, seed).then(self.remember, kept)
        reuse.click(lambda s: s, last_seed, seed).then(self.remember, kept)
        inputs = {base, prompt, negative, seed, steps, cfg, width, height, sampler, batch, mode, strengths}
        for (f, en, st, _, _), bw in zip(rows, blocks):
            inputs |= {f, en, st, *bw}

        @friendly
        def on_go(d):
            v = {"base_model": d[base], "prompt": d[prompt], "negative": d[negative], "seed": d[seed] or 0,
                 "steps": d[steps], "cfg": d[cfg], "width": d[width], "height": d[height], "sampler": d[sampler],
                 "batch": d[batch], "mode": d[mode], "strengths": d[strengths],
                 "loras": [(d[f], d[en], d[st], tuple(d[x] for x in bw)) for (f, en, st, _, _), bw in zip(rows, blocks)]}
            for images, msg in self.generate_live(v):
                yield images, msg, d[seed]

        go.click(on_go, inputs, [out, status, last_seed], show_progress="hidden")
        cancel.click(lambda: self.client.cancel() or "Cancelling after the current step...", None, status,
                     show_progress="hidden")
