#!/usr/bin/env python3
"""Print a config after inheritance, overrides and `${...}` resolution (or the files it merges)."""
from __future__ import annotations

import sys

import yaml

from bevfusion.config import config_chain, to_plain
from bevfusion.utils.cli import config_parser, parse_config_args, tool_main


@tool_main
def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__)
    parser.add_argument("--chain", action="store_true", help="only list the files merged, in order")
    args, cfg = parse_config_args(parser, argv, load=False)
    if args.chain:
        for path in config_chain(args.config):
            print(path)
        return 0
    args, cfg = parse_config_args(parser, argv)
    yaml.safe_dump(to_plain(cfg), sys.stdout, sort_keys=False, default_flow_style=None)
    return 0


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `print_config.py CFG | head` ends quietly
    sys.exit(main())
