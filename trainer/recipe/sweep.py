"""A sweep: several LoRAs trained in one run on one loaded base and one set of caches (issue 30).

A config with `variants` (a list of tables, each overriding LoRA-side fields, and optionally naming itself) trains
every variant as its own network with its own optimizer and schedule, on the same batches and the same noise:
the only difference between them is the setting. This module owns which fields a variant may change, the
variants' configs and names, and what is wrong with a sweep, in words. The engine side is
trainer/engine/sweep.py.
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

MAX_VARIANTS = 8

# what a variant may change: the network, its learning and its optimizer; never what the base, the data, the
# caches, the noise or the schedule's length depend on (those are shared)
FIELDS = (
    "network_type", "rank", "alpha", "network_target", "conv_rank", "conv_alpha", "use_dora", "use_tucker",
    "lokr_factor", "lokr_decompose_both", "lokr_full_matrix", "dropout", "rank_dropout", "module_dropout",
    "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight", "mid_lr_weight",
    "up_lr_weight", "block_lr_zero_threshold", "unet_lr", "text_encoder_lr", "optimizer", "adafactor_relative_step",
    "weight_decay", "lr_scheduler", "warmup_steps", "max_grad_norm", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio", "ema", "ema_decay", "ema_update_every", "ema_export",
)


def short(value) -> str:
    """A value as a name part: 0.0002 -> 2e-4, 8.0 -> 8, True -> on."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        text = f"{value:g}"
        return re.sub(r"e([+-])0*(\d)", lambda m: "e" + ("-" if m[1] == "-" else "") + m[2], text)
    return str(value)


def variant_name(overrides: dict) -> str:
    """The variant's name (its own, or made of its settings: rank8-unet_lr2e-4), safe in a file name."""
    name = str(overrides.get("name") or "-".join(f"{k}{short(v)}" for k, v in overrides.items() if k != "name"))
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("._") or "variant"


def variant_configs(cfg) -> list[tuple[str, object]]:
    """(name, TrainConfig) of each variant: the run's config with the variant's fields, no variants of its own,
    and the variant in the file name. Raises ConfigError for a value a field does not take."""
    from trainer.recipe.config import TrainConfig

    out = []
    for overrides in cfg.variants:
        name = variant_name(overrides)
        data = {**cfg.to_dict(), **{k: v for k, v in overrides.items() if k != "name"}, "variants": [],
                "output_name": f"{cfg.output_name}-{name}"}
        out.append((name, TrainConfig.from_dict(data, source=f"variant '{name}'")))
    return out


def problems(cfg) -> list[str]:
    """What stops a sweep before Start, each in one sentence naming the variant and the field."""
    from trainer.recipe.config import ConfigError, TrainConfig, unknown_keys

    if not cfg.variants:
        return []
    errors = []
    if len(cfg.variants) > MAX_VARIANTS:
        errors.append(f"A sweep trains at most {MAX_VARIANTS} variants in one run (this one has "
                      f"{len(cfg.variants)}): split it into two runs.")
    for i, v in enumerate(cfg.variants):
        if not isinstance(v, dict):
            errors.append(f"variants: entry {i + 1} is not a table of settings (e.g. {{ rank = 8 }}).")
            continue
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = [k for k in v if k != "name" and k not in known]
        if unknown:
            errors.append(f"variant '{variant_name(v)}': unknown key(s) {unknown_keys(unknown, FIELDS)}. Fix the "
                          "spelling or remove them.")
            continue
        shared = [k for k in v if k != "name" and k not in FIELDS]
        if shared:
            errors.append(f"variant '{variant_name(v)}' sets {', '.join(shared)}, which every variant of a sweep "
                          "shares (the base, the data, the noise and the steps are trained once for all). Set it for "
                          f"the whole run instead. A variant may set: {', '.join(FIELDS)}.")
    if errors:
        return errors
    names = [variant_name(v) for v in cfg.variants]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        errors.append(f"Two variants are both named {', '.join(twice)}: give each a different setting or name.")
    try:
        configs = variant_configs(cfg)
    except ConfigError as e:
        return errors + [str(e)]
    for name, vcfg in configs:
        errors += [f"variant '{name}': {e}" for e in vcfg.problems()[0]]
    return errors


def grid(first: tuple[str, list], second: tuple[str, list] | None = None) -> list[dict]:
    """The variants of one or two fields' values (the page's Compare settings): every combination, in order."""
    name, values = first
    rows = [{name: v} for v in values]
    if second and second[0] and second[1]:
        rows = [{**r, second[0]: w} for r in rows for w in second[1]]
    return rows


def parse_lines(text: str) -> list[dict]:
    """The page's variants box: one variant per line, `key = value` pairs separated by commas (`rank = 8, unet_lr =
    2e-4`, `name = big, rank = 32`). A value is read as TOML (numbers, true/false, "text, with commas"), else as
    plain text."""
    from trainer.recipe.config import ConfigError

    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        row = {}
        for part in split_commas(line):
            key, eq, value = (x.strip() for x in part.partition("="))
            if not eq or not key:
                raise ConfigError(f"variants, line {n}: '{part.strip()}' is not 'key = value'. Write each variant as "
                                  "e.g. 'rank = 8, unet_lr = 2e-4'.")
            row[key] = parse_value(value)
        out.append(row)
    return out


def split_commas(text: str) -> list[str]:
    """Parts of a line between commas, leaving commas inside "quoted, text" alone."""
    return re.split(r',(?=(?:[^"]*"[^"]*")*[^"]*$)', text)


def parse_value(text: str):
    """One value as TOML reads it (8, 2e-4, true, "a, b"), else the text itself (adamw8bit)."""
    try:
        return tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return text.strip()


def format_lines(variants: list[dict]) -> str:
    """The variants as the page's box shows them (parse_lines reads it back)."""
    def value(v):
        if isinstance(v, bool):
            return str(v).lower()
        return json.dumps(v) if isinstance(v, str) and ("," in v or "=" in v) else f"{v}"

    return "\n".join(", ".join(f"{k} = {value(v)}" for k, v in row.items()) for row in variants)
