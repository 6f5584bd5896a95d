"""Benchmark subcommand."""


def add_command(sub) -> None:
    pass
