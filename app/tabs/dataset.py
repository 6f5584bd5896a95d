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

TAG_FIELDS = ("general_threshold", "character_threshold", "ratings", "blacklist", "keep_underscores", "max_tags")
IMPORT_TYPES = [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".txt", ".caption", ".zip"]


class DatasetTab:
    def __init__(self, studio):
        self.studio, self.ws = studio, studio.ws
        self.captions = studio.captions  # app.captioning.CaptionJobs: the captioning worker, through the Studio

    # ------------------------------------------------------------------ auto-captioning
    def start_captioning(self, name: str, model: str, mode: str, confirm: bool, trigger: str = "",
                         batch_size: int = 4, *tag_values, preview: int = 0) -> str:
        """Start the captioning worker on a dataset (or a preview of its first captions); a sentence back."""
        from trainer.engine.autocaption import MODES

        if not name:
            return "Pick a dataset first."
        if mode not in MODES:
            return f"Choose what to caption ({', '.join(MODES)})."
        if mode == "overwrite" and not confirm and not preview:
            return ("Overwrite replaces every existing caption of this dataset: tick *Yes, replace existing "
                    "captions* first (or preview them).")
        if not (model or "").strip():
            return "Give a captioning model: a hub id or the folder of a downloaded model."
        if self.captions is None:
            return "Captioning is not available in this app."
        from trainer.engine.tagger import TagOptions, TaggerError

        tags = dict(zip(TAG_FIELDS, tag_values))
        try:
            TagOptions(**{k: v for k, v in tags.items() if v is not None}).check()
        except (TaggerError, TypeError, ValueError) as e:
            return str(e)
        return self.captions.start(name, model.strip(), mode, trigger or "", int(batch_size or 4), int(preview or 0),
                                   tags=tags)

    def captioning(self) -> tuple[str, list[list[str]], dict]:
        """(progress line, [file, caption] rows of the newest job, its state) for the page's timer."""
        from app.captioning import progress_markdown

        if self.captions is None:
            return "", [], {}
        s = self.captions.state()
        return progress_markdown(s), [list(c) for c in s.get("captions", [])], s

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
        """(the dataset's name, what to say). A name that would change on the way to a folder name ('a/b', '../x',
        'my set:1*?') is refused with the name it could have, never changed without a word."""
        from trainer.fsutil import safe_name

        wanted = (name or "").strip()
        clean = safe_name(wanted, fallback="")
        if clean and clean != wanted:
            raise ValueError(f"A dataset name cannot hold / \\ : * ? \" < > | or start with a dot: '{wanted}' would "
                             f"become '{clean}'. Use that, or another name.")
        folder = self.ws.dataset_path(wanted, create=True)
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

    BULK_WORDS = {"trigger": "add trigger '{a}'", "prefix": "add prefix '{a}'", "suffix": "add suffix '{a}'",
                  "find_replace": "replace text '{a}' with '{b}'", "fill": "fill missing captions with '{a}'"}

    def bulk(self, name: str, action: str, a: str = "", b: str = "") -> str:
        """action: trigger | prefix | suffix | find_replace (text) | fill, or a tag edit (trainer/data/tags.py OPS). One bulk
        edit: the captions it replaces are kept for *Undo last bulk edit*."""
        from trainer.data import tags

        if not name:
            return "Pick a dataset first."
        if action in tags.OPS:
            try:
                tags.check(action, a or "", b or "")
            except ValueError as e:
                return str(e)
        elif action not in self.BULK_WORDS:
            return f"Unknown action {action}"
        changes = {}
        for it, _ in self.entries(name):  # excluded images too: they are still part of the dataset
            old = it.caption or ""
            if action == "trigger":  # every image, also those without a caption yet (it gets one)
                new = with_triggers(old, split_tags(a))
            elif action == "prefix":
                new = f"{a.strip()}, {old}" if old and a.strip() else old
            elif action == "suffix":
                new = f"{old}, {a.strip()}" if old and a.strip() else old
            elif action == "find_replace":
                new = old.replace(a, b) if a else old
            elif action == "fill":
                new = old if old else a.strip()
            else:
                new = tags.edit(old, action, a or "", b or "")
            if new != old:
                changes[it.path] = new
        what = (self.BULK_WORDS.get(action) or tags.OPS[action].lower() + (" '{a}'" if a else "")
                + (" -> '{b}'" if action in ("replace", "merge") else "")).format(a=(a or "").strip(), b=(b or "").strip())
        n = tags.apply_bulk(self.ws.dataset_path(name), changes, self.ws.undo_file(name), what)
        return f"Changed {n} caption(s)" + (" (*Undo last bulk edit* puts them back)." if n else ".")

    def undo_bulk(self, name: str) -> str:
        from trainer.data import tags

        if not name:
            return "Pick a dataset first."
        return tags.undo_last(self.ws.dataset_path(name), self.ws.undo_file(name))

    def tag_table(self, name: str | None) -> list[list]:
        """[tag, images] for the dataset, most frequent first."""
        from trainer.data.tags import frequency

        if not name:
            return []
        return [[t, n] for t, n in frequency(it.caption for it, _ in self.entries(name))]

    def with_tag(self, name: str, tag: str) -> list[tuple[str, str]]:
        """The gallery of the images whose caption has `tag`."""
        from trainer.data.tags import has_tag

        return [(str(it.path), it.caption or "") for it, _ in self.entries(name) if has_tag(it.caption, tag)]

    def report(self, name: str, resolution: int = 512, trigger: str = "") -> str:
        if not name:
            return "Pick a dataset to see its report."
        try:
            return format_report(dataset_report(self.ws.dataset_path(name), int(resolution or 512), trigger or ""), markdown=True)
        except ValueError as e:
            return str(e)

    # ------------------------------------------------------------------ layout
    def build(self):
        pick = self.build_picker()
        ds = pick["ds"]
        with gr.Row():
            with gr.Column(scale=2):
                ed = self.build_editor()
                cap = self.build_captioning()
            with gr.Column(scale=1):
                side = self.build_side()
        status, view_in = ed["status"], [ds, side["res"], ed["trig"]]
        view = [ed["gallery"], side["report"], side["repeats"], ed["tag_table"]]

        @friendly
        def refresh(name, resolution, trigger):
            return self.items(name), self.report(name, resolution, trigger), self.repeat_rows(name), self.tag_table(name)

        self.wire_picker(pick, status, refresh, view_in, view)
        self.wire_editor(ds, ed, refresh, view_in, view)
        side["save"].click(friendly(lambda n, rows: self.save_repeats(n, rows.values.tolist() if hasattr(rows, "values")
                                                                      else rows)), [ds, side["repeats"]], status,
                           show_progress="hidden").then(refresh, view_in, view)
        side["res"].change(refresh, view_in, view)
        self.wire_captioning(cap, ds, status, refresh, view_in, view)
        self.picker = ds
        return ds

    def build_picker(self) -> dict:
        """The dataset picker, with Create, Delete and Restore."""
        with gr.Row():
            ds = gr.Dropdown(choices=self.ws.list_datasets(), label="Dataset", allow_custom_value=False, scale=3,
                             elem_id="ds-pick", interactive=True)
            new_name = gr.Textbox(label="New dataset name", scale=3, elem_id="ds-new-name")
            create = gr.Button("Create", scale=1, elem_id="ds-create")
        with gr.Row():
            delete = gr.Button("Delete this dataset (to the workspace trash)", size="sm", variant="stop",
                               elem_id="ds-delete")
            undelete = gr.Button("Restore the last deleted dataset", size="sm", elem_id="ds-undelete")
        return {"ds": ds, "new_name": new_name, "create": create, "delete": delete, "undelete": undelete}

    def build_editor(self) -> dict:
        """Drop zone, gallery, caption editor, image actions and bulk caption edits."""
        c = {}
        c["upload"] = gr.File(label="Drop images, caption .txt files or a .zip here", file_count="multiple",
                              file_types=IMPORT_TYPES, elem_id="ds-upload")
        with gr.Row():
            c["folder"] = gr.Textbox(label="...or import a folder (path on this computer)", scale=4)
            c["import_folder"] = gr.Button("Import folder", scale=1)
        c["status"] = gr.Markdown(elem_id="ds-status")
        c["gallery"] = gr.Gallery(label="Images (click one to edit its caption)", columns=6, height=360,
                                  elem_id="ds-gallery", allow_preview=False)
        c["current"] = gr.State("")
        c["image_info"] = gr.Markdown("Click an image to edit its caption.", elem_id="ds-image-info")
        with gr.Row():
            c["caption"] = gr.Textbox(label="Caption", lines=2, scale=5, elem_id="ds-caption")
            c["save"] = gr.Button("Save caption", scale=1, elem_id="ds-save-caption")
        with gr.Row():
            c["exclude"] = gr.Button("Exclude from training / include again", size="sm", elem_id="ds-exclude")
            c["remove"] = gr.Button("Remove (to the workspace trash)", size="sm", variant="stop", elem_id="ds-remove")
            c["restore"] = gr.Button("Restore last removed", size="sm", elem_id="ds-restore")
        with gr.Accordion("Bulk caption edits", open=True):
            with gr.Row():
                c["trig"] = gr.Textbox(label="Trigger word(s)", placeholder="zwx, ohwx", elem_id="ds-trigger")
                c["add_trig"] = gr.Button("Add trigger to captions", elem_id="ds-add-trigger")
            with gr.Row():
                c["affix"] = gr.Textbox(label="Text")
                c["add_prefix"] = gr.Button("Add as prefix")
                c["add_suffix"] = gr.Button("Add as suffix")
            with gr.Row():
                c["find"] = gr.Textbox(label="Find")
                c["repl"] = gr.Textbox(label="Replace with")
                c["do_repl"] = gr.Button("Replace in all captions")
            with gr.Row():
                c["template"] = gr.Textbox(label="Caption for images without one", placeholder="a photo of zwx")
                c["fill"] = gr.Button("Fill missing captions")
        with gr.Accordion("Tags", open=False, elem_id="ds-tags-accordion"):
            gr.Markdown("Captions as comma-separated tags (what a tagger writes): how often each tag appears (click "
                        "one to see its images), and edits over every caption. Each edit is one bulk edit that "
                        "*Undo last bulk edit* reverts.")
            with gr.Row():
                c["tag_table"] = gr.Dataframe(headers=["tag", "images"], datatype=["str", "number"], value=[],
                                              interactive=False, elem_id="ds-tag-table", scale=2, max_height=320)
                c["tag_gallery"] = gr.Gallery(label="Images with the tag", columns=4, height=300, scale=3,
                                              elem_id="ds-tag-gallery")
            with gr.Row():
                from trainer.data.tags import OPS

                c["tag_op"] = gr.Dropdown([(v, k) for k, v in OPS.items()], value="replace", label="Edit",
                                          elem_id="ds-tag-op", scale=2)
                c["tag_a"] = gr.Textbox(label="Tag(s)", placeholder="long_hair", elem_id="ds-tag-a", scale=2)
                c["tag_b"] = gr.Textbox(label="New tag (replace, merge into)", placeholder="long hair",
                                        elem_id="ds-tag-b", scale=2)
            with gr.Row():
                c["tag_apply"] = gr.Button("Apply to every caption", variant="primary", elem_id="ds-tag-apply")
                c["undo"] = gr.Button("Undo last bulk edit", elem_id="ds-undo")
        return c

    def build_side(self) -> dict:
        """The dataset report against a resolution, and the repeats per folder."""
        res = gr.Number(value=512, label="Check against resolution", precision=0)
        report = gr.Markdown(elem_id="ds-report")
        repeats = gr.Dataframe(headers=["folder", "images", "repeats"], datatype=["str", "number", "number"],
                               value=[], interactive=True, elem_id="ds-repeats",
                               label="Repeats: how often each folder's images are used per epoch")
        save = gr.Button("Save repeats", size="sm", elem_id="ds-save-repeats")
        return {"res": res, "report": report, "repeats": repeats, "save": save}

    def wire_picker(self, c: dict, status, refresh, view_in, view) -> None:
        ws, ds = self.ws, c["ds"]

        @friendly
        def on_create(name):
            try:
                made, msg = self.create(name)
            except ValueError as e:  # said on the status line: no red "Error" badge over the picker
                return gr.update(), f"**Not created:** {e}", gr.update()
            return gr.Dropdown(choices=ws.list_datasets(), value=made), msg, ""

        @friendly
        def on_delete(name):
            if not name:
                return gr.update(), "Pick a dataset first."
            msg = self.delete(name)
            return gr.Dropdown(choices=ws.list_datasets(), value=None), msg

        @friendly
        def on_undelete():
            try:
                name = self.undelete()
            except ValueError as e:
                return gr.update(), str(e)
            return gr.Dropdown(choices=ws.list_datasets(), value=name), f"Dataset '{name}' is back."

        c["create"].click(on_create, c["new_name"], [ds, status, c["new_name"]], show_progress="hidden").then(
            refresh, view_in, view)
        c["delete"].click(on_delete, ds, [ds, status], show_progress="hidden").then(refresh, view_in, view)
        c["undelete"].click(on_undelete, None, [ds, status], show_progress="hidden").then(refresh, view_in, view)
        ds.change(refresh, view_in, view)
        ds.change(self.remember, ds, None)  # a reload shows the dataset the person had picked

    def wire_editor(self, ds, c: dict, refresh, view_in, view) -> None:
        status = c["status"]

        @friendly
        def on_select(name, evt: gr.SelectData):
            entries = self.entries(name)
            if evt.index is None or evt.index >= len(entries):
                return "", "", self.info(name, "")
            it = entries[evt.index][0]
            return str(it.path), it.caption or "", self.info(name, str(it.path))

        c["gallery"].select(on_select, ds, [c["current"], c["caption"], c["image_info"]])
        # every action answers in the status line with a plain sentence, then the gallery and report refresh
        actions = [
            (c["upload"].upload, self.import_files, [ds, c["upload"]]),
            (c["import_folder"].click, self.import_folder, [ds, c["folder"]]),
            (c["save"].click, self.save_caption, [ds, c["current"], c["caption"]]),
            (c["add_trig"].click, lambda n, t: self.bulk(n, "trigger", t), [ds, c["trig"]]),
            (c["add_prefix"].click, lambda n, t: self.bulk(n, "prefix", t), [ds, c["affix"]]),
            (c["add_suffix"].click, lambda n, t: self.bulk(n, "suffix", t), [ds, c["affix"]]),
            (c["do_repl"].click, lambda n, a, b: self.bulk(n, "find_replace", a, b), [ds, c["find"], c["repl"]]),
            (c["fill"].click, lambda n, t: self.bulk(n, "fill", t), [ds, c["template"]]),
            (c["tag_apply"].click, self.bulk, [ds, c["tag_op"], c["tag_a"], c["tag_b"]]),
            (c["undo"].click, self.undo_bulk, [ds]),
            (c["exclude"].click, self.toggle_exclude, [ds, c["current"]]),
            (c["restore"].click, self.restore, [ds]),
        ]
        for event, handler, inputs in actions:  # no Gradio timer ("0.1s") inside the status sentence
            done = event(friendly(handler), inputs, status, show_progress="hidden").then(refresh, view_in, view)
            if event == c["upload"].upload:  # each drop imports what was dropped, then the drop zone is empty again
                done.then(lambda: None, None, c["upload"])
        c["exclude"].click(friendly(self.info), [ds, c["current"]], c["image_info"])

        @friendly
        def on_tag(name, evt: gr.SelectData):  # a click on a tag (or its count) shows its images
            row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
            rows = self.tag_table(name)
            if row is None or row >= len(rows):
                return [], gr.update()
            return self.with_tag(name, rows[row][0]), rows[row][0]

        c["tag_table"].select(on_tag, ds, [c["tag_gallery"], c["tag_a"]])
        # a removed image is no longer the one being edited
        c["remove"].click(friendly(self.remove), [ds, c["current"]], status).then(
            lambda: ("", "", "Click an image to edit its caption."), None,
            [c["current"], c["caption"], c["image_info"]]).then(refresh, view_in, view)

    def build_captioning(self) -> dict:
        from trainer.engine.autocaption import KNOWN_MODELS, MODE_LABELS
        from trainer.engine.tagger import looks_like_tagger

        with gr.Accordion("Auto-caption with a local model", open=False, elem_id="cap-accordion"):
            gr.Markdown("A vision-language model (BLIP, Florence-2) writes a caption for each image, or a WD tagger "
                        "(SmilingWolf's, through onnxruntime) writes booru tags, on the GPU when there is one. "
                        "Originals are never changed; each caption file is written as soon as it is ready, and the "
                        "captions stay editable above.")
            with gr.Row():
                model = gr.Dropdown(choices=KNOWN_MODELS, value=self.ws.caption_model(), allow_custom_value=True,
                                    label="Captioning model (hub id, or the folder of a downloaded model)",
                                    elem_id="cap-model", scale=3)
                batch = gr.Number(value=4, precision=0, minimum=1, maximum=64, label="Batch size", scale=1,
                                  elem_id="cap-batch")
            with gr.Row(visible=looks_like_tagger(self.ws.caption_model()), elem_id="cap-tagger") as tagger_row:
                tag = {"general_threshold": gr.Slider(0.05, 0.95, value=0.35, step=0.01, label="General tags: threshold",
                                                      elem_id="cap-general"),
                       "character_threshold": gr.Slider(0.05, 0.99, value=0.85, step=0.01,
                                                        label="Character tags: threshold", elem_id="cap-character"),
                       "ratings": gr.Checkbox(label="Add the rating tag", value=False, elem_id="cap-ratings"),
                       "blacklist": gr.Textbox(label="Never write these tags", placeholder="simple background, "
                                               "white background", elem_id="cap-blacklist"),
                       "keep_underscores": gr.Checkbox(label="Keep underscores (long_hair)", value=False,
                                                       elem_id="cap-underscores"),
                       "max_tags": gr.Number(value=0, precision=0, minimum=0, label="At most N tags (0 = all)",
                                             elem_id="cap-max-tags")}
            mode = gr.Radio([(v, k) for k, v in MODE_LABELS.items()], value="missing", label="Caption which images",
                            elem_id="cap-mode")
            with gr.Row():
                trigger = gr.Textbox(label="Trigger word(s) put first (optional)", placeholder="zwx",
                                     elem_id="cap-trigger", scale=3)
                confirm = gr.Checkbox(label="Yes, replace existing captions (Overwrite)", value=False,
                                      elem_id="cap-confirm", scale=2)
            with gr.Row():
                preview = gr.Button("Preview the first 4", elem_id="cap-preview")
                start = gr.Button("Caption the dataset", variant="primary", elem_id="cap-start")
                cancel = gr.Button("Cancel", variant="stop", elem_id="cap-cancel")
            progress = gr.Markdown(elem_id="cap-progress")
            table = gr.Dataframe(headers=["image", "caption"], value=[], interactive=False, wrap=True,
                                 column_widths=["25%", "75%"],  # the caption gets the room, and wraps
                                 elem_id="cap-table", label="Captions of the last run (edit them in the editor above)")
        # a tagger's own options appear when a tagger is chosen
        model.change(lambda m: gr.update(visible=looks_like_tagger(m or "")), model, tagger_row, show_progress="hidden")
        return {"model": model, "batch": batch, "mode": mode, "trigger": trigger, "confirm": confirm,
                "preview": preview, "start": start, "cancel": cancel, "progress": progress, "table": table,
                **{f"tag-{k}": v for k, v in tag.items()}}

    def wire_captioning(self, c: dict, ds, status, refresh, view_in, view) -> None:
        timer = gr.Timer(1.0, active=False)
        seen = gr.State("")  # the finished job the gallery was last refreshed for
        inputs = [ds, c["model"], c["mode"], c["confirm"], c["trigger"], c["batch"], *(c[f"tag-{k}"] for k in TAG_FIELDS)]

        def on_tick(last):
            md, rows, s = self.captioning()
            job = s.get("job", "")
            done = s.get("finished", True)
            fresh = done and job and job != last and not s.get("preview")
            return md, rows, gr.Timer(active=not done), job if done else last, fresh

        refresh_now = gr.State(False)
        for button, n in ((c["preview"], 4), (c["start"], 0)):
            button.click(friendly(lambda *a, n=n: self.start_captioning(*a, preview=n)), inputs, c["progress"]).then(
                lambda: gr.Timer(active=True), None, timer)
        c["cancel"].click(friendly(lambda: self.captions.cancel() if self.captions else ""), None, c["progress"])
        timer.tick(friendly(on_tick), seen, [c["progress"], c["table"], timer, seen, refresh_now],
                   show_progress="hidden").then(
            lambda fresh, *a: refresh(*a) if fresh else (gr.skip(), gr.skip()), [refresh_now, *view_in], view)
        self._cap_timer, self._cap_model = timer, c["model"]

    # ------------------------------------------------------------------ repeats
    ROOT_LABEL = "(the dataset's own images)"

    def repeat_rows(self, name: str | None) -> list[list]:
        """[folder, images, repeats] per folder with images (kohya's '<repeats>_' prefixes, or what was set here)."""
        from trainer.data.scan import scan_dataset

        if not name:
            return []
        res = scan_dataset(self.ws.dataset_path(name))
        root = res.root.name
        return [[self.ROOT_LABEL if sub == root else sub, s["img_count"], s["n_repeats"]] for sub, s in res.subsets.items()]

    def save_repeats(self, name: str, rows: list[list]) -> str:
        from trainer.data.scan import ROOT_KEY, scan_dataset, set_repeats

        if not name:
            return "Pick a dataset first."
        folder = self.ws.dataset_path(name)
        for label_, _, n in rows:
            try:
                n = float(n)
            except (TypeError, ValueError):
                raise ValueError(f"Repeats of '{label_}' must be a number (got {n!r}).") from None
            set_repeats(folder, ROOT_KEY if label_ == self.ROOT_LABEL else str(label_), int(n) if n.is_integer() else n)
        per_epoch = sum(it.repeats for it in scan_dataset(folder).items)
        return f"Repeats saved: {per_epoch} image(s) per epoch; the Train tab's step count follows."

    def remember(self, name: str | None) -> None:
        self.ws.save_ui_state("dataset", {"dataset": name or ""})

    def picked(self) -> str | None:
        """The dataset the person had picked, if it is still there."""
        name = self.ws.ui_state("dataset").get("dataset")
        return name if name in self.ws.list_datasets() else None

    def delete(self, name: str) -> str:
        from trainer.data import manage

        manage.remove_dataset(self.ws.dataset_path(name), self.ws.trash_dir)
        return f"Deleted dataset '{name}': it is in the workspace trash; *Restore the last deleted dataset* brings it back."

    def undelete(self) -> str:
        from trainer.data import manage

        return manage.restore_last_dataset(self.ws.datasets_dir, self.ws.trash_dir)

    def register_load(self, ui) -> None:
        ui.load(lambda: gr.Dropdown(choices=self.ws.list_datasets(), value=self.picked()), None, self.picker)
        # a reload finds a captioning job still running and follows it; the model is the remembered one
        ui.load(lambda: (gr.Timer(active=bool(self.captions and self.captions.running())), self.ws.caption_model()),
                None, [self._cap_timer, self._cap_model])
