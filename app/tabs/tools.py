"""Tools tab: a LoRA's rank spectrum, resize, merge, extract. Each runs `python -m trainer lora ...` as a worker
process (torch stays out of the UI process), with its progress in the page; results land in the workspace's
loras/ folder, where Preview finds them."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from app.ui_util import friendly
from trainer.fsutil import safe_name


def spectrum_tables(rep: dict):
    """(energy-per-rank curve per block, rows of the ranks keeping 90/95/99% per block) for the page."""
    import pandas as pd

    curve = [{"rank": k + 1, "energy": e, "block": b} for b, v in rep["blocks"].items() for k, e in enumerate(v["energy"])]
    rows = [[b, v["modules"], v["rank_90"], v["rank_95"], v["rank_99"]] for b, v in rep["blocks"].items()]
    return pd.DataFrame(curve or {"rank": [], "energy": [], "block": []}), rows


def module_rows(rep: dict) -> list[list]:
    """Per module: block, rank in the file, and the smallest rank keeping 90 / 95 / 99% of its update."""
    return [[name, m["block"], m["rank"], m["rank_90"], m["rank_95"], m["rank_99"]] for name, m in rep["modules"].items()]


class ToolsTab:
    def __init__(self, studio):
        self.studio, self.ws = studio, studio.ws

    def out_path(self, name: str) -> str:
        clean = safe_name((name or "").strip().removesuffix(".safetensors"), fallback="")
        if not clean:
            raise ValueError("Give the new file a name.")
        return str(self.ws.loras_dir / f"{clean}.safetensors")

    def stream(self, argv: list[str], what: str):
        """Markdown status lines for a tool run: progress, then the result in words."""
        for event in self.studio.run_tool(argv):
            if event[0] == "progress":
                yield f"{what}: {event[1]}/{event[2]} modules", None
            elif event[0] == "error":
                yield f"**{what} stopped:** {event[1]}", None
            else:
                yield None, event[1]

    def summary(self, rep: dict) -> str:
        kept = ", ".join(f"{b} {100 * v:.1f}%" for b, v in rep.get("energy_kept", {}).items())
        lines = [f"Wrote `{Path(rep['file']).name}` (ranks {', '.join(map(str, rep['ranks']))}); it is in Preview's LoRA lists."]
        if kept:
            lines.append(f"Energy kept per block: {kept}.")
        if "size_mb_before" in rep:
            lines.append(f"Size {rep['size_mb_before']} MB -> {rep['size_mb_after']} MB.")
        return "\n\n".join(lines)

    # ------------------------------------------------------------------ handlers (generators: progress, then result)
    @staticmethod
    def rank_args(rank, energy) -> list[str]:
        return ["--rank", str(int(rank))] if rank and int(rank) > 0 else ["--energy", str(float(energy))]

    def finish(self, msg, rep):
        if rep is None:
            return msg, gr.update()
        return msg, gr.Dropdown(choices=self.studio.lora_choices(), value=rep["file"])

    def on_show(self, path):
        if not path:
            yield "Pick a LoRA file.", None, [], [], {}
            return
        info = None
        for msg, rep in self.stream(["info", path], "Reading"):
            if msg:
                yield msg, None, [], [], {}
                return
            info = rep
        for msg, rep in self.stream(["spectrum", path, "--json"], "Spectrum"):
            if msg:
                yield msg, None, [], [], info
            else:
                table, rows = spectrum_tables(rep)
                yield (f"**{info['file']}**: {info['family']} {info['network']}, {info['modules']} modules, ranks "
                       f"{', '.join(map(str, info['ranks']))}{', DoRA' if info['dora'] else ''}, {info['size_mb']} MB."), \
                    table, rows, module_rows(rep), info

    def on_resize(self, path, rank, energy, name):
        if not path:
            yield "Pick a LoRA file.", gr.update()
            return
        for msg, rep in self.stream(["resize", path, *self.rank_args(rank, energy), "--out", self.out_path(name)], "Resizing"):
            yield self.finish(msg or self.summary(rep), rep)

    def on_merge(self, *values):
        *pairs, rank, name = values
        sources = [f"{pairs[i]}:{float(pairs[i + 1] or 0)}" for i in range(0, len(pairs), 2) if pairs[i] and pairs[i + 1]]
        argv = ["merge", *sources] + (["--rank", str(int(rank))] if rank and int(rank) > 0 else []) + ["--out", self.out_path(name)]
        for msg, rep in self.stream(argv, "Merging"):
            yield self.finish(msg or self.summary(rep), rep)

    def on_extract(self, base, tuned, rank, energy, name):
        if not base or not tuned:
            yield "Give both checkpoints.", gr.update()
            return
        argv = ["extract", "--base", base, "--tuned", tuned, *self.rank_args(rank, energy), "--out", self.out_path(name)]
        for msg, rep in self.stream(argv, "Extracting"):
            yield self.finish(msg or self.summary(rep), rep)

    # ------------------------------------------------------------------ layout
    def build(self):
        choices = self.studio.lora_choices()
        with gr.Row():
            self.file = gr.Dropdown(choices=choices, allow_custom_value=True, scale=4, elem_id="tools-file",
                                    label="LoRA file (one of yours, or a path to any kohya-format LoRA)")
            show = gr.Button("Info and rank spectrum", scale=1, elem_id="tools-spectrum")
        status = gr.Markdown(elem_id="tools-status")
        with gr.Row():
            curve = gr.LinePlot(x="rank", y="energy", color="block", height=260, elem_id="tools-curve",
                                title="Energy of the update kept at each rank, per block")
            ranks = gr.Dataframe(headers=["block", "modules", "rank for 90%", "95%", "99%"], interactive=False,
                                 elem_id="tools-ranks")
        with gr.Accordion("Per module", open=False):
            per_module = gr.Dataframe(headers=["module", "block", "rank", "rank for 90%", "95%", "99%"],
                                      interactive=False, elem_id="tools-modules")
        details = gr.JSON(label="File")
        with gr.Accordion("Resize (truncated SVD)", open=True):
            with gr.Row():
                r_rank = gr.Number(label="Rank (0 = use the energy)", value=0, precision=0)
                r_energy = gr.Slider(0.5, 1.0, value=0.95, step=0.01, label="...or keep this share of each module's energy")
                r_name = gr.Textbox(label="New file name", elem_id="tools-resize-name")
                r_go = gr.Button("Resize", elem_id="tools-resize")
        with gr.Accordion("Merge several LoRAs", open=False):
            merge_rows = []
            for i in range(3):
                with gr.Row():
                    merge_rows.append((gr.Dropdown(choices=choices, allow_custom_value=True, label=f"LoRA {i + 1}", scale=4),
                                       gr.Number(value=1.0 if i < 2 else 0.0, label="weight", scale=1)))
            with gr.Row():
                m_rank = gr.Number(label="Rank (0 = exact: ranks add up)", value=0, precision=0)
                m_name = gr.Textbox(label="New file name")
                m_go = gr.Button("Merge")
        with gr.Accordion("Extract a LoRA from a fine-tuned checkpoint", open=False):
            with gr.Row():
                e_base = gr.Textbox(label="Base checkpoint (.safetensors or diffusers folder)")
                e_tuned = gr.Textbox(label="Fine-tuned checkpoint of the same family")
            with gr.Row():
                e_rank = gr.Number(label="Rank (0 = use the energy)", value=32, precision=0)
                e_energy = gr.Slider(0.5, 1.0, value=0.9, step=0.01, label="...or keep this share of each module's energy")
                e_name = gr.Textbox(label="New file name")
                e_go = gr.Button("Extract")

        show.click(friendly(self.on_show), self.file, [status, curve, ranks, per_module, details])
        r_go.click(friendly(self.on_resize), [self.file, r_rank, r_energy, r_name], [status, self.file])
        m_go.click(friendly(self.on_merge), [x for row in merge_rows for x in row] + [m_rank, m_name], [status, self.file])
        e_go.click(friendly(self.on_extract), [e_base, e_tuned, e_rank, e_energy, e_name], [status, self.file])
        self.merge_files = [row[0] for row in merge_rows]

    def register_load(self, ui) -> None:
        def on_load():
            choices = self.studio.lora_choices()
            return [gr.Dropdown(choices=choices)] * (1 + len(self.merge_files))

        ui.load(on_load, None, [self.file] + self.merge_files)
