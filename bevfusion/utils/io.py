"""File I/O that never executes code from data and never leaves a half-written file.

- `load_pickle` reads info/database pickles with a restricted unpickler: plain containers, numbers,
  strings, bytes and numpy arrays/dtypes/scalars only. Anything else (a class, a function such as
  `os.system`) raises `UnsafePickleError` naming the file and the refused global.
- `dump_pickle`, `atomic_write_bytes`, `atomic_write_text` write to a temporary file in the same folder
  and rename it over the target, so readers see the old file or the new one, never a torn one. A write
  that fails (disk full, read-only folder, file size limit) removes the temporary file, leaves the target
  as it was and raises an OSError naming the target.
- `check_writable_output` is the one answer to "may this tool write here": never over one of its own
  inputs, never over a file of another kind unless told (`--force`), never into a folder it cannot write.
"""
from __future__ import annotations

import errno
import io
import json
import os
import pickle
import pickletools
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

__all__ = [
    "UnsafePickleError",
    "load_pickle",
    "loads_pickle",
    "dump_pickle",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_writer",
    "OutputRefusedError",
    "check_writable_output",
    "describe_file",
    "is_results_pickle",
    "is_info_pickle",
    "is_plain_pickle",
    "is_metrics_json",
    "is_submission_json",
    "is_rerun_recording",
    "is_torch_checkpoint",
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
    files whose completeness another file vouches for), then rename it over `path`.

    Any failure removes the temp file and leaves `path` untouched. Write failures (disk full, read-only
    folder, permission, file size limit; torch.save reports them as a RuntimeError of its stream writer)
    are raised as an OSError whose message names `path` and says that the previous file is unchanged.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it a plain file's mode
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        failure = _write_failure(path, exc)
        if failure is not None:
            raise failure from None
        raise
    return path


def _write_failure(path: Path, exc: BaseException) -> OSError | None:
    """The OSError to report for a failed write of `path`, or None when `exc` is not a write failure."""
    if isinstance(exc, OSError) and exc.errno is not None:
        code = exc.errno
    elif isinstance(exc, RuntimeError) and re.search(r"PytorchStreamWriter|enforce fail|file write failed", str(exc)):
        code = errno.ENOSPC if _free_bytes(path.parent) < 16 * 2**20 else errno.EIO
    else:
        return None
    what = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
            errno.EFBIG: "file too large (file size limit)", errno.EIO: "write failed"}.get(code)
    if what is None:
        what = os.strerror(code).lower() if code else "write failed"
    kept = "the previous file is unchanged" if path.exists() else "nothing was written"
    err = OSError(code, f"cannot write: {what}; {kept}")
    err.filename = os.fspath(path)
    return err


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> Path:
    return atomic_writer(path, lambda f: f.write(data), "wb", fsync)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_writer(path, lambda f: f.write(text), "w")


def dump_pickle(obj: Any, path: str | os.PathLike, protocol: int = 4) -> Path:
    """Pickle `obj` atomically (protocol 4 is readable by the official Python 3.8 tools)."""
    return atomic_writer(path, lambda f: pickle.dump(obj, f, protocol=protocol), "wb")


# ---------------------------------------------------------------------------------------------------
# May a tool write here?


class OutputRefusedError(ValueError):
    """An output path a tool must not write (one of its inputs, a file of another kind without --force,
    a folder); exit code 2 at the command line. The message names the option and the file."""

    exit_code = 2


_PICKLE_NOISE = {"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "MARK"}


def _pickle_head(path: Path, n: int = 4) -> list[tuple[str, Any]]:
    """The first `n` significant opcodes of a pickle file (framing and memo opcodes skipped), read
    lazily: the file is never unpickled, so no code runs and a large file costs nothing."""
    out: list[tuple[str, Any]] = []
    try:
        with open(path, "rb") as f:
            if f.read(1) != b"\x80":
                return out
            f.seek(0)
            for op, arg, _ in pickletools.genops(f):
                if op.name in _PICKLE_NOISE:
                    continue
                out.append((op.name, arg))
                if len(out) >= n or op.name == "STOP":
                    break
    except (OSError, ValueError):
        pass
    return out


def is_results_pickle(path: str | os.PathLike) -> bool:
    """A `tools/test.py --out` file: a pickled list of records whose first key is `token` (or an empty list)."""
    head = _pickle_head(Path(path), 3)
    if not head or head[0][0] != "EMPTY_LIST":
        return False
    return head[1:2] == [("STOP", None)] or (len(head) == 3 and head[1][0] == "EMPTY_DICT" and head[2][1] == "token")


def is_info_pickle(path: str | os.PathLike) -> bool:
    """An info file: a pickled dict whose first key is `infos` or `metadata`."""
    head = _pickle_head(Path(path), 2)
    return len(head) == 2 and head[0][0] == "EMPTY_DICT" and head[1][1] in ("infos", "metadata")


def is_plain_pickle(path: str | os.PathLike) -> bool:
    """A pickle whose top level is a plain dict or list (data, not a pickled object or a legacy torch file)."""
    head = _pickle_head(Path(path), 1)
    return bool(head) and head[0][0] in ("EMPTY_DICT", "EMPTY_LIST")


def _read_start(path: Path, n: int = 256) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def is_metrics_json(path: str | os.PathLike) -> bool:
    """A `--metrics-out` file: a JSON object of numbers (and an optional `dropout` report)."""
    try:
        if os.path.getsize(path) > 16 * 2**20:
            return False
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and all(
        isinstance(v, (int, float)) or (k == "dropout" and isinstance(v, dict)) for k, v in data.items())


def is_submission_json(path: str | os.PathLike) -> bool:
    """A nuScenes submission (`results_nusc.json`): a JSON object starting with `meta` or `results`."""
    return re.match(rb'\s*\{\s*"(meta|results)"\s*:', _read_start(Path(path))) is not None


def is_rerun_recording(path: str | os.PathLike) -> bool:
    return _read_start(Path(path), 3) == b"RRF"


def is_torch_checkpoint(path: str | os.PathLike) -> bool:
    """A torch.save file: a zip archive holding `data.pkl`, or the legacy format (a pickled magic number)."""
    start = _read_start(Path(path), 4)
    if start == b"PK\x03\x04":
        import zipfile

        try:
            with zipfile.ZipFile(path) as z:
                return any(name.endswith("/data.pkl") or name == "data.pkl" for name in z.namelist())
        except (OSError, zipfile.BadZipFile):
            return False
    head = _pickle_head(Path(path), 1)
    return bool(head) and head[0][0] == "LONG1"


def describe_file(path: str | os.PathLike) -> str:
    """What an existing file looks like, for messages: 'a torch checkpoint', 'a folder', 'a JSON file', ..."""
    path = Path(path)
    if path.is_dir():
        return "a folder"
    if not path.exists():
        return "missing"
    if is_torch_checkpoint(path):
        return "a torch checkpoint"
    if is_results_pickle(path):
        return "a results pickle"
    if is_info_pickle(path):
        return "an info file"
    if is_rerun_recording(path):
        return "a rerun recording"
    start = _read_start(path, 512)
    if not start:
        return "an empty file"
    if start[:1] == b"\x80":
        return "a pickle"
    if start.lstrip()[:1] in (b"{", b"["):
        return "a JSON file"
    try:
        start.decode("utf-8")
    except UnicodeDecodeError:
        return "a binary file"
    return "a text file"


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def check_writable_output(path: str | os.PathLike, *, option: str, kind: str,
                          inputs: Iterable[str | os.PathLike | None] = (), force: bool = False,
                          accept: Callable[[Path], bool] | None = None, folder: bool = False) -> Path:
    """Check that a tool may write `path` (the value of `option`) before any work is done.

    Refused (OutputRefusedError, naming the option and the path):
    - `path` is one of `inputs` (the same file after resolving symlinks and hard links), even with `force`;
    - `path` is an existing folder (or, with `folder`, an existing file);
    - `path` exists, `accept(path)` does not recognise it as a `kind` this tool writes, and not `force`
      (`accept=None`: any existing file needs `force`).
    A folder that cannot be created or written raises PermissionError naming it.

    Args:
        kind: what the tool writes, for the message ("results pickle", "checkpoint").
        folder: `path` is a folder the tool writes into (existing folders are fine).
    Returns:
        `path` as a Path.
    """
    path = Path(path)
    for inp in inputs:
        if inp is not None and _same_file(path, Path(inp)):
            raise OutputRefusedError(f"{option} {path}: is the input {inp}; refusing to overwrite it "
                                     "(choose another output path)")
    if folder:
        if path.exists() and not path.is_dir():
            raise OutputRefusedError(f"{option} {path}: exists and is not a folder ({describe_file(path)})")
    elif path.is_dir():
        raise OutputRefusedError(f"{option} {path}: is a folder; give a file path for the {kind}")
    elif (path.exists() or path.is_symlink()) and not force and not (accept is not None and accept(path)):
        found = describe_file(path) if path.exists() else "a dangling symlink"
        what = f"is {found}, not a {kind} written by this tool" if accept is not None else f"({found})"
        raise OutputRefusedError(f"{option} {path}: exists {what}; refusing to overwrite it "
                                 "(pass --force to replace it)")
    _check_folder_writable(path if folder else path.parent, option, path)
    return path


def _check_folder_writable(folder: Path, option: str, target: Path) -> None:
    """The nearest existing ancestor of `folder` must be a writable folder (it is created later)."""
    p = folder.absolute()
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    if not p.is_dir():
        raise OutputRefusedError(f"{option} {target}: cannot write into {folder}: {p} is a file, not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        code, what = errno.EACCES, "permission denied"
        try:
            if os.statvfs(p).f_flag & os.ST_RDONLY:
                code, what = errno.EROFS, "read-only file system"
        except (OSError, AttributeError):
            pass
        raise OSError(code, f"{option} {target}: cannot write into {p}: {what}")
