"""File I/O that never executes code from data and never leaves a half-written file.

- `load_pickle` reads info/database pickles with a restricted unpickler: plain containers, numbers,
  strings, bytes and numpy arrays/dtypes/scalars only. Anything else (a class, a function such as
  `os.system`) raises `UnsafePickleError` naming the file and the refused global.
- `dump_pickle`, `atomic_write_bytes`, `atomic_write_text` write to a temporary file in the same folder
  and rename it over the target, so readers see the old file or the new one, never a torn one.
"""
from __future__ import annotations

import io
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = [
    "UnsafePickleError",
    "load_pickle",
    "loads_pickle",
    "dump_pickle",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_writer",
]


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle referred to a global that is not on the allow-list."""



def _numpy_core_module(suffix: str) -> str:
    """The running numpy's spelling of numpy.core.<suffix> / numpy._core.<suffix>."""
    import importlib

    for prefix in ("numpy._core", "numpy.core") if np.__version__ >= "2" else ("numpy.core", "numpy._core"):
        try:
            importlib.import_module(prefix + suffix)
            return prefix + suffix
        except ImportError:
            continue
    return "numpy.core" + suffix

# (module, name) pairs a data pickle may reference. numpy's own module was renamed from numpy.core
# to numpy._core in numpy 2; both spellings are accepted and mapped to the running numpy.
_ALLOWED = {
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "str"), ("builtins", "bytes"), ("builtins", "bytearray"),
    ("builtins", "int"), ("builtins", "float"), ("builtins", "complex"), ("builtins", "bool"),
    ("builtins", "slice"), ("builtins", "range"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # protocol-2 pickles store bytes as codecs.encode(str, "latin1")
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}
# numpy scalar and dtype classes (numpy.float64, numpy.dtypes.Float64DType, ...) are allowed by prefix.
_NUMPY_TYPE_MODULES = ("numpy", "numpy.dtypes")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            if module.startswith(("numpy.core", "numpy._core")):
                module = _numpy_core_module(module.split("core", 1)[1])
            return super().find_class(module, name)
        if module in _NUMPY_TYPE_MODULES:
            obj = getattr(np, name, None) if module == "numpy" else getattr(getattr(np, "dtypes", None), name, None)
            if isinstance(obj, type) and (issubclass(obj, np.generic) or issubclass(obj, np.dtype)):
                return obj
        raise UnsafePickleError(
            f"{self.source}: refusing to unpickle global {module}.{name}: data files may only contain "
            "plain containers, numbers, strings and numpy arrays")


def loads_pickle(data: bytes, source: str = "<bytes>") -> Any:
    """Restricted `pickle.loads` (see module docstring)."""
    return _RestrictedUnpickler(io.BytesIO(data), source).load()


def load_pickle(path: str | os.PathLike) -> Any:
    """Restricted `pickle.load` of a file; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    with open(path, "rb") as f:
        try:
            return _RestrictedUnpickler(f, os.fspath(path)).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
            raise pickle.UnpicklingError(f"{path}: not a readable pickle ({exc})") from None


def atomic_writer(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb",
                  fsync: bool = True) -> Path:
    """Call `write(file)` on a temp file beside `path`, fsync it (unless `fsync` is false: for many small
    files whose completeness another file vouches for), then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> Path:
    return atomic_writer(path, lambda f: f.write(data), "wb", fsync)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_writer(path, lambda f: f.write(text), "w")


def dump_pickle(obj: Any, path: str | os.PathLike, protocol: int = 4) -> Path:
    """Pickle `obj` atomically (protocol 4 is readable by the official Python 3.8 tools)."""
    return atomic_writer(path, lambda f: pickle.dump(obj, f, protocol=protocol), "wb")
