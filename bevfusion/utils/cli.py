"""One argument style and one error style for every tool.

Arguments: `TOOL CONFIG [--set k=v ...] [k=v ...]`. Overrides may be given after `--set`, as trailing
`key=value` arguments, or in the official torchpack form `--model.a.b VALUE` / `--model.a.b=VALUE` (a
dotted option name), so commands copied from the official README work.

Errors: every tool's `main` goes through `tool_main`, which turns an error into ONE line on stderr,

    error: <message naming the file, sample or config key>

and an exit code (the traceback only with `--debug` or `BEVFUSION_DEBUG=1`):

    0    done
    1    the run failed: a config value the engine, model or dataset refuses (the key is named), a
         missing, unreadable or inconsistent file (data, checkpoint, results), a full disk, a read-only
         folder, or an unexpected error (a bug: the line says to rerun with --debug)
    2    the command line is wrong: an unknown or ill-typed option, an impossible option value
         (`--max-samples -3`), a config file or override that does not load, or an output that would
         overwrite one of the inputs or a file of another kind (without --force)
    130  interrupted (Ctrl-C)
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import pickle
import re
import sys
import traceback
from typing import Any, Callable, Sequence

from bevfusion.config import Config, ConfigError, load_config

__all__ = ["config_parser", "parse_config_args", "split_dotted_options", "ToolParser", "UsageError", "tool_main",
           "describe_error", "one_line", "debug_requested", "int_at_least", "float_in", "file_tag",
           "EXIT_FAILED", "EXIT_USAGE", "EXIT_INTERRUPTED"]

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
DEBUG_ENV = "BEVFUSION_DEBUG"
_MAX_MESSAGE = 1500

_DOTTED = re.compile(r"^--([A-Za-z_][\w-]*(?:\.[\w-]+)+)(?:=(.*))?$", re.S)


class UsageError(ValueError):
    """A bad command-line value or combination (exit code 2); the message names the option."""

    exit_code = EXIT_USAGE


class ToolParser(argparse.ArgumentParser):
    """argparse with the tools' error style (one `error: ...` line, exit code 2) and a `--debug` flag.

    `--debug` is consumed by `tool_main` before parsing; it is declared here for `--help`.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true",
                          help=f"show the full traceback of an error (also {DEBUG_ENV}=1)")

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"error: {one_line(message)} (see {self.prog} --help)\n")


def config_parser(description: str, config_required: bool = True) -> ToolParser:
    """A ToolParser with the shared CONFIG / --set / trailing-override arguments."""
    parser = ToolParser(
        description=description,
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
    Raises UsageError for `--set` without a value or a dotted option without one.
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
                raise UsageError("--set needs at least one KEY=VALUE")
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
                raise UsageError(f"option {arg} needs a value")
        elif not arg.startswith("-") and "=" in arg and re.match(r"^\+?[A-Za-z_][\w.-]*=", arg):
            overrides.append(arg)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def parse_config_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
                      load: bool = True) -> tuple[argparse.Namespace, Config | None]:
    """Parse `argv` and load the config with every override applied.

    A ConfigError ends the program with one `error: ...` line (which names the file and key) and exit
    code 2.
    """
    argv = sys.argv[1:] if argv is None else argv
    try:
        rest, extra = split_dotted_options(argv)
    except UsageError as exc:
        parser.exit(EXIT_USAGE, f"error: {exc}\n")
    args = parser.parse_args(rest)
    args.overrides = list(args.overrides) + extra
    if not load or args.config is None:
        return args, None
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        parser.exit(EXIT_USAGE, f"error: {one_line(str(exc))}\n")
    return args, cfg


# ---------------------------------------------------------------------------------------------------
# argparse value types: the option name comes from argparse ("argument --max-samples: must be >= 1, got -3")


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse `type` for integers >= `low` (refuses 1.5, -3, 'abc')."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def float_in(low: float, high: float) -> Callable[[str], float]:
    """An argparse `type` for finite numbers in [low, high]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in [{low}, {high}], got {text!r}") from None
        if not low <= value <= high:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {text}")
        return value

    parse.__name__ = f"number in [{low}, {high}]"
    return parse


def file_tag(text: str) -> str:
    """An argparse `type` for a file-name prefix: letters, digits, '.', '_', '-'; no path separators, no
    leading dot (so no '..' and no hidden files): outputs stay inside the output folder."""
    if not re.fullmatch(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*", text or "") or ".." in text:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a plain file-name prefix (letters, digits, '.', '_', '-'; no '/', no '..', "
            "not starting with '.')")
    return text


# ---------------------------------------------------------------------------------------------------
# The entry wrapper


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """`--debug` among the options (before a `--`), or BEVFUSION_DEBUG set to a true value."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off"):
        return True
    if argv is None:
        return False
    argv = list(argv)
    return "--debug" in argv[: argv.index("--") if "--" in argv else len(argv)]


def one_line(text: str) -> str:
    """`text` on one line: lines joined with '; ' (or a space after a colon), whitespace collapsed,
    at most ~1500 characters."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    out = ""
    for ln in lines:
        out = ln if not out else out + (" " if out.endswith(":") else "; ") + ln
    out = re.sub(r"\s+", " ", out)
    return out if len(out) <= _MAX_MESSAGE else out[:_MAX_MESSAGE - 3] + "..."


_WORKER = re.compile(r"Caught (\w+) in (DataLoader worker process \d+)\.\s*Original Traceback", re.S)


def _from_worker(text: str) -> str:
    """A DataLoader re-raises a worker's exception with the worker's traceback in its message: keep
    the original message (the traceback's last line, without its type) and say which worker."""
    m = _WORKER.search(text)
    if not m:
        return text
    last = [ln for ln in text.splitlines() if ln.strip()][-1].strip()
    last = re.sub(r"^[\w.]*(Error|Exception|Warning)\w*: ", "", last)
    return f"{last} (in {m.group(2)})"


def describe_error(exc: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for an exception that ended a tool (see the module docstring)."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        target = f"{exc.filename} -> {exc.filename2}" if exc.filename2 else f"{exc.filename}"
        text = f"{target}: {exc.strerror}"
    elif isinstance(exc, OSError) and exc.strerror and exc.filename is None:
        text = exc.strerror  # our own OSErrors carry the whole message there
    elif isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = exc.args[0]
    else:
        text = str(exc)
    text = one_line(_from_worker(text))
    code = getattr(exc, "exit_code", None)
    if code is None:
        code = EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAILED
    known = getattr(exc, "exit_code", None) is not None or isinstance(
        exc, (ValueError, KeyError, OSError, pickle.UnpicklingError))
    if not known:
        text = f"{type(exc).__name__}: {text or '(no message)'} (unexpected; rerun with --debug for the traceback)"
    return int(code), text or type(exc).__name__


def tool_main(fn: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a tool's `main(argv, **kwargs)`: the result is its exit code, and an error becomes one
    `error: ...` line on stderr (the traceback before it with `--debug` / BEVFUSION_DEBUG=1).

    `--debug` is removed from argv before `fn` sees it. argparse's own exits (`--help`, usage errors)
    pass through as SystemExit, as they do without the wrapper.
    """

    @functools.wraps(fn)
    def main(argv: Sequence[str] | None = None, **kwargs: Any) -> int:
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = debug_requested(argv)
        end = argv.index("--") if "--" in argv else len(argv)
        argv = [a for a in argv[:end] if a != "--debug"] + argv[end:]
        raise_exceptions = logging.raiseExceptions
        logging.raiseExceptions = debug  # a log file on a full disk: no "--- Logging error ---" traceback
        try:
            rc = fn(argv, **kwargs)
            return 0 if rc is None else int(rc)
        except KeyboardInterrupt:
            _flush()
            if debug:
                traceback.print_exc()
            print("error: interrupted", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        except Exception as exc:
            _flush()
            code, text = describe_error(exc)
            if debug:
                traceback.print_exc()
            print(f"error: {text}", file=sys.stderr, flush=True)
            return code
        finally:
            logging.raiseExceptions = raise_exceptions

    return main


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
