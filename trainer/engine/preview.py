"""Preview: one cached pipeline, LoRAs loaded by name with diffusers' own mechanism, strengths as a runtime
knob (`set_adapters`), single images, base-vs-LoRA, strength grids and checkpoint grids.

What Preview shows is what a web UI shows: the exported kohya files go through `load_lora_weights`.
A `serve()` loop runs this in a worker process (JSON lines on stdin/stdout), so the UI process never
touches the GPU and the pipeline stays loaded between generations.
"""
from __future__ import annotations

import itertools

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from trainer.models import families
from trainer.models.load import text_encoder_names
from trainer.engine import samplers


class PreviewError(ValueError):
    """A preview problem in plain words."""


class PreviewCancelled(Exception):
    """The person pressed Cancel (or closed the tab): the generation stops at the next denoising step."""


CANCEL_FILE = ".cancel"  # in the worker's output folder: present = stop the generation under way


@dataclass
class LoraSpec:
    path: str
    strength: float = 1.0
    enabled: bool = True
    name: str = ""
    blocks: tuple = (1.0, 1.0, 1.0)  # IN / MID / OUT multipliers of the UNet part (A1111's LoRA Block Weight)

    def weights(self, text_encoders: list[str]):
        """What diffusers' set_adapters takes for this LoRA: one strength, or per-block UNet strengths (the
        pipeline's `text_encoders` at the LoRA's strength)."""
        s = self.strength if self.enabled else 0.0
        if tuple(float(b) for b in self.blocks) == (1.0, 1.0, 1.0):
            return s
        i, m, o = (float(b) * s for b in self.blocks)
        return {"unet": {"down": i, "mid": m, "up": o}, **{t: s for t in text_encoders}}

    @property
    def display(self) -> str:
        return self.name or Path(self.path).stem


@dataclass
class GenParams:
    prompt: str = ""
    negative: str = ""
    seed: int = 0
    steps: int = samplers.DEFAULTS["steps"]
    cfg: float = samplers.DEFAULTS["cfg"]
    width: int = samplers.DEFAULTS["width"]
    height: int = samplers.DEFAULTS["height"]
    sampler: str = samplers.DEFAULTS["sampler"]
    batch: int = samplers.DEFAULTS["batch"]
    loras: list = field(default_factory=list)  # list[LoraSpec]


def make_scheduler(name: str, config):
    try:
        return samplers.make_scheduler(name, config)
    except ValueError as e:
        raise PreviewError(str(e)) from None


def lora_family(path: str | Path) -> str | None:
    """The base family group a kohya LoRA file is for (trainer/loras/format.py decides), None when nothing tells."""
    from trainer.loras.format import LoraFileError, family_of, header_shapes

    try:
        shapes, md = header_shapes(path)
    except LoraFileError as e:
        raise PreviewError(str(e)) from None
    if not any(k.startswith("lora_") for k in shapes):
        raise PreviewError(f"{Path(path).name} has no kohya LoRA keys (lora_unet_..., lora_te_...). Is it a LoRA?")
    return family_of(shapes, md)


def a1111_parameters(p: GenParams, model_name: str, seed: int, loras: list[LoraSpec]) -> str:
    tags = "".join(f" <lora:{lo.display}:{lo.strength:g}>" for lo in loras if lo.enabled and lo.strength != 0)
    return (f"{p.prompt}{tags}\nNegative prompt: {p.negative}\nSteps: {p.steps}, Sampler: {p.sampler}, "
            f"CFG scale: {p.cfg:g}, Seed: {seed}, Size: {p.width}x{p.height}, Model: {model_name}")


def save_png(img: Image.Image, path: Path, parameters: str) -> Path:
    info = PngInfo()
    info.add_text("parameters", parameters)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp, pnginfo=info)
    tmp.replace(path)
    return path


def label_font(cell_width: int):
    """A real (FreeType) font sized to the cells: PIL's old bitmap default all but drops spaces
    ('checkpointsatstrength 1')."""
    from PIL import ImageFont

    size = max(12, min(28, cell_width // 20))
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType
        return ImageFont.load_default()


def grid(images: list[Image.Image], labels: list[str], cols: int, title: str = "") -> Image.Image:
    """Images in a labelled grid (label under each image), labels and title in words."""
    w, h = images[0].size
    font = label_font(w)
    pad = int(font.getbbox("Ag")[3]) + 8
    rows = (len(images) + cols - 1) // cols
    top = pad if title else 0
    out = Image.new("RGB", (cols * w, top + rows * (h + pad)), "white")
    d = ImageDraw.Draw(out)
    if title:
        d.text((4, 3), title, fill="black", font=font)
    for i, (im, lab) in enumerate(zip(images, labels)):
        x, y = (i % cols) * w, top + (i // cols) * (h + pad)
        out.paste(im, (x, y))
        d.text((x + 4, y + h + 3), lab, fill="black", font=font)
    return out


class PreviewEngine:
    def __init__(self, device: str = "auto", dtype: torch.dtype | None = None):
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.dtype = dtype or (torch.float16 if self.device == "cuda" else torch.float32)
        self.pipe = None
        self.base = None
        self.family = None
        self.loaded: dict[str, str] = {}  # adapter name -> file path

    # ------------------------------------------------------------ model and LoRAs
    def set_base(self, base_model: str, model_config: str | None = None) -> None:
        if self.base == base_model and self.pipe is not None:
            return
        from trainer.models.load import load_model

        self.unload()  # free the old model before loading the new one
        self.use_model(load_model(base_model, "auto", model_config, dtype=self.dtype), base_model)

    def use_model(self, m, name: str) -> None:
        """Generate with a loaded model (trainer.models.load.LoadedModel) known as `name`."""
        pipe = m.pipeline()
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self.pipe, self.base, self.family = pipe, name, families.group(m.family)

    def unload(self) -> None:
        self.pipe, self.base, self.family, self.loaded = None, None, None, {}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def adapter_name(self, path: str) -> str:
        for name, p in self.loaded.items():
            if p == path:
                return name
        return f"lora{len(self.loaded)}_{abs(hash(path)) % 10**6}"

    def ensure_lora(self, path: str) -> str:
        """Load a LoRA file once; later calls only look it up."""
        path = str(Path(path).resolve())
        for name, p in self.loaded.items():
            if p == path:
                return name
        if not Path(path).is_file():
            raise PreviewError(f"LoRA file not found: {path}")
        fam = lora_family(path)
        if fam and fam != self.family:
            want, have = families.group_name(fam), families.group_name(self.family)
            raise PreviewError(
                f"{Path(path).name} is a LoRA for {want}, but the base model is {have}. "
                f"Pick a {want} base model, or a LoRA trained for {have}."
            )
        name = self.adapter_name(path)
        try:
            self.pipe.load_lora_weights(self.lora_source(path), adapter_name=name)
        except Exception as e:
            try:
                self.pipe.delete_adapters([name])
            except Exception:
                pass
            raise PreviewError(
                f"{Path(path).name} does not fit this base model ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__}). "
                "It was probably trained for another model family or is damaged."
            ) from None
        self.attach_dora(path, name)
        self.loaded[name] = path
        return name

    def parts(self) -> list[tuple[str, torch.nn.Module]]:
        """(part name, module tree) of the pipeline's UNet and text encoders, in the file's part names."""
        spec = families.family(self.family)
        return [("unet", self.pipe.unet)] + [(part, getattr(self.pipe, attr)) for part, attr in
                                            zip(spec.te_parts, text_encoder_names(spec))]

    def lora_source(self, path: str):
        """What diffusers' load_lora_weights gets: the file itself, or for a LoHa / LoKr file (which diffusers does
        not read) the same updates as LoRA factors (trainer/loras/format.py: lyco_as_lora)."""
        from trainer.loras import format as fmt

        shapes, _ = fmt.header_shapes(path)
        if not any(k.endswith(tuple(fmt.LYCO_SUFFIXES)) for k in shapes):
            return path
        lf = fmt.read(path)
        layout = fmt.layout_of(self.pipe.unet.config)
        weights = {}
        for part, model in self.parts():
            for m, mod in model.named_modules():
                if isinstance(getattr(mod, "weight", None), torch.Tensor):
                    weights[fmt.module_name(part, m, self.family, layout)] = tuple(mod.weight.shape)
        missing = [n for n in lf.modules if n not in weights]
        if missing:
            raise PreviewError(f"{Path(path).name} does not fit this base model (no module {missing[0]}). It was "
                               "probably trained for another model family.")
        return fmt.pack(fmt.lyco_as_lora(lf.modules, weights), torch.float32)

    def attach_dora(self, path: str, adapter: str) -> int:
        """diffusers drops `dora_scale` when it loads a kohya file; give those modules their magnitudes back, so
        Preview shows a DoRA LoRA as ComfyUI and A1111 apply it (strength blends W + s * (W' - W))."""
        from safetensors import safe_open

        from trainer.loras.format import layout_of, module_name
        from trainer.models.lora import use_column_dora

        with safe_open(path, framework="pt") as f:
            scales = {k[: -len(".dora_scale")]: f.get_tensor(k) for k in f.keys() if k.endswith(".dora_scale")}
        if not scales:
            return 0
        layout = layout_of(self.pipe.unet.config)
        n = 0
        for part, model in self.parts():
            names = {m: module_name(part, m, self.family, layout) for m, _ in model.named_modules()}
            found = {m: scales[k] for m, k in names.items() if k in scales}
            n += use_column_dora(model, adapter, magnitudes=found) if found else 0
        return n

    def apply(self, loras: list[LoraSpec]) -> None:
        """Set the strength of every LoRA (0 for those not listed or disabled): no reload, no rebuild."""
        wanted = {}
        for lo in loras:
            name = self.ensure_lora(lo.path)
            wanted[name] = lo.weights(text_encoder_names(families.family(self.family)))
        if not self.loaded:
            return
        names = list(self.loaded)
        self.pipe.set_adapters(names, [wanted.get(n, 0.0) for n in names])

    # ------------------------------------------------------------ generation
    # progress of a request: every denoising step of every image it makes, and the way to stop it
    on_step = None  # callable(done, total), or None
    cancel_file: Path | None = None
    _done, _total = 0, 0

    def begin(self, images: int, steps: int) -> None:
        """A request that makes `images` images of `steps` steps each starts: count its steps from zero."""
        self._done, self._total = 0, max(1, int(images) * int(steps))

    _images_per_step = 1  # a batch of cells counts each of its images' steps

    def _step(self, pipe, i, t, kwargs):
        self._done += self._images_per_step
        if self.on_step:
            self.on_step(self._done, self._total)
        if self.cancel_file is not None and self.cancel_file.exists():
            raise PreviewCancelled()
        return kwargs

    def _gen(self, p: GenParams, seed: int) -> Image.Image:
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        self.pipe.scheduler = make_scheduler(p.sampler, self.pipe.scheduler.config)
        with torch.no_grad():
            return self.pipe(p.prompt, negative_prompt=p.negative or None, num_inference_steps=int(p.steps),
                             guidance_scale=float(p.cfg), width=int(p.width), height=int(p.height), generator=g,
                             callback_on_step_end=self._step).images[0]

    def _gen_cells(self, p: GenParams, seed: int, adapters: list[str]) -> list[Image.Image]:
        """Images of one prompt and seed, each through its own LoRA adapter, in one batch: peft's LoRA layers take
        the adapter of each sample (`adapter_names`), passed to every layer by a forward pre-hook while the batch
        runs. Each image has its own generator at `seed`, so it is the image one generation of that adapter
        alone makes (up to the order of the batch's sums)."""
        from peft.tuners.lora import LoraLayer

        n = len(adapters)

        def pass_names(_module, args, kwargs):
            return args, {**kwargs, "adapter_names": adapters * (args[0].shape[0] // n)}  # guidance: [uncond, cond]

        layers = [m for _, part in self.parts() for m in part.modules() if isinstance(m, LoraLayer)]
        hooks = [m.register_forward_pre_hook(pass_names, with_kwargs=True) for m in layers]
        self.pipe.scheduler = make_scheduler(p.sampler, self.pipe.scheduler.config)
        self._images_per_step = n
        try:
            with torch.no_grad():
                return self.pipe([p.prompt] * n, negative_prompt=[p.negative] * n if p.negative else None,
                                 num_inference_steps=int(p.steps), guidance_scale=float(p.cfg), width=int(p.width),
                                 height=int(p.height), callback_on_step_end=self._step,
                                 generator=[torch.Generator(device="cpu").manual_seed(int(seed)) for _ in range(n)]).images
        finally:
            self._images_per_step = 1
            for h in hooks:
                h.remove()

    def _batchable(self, adapters: list[str]) -> bool:
        """Whether cells of these adapters can share a batch: peft's per-sample path has no DoRA magnitude of
        ours (use_column_dora), so a DoRA LoRA is drawn cell by cell."""
        from peft.tuners.lora import LoraLayer

        return not any(a in getattr(m, "lora_magnitude_vector", {}) for _, part in self.parts()
                       for m in part.modules() if isinstance(m, LoraLayer) for a in adapters)

    def cells(self, p: GenParams, specs: list[LoraSpec], batch: int = 8, batched: bool = True) -> list[Image.Image]:
        """One image per LoRA spec (one LoRA at one strength each), same prompt and seed: in batches of up to
        `batch` cells of one strength, or one at a time (`batched=False`, and for DoRA)."""
        names = [self.ensure_lora(s.path) for s in specs]
        if not (batched and self._batchable(names)):
            out = []
            for spec in specs:
                self.apply([spec])
                out.append(self._gen(p, p.seed))
            return out
        images: list[Image.Image | None] = [None] * len(specs)
        order = sorted(range(len(specs)), key=lambda i: specs[i].strength)
        for _, group in itertools.groupby(order, key=lambda i: specs[i].strength):
            group = list(group)
            for k in range(0, len(group), batch):
                part = group[k : k + batch]
                self.apply([specs[i] for i in part])
                for i, img in zip(part, self._gen_cells(p, p.seed, [names[i] for i in part])):
                    images[i] = img
        return images

    def generate(self, p: GenParams) -> list[tuple[Image.Image, str, int]]:
        """`batch` images with seeds seed, seed+1, ...; each with its A1111 parameters text."""
        self.apply(p.loras)
        out = []
        for i in range(int(p.batch)):
            seed = int(p.seed) + i
            out.append((self._gen(p, seed), a1111_parameters(p, Path(self.base).name, seed, p.loras), seed))
        return out

    def compare(self, p: GenParams) -> tuple[Image.Image, list[Image.Image]]:
        """Base vs LoRA, same seed, side by side."""
        self.apply([LoraSpec(lo.path, 0.0, True, lo.name) for lo in p.loras])
        base = self._gen(p, p.seed)
        self.apply(p.loras)
        with_lora = self._gen(p, p.seed)
        return grid([base, with_lora], ["base", "with LoRA"], 2), [base, with_lora]

    def strength_grid(self, p: GenParams, lora_index: int, strengths: list[float]) -> tuple[Image.Image, list[Image.Image]]:
        """One LoRA at several strengths (the others as set), one seed."""
        cells = []
        for s in strengths:
            loras = [LoraSpec(lo.path, s if i == lora_index else lo.strength, True if i == lora_index else lo.enabled, lo.name,
                              lo.blocks)
                     for i, lo in enumerate(p.loras)]
            self.apply(loras)
            cells.append(self._gen(p, p.seed))
        name = p.loras[lora_index].display
        return grid(cells, [f"strength {s:g}" for s in strengths], len(cells), f"{name} at several strengths"), cells

    def checkpoint_grid(self, p: GenParams, files: list[str], labels: list[str], strength: float = 1.0,
                        batched: bool = True):
        """The same prompt and seed through each checkpoint's LoRA file (several cells a batch)."""
        cells = self.cells(p, [LoraSpec(f, strength) for f in files], batched=batched)
        return grid(cells, labels, min(len(cells), 5), f"checkpoints at strength {strength:g}"), cells

    def variant_grid(self, p: GenParams, files: list[str], labels: list[str], strengths: list[float],
                     batched: bool = True):
        """A sweep's variants (rows) at several strengths (columns), one prompt and one seed (each strength's
        variants a batch)."""
        specs = [LoraSpec(f, s) for f in files for s in strengths]
        cells = self.cells(p, specs, batched=batched)
        names = [f"{label} · {s:g}" for label in labels for s in strengths]
        return grid(cells, names, len(strengths), "variants at several strengths"), cells


# ---------------------------------------------------------------------------------- worker protocol
def handle(engine: PreviewEngine, req: dict, out_dir: Path) -> dict:
    """One request -> one JSON-able answer. Every failure is a plain message."""
    try:
        engine.set_base(req["base_model"], req.get("model_config") or None)
        p = GenParams(**{k: v for k, v in req.get("params", {}).items() if k != "loras"})
        p.loras = [LoraSpec(**lo) for lo in req.get("params", {}).get("loras", [])]
        mode = req.get("mode", "single")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out_dir.mkdir(parents=True, exist_ok=True)
        engine.begin(images_of(req, p), p.steps)
        if mode == "single":
            paths = []
            for k, (img, params, seed) in enumerate(engine.generate(p)):
                paths.append(str(save_png(img, out_dir / f"{stamp}-{seed}-{k}.png", params)))
            return {"ok": True, "images": paths}
        if mode == "compare":
            img, _ = engine.compare(p)
        elif mode == "strength_grid":
            img, _ = engine.strength_grid(p, int(req.get("lora_index", 0)), [float(s) for s in req["strengths"]])
        elif mode == "checkpoint_grid":
            img, _ = engine.checkpoint_grid(p, req["files"], req["labels"], float(req.get("strength", 1.0)))
        elif mode == "variant_grid":
            img, _ = engine.variant_grid(p, req["files"], req["labels"], [float(s) for s in req["strengths"]])
        else:
            return {"ok": False, "error": f"Unknown preview mode '{mode}'."}
        path = save_png(img, out_dir / f"{stamp}-{mode}-{p.seed}.png", a1111_parameters(p, Path(engine.base).name, p.seed, p.loras))
        return {"ok": True, "images": [str(path)]}
    except PreviewError as e:
        return {"ok": False, "error": str(e)}
    except PreviewCancelled:
        return {"ok": False, "cancelled": True, "error": "Cancelled: nothing was saved."}
    except Exception as e:
        from trainer.models.load import ModelError

        if isinstance(e, ModelError):
            return {"ok": False, "error": str(e)}
        if isinstance(e, torch.cuda.OutOfMemoryError):
            return {"ok": False, "error": "The GPU ran out of memory while generating. Lower the size or batch count."}
        return {"ok": False, "error": f"Preview failed ({type(e).__name__}: {str(e)[:300]})."}


def images_of(req: dict, p: GenParams) -> int:
    """How many images a request makes (for its progress): a batch, two to compare, a grid's cells."""
    mode = req.get("mode", "single")
    if mode == "compare":
        return 2
    if mode == "strength_grid":
        return len(req.get("strengths", []))
    if mode == "checkpoint_grid":
        return len(req.get("files", []))
    if mode == "variant_grid":
        return len(req.get("files", [])) * len(req.get("strengths", []))
    return int(p.batch)


def serve(out_dir: str, device: str = "auto") -> int:
    """Answer one JSON request per stdin line with one JSON line on stdout, keeping the pipeline loaded. While it
    works it writes progress events (trainer/events.py's JSON lines) before the answer; a cancel file in `out_dir`
    stops the generation under way."""
    from trainer.events import event_line

    engine = PreviewEngine(device)
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # library prints must not corrupt the protocol
    engine.cancel_file = Path(out_dir) / CANCEL_FILE

    def progress(done: int, total: int) -> None:
        real_stdout.write(event_line("progress", done=done, total=total) + "\n")
        real_stdout.flush()

    engine.on_step = progress
    real_stdout.write(json.dumps({"ok": True, "ready": True}) + "\n")
    real_stdout.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
        except ValueError:
            ans = {"ok": False, "error": "bad request"}
        else:
            if req.get("cmd") == "quit":
                break
            engine.cancel_file.unlink(missing_ok=True)  # a Cancel meant for an earlier request
            ans = handle(engine, req, Path(out_dir))
            engine.cancel_file.unlink(missing_ok=True)
        real_stdout.write(json.dumps(ans) + "\n")
        real_stdout.flush()
    return 0
