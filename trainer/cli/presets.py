"""`python -m trainer presets ...`: list presets, import a kohya_ss JSON, export an sd-scripts TOML."""
from __future__ import annotations

import sys


def add_commands(sub) -> None:
    p = sub.add_parser("presets", help="list presets; import/export kohya configs")
    ps = p.add_subparsers(dest="presets_cmd", required=True)
    ls = ps.add_parser("list", help="list shipped (and a workspace's) presets")
    ls.add_argument("--user-dir", help="a workspace's presets folder")
    ls.set_defaults(fn=_list)
    imp = ps.add_parser("import-kohya", help="turn a kohya_ss JSON into a TrainConfig TOML")
    imp.add_argument("json_file")
    imp.add_argument("--out", help="write the TOML here (default: print it)")
    imp.set_defaults(fn=_import)
    exp = ps.add_parser("export-kohya", help="write an sd-scripts TOML for a TrainConfig TOML")
    exp.add_argument("config")
    exp.set_defaults(fn=_export)


def _list(args) -> int:
    from trainer.recipe.presets import list_presets

    for p in list_presets(args.user_dir):
        print(f"{p.key:20s} {p.family:5s} {p.name}{'' if p.shipped else '  (yours)'}")
    return 0


def _import(args) -> int:
    from trainer.recipe.config import TrainConfig, dumps_toml
    from trainer.fsutil import atomic_write_text
    from trainer.recipe.kohya_ss import import_kohya_file

    try:
        values, notes = import_kohya_file(args.json_file)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    text = dumps_toml(TrainConfig.from_dict(values).to_dict())
    if args.out:
        atomic_write_text(args.out, text)
    else:
        print(text, end="")
    return 0


def _export(args) -> int:
    from trainer.recipe.config import TrainConfig
    from trainer.recipe.kohya_ss import to_sd_scripts_toml

    print(to_sd_scripts_toml(TrainConfig.load(args.config)), end="")
    return 0
