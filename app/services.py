"""What the page and the scripting API do, in one place: the tabs and `gr.api` endpoints both call a `Studio`.

No gradio and no torch here: plain values in, plain values out, unit-testable.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from app.forms import cannot_start, config_to_values, preflight, values_to_config
from app.workers import gpu_busy, run_tool
from trainer.recipe.config import ConfigError, TrainConfig
from trainer.recipe.presets import find_preset, list_presets
from trainer.runfiles import RunFiles, step_of


def run_metadata(run: dict) -> dict:
    """The settings of a run a person recognises it by (from its config file)."""
    try:
        cfg = TrainConfig.load(RunFiles(run["dir"]).config)
    except (ValueError, OSError):
        return {}
    return {"base": Path(cfg.base_model).name or cfg.base_model, "rank/alpha": f"{cfg.rank}/{cfg.alpha:g}",
            "trigger": cfg.trigger, "steps": cfg.max_steps or f"{cfg.epochs} epochs", "name": cfg.output_name}


class Studio:
    def __init__(self, ws, runs, captions=None):
        self.ws, self.runs = ws, runs
        self.captions = captions  # app.captioning.CaptionJobs: the other worker that wants the GPU

    # ------------------------------------------------------------------ presets
    def preset_choices(self) -> list[tuple[str, str]]:
        return [(("" if p.shipped else "★ ") + p.name, p.key) for p in list_presets(self.ws.presets_dir)]

    def apply_preset(self, key: str, values: dict, gpu: bool | None = None) -> tuple[dict, str]:
        """Form values with the preset laid over them, and a description of the preset. Without a GPU the
        preset's [cpu] values apply and the precision is fp32, and the description says so."""
        from app.forms import machine_defaults
        from app.gpu import gpu_present

        if not key:
            return values, ""
        gpu = gpu_present() if gpu is None else gpu
        p = find_preset(key, self.ws.presets_dir)
        cfg = values_to_config(values, self.ws.datasets_dir, strict=False) if values else TrainConfig()
        cfg = p.apply(cfg, gpu).replace(**machine_defaults(gpu))
        info = f"**{p.name}** ({p.family}) — {p.description}"
        if p.steps:
            info += f"\n\n*Typical length:* {p.steps}"
        if not gpu:
            changed = ", ".join(f"{k} = {v}" for k, v in {**p.cpu, **machine_defaults(gpu)}.items())
            info += f"\n\n*No NVIDIA GPU here, so for this machine:* {changed}."
        return config_to_values(cfg), info

    # ------------------------------------------------------------------ base models
    CHECKPOINT_DIRS = (("Stable-diffusion",), ("checkpoints",))  # A1111 / Forge, ComfyUI: beside their LoRA folder

    def model_choices(self) -> list[tuple[str, str]]:
        """What the Base model field offers a person who does not know a path or a hub id: the models used before,
        checkpoints of the web UI whose LoRA folder is set in Settings, diffusers models in the Hugging Face cache,
        the well-known hub ids with their download size, and the built-in tiny model once it was made."""
        from trainer.models.hub import WELL_KNOWN, cached_models

        out: dict[str, str] = {m: m for m in self.ws.settings().get("recent_models", [])}
        for f in self.webui_checkpoints():
            out.setdefault(str(f), f"{f.name} (your web UI's checkpoints)")
        for repo in cached_models():
            out.setdefault(repo, f"{repo} (already downloaded)")
        for repo, what in WELL_KNOWN.items():
            out.setdefault(repo, f"{repo} ({what})")
        tiny = self.ws.tiny_model_dir
        if (tiny / "model_index.json").is_file():
            out.setdefault(str(tiny), "Built-in tiny model (random weights: it only shows the steps)")
        return [(label_, value) for value, label_ in out.items()]

    def webui_checkpoints(self) -> list[Path]:
        lora_dir = self.ws.settings().get("webui_lora_dir")
        if not lora_dir:
            return []
        models = Path(lora_dir).expanduser().parent  # <webui>/models/Lora, <ComfyUI>/models/loras
        found = []
        for (sub,) in self.CHECKPOINT_DIRS:
            d = models / sub
            if d.is_dir():
                found += sorted(p for p in d.rglob("*") if p.suffix.lower() in (".safetensors", ".ckpt"))
        return found[:200]

    def tiny_journey(self) -> tuple[dict, str]:
        """(form values, what to say) for trying the whole journey offline in a minute on a CPU: the built-in tiny
        random-weight model (made once, by a worker: the page does not load torch) and a dataset of a few generated
        pictures. Its images are noise; it exists to show the steps."""
        import subprocess

        from app.workers import engine_command, start_attached
        from trainer.fsutil import atomic_dir

        tiny = self.ws.tiny_model_dir
        if not (tiny / "model_index.json").is_file():
            with atomic_dir(tiny) as tmp:
                proc = start_attached(engine_command("tiny-model", str(tmp)), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
                out, _ = proc.communicate(timeout=600)
                if proc.returncode != 0:
                    raise RuntimeError("The tiny model could not be made: " + (out.strip().splitlines() or ["?"])[-1])
        data = self.ws.dataset_path("tiny-demo", create=True)
        if not any(data.glob("*.png")):
            demo_pictures(data)
        values = {"base_model": str(tiny), "dataset": "tiny-demo", "trigger": "zwx", "resolution": 64, "min_bucket": 64,
                  "max_bucket": 128, "rank": 4, "alpha": 4.0, "max_steps": 30, "batch_size": 2, "unet_lr": 1e-3,
                  "text_encoder_lr": 1e-3, "mixed_precision": "no", "save_every_steps": 10, "sample_every_steps": 10,
                  "sample_steps": 4, "sample_prompts": "zwx, a red square", "output_name": "tiny-demo"}
        return values, ("The form now holds the **built-in tiny model** and the *tiny-demo* dataset: press *Start*. It "
                        "trains in about a minute on a CPU, fully offline. Its weights are random, so its samples "
                        "and previews are noise: it exists to show every step (training, Outputs, Preview, Tools) "
                        "before you use a real model.")

    # ------------------------------------------------------------------ engine processes
    def gpu_busy(self, asking: str = "") -> str | None:
        """Which job holds the GPU ('training', 'captioning') or None: the one rule, in app/workers.py."""
        return gpu_busy(self.runs, self.captions, asking)

    def run_tool(self, argv: list[str]):
        """A `trainer lora` command as a worker: ('progress', done, total) ..., then ('done', result) or ('error', ...)."""
        return run_tool(argv)

    # ------------------------------------------------------------------ runs
    def check(self, values, preset_key: str = "", processes: int = 1,
              gpu_ids: list[int] | None = None) -> tuple[bool, str]:
        """The pre-flight check of the form's values (or of the TrainConfig made of them), for a run on
        `processes` GPUs (or CPU ranks): the `gpu_ids` picked, else the first GPU."""
        from app.gpu import gpu_present, list_gpus, run_card
        from trainer.recipe import timing

        preset = find_preset(preset_key, self.ws.presets_dir) if preset_key else None
        device = "cuda" if gpu_present() else "cpu"
        return preflight(values, self.ws.datasets_dir, preset, timing.load(self.ws.timings_path), device, processes,
                         card=run_card(list_gpus(), gpu_ids) if device == "cuda" else None)

    def start(self, values: dict, preset_key: str = "", to_queue: bool = False, gpu_ids: list[int] | None = None,
              processes: int | None = None) -> tuple[str | None, str]:
        """(run id or None, what to tell the person): a run starts only after the pre-flight check passes.
        Start puts it next in line; `to_queue` (Add to queue) at the end. `gpu_ids`: the GPUs it trains on (two or
        more: one rank each, through accelerate); `processes`: ranks on the CPU (device = 'cpu'), as the tests
        run a group here."""
        try:
            cfg = values_to_config(values, self.ws.datasets_dir)  # once: the check and the run use this config
        except ConfigError as e:
            return None, cannot_start(e)
        n = int(processes or len(gpu_ids or []) or 1)
        if n > 1 and cfg.device != "cpu" and len(gpu_ids or []) != n:
            return None, "Choose the GPUs the run trains on (two or more for a group), or one for a single GPU."
        if n > 1 and cfg.variants:
            return None, ("A sweep (Compare settings) trains its variants on one GPU: pick one GPU in Train on, or "
                          "empty the variants to train one LoRA on several.")
        ok, text = self.check(cfg, preset_key, n, gpu_ids)
        if not ok:
            return None, text
        self.ws.remember_model(cfg.base_model)
        run_id, created = self.runs.create(cfg, front=not to_queue, gpu_ids=gpu_ids, processes=n)
        return run_id, self.start_message(run_id, created) + "\n\n" + text

    def start_message(self, run_id: str, created: bool) -> str:
        """What Start did: started, queued behind which runs, or the same run already there."""
        if not created:
            return "This run is already queued or running; showing it."
        me = self.runs.get(run_id) or {}
        if me.get("status") != "queued":
            return "Started."
        queue = [r["id"] for r in self.runs.queue()]
        ahead = [f"`{r['id']}`" for r in self.runs.list() if r["status"] == "running"] + [
            f"`{r}`" for r in queue[: queue.index(run_id)]]
        if self.captions is not None and (self.captions.running() or self.captions.waiting()):
            ahead.insert(0, "the auto-captioning of the Dataset tab")
        paused = " The queue is paused: resume it in the queue panel." if self.runs.paused() else ""
        return ((f"Queued: it starts when {', then '.join(ahead)} "
                 f"{'has' if len(ahead) == 1 else 'have'} finished (one job on the GPU at a time)." if ahead
                 else "Queued: it starts in a moment.") + paused)

    def edit_queued(self, run_id: str, values: dict) -> str:
        """Give a queued run the form's settings, after the same pre-flight check as Start."""
        try:
            cfg = values_to_config(values, self.ws.datasets_dir)
        except ConfigError as e:
            return cannot_start(e)
        ok, text = self.check(cfg, processes=(self.runs.get(run_id) or {}).get("processes") or 1)
        return self.runs.update_config(run_id, cfg) if ok else text

    def queue_rows(self) -> list[list]:
        """[place, run, settings] of the queued runs, the next one first (the page's queue panel)."""
        rows = []
        for i, r in enumerate(self.runs.queue()):
            try:
                cfg = TrainConfig.load(RunFiles(r["dir"]).config)
                what = (f"{cfg.network_type} rank {cfg.rank}, {cfg.max_steps or f'{cfg.epochs} epochs'}"
                        f"{' steps' if cfg.max_steps else ''}, {Path(cfg.base_model).name}")
            except (OSError, ValueError):
                what = "(its config cannot be read)"
            rows.append([i + 1, f"{r['id']} · {r['name']}" + (" (resume)" if r["resume"] else ""), what])
        return rows

    def run_choices(self) -> list[tuple[str, str]]:
        return [(f"{r['id']} · {r['name']} · {r['status']}", r["id"]) for r in self.runs.list()]

    def active_run(self) -> str | None:
        """The running run, else the first queued one: what a (re)loaded page attaches to."""
        runs = self.runs.list()
        return next((r["id"] for r in runs if r["status"] == "running"), None) or next(
            (r["id"] for r in runs if r["status"] == "queued"), None)

    def status(self, run_id: str) -> dict:
        run = self.runs.get(run_id)
        if run is None:
            return {"error": f"no run {run_id}"}
        v = self.runs.view(run_id)
        return {"status": run["status"], "state": v.state, "step": v.step, "total": v.total,
                "loss": v.losses[-1][1] if v.losses else None, "error": v.error, "output": v.output}

    def runs_signature(self) -> str:
        """Changes whenever a run is added, changes status or writes a LoRA file: what lists follow."""
        import json

        return json.dumps([(r["id"], r["status"], len(RunFiles(r["dir"]).lora_files())) for r in self.runs.list()])

    def list_runs(self) -> list[dict]:
        return [{k: r[k] for k in ("id", "name", "status", "dir")} for r in self.runs.list()]

    # ------------------------------------------------------------------ outputs
    def outputs_table(self) -> list[list[str]]:
        rows = []
        for r in self.runs.list():
            md = run_metadata(r)
            best = self.runs.view(r["id"]).best_checkpoint()
            rows.append([r["id"], r["status"], md.get("name", ""), md.get("base", ""), md.get("rank/alpha", ""),
                         str(md.get("steps", "")), md.get("trigger", ""),
                         f"step {best[0]} ({best[1]:.4f})" if best else ""])
        return rows

    def lora_files(self, run_id: str) -> list[str]:
        """A run's LoRA files: the final one first, then each checkpoint's, newest first."""
        run = self.runs.get(run_id) if run_id else None
        return [str(p) for p in RunFiles(run["dir"]).lora_files()] if run else []

    def lora_file_choices(self, run_id: str) -> list[tuple[str, str]]:
        """(label, path) of a run's LoRA files for a picker: 'final', 'step 6', and which checkpoint had the
        lowest validation loss, instead of long paths."""
        run = self.runs.get(run_id) if run_id else None
        if not run:
            return []
        best = self.runs.view(run_id).best_checkpoint()
        out = []
        for f in self.lora_files(run_id):
            step = step_of(Path(f).parent)
            label = "final" if step is None else f"step {step}"
            if best and step == best[0]:
                label += f" (lowest validation loss, {best[1]:.4f})"
            out.append((f"{label} · {Path(f).name}", f))
        return out

    def lora_choices(self) -> list[tuple[str, str]]:
        """(label, path) of every LoRA in the workspace: each run's final file and checkpoints, then imported ones."""
        out = []
        for r in self.runs.list():
            files = RunFiles(r["dir"])
            out += [(f"{r['id']} · final · {f.name}", str(f)) for f in files.final_loras()]
            out += [(f"{r['id']} · {f.parent.name}", str(f)) for _, f in reversed(files.checkpoint_loras())]
        out += [(f"imported · {f.name}", str(f)) for f in sorted(self.ws.loras_dir.glob("*.safetensors"))]
        return out

    def variant_series(self, path: str) -> tuple[list[str], list[str]]:
        """(final files, variant names) of the sweep a LoRA file belongs to (Preview's Variant grid): each variant
        folder of its run with its `<output_name>-<variant>.safetensors`."""
        files = RunFiles.of_lora(self.ws.resolve_file(path))
        finals = files.final_loras()
        found = []
        for name in (d.name for d in files.variant_dirs()):
            mine = [f for f in finals if f.name.endswith(f"-{name}.safetensors")]
            if mine:
                found.append((str(mine[0]), name))
        if not found:
            raise ValueError("That LoRA is not one of a finished sweep's (Compare settings on the Train tab): pick a "
                             "file of such a run as the first enabled LoRA.")
        return [f for f, _ in found], [n for _, n in found]

    def checkpoint_series(self, path: str) -> tuple[list[str], list[str]]:
        """The files of the run a LoRA file belongs to, under its name (a sweep: its variant's): checkpoints oldest
        first, then the final one."""
        src = Path(self.ws.resolve_file(path))
        files = RunFiles.of_lora(src)
        ckpts = [(s, f) for s, f in files.checkpoint_loras() if f.name == src.name]
        finals = [f for f in files.final_loras() if f.name == src.name]
        if not ckpts and not finals:
            raise ValueError("That LoRA is not part of a run with checkpoints.")
        return ([str(f) for _, f in ckpts] + [str(f) for f in finals],
                [f"step {s}" for s, _ in ckpts] + ["final"] * len(finals))

    @staticmethod
    def public_name(src: Path) -> str:
        """A LoRA's file name outside its run folder: the run (and checkpoint step) in it, so that files from
        different runs and steps never share a name ('lora-20261201-101500-ab12cd-step-000006.safetensors')."""
        step = step_of(src.parent)
        run = RunFiles.of_lora(src)
        if not run.config.is_file():  # not a run's file (the workspace's loras/, a file from elsewhere)
            return src.name
        return f"{src.stem}-{run.root.name}{f'-{src.parent.name}' if step is not None else ''}.safetensors"

    def download_copy(self, path: str) -> str:
        """The file to hand to the browser, under its public name (a hard link in the workspace's downloads/)."""
        import os

        src = self.ws.resolve_file(path)
        dst = self.ws.downloads_dir / self.public_name(src)
        dst.parent.mkdir(exist_ok=True)
        if not (dst.exists() and os.path.samefile(src, dst)):  # this very file, never an older namesake
            dst.unlink(missing_ok=True)
            try:
                os.link(src, dst)
            except OSError:  # another file system, or no hard links there
                shutil.copyfile(src, dst)
        return str(dst)

    def copy_to_webui(self, path: str) -> str:
        """Copy a LoRA into the web UI's LoRA folder, named after its run (and step) so copies never collide."""
        target = self.ws.settings().get("webui_lora_dir")
        if not target:
            return "Set your web UI's LoRA folder in Settings first."
        src = self.ws.resolve_file(path)
        dst_dir = Path(target).expanduser()
        if not dst_dir.is_dir():
            return f"The LoRA folder {dst_dir} does not exist."
        dst = dst_dir / self.public_name(src)
        tmp = dst.with_suffix(".partial")
        shutil.copyfile(src, tmp)
        tmp.replace(dst)
        return f"Copied to {dst}"


def demo_pictures(folder: Path, n: int = 6) -> None:
    """A few pictures of one clear concept (a red square on blue, moved about), captioned, for the tiny model."""
    from PIL import Image, ImageDraw

    for i in range(n):
        im = Image.new("RGB", (96, 96), (20, 40, 190))
        x, y = 10 + 9 * i, 50 - 6 * i
        ImageDraw.Draw(im).rectangle([x, y, x + 36, y + 36], fill=(220, 25, 25))
        im.save(folder / f"demo{i}.png")
        (folder / f"demo{i}.txt").write_text("zwx, a red square on a blue field")
