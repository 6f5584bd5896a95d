"""Preset subcommands (filled in by the presets module)."""


def add_commands(sub) -> None:
    pass
