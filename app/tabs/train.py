"""Train tab: preset, model, dataset, rank/alpha and friends; pre-flight; start/stop/save/resume; live view."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from app.forms import (ADVANCED, BASIC, FIELDS, HIDDEN, NETWORK_ONLY, config_to_values, in_ui_words, label,
                       network_fields, values_to_config)
from app.ui_util import friendly, keep_edits
from trainer.measure.spill import spill_warning
from trainer.recipe.config import TrainConfig
from trainer.recipe.presets import delete_user_preset, save_user_preset
from trainer.runfiles import RunFiles


def fmt_eta(s):
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


PHASES = {"training": "training", "loading": "loading the model", "caching": "caching latents",
          "sampling": "rendering sample", "saving": "saving a checkpoint", "exporting": "writing the LoRA file",
          "starting": "starting", "queued": "waiting in the queue", "failed": "failed", "stopped": "stopped",
          "finished": "finished"}
MOVING = ("training", "sampling", "saving")  # the phases an ETA means something in


def progress_markdown(run: dict | None, v) -> str:
    """What a run is doing right now, from its folded event log: the phase (with its own progress where it
    has one), steps, speed and ETA while it moves, and the outcome once it ended."""
    if run is None or v is None:
        return "No run selected."
    state = PHASES.get(v.state, v.state)
    if v.phase:
        state += f" {v.phase[0]}/{v.phase[1]}"
    if v.stopping:
        state = f"stopping (saves first) · {state}"
    pct = (100 * v.step / v.total) if v.total else 0
    bar = f'<progress value="{v.step}" max="{max(v.total, 1)}" style="width:100%"></progress>'
    lines = [f"**Run `{run['id']}`: {state}**", bar]
    if v.phase:
        lines.append(f'<progress value="{v.phase[0]}" max="{max(v.phase[1], 1)}" style="width:40%"></progress>')
    line = f"step {v.step}/{v.total} ({pct:.0f}%) · epoch {v.epoch}"
    if v.state in MOVING and not v.stopping:
        line += f" · {v.its:.2f} it/s · ETA {fmt_eta(v.eta)}"
    lines.append(line)
    if v.variant_losses:  # a sweep: each variant's loss (the plot draws the first's)
        lines.append("loss by variant (the plot draws the first): " + " · ".join(f"{n} {x:.4f}" for n, x in v.variant_losses.items()))
        best = v.comparison()[2]
        if best:
            lines.append(f"lowest validation loss so far: **{best[0]}** at step {best[1]} ({best[2]:.4f})")
    elif v.losses:
        lines.append(f"loss {v.losses[-1][1]:.4f}" + (f" · validation loss {v.val_losses[-1][1]:.4f} at step "
                                                      f"{v.val_losses[-1][0]}" if v.val_losses else ""))
    best = v.best_checkpoint() if v.val_losses else None
    if best:
        lines.append(f"lowest validation loss among the checkpoints: step {best[0]} ({best[1]:.4f})")
    board = RunFiles(run["dir"]).tensorboard if run.get("dir") else None
    if board is not None and board.is_dir():
        lines.append(f"TensorBoard: `tensorboard --logdir \"{board}\"` then open http://localhost:6006")
    spill = spill_warning(v.memory, v.dedicated_gb) if v.state in MOVING else None
    if spill:
        lines.append(f"\n**Slow steps:** {spill}")
    if v.error:
        lines.append(f"\n**What happened:** {v.error}")
    if v.output:
        lines.append(f"\nLoRA written to `{v.output}`")
    return "\n\n".join(lines)


# Gradio's own autoscroll follows only while the box is within 100 px of its end, so a log that arrives 30 lines
# at a time (a reload, a busy phase) is never followed. This keeps the newest line in view unless the person
# scrolled up to read, like a terminal; scrolling back to the end follows again. Runs in the browser only.
FOLLOW_LOG_JS = """() => {
  const t = document.querySelector('#log textarea');
  if (!t) return;
  if (!t.dataset.follow) {
    t.dataset.follow = '1';
    t.addEventListener('scroll', () => {
      t.dataset.follow = (t.scrollHeight - t.scrollTop - t.clientHeight < 30) ? '1' : '0';
    });
  }
  if (t.dataset.follow === '1') t.scrollTop = t.scrollHeight;
}"""


def loss_frame(points: list, name: str):
    """(step, value) points as the typed frame a LinePlot needs: an untyped empty frame makes its axes nominal
    and no line is ever drawn."""
    import pandas as pd

    return pd.DataFrame(points, columns=["step", name]).astype({"step": "int64", name: "float64"})


def variant_frame(points: list):
    """A sweep's (step, variant, validation loss) points as the frame of a LinePlot coloured by variant."""
    import pandas as pd

    return pd.DataFrame([(s, loss, n) for s, n, loss in points], columns=["step", "validation loss", "variant"]).astype(
        {"step": "int64", "validation loss": "float64"})


class TrainTab:
    def __init__(self, studio):
        self.studio, self.ws, self.runs = studio, studio.ws, studio.runs

    def live(self, run_id: str | None):
        """Progress text, loss curve, samples and log of a run, from its event log."""
        run = self.runs.get(run_id) if run_id else None
        if not run:
            return ("No run selected.", None, gr.LinePlot(value=None, visible=False), gr.LinePlot(visible=False),
                    gr.update(visible=False), [], "")
        v = self.runs.view(run_id)
        # the validation plot takes room only when the run measures a validation loss
        val = gr.LinePlot(value=loss_frame(v.val_losses, "validation loss"), visible=bool(v.val_losses))
        # a sweep's validation losses: a line per variant, and a table with each variant's lowest marked
        by_variant = gr.LinePlot(value=variant_frame(v.variant_val), visible=True) if v.variant_val else gr.LinePlot(
            visible=False)
        headers, rows, _ = v.comparison()
        table = gr.update(value={"headers": headers, "data": rows}, visible=True) if rows else gr.update(visible=False)
        return (progress_markdown(run, v), loss_frame(v.losses, "loss"), val, by_variant, table,
                list(v.samples[-12:]), "\n".join(v.log[-30:]))

    def follow(self, run_id: str | None, shown: dict) -> tuple[dict, str | None, dict]:
        """Keep the run picker and the run's status true to the event log, with no Refresh button: the picker's
        labels change when a run's status does, a run started elsewhere is picked up when none is shown, and
        `same_state` says whether the shown run is still in the phase it was (else its last message is stale)."""
        choices = self.studio.run_choices()
        picker = gr.update()
        active = None if run_id else self.studio.active_run()
        if active:
            run_id = active
            picker = gr.Dropdown(choices=choices, value=run_id)
        elif [list(c) for c in choices] != shown.get("choices"):
            # labels only: a tick that left before a Start or a pick must not set the old run back
            picker = gr.Dropdown(choices=choices)
        state = None
        if run_id and self.runs.get(run_id):
            state = self.runs.view(run_id).state  # a Stop's "stopping" is not a new phase: its answer stays
        # a message is stale once the run it speaks of moved on; picking another run is no reason to wipe the
        # answer to that pick ("The form now holds the settings ...")
        same = not (run_id == shown.get("run") and state != shown.get("state"))
        return ({"picker": picker, "same_state": same}, run_id,
                {"choices": [list(c) for c in choices], "run": run_id, "state": state})

    # ------------------------------------------------------------------ layout
    def field(self, name: str):
        """The input for one TrainConfig field, with its help text as the tooltip."""
        f, ws = FIELDS[name], self.ws
        kw = dict(label=label(name), info=f["help"], value=self.default_values()[name], elem_id=f"f-{name}")
        if name in NETWORK_ONLY:
            kw["visible"] = network_fields(self.default_values()["network_type"])[name]
        if name == "base_model":
            return gr.Dropdown(choices=self.studio.model_choices(), allow_custom_value=True, **kw)
        if name == "dataset":
            return gr.Dropdown(choices=ws.list_datasets(), allow_custom_value=True, **kw)
        if f["choices"]:
            return gr.Dropdown(choices=list(f["choices"]), **kw)
        if f["type"] == "bool":
            return gr.Checkbox(**kw)
        if f["type"] in ("int", "float"):
            return gr.Number(precision=0 if f["type"] == "int" else None, **kw)
        if name == "variants":
            return gr.Textbox(lines=4, placeholder="one variant per line, e.g. rank = 8, unet_lr = 2e-4", **kw)
        if f["type"] == "list":
            return gr.Textbox(lines=3, placeholder="one prompt per line; {trigger} = your trigger words", **kw)
        return gr.Textbox(**kw)

    def build(self, dataset_dropdown=None):
        with gr.Row():
            self.preset_dd = gr.Dropdown(choices=self.studio.preset_choices(), label="Preset", value=None, scale=3,
                                         elem_id="preset")
            preset_info = gr.Markdown()
        comps: dict[str, gr.components.Component] = {}
        for names in (BASIC[:3], BASIC[3:9], BASIC[9:]):
            with gr.Row():
                for n in names:
                    comps[n] = self.field(n)
        with gr.Accordion("Advanced", open=False):
            sections: dict[str, list[str]] = {}
            for n in ADVANCED:
                sections.setdefault(FIELDS[n]["section"], []).append(n)
            for sec, names in sections.items():
                gr.Markdown(f"**{sec.capitalize()}**")
                for i in range(0, len(names), 4):
                    with gr.Row():
                        for n in names[i : i + 4]:
                            comps[n] = self.field(n)
        comps["variants"] = self.build_compare()
        self.comps, self.order, self.inputs = comps, list(comps), set(comps.values())
        self.variants_made.then(self.remember, self.inputs | {self.preset_dd})  # kept like any edit of the form
        self.variants_made.then(lambda data: self.sweep_plan(self.values_of(data)), self.inputs, self.compare_note)
        self.outputs = [comps[n] for n in self.order]
        shown = list(NETWORK_ONLY)
        # a network type's own fields appear with it (also when a preset, a restored form or a run sets it)
        comps["network_type"].change(lambda kind: [gr.update(visible=v) for v in network_fields(kind).values()],
                                     comps["network_type"], [comps[n] for n in shown], show_progress="hidden")

        @friendly
        def on_preset(data):
            vals, info = self.studio.apply_preset(data[self.preset_dd], self.values_of(data))
            return [vals[n] for n in self.order] + [info]

        # .input: a person's choice only, so restoring the form on load does not re-apply the preset over it
        self.preset_dd.input(on_preset, self.inputs | {self.preset_dd}, self.outputs + [preset_info]).then(
            self.remember, self.inputs | {self.preset_dd})
        self.build_block_table()
        self.build_preset_tools()
        self.build_run_controls()
        if dataset_dropdown is not None:  # a dataset made or removed there is offered here; the choice here stays
            dataset_dropdown.change(self.dataset_choices, None, comps["dataset"])
        # every edit of the form is kept in the workspace; a reload puts it back (register_load)
        keep_edits(comps.values(), self.remember, self.inputs | {self.preset_dd})
        return comps

    def build_compare(self):
        """Compare settings: a sweep made of one or two settings' values (every combination, up to 8), trained in
        one run on one loaded base; returns the variants field (one variant per line, editable by hand)."""
        from app.forms import compare_grid
        from trainer.recipe.sweep import FIELDS as SWEEP_FIELDS, MAX_VARIANTS

        with gr.Accordion("Compare settings (several LoRAs in one run)", open=False, elem_id="compare"):
            gr.Markdown(f"Train up to {MAX_VARIANTS} variants of this form at once: the base model is loaded and the "
                        "latents cached once, and every variant sees the same images and noise, so the only "
                        "difference between them is the setting. Each is written as its own file, "
                        "`<output name>-<variant>.safetensors`; the run shows their validation losses side by side "
                        "(set a validation split under Advanced › Quality) and Preview's *Variant grid* draws them.")
            with gr.Row():
                first = gr.Dropdown(list(SWEEP_FIELDS), value="rank", label="Compare", elem_id="cmp-first")
                first_values = gr.Textbox(label="Values (comma-separated)", placeholder="8, 16, 32",
                                          elem_id="cmp-first-values")
                second = gr.Dropdown([""] + list(SWEEP_FIELDS), value="", label="And (optional)", elem_id="cmp-second")
                second_values = gr.Textbox(label="Values", placeholder="1e-4, 2e-4", elem_id="cmp-second-values")
            make = gr.Button("Make the variants", elem_id="cmp-make")
            variants = self.field("variants")
            note = gr.Markdown(elem_id="cmp-note")

        @friendly
        def on_make(a, av, b, bv):
            from trainer.recipe.config import ConfigError

            try:
                lines = compare_grid(a, av, b, bv)
            except ConfigError as e:
                return gr.update(), in_ui_words(str(e))
            return lines, ""

        self.variants_made = make.click(on_make, [first, first_values, second, second_values], [variants, note])
        self.compare_note = note
        return variants

    def sweep_plan(self, values: dict) -> str:
        """The Compare panel's count and memory: the base once, each variant's network and optimizer state, one
        pass's activations at a time, beside one LoRA alone."""
        from trainer.models.sniff import sniff_family
        from trainer.recipe.config import ConfigError
        from trainer.recipe.estimate import estimate_vram_gb

        try:
            cfg = values_to_config(values, self.ws.datasets_dir)
        except ConfigError as e:
            return in_ui_words(str(e))
        if not cfg.variants:
            return ""
        errors = cfg.problems()[0]
        if errors:
            return in_ui_words("Cannot start yet: " + " ".join(errors))
        family = sniff_family(cfg.base_model) if cfg.model_family == "auto" else cfg.model_family
        if family == "auto":
            return f"{len(cfg.variants)} variants in one run. Pick the base model to see what they need together."
        both, one = estimate_vram_gb(cfg, family), estimate_vram_gb(cfg.replace(variants=[]), family)
        return (f"{len(cfg.variants)} variants in one run: about {both['total_gb']} GB projected for the card (the "
                f"base once, {both['lora_params_m']}M LoRA parameters with their optimizer state, one pass at a "
                f"time), against {one['total_gb']} GB for one LoRA alone and {len(cfg.variants)} x that side by "
                "side. Each step trains every variant, so a step takes about that many times longer; **Check "
                "setup** gives the time.")

    def dataset_choices(self):
        """The Dataset field offers the workspace's datasets as they are now, and keeps the one it holds."""
        return gr.update(choices=self.ws.list_datasets())  # no value: the field keeps its own

    # ------------------------------------------------------------------ the form's memory
    def remember(self, data) -> None:
        """Keep the form's values (and the chosen preset) in the workspace, for the next page load."""
        self.ws.save_ui_state("train", {**self.values_of(data), "preset": data[self.preset_dd]})

    def default_values(self) -> dict:
        """The form on a first visit: TrainConfig's defaults, adjusted to this machine (fp32 without a GPU)."""
        from app.forms import machine_defaults
        from app.gpu import gpu_present

        return {**config_to_values(TrainConfig()), **machine_defaults(gpu_present())}

    def restored_values(self) -> tuple[dict, str | None]:
        """(form values, preset key) as the person left them: saved values over the defaults, unknown ones dropped."""
        saved = self.ws.ui_state("train")
        vals = {**self.default_values(), **{k: v for k, v in saved.items() if k in self.comps}}
        keys = {key for _, key in self.studio.preset_choices()}
        return vals, saved.get("preset") if saved.get("preset") in keys else None

    def run_values(self, run_id: str) -> dict:
        """A run's settings as form values: what 'choosing a run' puts back into the form."""
        run = self.runs.get(run_id)
        if not run:
            raise ValueError(f"No run {run_id}.")
        cfg = TrainConfig.load(RunFiles(run["dir"]).config)
        vals = config_to_values(cfg.replace(output_dir=TrainConfig().output_dir))
        ds = Path(cfg.dataset)
        if ds.parent == self.ws.datasets_dir:  # a workspace dataset shows by its name, as the picker lists it
            vals["dataset"] = ds.name
        return {k: v for k, v in vals.items() if k in FIELDS and k not in HIDDEN}

    def values_of(self, data) -> dict:
        return {n: data[self.comps[n]] for n in self.order}

    def build_block_table(self):
        """Per-block rank, alpha and learning-rate weight as a table (kohya's IN / MID / OUT numbering), filled by
        hand or suggested from a trained LoRA's spectrum; it writes the block_* fields of the form."""
        from app.forms import block_families, block_rows, rows_to_values

        comps = self.comps
        block_fields = ["block_dims", "block_alphas", "down_lr_weight", "mid_lr_weight", "up_lr_weight"]
        fams = block_families()
        with gr.Accordion("Per-block rank, alpha and learning rate", open=False):
            gr.Markdown("Rank 0 or LR weight 0: the block gets no LoRA. *Use these values* writes the table into the "
                        "block fields above (Advanced, Blocks); empty fields mean one rank everywhere.")
            with gr.Row():
                fam = gr.Radio(list(fams), value=next(iter(fams)), label="Model family", elem_id="blocks-family")
                fill = gr.Button("Show the current values", elem_id="blocks-fill")
                use = gr.Button("Use these values", elem_id="blocks-use")
                clear = gr.Button("One rank everywhere")
            table = gr.Dataframe(headers=["block", "rank", "alpha", "LR weight"], datatype=["str", "number", "number", "number"],
                                 value=block_rows(self.default_values(), next(iter(fams.values()))), interactive=True,
                                 elem_id="blocks-table")
            with gr.Row():
                source = gr.Dropdown(choices=self.studio.lora_choices(), allow_custom_value=True, scale=3,
                                     label="Suggest from a trained LoRA (train once wide, then again lean)")
                energy = gr.Slider(0.5, 0.999, value=0.95, step=0.005, label="Energy to keep per block")
                suggest = gr.Button("Suggest ranks", elem_id="blocks-suggest")
            note = gr.Markdown(elem_id="blocks-note")

        def values(data):
            return {n: data[comps[n]] for n in ["rank", "alpha", *block_fields]}

        @friendly
        def on_fill(data):
            return block_rows(values(data), fams[data[fam]])

        @friendly
        def on_use(rows, family):
            vals = rows_to_values(rows.values.tolist() if hasattr(rows, "values") else rows, fams[family])
            return [vals[n] for n in block_fields] + ["The block fields now hold the table."]

        @friendly
        def on_suggest(path, keep, family, rank, alpha):
            yield from self.suggest_from_spectrum(path, float(keep), fams[family], float(alpha or 1) / float(rank or 1))

        fill_inputs = {fam} | {comps[n] for n in ["rank", "alpha", *block_fields]}
        fill.click(on_fill, fill_inputs, table)
        # the table starts from, and follows, the form: Rank, Alpha, the block fields (a restored form too), the family
        for c in [fam, *(comps[n] for n in ["rank", "alpha", *block_fields])]:
            c.change(on_fill, fill_inputs, table, trigger_mode="always_last")
        keep = self.inputs | {self.preset_dd}
        use.click(on_use, [table, fam], [comps[n] for n in block_fields] + [note]).then(self.remember, keep)
        clear.click(lambda: [""] * len(block_fields) + ["One rank and alpha everywhere."], None,
                    [comps[n] for n in block_fields] + [note]).then(self.remember, keep)
        suggest.click(on_suggest, [source, energy, fam, comps["rank"], comps["alpha"]], [table, note])

    def suggest_from_spectrum(self, path: str, keep: float, blocks, ratio: float):
        """(table, note) updates while the spectrum tool reads the LoRA at `path`, then the smallest rank per block
        that keeps `keep` of its update, with alpha at `ratio` times the rank."""
        from app.forms import suggest_ranks

        if not path:
            yield gr.update(), "Pick a LoRA file to learn the ranks from."
            return
        for event in self.studio.run_tool(["spectrum", path, "--json"]):
            if event[0] == "progress":
                yield gr.update(), f"Reading the spectrum: {event[1]}/{event[2]} modules"
            elif event[0] == "error":
                yield gr.update(), f"**Could not read the spectrum:** {event[1]}"
            else:
                yield suggest_ranks(event[1], blocks, keep, ratio), (
                    f"Suggested from {event[1]['file']}: the smallest rank per block keeping {100 * keep:g}% of its "
                    "update (alpha keeps your alpha/rank ratio). Check them, then *Use these values*.")

    def build_preset_tools(self):
        """Save / delete the person's presets, import a kohya_ss JSON, show an sd-scripts TOML."""
        ws, preset = self.ws, self.preset_dd
        with gr.Accordion("Presets: save yours, import from kohya_ss", open=False):
            with gr.Row():
                preset_name = gr.Textbox(label="Save these settings as a preset named", scale=3)
                save_preset = gr.Button("Save preset", scale=1)
                delete_preset = gr.Button("Delete selected preset", scale=1)
            kohya_file = gr.File(label="Import a kohya_ss preset / config .json", file_types=[".json"])
            export_btn = gr.Button("Show an sd-scripts TOML of these settings")
            export_text = gr.Code(label="sd-scripts TOML", language=None, visible=False)
            preset_msg = gr.Markdown()

        @friendly
        def on_save_preset(data):
            cfg = values_to_config(self.values_of(data), ws.datasets_dir)
            p = save_user_preset(ws.presets_dir, data[preset_name], cfg)
            return gr.Dropdown(choices=self.studio.preset_choices(), value=p.key), f"Saved preset '{p.name}'."

        @friendly
        def on_delete_preset(key):
            if not key:
                return gr.Dropdown(), "Pick a preset."
            delete_user_preset(ws.presets_dir, key)
            return gr.Dropdown(choices=self.studio.preset_choices(), value=None), "Deleted."

        @friendly
        def on_kohya(data):
            from trainer.recipe.kohya_ss import import_kohya_file

            f = data[kohya_file]
            if not f:
                return [data[self.comps[n]] for n in self.order] + [""]
            mapped, notes = import_kohya_file(f)
            current = values_to_config(self.values_of(data), ws.datasets_dir).to_dict()
            vals = {**self.values_of(data), **config_to_values(TrainConfig.from_dict({**current, **mapped}))}
            msg = f"Imported {len(mapped)} setting(s) from {Path(f).name}."
            if notes:
                msg += "\n" + "\n".join(f"- {n}" for n in notes)
            return [vals[n] for n in self.order] + [msg]

        @friendly
        def on_export(data):
            from trainer.recipe.kohya_ss import to_sd_scripts_toml

            return gr.Code(value=to_sd_scripts_toml(values_to_config(self.values_of(data), ws.datasets_dir)), visible=True)

        keep = self.inputs | {preset}
        save_preset.click(on_save_preset, self.inputs | {preset_name}, [preset, preset_msg]).then(self.remember, keep)
        delete_preset.click(on_delete_preset, preset, [preset, preset_msg]).then(self.remember, keep)
        kohya_file.upload(on_kohya, self.inputs | {kohya_file}, self.outputs + [preset_msg]).then(self.remember, keep)
        export_btn.click(on_export, self.inputs, export_text)

    def build_run_controls(self):
        """Check / Start / Stop / Save now / Resume, the run picker and the live view (progress, loss, samples, log)."""
        preset = self.preset_dd
        with gr.Row():
            check = gr.Button("Check setup", elem_id="check")
            start = gr.Button("Start", variant="primary", elem_id="start")
            add_queue = gr.Button("Add to queue", elem_id="add-queue")
            stop = gr.Button("Stop (saves first)", elem_id="stop")
            save_now = gr.Button("Save now", elem_id="save-now")
            resume = gr.Button("Resume", elem_id="resume")
            tiny = gr.Button("No model yet? Try the whole journey with a built-in tiny model", size="sm",
                             elem_id="tiny-journey")
        gpu_pick, chosen_gpus = self.build_gpu_pick()
        preflight_md = gr.Markdown(elem_id="preflight")
        self.run_pick = gr.Dropdown(choices=self.studio.run_choices(), label="Run", elem_id="run-pick")
        run_msg = gr.Markdown(elem_id="run-msg")  # what Stop / Save now / Resume answered, until the run moves on
        live_out = self.build_live_view()
        queue = self.build_queue(run_msg)
        timer = gr.Timer(1.0)
        seen = gr.State({})  # what the page shows now: run list and the run's state, to update only on change

        @friendly
        def on_check(data):
            chosen = chosen_gpus(data)
            return in_ui_words(self.studio.check(self.values_of(data), data[preset], len(chosen or []) or 1, chosen)[1])

        def on_start(data, to_queue=False):
            chosen = chosen_gpus(data)
            run_id, text = self.studio.start(self.values_of(data), data[preset], to_queue=to_queue, gpu_ids=chosen)
            text = in_ui_words(text)
            if run_id is None:
                return gr.Dropdown(), text
            return gr.Dropdown(choices=self.studio.run_choices(), value=run_id), text

        @friendly
        def on_tiny(data):
            values, text = self.studio.tiny_journey()
            vals = {**self.values_of(data), **values}
            lists = {"dataset": self.ws.list_datasets(), "base_model": self.studio.model_choices()}
            form = [gr.Dropdown(choices=lists[n], value=vals[n]) if n in lists else vals[n] for n in self.order]
            return [*form, text]

        check.click(on_check, self.inputs | {preset, gpu_pick}, preflight_md)
        tiny.click(on_tiny, self.inputs, self.outputs + [preflight_md]).then(self.remember, self.inputs | {preset})
        start.click(friendly(on_start), self.inputs | {preset, gpu_pick}, [self.run_pick, preflight_md])
        add_queue.click(friendly(lambda data: on_start(data, to_queue=True)), self.inputs | {preset, gpu_pick},
                        [self.run_pick, preflight_md])
        self.wire_run_actions(stop, save_now, resume, run_msg, live_out)

        @friendly
        def on_tick(run_id, shown):
            follow, run_id, new = self.follow(run_id, shown)
            msg = gr.update() if follow["same_state"] else ""
            rows = self.studio.queue_rows()
            new["queue"] = rows
            return [follow["picker"], *self.live(run_id), msg, rows if rows != shown.get("queue") else gr.update(), new]

        timer.tick(on_tick, [self.run_pick, seen], [self.run_pick, *live_out, run_msg, queue, seen],
                   show_progress="hidden").then(None, js=FOLLOW_LOG_JS)

    def wire_run_actions(self, stop, save_now, resume, run_msg, live_out):
        """Stop / Save now / Resume act on the picked run; picking a run shows it live and loads its settings into
        the form."""
        runs = self.runs
        stop.click(friendly(lambda r: runs.stop(r) if r else "Pick a run."), self.run_pick, run_msg, show_progress="hidden")
        save_now.click(friendly(lambda r: runs.save_now(r) if r else "Pick a run."), self.run_pick, run_msg,
                       show_progress="hidden")
        resume.click(friendly(lambda r: runs.resume(r) if r else "Pick a run."), self.run_pick, run_msg,
                     show_progress="hidden")
        self.run_pick.change(friendly(self.live), self.run_pick, live_out)

        @friendly
        def on_choose_run(run_id):
            if not run_id:
                return [gr.update()] * len(self.order) + [""]
            vals = self.run_values(run_id)
            return [vals.get(n, gr.update()) for n in self.order] + [
                f"The form now holds the settings of run `{run_id}`: change what you like and Start a new run."]

        self.run_pick.input(on_choose_run, self.run_pick, self.outputs + [run_msg]).then(
            self.remember, self.inputs | {self.preset_dd})

    def build_gpu_pick(self):
        """With two or more GPUs, which of them the run takes (one process each, through accelerate; the batch size
        is per GPU). Returns the choice and chosen(data): the picked indices, or None with one GPU or none."""
        from app.gpu import gpu_label, list_gpus

        gpus = list_gpus()
        pick = gr.CheckboxGroup([(gpu_label(g), g["index"]) for g in gpus], value=[gpus[0]["index"]] if gpus else [],
                                label="Train on (several GPUs: one process each; Batch size is per GPU)",
                                visible=len(gpus) > 1, elem_id="gpu-pick")

        def chosen(data) -> list[int] | None:
            return sorted(int(i) for i in data[pick] or []) if len(gpus) > 1 else None

        return pick, chosen

    def build_live_view(self) -> list:
        """The picked run's live view: [progress, loss plot, validation plot, variant plot, variant table, samples,
        log], the outputs of self.live."""
        progress = gr.Markdown("No run selected.", elem_id="progress")
        with gr.Row():
            # two plots, not one with a colour per series: a coloured LinePlot that starts empty and is updated
            # by the timer never draws its lines (Gradio 6.31, seen in Chromium)
            loss_plot = gr.LinePlot(x="step", y="loss", title="Training loss", height=260, elem_id="loss-plot")
            val_plot = gr.LinePlot(x="step", y="validation loss", height=260, elem_id="val-plot",
                                   title="Validation loss (Advanced › Quality)", visible=False)
            samples = gr.Gallery(label="Samples", columns=3, height=300, object_fit="contain", elem_id="samples")
        # starts hidden, then shown with its lines (a coloured plot shown empty first never drew in Gradio 6.31)
        variant_plot = gr.LinePlot(x="step", y="validation loss", color="variant", height=260, visible=False,
                                   title="Validation loss by variant", elem_id="variant-plot")
        compare_table = gr.Dataframe(label="Validation loss by variant (★ each variant's lowest)", visible=False,
                                     interactive=False, elem_id="compare-table")
        logs = gr.Textbox(label="Log", lines=8, max_lines=8, elem_id="log", autoscroll=True)
        return [progress, loss_plot, val_plot, variant_plot, compare_table, samples, logs]

    def build_queue(self, run_msg):
        """The queue panel: the queued runs in order; the run picked above moves, leaves or takes the form's
        settings; the whole queue pauses."""
        runs = self.runs
        with gr.Accordion("Queue", open=False, elem_id="queue-accordion"):
            gr.Markdown("Queued runs start one after another when the GPU is free (the next one first). Pick a "
                        "queued run in *Run* above to move it, remove it or give it the form's settings. The queue "
                        "is kept in the workspace: it survives closing the app.")
            table = gr.Dataframe(headers=["#", "run", "settings"], datatype=["number", "str", "str"],
                                 value=self.studio.queue_rows(), interactive=False, elem_id="queue-table")
            with gr.Row():
                earlier = gr.Button("Earlier", size="sm", elem_id="queue-up")
                later = gr.Button("Later", size="sm", elem_id="queue-down")
                remove = gr.Button("Remove from the queue", size="sm", variant="stop", elem_id="queue-remove")
                edit = gr.Button("Give it the form's settings", size="sm", elem_id="queue-edit")
                pause = gr.Checkbox(label="Pause the queue", value=runs.paused(), elem_id="queue-pause")

        def act(fn):
            return friendly(lambda r, *a: fn(r, *a) if r else "Pick a queued run in *Run* above.")

        earlier.click(act(lambda r: runs.move(r, -1)), self.run_pick, run_msg, show_progress="hidden")
        later.click(act(lambda r: runs.move(r, 1)), self.run_pick, run_msg, show_progress="hidden")
        remove.click(act(runs.stop), self.run_pick, run_msg, show_progress="hidden")

        @friendly
        def on_edit(data):
            run_id = data[self.run_pick]
            if not run_id:
                return "Pick a queued run in *Run* above."
            return in_ui_words(self.studio.edit_queued(run_id, self.values_of(data)))

        edit.click(on_edit, self.inputs | {self.run_pick}, run_msg, show_progress="hidden")
        pause.input(friendly(runs.set_paused), pause, run_msg, show_progress="hidden")
        return table

    def register_load(self, ui) -> None:
        """A (re)loaded page gets fresh lists and re-attaches the live view to the active run."""
        ui.load(friendly(self.page_load), None, [self.run_pick, self.preset_dd, *self.outputs])

    def page_load(self) -> list:
        """Run picker (attached to the active run), preset and every form field as the person left them."""
        active = self.studio.active_run()
        runs = self.studio.run_choices()
        vals, preset = self.restored_values()
        lists = {"dataset": self.ws.list_datasets(), "base_model": self.studio.model_choices()}
        form = [gr.Dropdown(choices=lists[n], value=vals[n]) if n in lists else vals[n] for n in self.order]
        return [gr.Dropdown(choices=runs, value=active) if active else gr.Dropdown(choices=runs),
                gr.Dropdown(choices=self.studio.preset_choices(), value=preset), *form]
