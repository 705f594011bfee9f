"""The `mlxk` command line: a click group whose commands live in mlxk/commands/ and load on first use.

Loading lazily keeps `mlxk list` from importing what `mlxk serve` or `mlxk pull` need.
"""
from __future__ import annotations

import importlib
import sys
import threading

import click

from mlxk import __version__
from mlxk.commands import SuggestingGroup
from mlxk.output import JsonUsageError, Output, json_command, json_requested, system_object

# name → "module:attribute"; the order is the order of `mlxk --help`
COMMANDS = {
    "list": "mlxk.commands.models:list_command",
    "show": "mlxk.commands.models:show_command",
    "health": "mlxk.commands.models:health_command",
    "pull": "mlxk.commands.jobs:pull_command",
    "rm": "mlxk.commands.jobs:rm_command",
    "clone": "mlxk.commands.jobs:clone_command",
    "push": "mlxk.commands.jobs:push_command",
    "jobs": "mlxk.commands.jobs:jobs_group",
    "run": "mlxk.commands.serve:run_command",
    "embed": "mlxk.commands.serve:embed_command",
    "serve": "mlxk.commands.serve:serve_command",
    "ps": "mlxk.commands.serve:ps_command",
    "stop": "mlxk.commands.serve:stop_command",
    "worker": "mlxk.commands.jobs:worker_command",
    "processes": "mlxk.commands.processes:processes_group",
    "version": "mlxk.cli:version_command",
}
# Commands that only read and print, run on the main thread alone: once they are done nothing is left to clean up but
# what atexit knows about, so main() skips the interpreter's module teardown (~10 ms, a tenth of `mlxk list`).
QUICK_EXIT = {"list", "show"}
# Commands that have cleaned up by the time they return but may leave threads inside native code: the job worker's task
# threads can sit in MLX (a runtime check imports and runs it) when the consumer stops. A normal exit would then run
# MLX's C++ static destructors under them ("terminate called without an active exception", SIGABRT); os._exit skips
# them. `python -m mlxk.workers` leaves the same way.
EXIT_AFTER_CLEANUP = {"worker"}
_invoked: list[str] = []  # the subcommand click resolved, for main()


class LazyGroup(SuggestingGroup):
    _json = False  # the command line being run asked for --json (set by main, read when a usage error passes)

    def main(self, args=None, *rest, **kwargs):
        args = list(sys.argv[1:] if args is None else args)
        self._json = json_requested(args)
        return super().main(args, *rest, **kwargs)

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.ClickException as error:
            raise self._as_json(error) from None

    def invoke(self, ctx):
        # Every command's own parsing (and any click error it raises) happens below this call.
        try:
            return super().invoke(ctx)
        except click.ClickException as error:
            raise self._as_json(error) from None

    def _as_json(self, error: click.ClickException) -> click.ClickException:
        return JsonUsageError(error) if self._json and not isinstance(error, JsonUsageError) else error

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            if ctx.resilient_parsing:
                return None
            raise

    def resolve_command(self, ctx, args):
        name, command, rest = super().resolve_command(ctx, args)
        _invoked.append(name)
        return name, command, rest

    def format_commands(self, ctx, formatter):
        # `--help` must not import every command module; short help comes from each command's first doc line.
        rows = []
        for name in self.list_commands(ctx):
            try:
                command = self.get_command(ctx, name)
            except (ImportError, AttributeError):
                continue
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=formatter.width - 20)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="mlxk")
def cli():
    """Manage and serve MLX models in the Hugging Face cache."""


JSON_API_SPEC_VERSION = "0.2.4"  # the mlx-knife JSON API whose shapes `--json` is a superset of (README)


@click.command("version")
@json_command
def version_command():
    """Show the versions of mlxk and the libraries it runs on."""
    from importlib.metadata import PackageNotFoundError, version  # lazy: keeps `mlxk list` light

    libraries = {}
    for package in ("mlx", "mlx-lm", "huggingface-hub", "huey"):
        try:
            libraries[package] = version(package)
        except PackageNotFoundError:
            libraries[package] = None
    data = {"cli_version": __version__, "json_api_spec_version": JSON_API_SPEC_VERSION, "system": system_object(),
            "version": __version__, **libraries}
    text = f"mlxk {__version__}\n" + "\n".join(f"{k} {v or 'not installed'}" for k, v in libraries.items())
    return Output(data, text)


def main():
    args = sys.argv[1:]
    if "--version" in args and "--json" in args and set(args) <= {"--version", "--json"}:
        args = ["version", "--json"]  # mlx-knife's `--version --json`: the same document as `version --json`
    try:
        cli.main(args=args, prog_name="mlxk")  # standalone: always ends in SystemExit
    except SystemExit as done:
        if _invoked and (_invoked[-1] in QUICK_EXIT and threading.active_count() == 1
                         or _invoked[-1] in EXIT_AFTER_CLEANUP):
            from mlxk.processes import exit_now

            exit_now(done.code)
        raise
