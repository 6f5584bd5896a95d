"""Auto-captioning: natural-language captions from a vision-language model that transformers loads
(BLIP, Florence-2, GIT, ...: anything `AutoModelForImageTextToText` knows), or booru tags from a WD tagger through
onnxruntime (trainer/engine/tagger.py), written beside the images. One run for both kinds of model.

Originals are never touched; each caption file is written atomically the moment its batch is done, and a
record of what the captioner wrote (`.captioner.json` in the dataset) lets the report tell captioner captions
from hand-written ones: a caption the person edited afterwards counts as theirs.

`python -m trainer caption DATASET ...` runs this; the app runs the same command as a worker process.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainer.data.captions import join_tags, split_tags, with_triggers
from trainer.engine.tagger import WD_TAGGERS, TagOptions, TaggerError, looks_like_tagger
from trainer.data.provenance import RECORD_FILE, record, rel_path
from trainer.events import EventLog
from trainer.runfiles import RunFiles
from trainer.fsutil import atomic_write_text

MODES = ("missing", "append", "overwrite")
MODE_LABELS = {"missing": "Only images without a caption (or with the trigger words alone)",
               "append": "Append to existing captions",
               "overwrite": "Overwrite existing captions"}
# Known to load with transformers 5 (no remote code): BLIP and the transformers-native Florence-2 conversions.
KNOWN_MODELS = ["Salesforce/blip-image-captioning-large", "Salesforce/blip-image-captioning-base",
                "florence-community/Florence-2-base", "florence-community/Florence-2-large", *WD_TAGGERS]
DEFAULT_MODEL = KNOWN_MODELS[0]
FLORENCE_TASK = "<DETAILED_CAPTION>"


class CaptionError(Exception):
    """Something the person can fix (model not found, offline, bad folder): one plain sentence."""


@dataclass
class CaptionOptions:
    model: str = DEFAULT_MODEL
    mode: str = "missing"
    trigger: str = ""  # comma-separated; put first in every caption written
    batch_size: int = 4
    max_new_tokens: int = 60
    device: str = "auto"
    tags: TagOptions = field(default_factory=TagOptions)  # a WD tagger's thresholds, blacklist, ...

    def check(self) -> None:
        try:
            self.tags.check()
        except TaggerError as e:
            raise CaptionError(str(e)) from None
        if self.mode not in MODES:
            raise CaptionError(f"Unknown mode '{self.mode}': use one of {', '.join(MODES)}.")
        if not (1 <= int(self.batch_size) <= 64):
            raise CaptionError(f"Batch size {self.batch_size} is out of range: use 1 to 64.")
        if not (self.model or "").strip():
            raise CaptionError("Give a captioning model: a hub id such as "
                               f"'{DEFAULT_MODEL}' or the path of a downloaded model folder.")


# ---------------------------------------------------------------------------------------------- what to caption
def entries(folder: Path, unreadable: list[str] | None = None) -> list:
    """Every image of the dataset (excluded ones too: they are still part of it), in file order. Image files that
    do not read are added to `unreadable` as 'name: why'."""
    from trainer.data.images import is_image_name
    from trainer.data.scan import scan_dataset

    res = scan_dataset(folder)
    if unreadable is not None:
        unreadable += [f"{s.path.name}: {s.reason}" for s in res.skipped if is_image_name(s.path.name)]
    return sorted(res.items + res.excluded, key=lambda it: str(it.path))


def targets(items: list, mode: str, triggers: list[str] = ()) -> list:
    """The images a mode writes to: without a caption (missing), or all of them (append, overwrite). A caption that
    holds only trigger words (after *Add trigger to captions*) is no description: missing mode captions it."""
    return [it for it in items if mode != "missing" or not described(it.caption, triggers)]


def described(caption: str | None, triggers: list[str]) -> bool:
    """Whether a caption says more than the trigger words."""
    trig = {t.lower() for t in triggers}
    return any(tag.lower() not in trig for tag in split_tags(caption or ""))


def excluded_paths(folder: Path) -> set:
    from trainer.data.scan import scan_dataset

    return {it.path for it in scan_dataset(folder).excluded}


def compose(old: str | None, new: str, mode: str, triggers: list[str], tags: bool = False) -> str:
    """The caption to write: the captioner's text (after the old one when appending; a tagger's tags that the old
    caption already has are not added twice), trigger words first."""
    new = " ".join(new.split()).strip(" ,")
    if tags and mode == "append" and new:
        have = {t.lower() for t in split_tags(old or "")}
        new = join_tags([t for t in split_tags(new) if t.lower() not in have])
    text = f"{old.strip()}, {new}" if mode == "append" and (old or "").strip() and new else (new or (old or ""))
    return with_triggers(text, triggers) if triggers else text


# ---------------------------------------------------------------------------------------------- the model
def model_label(model: str) -> str:
    """A hub id as it is; a local folder by its name only (no path of this computer goes into a file)."""
    return Path(model).name if Path(model).expanduser().is_dir() else model


def resolve_model(model: str, emit=lambda e: None) -> str:
    """A local model folder, or a hub id that is cached or can be downloaded (the first use says so)."""
    from trainer.models.hub import how_to_get, is_hub_id, offline

    model = (model or "").strip()
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise CaptionError(f"The folder {p.name} holds neither a captioning model (config.json) nor a WD tagger "
                               "(model.onnx and selected_tags.csv): give the folder of a downloaded model (what "
                               "`hf download <id>` fetches), not a parent folder.")
        return str(p)
    if not is_hub_id(model):
        raise CaptionError(f"'{model}' is neither a model folder on this computer nor a hub id like '{DEFAULT_MODEL}'.")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "config.json"), str):
        return model
    if offline():
        raise CaptionError(f"The captioning model '{model}' is not downloaded and this computer is offline. "
                           f"{how_to_get(model)} Or put the model folder anywhere and give its path.")
    emit({"type": "status", "message": f"First use of '{model}': downloading it to the Hugging Face cache "
                                       "(~/.cache/huggingface), once."})
    return model


class Captioner:
    """One loaded vision-language model and its processor; `caption(images)` gives one text per image."""

    def __init__(self, model: str, device: str = "auto"):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        dev = "cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
        dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if dev == "cuda" else torch.float32
        try:
            self.processor = AutoProcessor.from_pretrained(model)
            self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype).to(dev).eval()
        except (OSError, ValueError, KeyError) as e:
            from trainer.models.hub import how_to_get, is_hub_id

            hint = how_to_get(model) if is_hub_id(model) and not Path(model).exists() else ""
            raise CaptionError(f"Could not load the captioning model '{model}': {str(e).splitlines()[0]} {hint}".strip())
        self.device, self.dtype = dev, dtype
        self.florence = self.model.config.model_type == "florence2"

    def caption(self, images: list, max_new_tokens: int = 60) -> list[str]:
        import torch

        kw = {"text": [FLORENCE_TASK] * len(images)} if self.florence else {}
        inputs = self.processor(images=images, return_tensors="pt", **kw).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
        if self.model.config.is_encoder_decoder is False and "input_ids" in inputs:  # decoder-only: drop the prompt
            out = out[:, inputs["input_ids"].shape[1]:]
        return [" ".join(t.split()) for t in self.processor.batch_decode(out, skip_special_tokens=True)]


def load(opts: CaptionOptions, emit=lambda e: None):
    """The model of a run: a WD tagger (onnxruntime) or a vision-language model (transformers); both answer
    `caption(images, max_new_tokens)` and have a `device`."""
    from trainer.engine.tagger import Tagger, tagger_folder

    if looks_like_tagger(opts.model):
        try:
            folder = tagger_folder(opts.model.strip(), emit)
            emit({"type": "status", "message": f"Loading the tagger {model_label(opts.model)}..."})
            return Tagger(folder, opts.device, opts.tags)
        except TaggerError as e:
            raise CaptionError(str(e)) from None
    model = resolve_model(opts.model, emit)
    emit({"type": "status", "message": f"Loading {model_label(opts.model)}..."})
    return Captioner(model, opts.device)


# ---------------------------------------------------------------------------------------------- a whole run
def caption_dataset(folder: str | Path, opts: CaptionOptions, emit=print, should_stop=lambda: False,
                    preview: int = 0) -> dict:
    """Caption the dataset's target images in batches; `preview` > 0 captions only that many and writes
    nothing. Emits status / progress / caption / done events (dicts). Returns the done event."""
    from trainer.data.importer import save_caption

    opts.check()
    folder = Path(folder)
    if not folder.is_dir():
        raise CaptionError(f"Dataset folder not found: {folder}")
    skipped: list[str] = []  # 'name: why' of each image that does not read: the run goes on without it
    todo = targets(entries(folder, skipped), opts.mode, split_tags(opts.trigger))
    if preview:
        todo = todo[:preview]
    if not todo:
        unread = f" Unreadable, left as they are: {unreadable_list(skipped)}." if skipped else ""
        done = {"type": "done", "written": 0, "total": 0, "preview": bool(preview), "skipped": skipped,
                "message": ("Nothing to caption: every image has a caption already (choose Append or Overwrite to "
                            "change them)." if opts.mode == "missing" else "The dataset has no readable images.")
                + unread}
        emit(done)
        return done
    cap = load(opts, emit)
    tagger = not isinstance(cap, Captioner)
    triggers, label = split_tags(opts.trigger), model_label(opts.model)
    rec, written, t0 = record(folder), 0, time.perf_counter()
    left_out, excluded_written = excluded_paths(folder), 0
    emit({"type": "progress", "done": 0, "total": len(todo), "images_per_s": None, "eta_s": None, "device": cap.device})
    for start in range(0, len(todo), opts.batch_size):
        if should_stop():
            break
        batch, images = read_batch(todo[start:start + opts.batch_size], skipped)
        texts = cap.caption(images, opts.max_new_tokens) if images else []
        for it, text in zip(batch, texts):
            final = compose(it.caption, text, opts.mode, triggers, tags=tagger)
            wrote = bool(text) and not preview
            if wrote:
                save_caption(it.path, final)
                rec[rel_path(folder, it.path)] = {"model": label, "text": " ".join(final.split()),
                                              **({"appended": True} if opts.mode == "append"
                                                 and described(it.caption, triggers) else {})}
                written += 1
                excluded_written += it.path in left_out
            emit({"type": "caption", "file": rel_path(folder, it.path), "caption": final if text else "",
                  "written": wrote})
        if written and not preview:
            atomic_write_text(folder / RECORD_FILE, json.dumps(rec, indent=1))
        n = min(start + opts.batch_size, len(todo))
        rate = n / max(time.perf_counter() - t0, 1e-9)
        emit({"type": "progress", "done": n, "total": len(todo), "images_per_s": round(rate, 3),
              "eta_s": round((len(todo) - n) / rate, 1), "device": cap.device})
    stopped = should_stop()
    done = {"type": "done", "written": written, "total": len(todo), "preview": bool(preview), "stopped": stopped,
            "skipped": skipped, "message": done_message(written if not preview else len(todo), label, preview,
                                                        excluded_written, stopped, skipped)}
    emit(done)
    return done


def read_batch(items: list, skipped: list[str]) -> tuple[list, list]:
    """(the items whose image reads, their images): an unreadable image is added to `skipped` with why, and the
    run goes on without it."""
    from trainer.data.images import ImageProblem, load_rgb

    batch, images = [], []
    for it in items:
        try:
            images.append(load_rgb(it.path))
            batch.append(it)
        except ImageProblem as e:
            skipped.append(f"{it.path.name}: {e}")
    return batch, images


def done_message(n: int, label: str, preview: int, excluded: int, stopped: bool, skipped: list) -> str:
    return (f"{'Previewed' if preview else 'Wrote'} {n} caption(s) with {label}"
            + (f" ({excluded} of them for excluded images)" if excluded else "")
            + (" (cancelled; the captions written so far are kept)" if stopped else "")
            + (f"; skipped {len(skipped)} unreadable image(s), left as they are: {unreadable_list(skipped)}"
               if skipped else "")
            + ".")


def unreadable_list(skipped: list[str]) -> str:
    """The first three unreadable images ('name: why'), and how many more."""
    return "; ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")


# ---------------------------------------------------------------------------------------------- command line
def add_command(sub) -> None:
    c = sub.add_parser("caption", help="caption a dataset's images with a local vision-language model")
    c.add_argument("dataset", help="dataset folder")
    c.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or local model folder (default {DEFAULT_MODEL})")
    c.add_argument("--mode", choices=MODES, default="missing",
                   help="missing: only images without a caption; append; overwrite (replaces existing captions)")
    c.add_argument("--trigger", default="", help="trigger word(s), comma-separated, put first in every caption")
    c.add_argument("--batch-size", type=int, default=4)
    c.add_argument("--max-new-tokens", type=int, default=60)
    c.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    c.add_argument("--preview", type=int, default=0, metavar="N", help="caption the first N and write nothing")
    t = c.add_argument_group("WD taggers (a folder with model.onnx and selected_tags.csv, or a SmilingWolf/wd-* id)")
    t.add_argument("--general-threshold", type=float, default=TagOptions.general_threshold)
    t.add_argument("--character-threshold", type=float, default=TagOptions.character_threshold)
    t.add_argument("--ratings", action="store_true", help="add the most likely rating tag")
    t.add_argument("--blacklist", default="", help="comma-separated tags never written")
    t.add_argument("--keep-underscores", action="store_true", help="write long_hair, not long hair")
    t.add_argument("--max-tags", type=int, default=0, help="at most this many tags per image (0 = no cap)")
    c.add_argument("--job", help="a job folder (the app's): events go to its events.jsonl, and a stop request "
                                 "there (trainer/events.py) stops the job after the current batch")
    c.set_defaults(fn=cmd_caption)


def cmd_caption(args) -> int:
    tags = TagOptions(args.general_threshold, args.character_threshold, args.ratings, args.blacklist,
                      args.keep_underscores, args.max_tags)
    opts = CaptionOptions(model=args.model, mode=args.mode, trigger=args.trigger, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens, device=args.device, tags=tags)
    log = EventLog(args.job) if args.job else None

    def emit(e: dict) -> None:
        if log:
            log.emit(**e)
        if e["type"] == "caption":
            print(f"{e['file']}: {e['caption']}")
        elif e["type"] in ("status", "done", "error"):
            print(e["message"])
        elif e["type"] == "progress" and e["images_per_s"]:
            print(f"{e['done']}/{e['total']} images, {e['images_per_s']:.2f} images/s, ETA {e['eta_s']:.0f} s")

    stop = RunFiles(args.job).request("stop") if args.job else None
    try:
        caption_dataset(args.dataset, opts, emit, lambda: bool(stop and stop.exists()), preview=args.preview)
        return 0
    except CaptionError as e:
        emit({"type": "error", "message": str(e)})
        return 2
    except Exception as e:  # the app shows this sentence, the worker log keeps the traceback
        import traceback

        traceback.print_exc()
        emit({"type": "error", "message": f"Captioning failed: {type(e).__name__}: {e}"})
        return 1
