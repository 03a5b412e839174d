"""The command line, ``python -m avg_kernels <command>`` (SPEC §7).

A command is a module in this package (``avg_kernels/cli/<name>.py``) that defines

    COMMAND = "<name>"                      # the subcommand
    HELP = "one line for --help"
    def configure(parser): ...              # adds its arguments to its argparse sub-parser
                                            # (set_defaults(_accept_extra=True): it takes unknown ones too)
    def run(args) -> int: ...               # runs it; the exit status
or, instead of configure and run,
    PASSTHROUGH = True
    def run_argv(argv) -> int: ...          # gets its arguments unparsed (its own parser sees them all)

Modules are discovered here, so adding a command means adding one file, no edit elsewhere. Keep
their module-level imports light (every invocation imports every command module); a command module
that fails to import still shows up and reports its import error when run.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import traceback


def _commands() -> dict[str, object]:
    found: dict[str, object] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        try:
            mod = importlib.import_module(f"{__name__}.{info.name}")
        except Exception:  # noqa: BLE001 - one broken command must not take the others down
            found[info.name] = _Broken(info.name, traceback.format_exc())
            continue
        found[getattr(mod, "COMMAND", info.name)] = mod
    return found


class _Broken:
    def __init__(self, name: str, tb: str):
        self.COMMAND, self.HELP, self._tb = name, f"(unavailable: its module failed to import)", tb

    def configure(self, parser):
        parser.set_defaults(_accept_extra=True)

    def run(self, args) -> int:
        print(f"error: the {self.COMMAND!r} command failed to import:\n{self._tb}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m avg_kernels",
                                     description="avg_kernels command line: fused kernels for AG training.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, mod in _commands().items():
        p = sub.add_parser(name, help=mod.HELP, description=(mod.__doc__ or mod.HELP).strip().splitlines()[0]
                           if not isinstance(mod, _Broken) else mod.HELP, add_help=not getattr(mod, "PASSTHROUGH", False))
        if not getattr(mod, "PASSTHROUGH", False):  # (a passthrough command never reaches this parser)
            mod.configure(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = _commands()
    if argv and getattr(commands.get(argv[0]), "PASSTHROUGH", False):  # its own parser sees every argument
        return int(commands[argv[0]].run_argv(argv[1:]) or 0)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "_accept_extra", False):  # a command that cannot run takes anything
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args._run(args) or 0)
