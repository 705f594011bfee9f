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
