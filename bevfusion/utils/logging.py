"""Timestamped logging and progress bars shared by the tools and the library."""
from __future__ import annotations

import logging
import os
import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_DATEFMT = "%Y-%m-%d %H:%M:%S"


def get_logger(name: str = "bevfusion", log_file: str | os.PathLike | None = None,
               level: int = logging.INFO) -> logging.Logger:
    """Return a logger under the `bevfusion` hierarchy with timestamped lines.

    The handler is attached to the root `bevfusion` logger once; a `log_file` adds a file handler
    (appending), so a run directory keeps its own log.
    """
    root = logging.getLogger("bevfusion")
    if not any(getattr(h, "_bevfusion", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, _DATEFMT))
        handler._bevfusion = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.setLevel(level)
        root.propagate = False
    if log_file is not None:
        path = os.fspath(log_file)
        if not any(isinstance(h, logging.FileHandler) and h.baseFilename == os.path.abspath(path)
                   for h in root.handlers):
            fh = logging.FileHandler(path)
            fh.setFormatter(logging.Formatter(_FORMAT, _DATEFMT))
            root.addHandler(fh)
    if name == "bevfusion" or name.startswith("bevfusion."):
        return logging.getLogger(name)
    return logging.getLogger(f"bevfusion.{name}")


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "",
             disable: bool | None = None, **kwargs) -> Iterator[T]:
    """Wrap an iterable in a tqdm progress bar (rate and ETA) on stderr.

    The bar is disabled when `disable` is true, or when it is None and BEVFUSION_NO_PROGRESS is set
    (tests set it to keep their output short).
    """
    from tqdm import tqdm

    if disable is None:
        disable = bool(os.environ.get("BEVFUSION_NO_PROGRESS"))
    return iter(tqdm(iterable, total=total, desc=desc, disable=disable, dynamic_ncols=True,
                     file=sys.stderr, **kwargs))
