"""Click commands of the `mlxk` CLI, one module per area; options shared by several commands live here."""
from __future__ import annotations

import click

from mlxk.config import LOG_LEVELS


def log_options(fn):
    """`--log-level` and `--log-json` (defaults: MLXK_LOG_LEVEL, MLXK_LOG_JSON) for commands that run a process."""
    fn = click.option("--log-json", is_flag=True, default=None,
                      help="Log one JSON object per line (MLXK_LOG_JSON).")(fn)
    return click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default=None,
                        help="Log level (MLXK_LOG_LEVEL, default info).")(fn)


class NoSuchCommand(click.UsageError):
    """An unknown command, with the closest known ones (`possibilities`, as click's NoSuchOption has)."""

    def __init__(self, name: str, possibilities: list[str], ctx: click.Context | None = None):
        hint = f" Did you mean {' or '.join(repr(p) for p in possibilities)}?" if possibilities else ""
        super().__init__(f"No such command {name!r}.{hint}", ctx)
        self.possibilities = possibilities


class SuggestingGroup(click.Group):
    """A group that answers a mistyped command with the closest known ones: `mlxk lsit` → did you mean 'list'."""

    def resolve_command(self, ctx, args):
        name = args[0] if args else None
        if name and not name.startswith("-") and not ctx.resilient_parsing and self.get_command(ctx, name) is None:
            import difflib

            raise NoSuchCommand(name, difflib.get_close_matches(name, self.list_commands(ctx), n=3, cutoff=0.6), ctx)
        return super().resolve_command(ctx, args)
