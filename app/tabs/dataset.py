"""Dataset tab: create/pick a dataset, drop files in, edit captions, bulk actions, the report."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from app.ui_util import friendly
from trainer.data.captions import split_tags, with_triggers
from trainer.data import manage
from trainer.data.importer import import_sources, save_caption
from trainer.data.report import dataset_report, format_report
from trainer.data.scan import scan_dataset

IMPORT_TYPES = [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".txt", ".caption", ".zip"]


class DatasetTab:
    def __init__(self, ws):
        self.ws = ws

    # ------------------------------------------------------------------ handlers (plain, unit-tested)
    def entries(self, name: str) -> list[tuple[object, bool]]:
        """(ImageItem, excluded) for every image in the dataset, excluded ones too, in file order."""
        if not name:
            return []
        try:
            folder = self.ws.dataset_path(name)
        except ValueError:
            return []
        res = scan_dataset(folder)
        both = [(it, False) for it in res.items] + [(it, True) for it in res.excluded]
        return sorted(both, key=lambda e: str(e[0].path))

    def items(self, name: str) -> list[tuple[str, str]]:
        """The gallery: each image with its caption; an excluded one says so first."""
        return [(str(it.path), ("⊘ excluded · " if ex else "") + (it.caption or "")) for it, ex in self.entries(name)]

    def image_in(self, name: str, image: str) -> Path:
        p = self.ws.resolve_file(image)
        if self.ws.dataset_path(name).resolve() not in p.parents:
            raise ValueError("That image is not in this dataset.")
        return p

    def info(self, name: str, image: str) -> str:
        """What the caption editor is editing: file name, size in pixels and bytes, excluded or not."""
        if not image:
            return "Click an image to edit its caption."
        p = self.image_in(name, image)
        it, ex = next(((it, ex) for it, ex in self.entries(name) if it.path.resolve() == p), (None, False))
        size = p.stat().st_size
        kb = f"{size / 1024:.0f} KB" if size < 1 << 20 else f"{size / (1 << 20):.1f} MB"
        dims = f"{it.width}×{it.height} px · " if it else ""
        rel = p.relative_to(self.ws.dataset_path(name).resolve()).as_posix()
        return f"**{rel}** · {dims}{kb}" + (" · **excluded from training**" if ex else "")

    def toggle_exclude(self, name: str, image: str) -> str:
        if not image:
            return "Click an image first."
        p, folder = self.image_in(name, image), self.ws.dataset_path(name)
        now = manage.set_excluded(folder, p, p.relative_to(folder.resolve()).as_posix() not in manage.excluded(folder))
        return (f"{p.name} is excluded from training (it stays in the folder; click it and Include to undo)."
                if now else f"{p.name} is included in training again.")

    def remove(self, name: str, image: str) -> str:
        if not image:
            return "Click an image first."
        p = self.image_in(name, image)
        batch = manage.remove_to_trash(self.ws.dataset_path(name), p, self.ws.trash_dir)
        return (f"Moved {p.name} and its caption to the trash (`{batch.relative_to(self.ws.root).as_posix()}`). "
                "*Restore last removed* puts it back.")

    def restore(self, name: str) -> str:
        names = manage.restore_last(self.ws.dataset_path(name), self.ws.trash_dir)
        return f"Restored {', '.join(names)}." if names else "Nothing restored: those files exist in the dataset again."

    def create(self, name: str) -> tuple[str, str]:
        folder = self.ws.dataset_path(name, create=True)
        return folder.name, f"Dataset '{folder.name}' is ready: drop images into it."

    def import_files(self, name: str, files: list[str]) -> str:
        if not name:
            return "Create or pick a dataset first."
        if not files:
            return "No files were dropped."
        rep = import_sources([Path(f) for f in files], self.ws.dataset_path(name))
        return rep.summary()

    def import_folder(self, name: str, folder: str) -> str:
        if not name:
            return "Create or pick a dataset first."
        p = Path(folder or "").expanduser()
        if not folder or not p.exists():
            return f"Folder not found: {folder}"
        return import_sources([p], self.ws.dataset_path(name)).summary()

    def save_caption(self, name: str, image: str, text: str) -> str:
        if not image:
            return "Click an image first."
        p = self.image_in(name, image)
        save_caption(p, text)
        return f"Saved the caption of {p.name}."

    def bulk(self, name: str, action: str, a: str = "", b: str = "") -> str:
        """action: trigger | prefix | suffix | replace | fill."""
        folder = self.ws.dataset_path(name)
        changed = 0
        for it, _ in self.entries(name):  # excluded images too: they are still part of the dataset
            old = it.caption or ""
            if action == "trigger":  # every image, also those without a caption yet (it gets one)
                new = with_triggers(old, split_tags(a))
            elif action == "prefix":
                new = f"{a.strip()}, {old}" if old and a.strip() else old
            elif action == "suffix":
                new = f"{old}, {a.strip()}" if old and a.strip() else old
            elif action == "replace":
                new = old.replace(a, b) if a else old
            elif action == "fill":
                new = old if old else a.strip()
            else:
                return f"Unknown action {action}"
            if new != old:
                save_caption(it.path, new)
                changed += 1
        return f"Changed {changed} caption(s)."

    def report(self, name: str, resolution: int = 512, trigger: str = "") -> str:
        if not name:
            return "Pick a dataset to see its report."
        try:
            return format_report(dataset_report(self.ws.dataset_path(name), int(resolution or 512), trigger or ""), markdown=True)
        except ValueError as e:
            return str(e)

    # ------------------------------------------------------------------ layout
    def build(self):
        ws = self.ws
        with gr.Row():
            ds = gr.Dropdown(choices=ws.list_datasets(), label="Dataset", allow_custom_value=False, scale=3,
                             elem_id="ds-pick", interactive=True)
            new_name = gr.Textbox(label="New dataset name", scale=3, elem_id="ds-new-name")
            create = gr.Button("Create", scale=1, elem_id="ds-create")
        with gr.Row():
            with gr.Column(scale=2):
                upload = gr.File(label="Drop images, caption .txt files or a .zip here", file_count="multiple",
                                 file_types=IMPORT_TYPES, elem_id="ds-upload")
                with gr.Row():
                    folder = gr.Textbox(label="...or import a folder (path on this computer)", scale=4)
                    import_folder = gr.Button("Import folder", scale=1)
                status = gr.Markdown(elem_id="ds-status")
                gallery = gr.Gallery(label="Images (click one to edit its caption)", columns=6, height=360,
                                     elem_id="ds-gallery", allow_preview=False)
                current = gr.State("")
                image_info = gr.Markdown("Click an image to edit its caption.", elem_id="ds-image-info")
                with gr.Row():
                    caption = gr.Textbox(label="Caption", lines=2, scale=5, elem_id="ds-caption")
                    save = gr.Button("Save caption", scale=1, elem_id="ds-save-caption")
                with gr.Row():
                    exclude = gr.Button("Exclude from training / include again", size="sm", elem_id="ds-exclude")
                    remove = gr.Button("Remove (to the workspace trash)", size="sm", variant="stop", elem_id="ds-remove")
                    restore = gr.Button("Restore last removed", size="sm", elem_id="ds-restore")
                with gr.Accordion("Bulk caption edits", open=True):
                    with gr.Row():
                        trig = gr.Textbox(label="Trigger word(s)", placeholder="zwx, ohwx", elem_id="ds-trigger")
                        add_trig = gr.Button("Add trigger to captions", elem_id="ds-add-trigger")
                    with gr.Row():
                        affix = gr.Textbox(label="Text")
                        add_prefix = gr.Button("Add as prefix")
                        add_suffix = gr.Button("Add as suffix")
                    with gr.Row():
                        find = gr.Textbox(label="Find")
                        repl = gr.Textbox(label="Replace with")
                        do_repl = gr.Button("Replace in all captions")
                    with gr.Row():
                        template = gr.Textbox(label="Caption for images without one", placeholder="a photo of zwx")
                        fill = gr.Button("Fill missing captions")
            with gr.Column(scale=1):
                res = gr.Number(value=512, label="Check against resolution", precision=0)
                report = gr.Markdown(elem_id="ds-report")

        @friendly
        def refresh(name, resolution, trigger):
            return self.items(name), self.report(name, resolution, trigger)

        @friendly
        def on_create(name):
            made, msg = self.create(name)
            return gr.Dropdown(choices=ws.list_datasets(), value=made), msg

        @friendly
        def on_select(name, evt: gr.SelectData):
            entries = self.entries(name)
            if evt.index is None or evt.index >= len(entries):
                return "", "", self.info(name, "")
            it = entries[evt.index][0]
            return str(it.path), it.caption or "", self.info(name, str(it.path))

        view = [gallery, report]
        view_in = [ds, res, trig]
        create.click(on_create, new_name, [ds, status]).then(refresh, view_in, view)
        ds.change(refresh, view_in, view)
        res.change(refresh, view_in, view)
        gallery.select(on_select, ds, [current, caption, image_info])
        # every action answers in the status line with a plain sentence, then the gallery and report refresh
        actions = [
            (upload.upload, self.import_files, [ds, upload]),
            (import_folder.click, self.import_folder, [ds, folder]),
            (save.click, self.save_caption, [ds, current, caption]),
            (add_trig.click, lambda n, t: self.bulk(n, "trigger", t), [ds, trig]),
            (add_prefix.click, lambda n, t: self.bulk(n, "prefix", t), [ds, affix]),
            (add_suffix.click, lambda n, t: self.bulk(n, "suffix", t), [ds, affix]),
            (do_repl.click, lambda n, a, b: self.bulk(n, "replace", a, b), [ds, find, repl]),
            (fill.click, lambda n, t: self.bulk(n, "fill", t), [ds, template]),
            (exclude.click, self.toggle_exclude, [ds, current]),
            (restore.click, self.restore, [ds]),
        ]
        for event, handler, inputs in actions:
            done = event(friendly(handler), inputs, status).then(refresh, view_in, view)
            if event == upload.upload:  # each drop imports what was dropped, then the drop zone is empty again
                done.then(lambda: None, None, upload)
        exclude.click(friendly(self.info), [ds, current], image_info)
        # a removed image is no longer the one being edited
        remove.click(friendly(self.remove), [ds, current], status).then(
            lambda: ("", "", "Click an image to edit its caption."), None, [current, caption, image_info]).then(
            refresh, view_in, view)
        self.picker = ds
        return ds

    def register_load(self, ui) -> None:
        ui.load(lambda: gr.Dropdown(choices=self.ws.list_datasets()), None, self.picker)
