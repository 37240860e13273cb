"""One argument style for every config-driven tool: `TOOL CONFIG [--set k=v ...] [k=v ...]`.

Overrides may be given after `--set`, as trailing `key=value` arguments, or in the official
torchpack form `--model.a.b VALUE` / `--model.a.b=VALUE` (a dotted option name), so commands copied
from the official README work.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Sequence

from bevfusion.config import Config, ConfigError, load_config

__all__ = ["config_parser", "parse_config_args", "split_dotted_options"]

_DOTTED = re.compile(r"^--([A-Za-z_][\w-]*(?:\.[\w-]+)+)(?:=(.*))?$", re.S)


def config_parser(description: str, config_required: bool = True) -> argparse.ArgumentParser:
    """An ArgumentParser with the shared CONFIG / --set / trailing-override arguments."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides: `--set a.b=1 c=[1,2]`, trailing `a.b=1`, or `--a.b 1` (official style). "
               "Values are typed by YAML rules; prefix a key with '+' to add a key the config lacks.",
    )
    parser.add_argument("config", nargs=None if config_required else "?",
                        help="YAML config, e.g. configs/nuscenes/det/.../convfuser.yaml")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], action="extend",
                        metavar="KEY=VALUE", help="config overrides")
    return parser


def split_dotted_options(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate overrides from the other arguments.

    Overrides are the values after `--set`, official-style `--a.b VALUE` / `--a.b=VALUE` options and
    bare `key=value` arguments. Returns (other_args, overrides as "a.b=VALUE" strings), in order.
    """
    rest: list[str] = []
    overrides: list[str] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        m = _DOTTED.match(arg)
        if arg == "--set" or arg.startswith("--set="):
            if arg.startswith("--set="):
                overrides.append(arg[len("--set="):])
            elif i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                raise SystemExit("error: --set needs at least one KEY=VALUE")
            while i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                overrides.append(argv[i + 1])
                i += 1
        elif m:
            if m.group(2) is not None:
                overrides.append(f"{m.group(1)}={m.group(2)}")
            elif i + 1 < len(argv):
                overrides.append(f"{m.group(1)}={argv[i + 1]}")
                i += 1
            else:
                raise SystemExit(f"error: option {arg} needs a value")
        elif not arg.startswith("-") and "=" in arg and re.match(r"^\+?[A-Za-z_][\w.-]*=", arg):
            overrides.append(arg)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def parse_config_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
                      load: bool = True) -> tuple[argparse.Namespace, Config | None]:
    """Parse `argv` and load the config with every override applied.

    A ConfigError ends the program with its message (which names the file and key) and exit code 2.
    """
    argv = sys.argv[1:] if argv is None else argv
    rest, extra = split_dotted_options(argv)
    args = parser.parse_args(rest)
    args.overrides = list(args.overrides) + extra
    if not load or args.config is None:
        return args, None
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    return args, cfg
