"""UI values <-> TrainConfig, and the pre-flight check. Pure functions, no gradio, no torch."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.recipe.config import ConfigError, TrainConfig, field_help

BASIC = ["base_model", "dataset", "trigger", "network_type", "rank", "alpha", "unet_lr", "text_encoder_lr", "train_text_encoder",
         "max_steps", "epochs", "batch_size", "resolution", "optimizer", "mixed_precision", "output_name"]
HIDDEN = ["output_dir", "config_version"]  # set by the app, not by the person
FIELDS = {f["name"]: f for f in field_help()}
SWEEP = ["variants"]  # the Compare settings panel's own field
ADVANCED = [n for n in FIELDS if n not in BASIC and n not in HIDDEN and n not in SWEEP]


# Fields that belong to some network types only: hidden on the page for the others (the config refuses them there).
NETWORK_ONLY = {"use_tucker": ("loha", "lokr"), "lokr_factor": ("lokr",), "lokr_decompose_both": ("lokr",),
                "lokr_full_matrix": ("lokr",), "use_dora": ("lora",), "dropout": ("lora",),
                "loraplus_lr_ratio": ("lora",), "loraplus_unet_lr_ratio": ("lora",),
                "loraplus_text_encoder_lr_ratio": ("lora",)}


def network_fields(network_type: str) -> dict[str, bool]:
    """Which of the network-specific fields the page shows for a network type."""
    return {name: network_type in kinds for name, kinds in NETWORK_ONLY.items()}


LABELS = {"network_type": "Network (LoRA, LoHa, LoKr)", "base_model": "Base model (checkpoint file, diffusers folder or hub id)", "unet_lr": "UNet learning rate",
          "text_encoder_lr": "Text-encoder learning rate", "max_steps": "Max steps (0 = use epochs)"}


def label(name: str) -> str:
    """The label a form field shows."""
    return LABELS.get(name, name.replace("_", " ").capitalize())


def in_ui_words(text: str) -> str:
    """A message for the page: config keys (`min_bucket`) become the labels the person sees, with where to find
    them ('**Min bucket** (Advanced › Images)'); the CLI keeps the keys, which is what a config file holds."""
    import re

    def short(name):
        return label(name).split(" (")[0]

    def repl(m):
        name = m.group(1)
        where = "" if name in BASIC else f" (Advanced › {FIELDS[name]['section'].capitalize()})"
        return f"**{short(name)}**{where}"

    keys = sorted((n for n in FIELDS if "_" in n and n not in HIDDEN), key=len, reverse=True)
    return re.sub(r"(?<![\w/.-])(" + "|".join(keys) + r")(?![\w/.-])", repl, text)


def machine_defaults(gpu: bool) -> dict[str, Any]:
    """Form defaults that depend on the machine: without an NVIDIA GPU, fp32 (bf16 on a CPU is emulated, slower)."""
    return {} if gpu else {"mixed_precision": "no"}


def values_to_config(values: dict[str, Any], datasets_dir: Path | None = None, strict: bool = True) -> TrainConfig:
    """Form values (by field name) -> TrainConfig. The dataset may be a workspace dataset name. A number box left
    empty (a browser empties one that holds letters) is refused by name, never replaced by the default; with
    `strict=False` (laying a preset over the form) it takes the default."""
    empty = [k for k, v in values.items() if v is None and k in FIELDS and k not in HIDDEN
             and FIELDS[k]["type"] in ("int", "float")]
    if empty and strict:
        raise ConfigError("\n".join(f"{k} is empty or not a number: enter a number (the default is "
                                     f"{FIELDS[k]['default']})." for k in empty))
    data = TrainConfig().to_dict()
    for k, v in values.items():
        if k not in FIELDS or k in HIDDEN:
            continue
        if v is not None:
            data[k] = v  # TrainConfig.from_dict coerces (numbers from number boxes, lists from text areas)
    ds = data.get("dataset") or ""
    if datasets_dir is not None and ds and not Path(ds).is_absolute() and (datasets_dir / ds).is_dir():
        data["dataset"] = str(datasets_dir / ds)
    return TrainConfig.from_dict(data, source="the form")


def compare_grid(first: str, first_values: str, second: str = "", second_values: str = "") -> str:
    """The variants box's lines for every combination of one or two settings' values (Compare settings): values
    comma-separated, each read as the config reads it."""
    from trainer.recipe import sweep

    picked = []
    for name, text in ((first, first_values), (second, second_values)):
        if not name:
            continue
        if name not in sweep.FIELDS:
            raise ConfigError(f"{name} is not a setting a variant can change. Pick one of: {', '.join(sweep.FIELDS)}.")
        values = [sweep.parse_value(x) for x in sweep.split_commas(text or "") if x.strip()]
        if not values:
            raise ConfigError(f"Give the values of {name} to compare, comma-separated (e.g. 8, 16, 32).")
        picked.append((name, values))
    if not picked:
        raise ConfigError("Pick a setting to compare and give its values.")
    rows = sweep.grid(*picked)
    if len(rows) > sweep.MAX_VARIANTS:
        raise ConfigError(f"{len(rows)} combinations: a sweep trains at most {sweep.MAX_VARIANTS}. Give fewer values.")
    return sweep.format_lines(rows)


def sweep_line(cfg: TrainConfig) -> str:
    """The plan's line for a sweep: how many variants, their names, where their files go."""
    from trainer.recipe.sweep import variant_name

    names = [variant_name(v) for v in cfg.variants if isinstance(v, dict)]
    return (f"- Compares {len(names)} variants in one run, on one loaded base and one set of caches, with the same "
            f"batches and noise: {', '.join(names)}. Each is written as {cfg.output_name}-<variant>.safetensors.")


def cannot_start(e: ConfigError) -> str:
    return "### Cannot start\n" + "\n".join(f"- {line}" for line in str(e).splitlines())


def config_to_values(cfg: TrainConfig) -> dict[str, Any]:
    from trainer.recipe.sweep import format_lines

    d = cfg.to_dict()
    for k, f in FIELDS.items():
        if k == "variants":
            d[k] = format_lines(d[k])
        elif f["type"] == "list":
            d[k] = "\n".join(d[k])
    return d


def planned_steps(cfg: TrainConfig, images_per_epoch: int, processes: int = 1) -> int:
    """Optimizer steps of a run (max_steps, or epochs of the dataset at this batch on `processes` GPUs): about,
    before bucketing."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    micro = -(-max(1, images_per_epoch) // max(1, cfg.batch_size * processes))
    return cfg.epochs * max(1, micro // max(1, cfg.gradient_accumulation))


def group_line(cfg: TrainConfig, n: int) -> str:
    """What a group of n ranks means for the batch, the steps and the memory (the batch size is per GPU, as in
    kohya)."""
    eff = cfg.batch_size * n * cfg.gradient_accumulation
    steps = (f"the same {cfg.max_steps} steps, each on {n} times the images" if cfg.max_steps > 0
             else f"each epoch takes 1/{n} of the steps")
    return (f"- Trains on {n} {'CPU processes' if cfg.device == 'cpu' else 'GPUs'}: effective batch {eff} "
            f"({cfg.batch_size} per GPU x {n} x {cfg.gradient_accumulation} accumulation); {steps}; each GPU "
            "needs the VRAM above.")


def check_extra_folders(cfg: TrainConfig, errors: list[str], notes: list[str]) -> None:
    """The class-image and validation folders: there, with images, and what they add to the plan."""
    from trainer.data.report import dataset_report

    for folder, what in ((cfg.reg_dataset, "Class-image"), (cfg.validation_dataset, "Validation")):
        if not folder:
            continue
        try:
            extra = dataset_report(folder, cfg.resolution)
        except FileNotFoundError:
            errors.append(f"{what} folder not found: {folder}")
            continue
        if not extra["image_count"]:
            errors.append(f"{what} folder {folder} has no usable images.")
        elif what == "Class-image":
            notes.append(f"{extra['images_with_repeats']} class image(s) per epoch for prior preservation "
                         f"(prior_loss_weight {cfg.prior_loss_weight:g})")
        else:
            notes.append(f"{extra['image_count']} validation image(s) from {Path(folder).name}")


def where_it_runs(cfg: TrainConfig, device: str | None) -> str | None:
    """'cuda' or 'cpu': the config's device, or this machine's `device` when the config says auto."""
    return device if cfg.device == "auto" else cfg.device


def duration_line(cfg: TrainConfig, family: str, images_per_epoch: int, timings: list[dict], device: str,
                  processes: int = 1) -> str:
    """'- Time on this machine (CPU): about 4 min (...)' for the plan (a group's steps take about one GPU's
    time: each rank trains its own batch)."""
    from trainer.recipe import timing

    run_device = where_it_runs(cfg, device)
    steps = planned_steps(cfg, images_per_epoch, processes)
    est = timing.estimate(cfg, family, steps, run_device, timings)
    return f"- Time on this machine ({'GPU' if run_device == 'cuda' else 'CPU'}): " + timing.describe(est, steps)


def preflight(values: dict[str, Any] | TrainConfig, datasets_dir: Path | None = None, preset=None,
              timings: list[dict] | None = None, device: str | None = None, processes: int = 1,
              card: dict | None = None) -> tuple[bool, str]:
    """(ok to start, plain-language markdown): config errors, conflicts, dataset blockers, VRAM estimate and,
    given this machine's `device` ('cuda' | 'cpu') and measured `timings`, how long the run will take on
    `processes` GPUs; given the `card` it trains on (app.gpu's row: name, total_gb), whether the projected peak
    fits it. `values` are the form's, or the TrainConfig already made of them."""
    from trainer.models import families
    from trainer.recipe.estimate import estimate_vram_gb
    from trainer.recipe.presets import family_mismatch

    try:
        cfg = values if isinstance(values, TrainConfig) else values_to_config(values, datasets_dir)
    except ConfigError as e:
        return False, cannot_start(e)
    errors, warns = cfg.problems()
    notes: list[str] = []
    family = check_base_model(cfg, errors, notes)
    spec = families.resolve(family, cfg.resolution)
    low, high = spec.resolutions
    in_range = low <= cfg.resolution <= high
    if not in_range:  # first: every other figure of such a run (buckets, memory, time) is meaningless
        errors.insert(0, f"resolution {cfg.resolution} is outside what {spec.name} trains at: choose {low} to {high} "
                         f"(its native resolution is {spec.native_resolution}).")
    mismatch = family_mismatch(preset, family) if preset is not None else None
    if mismatch:
        errors.append(mismatch)
    report = check_dataset(cfg, errors, warns, notes)
    check_extra_folders(cfg, errors, notes)
    est = estimate_vram_gb(cfg, family)
    if card and in_range and where_it_runs(cfg, device) == "cuda":
        warns += card_warning(cfg, est, card)
    lines = []
    if errors:
        lines.append("### Cannot start yet")
        lines += [f"- {x}" for x in errors]
    if warns:
        lines.append("### Check these")
        lines += [f"- {x}" for x in warns]
    lines.append("### Plan")
    if report:
        lines.append(f"- {report['image_count']} images ({report['images_with_repeats']} per epoch with repeats)")
    lines.append(f"- Model family: {families.name(family)}")
    lines += [f"- {n}" for n in notes]
    if in_range:
        lines.append(f"- Projected peak VRAM (counted on the CPU; no GPU has confirmed it yet): about "
                     f"{est['total_gb']} GB, while {est['phase']}; the biggest part is "
                     f"{est['biggest']} ({est['terms_gb'][est['biggest']]:.1f} GB). LoRA: {est['lora_params_m']}M parameters")
    if cfg.variants:
        lines.append(sweep_line(cfg))
    if processes > 1:
        lines.append(group_line(cfg, processes))
    if device and in_range:
        lines.append(duration_line(cfg, family, report["images_with_repeats"] if report else 1, timings or [], device,
                                   processes))
    if not errors:
        lines.insert(0, "### Ready to start")
    return not errors, "\n".join(lines)


def card_warning(cfg: TrainConfig, est: dict, card: dict) -> list[str]:
    """One sentence when the projected peak is more than the card holds: what happens, and what to change first."""
    if est["total_gb"] <= card["total_gb"]:
        return []
    first = ("turn on gradient_checkpointing, which saves the most for about 25% of the speed; " if not
             cfg.gradient_checkpointing else "")
    return [f"The projected peak, about {est['total_gb']} GB while {est['phase']}, is more than the "
            f"{card['total_gb']:g} GB of GPU {card['index']} ({card['name']}): the run would stop when the card is "
            f"full, or on Windows spill into system memory and take 10-50x longer per step. To fit, {first}lower "
            f"batch_size or resolution, or pick the preset for your card size."]


def check_base_model(cfg: TrainConfig, errors: list[str], notes: list[str]) -> str:
    """The base model is there (a file, a folder, a hub id in the cache or downloadable); returns its family key, or
    'auto' when it cannot be told before loading."""
    from trainer.models.hub import hub_status, is_hub_id
    from trainer.models.sniff import sniff_family

    if not cfg.base_model:
        return "auto"
    p = Path(cfg.base_model).expanduser()
    if not p.exists() and is_hub_id(cfg.base_model) and p.suffix.lower() not in (".safetensors", ".ckpt"):
        hub = hub_status(cfg.base_model)  # in the cache, downloadable, or neither (and what to do)
        (notes if hub.usable else errors).append(hub.message)
    elif not p.exists():
        errors.append(f"Base model not found: {cfg.base_model}. Give the path of a .safetensors / .ckpt file, "
                      "a diffusers folder (with model_index.json) or a hub id like 'org/name'.")
    return sniff_family(cfg.base_model) if cfg.model_family == "auto" else cfg.model_family


def check_dataset(cfg: TrainConfig, errors: list[str], warns: list[str], notes: list[str]) -> dict | None:
    """The dataset's report (None without one): its blockers, skipped files, missing captions, what validation
    holds out, duplicates, masks."""
    from trainer.data.report import dataset_report
    from trainer.data.scan import holdout_count, holdout_error

    if not cfg.dataset:
        return None
    try:
        report = dataset_report(cfg.dataset, cfg.resolution, cfg.trigger, *cfg.bucket_range, cfg.bucket_step,
                                cfg.no_upscale)
    except FileNotFoundError:
        errors.append(f"Dataset folder not found: {cfg.dataset}")
        return None
    errors += report["blockers"]
    if report["skipped"]:
        warns.append(f"{len(report['skipped'])} file(s) will be skipped: "
                     + "; ".join(f"{s['file']} ({s['reason']})" for s in report["skipped"][:5]))
    if report["missing_captions"]:
        warns.append(f"{len(report['missing_captions'])} image(s) have no caption"
                     + ("; those in '<repeats>_<name>' folders are captioned with the name" if cfg.caption_from_folder else "")
                     + (f"; they use '{cfg.class_caption}'" if cfg.class_caption else " and train on the trigger word alone"))
    n = report["image_count"]
    if cfg.validation_split and holdout_error(cfg.validation_split, n):
        errors.append(holdout_error(cfg.validation_split, n))
    elif cfg.validation_split:
        notes.append(f"validation_split = {cfg.validation_split:g} holds out "
                     f"{holdout_count(cfg.validation_split, n)} of {n} image(s) to measure a validation loss")
    if report["duplicates"]:
        warns.append(f"{len(report['duplicates'])} group(s) of duplicate images")
    if cfg.masked_loss and not sum(report["masks"].values()):
        warns.append("masked_loss is on but none of the images has a mask (an alpha channel, or a same-name "
                     "file in a masks/ folder): every pixel counts, as without it")
    return report


# ------------------------------------------------------------------------------------------ the block table
def block_families() -> dict[str, str]:
    """{label: family key} for the block table: one entry per UNet block layout ('SD 1.x / SD 2.x (25 blocks)')."""
    from trainer.models import families

    layouts: dict[tuple, list] = {}
    for f in families.groups():
        layouts.setdefault(f.blocks, []).append(f)
    return {" / ".join(f.group_name for f in fs) + f" ({sum(b)} blocks)": fs[0].key for b, fs in layouts.items()}


def block_rows(values: dict[str, Any], family: str) -> list[list]:
    """Rows (block, rank, alpha, LR weight) of the per-block table from form values; blanks become the
    global rank / alpha and weight 1."""
    from trainer.models import blocks

    names = blocks.names(family)
    n_side = (len(names) - 1) // 2
    rank, alpha = int(values.get("rank") or 16), float(values.get("alpha") or 16)

    def field(name, count, default, integer=False):
        try:
            got = blocks.parse(values.get(name) or "", count, name, integer)
        except ValueError:
            got = None  # written for the other family: start from the defaults
        return got if got is not None else [default] * count

    dims = field("block_dims", len(names), rank, True)
    alphas = field("block_alphas", len(names), alpha)
    lr = field("down_lr_weight", n_side, 1.0) + field("mid_lr_weight", 1, 1.0) + field("up_lr_weight", n_side, 1.0)
    return [[b, int(d), float(a), float(w)] for b, d, a, w in zip(names, dims, alphas, lr)]


def rows_to_values(rows: list[list], family: str) -> dict[str, str]:
    """The table back into block_dims / block_alphas / *_lr_weight strings (kohya's format)."""
    from trainer.models import blocks

    names = blocks.names(family)
    by = {str(r[0]): r for r in rows}
    missing = [b for b in names if b not in by]
    if missing:
        raise ValueError(f"The block table lacks {', '.join(missing[:4])}: fill it for this model family first.")
    num = lambda x: f"{float(x):g}"  # noqa: E731
    dims = [str(int(float(by[b][1]))) for b in names]
    alphas = [num(by[b][2]) for b in names]
    lr = [num(by[b][3]) for b in names]
    n_side = (len(names) - 1) // 2
    return {"block_dims": ",".join(dims), "block_alphas": ",".join(alphas),
            "down_lr_weight": ",".join(lr[:n_side]), "mid_lr_weight": lr[n_side], "up_lr_weight": ",".join(lr[n_side + 1:])}


def suggest_ranks(spectrum: dict, family: str, energy: float, alpha_ratio: float = 1.0) -> list[list]:
    """Rows of the block table from a trained LoRA's spectrum: per block the smallest rank at which the block's
    modules, each cut to that rank, keep `energy` of the block's update (train once wide, then again lean)."""
    from trainer.models import blocks

    sq: dict[str, list[list[float]]] = {}
    for name, m in spectrum["modules"].items():
        b = blocks.of(name)
        if b:
            sq.setdefault(b, []).append([s * s for s in m["singular_values"]])
    rows = []
    for b in blocks.names(family):
        mods = sq.get(b)
        rank = 0
        if mods:
            total = sum(sum(x) for x in mods)
            top = max(len(x) for x in mods)
            rank = next((k for k in range(1, top + 1) if total == 0 or sum(sum(x[:k]) for x in mods) >= energy * total), top)
        rows.append([b, rank, round(rank * alpha_ratio, 4), 1.0])
    return rows
