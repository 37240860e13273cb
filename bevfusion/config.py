"""YAML configs in the official BEVFusion layout.

Loading `configs/a/b/c.yaml` merges, in this order, `configs/default.yaml`, `configs/a/default.yaml`,
`configs/a/b/default.yaml` (each if present, `default.yml` as a fallback) and finally `c.yaml`; deeper
files win. Mappings merge key by key; scalars and lists are replaced whole; `null` replaces a value
(that is how a child removes a submodule) and a mapping replaces a `null`. There is no `_base_` key:
inheritance comes from the directory tree alone, so the official config files load unchanged.

After the merge (and after command-line overrides), a string value that starts with `${` and ends
with `}` is an expression over the merged tree: top-level keys are names, nested mappings are reached
with `.` or `["key"]`, and indexing, slicing, list/tuple literals and arithmetic work, e.g.
`${voxel_size[:2]}`, `${augment2d.resize[0]}`, `${dataset_root + "nuscenes_infos_train.pkl"}`,
`${[image_size[0] // 8, image_size[1] // 8]}`. Expressions are parsed with `ast` and evaluated by a
small interpreter that allows only those node kinds: no calls, no attribute access outside the config,
no dunder names, never `eval`. Because evaluation happens after the merge, a child's `voxel_size`
reaches every `${voxel_size}` in its parents.

Overrides (`load_config(path, overrides)`) are `key.sub=value` strings typed by YAML rules, as the
command line gives them, or a mapping `{"key.sub": value}` of values already typed; either way a
value replaces the key's whole value (see `apply_overrides`).

Every error is a `ConfigError` that names the file and the key path.

A config is user input, so loading is bounded: a hostile or broken file ends in a `ConfigError`
within about a second at most, instead of hanging or exhausting memory. The bounds (module constants) sit far
above what real configs use (the largest official config: 1,203 YAML nodes over its chain, nesting
9 deep, 2,088 values once resolved, expressions of under 50 characters):

- `MAX_FILE_BYTES` (1 MiB) per YAML file; `MAX_YAML_NODES` (20,000) YAML nodes per load, over all
  files of the chain and the overrides, counted while parsing with aliases expanded (so an alias
  "billion laughs" fails before any Python object is built); a scalar counts one node per 64
  characters; recursive aliases are refused.
- `MAX_DEPTH` (48) levels of nesting, in files, in override keys and values, and in resolved values.
- Per `${...}`: `MAX_EXPR_CHARS` (4,096) characters and `MAX_EXPR_DEPTH` (32) levels of syntax.
- Every value an expression computes, checked before the operation where the size is known in
  advance (`*`, `+`, `**`, `%`): integers of at most `MAX_INT_BITS` (1,024) bits (the float range),
  strings of at most `MAX_STR_LEN` (65,536) characters, lists of at most `MAX_SEQ_LEN` (100,000)
  items; complex results are refused; a float may overflow to `inf` only where Python itself gives
  `inf` (an `OverflowError` is a `ConfigError`). `str % value` formatting takes one number or string
  and widths/precisions of at most 1,000.
- `MAX_EVAL_STEPS` (1,000,000) units of evaluation work per load: one per syntax node, per value
  resolved or copied and per 64 characters parsed or copied, so many keys each doing bounded work
  still end (the largest official config uses about 1% of it).
- `MAX_NESTING` (200) levels of keys being resolved at once plus expression levels being
  evaluated (reference chains `a: ${b}`, `b: ${c}`, ...), which keeps the resolver within Python's
  recursion limit.
"""
from __future__ import annotations

import ast
import copy
import difflib
import errno
import numbers
import operator
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

__all__ = [
    "Config",
    "ConfigError",
    "load_config",
    "load_yaml",
    "config_chain",
    "apply_overrides",
    "resolve",
    "evaluate_expression",
    "dump_config",
    "to_plain",
]

DEFAULT_NAMES = ("default.yaml", "default.yml")

# Bounds on loading (see the module docstring); real configs use a small fraction of each.
MAX_FILE_BYTES = 1 << 20
MAX_YAML_NODES = 20_000
MAX_DEPTH = 48
MAX_EXPR_CHARS = 4_096
MAX_EXPR_DEPTH = 32
MAX_INT_BITS = 1_024
MAX_STR_LEN = 65_536
MAX_SEQ_LEN = 100_000
MAX_EVAL_STEPS = 1_000_000
MAX_NESTING = 200
_CHARS_PER_UNIT = 64  # a string costs one node / step per this many characters
_MAX_FORMAT_WIDTH = 1_000


class ConfigError(ValueError):
    """A config problem, with the file and the dotted key path it concerns (either may be None)."""

    def __init__(self, message: str, file: str | os.PathLike | None = None, key: str | None = None):
        self.file = None if file is None else os.fspath(file)
        self.key = key
        where = ", ".join(p for p in (self.file and f"file {self.file}", key and f"key {key}") if p)
        super().__init__(f"{where}: {message}" if where else message)


class Config(dict):
    """A dict with attribute access for its string keys (`cfg.model.fuser.in_channels`).

    Nested mappings are `Config` too (lists keep their elements converted). Setting an attribute sets
    the key. Missing attributes raise AttributeError naming the key, so `getattr(cfg, k, default)` works.
    """

    def __init__(self, *args, **kwargs):
        super().__init__()
        for k, v in dict(*args, **kwargs).items():
            self[k] = v

    def __setitem__(self, key, value):
        super().__setitem__(key, _wrap(value))

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r} (keys: {', '.join(map(str, self))})") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __deepcopy__(self, memo):
        return Config({k: copy.deepcopy(v, memo) for k, v in self.items()})

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, *args, **kwargs):
        for k, v in dict(*args, **kwargs).items():
            self[k] = v


def _wrap(value: Any) -> Any:
    if isinstance(value, Config):
        return value
    if isinstance(value, Mapping):
        return Config(value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


def to_plain(value: Any) -> Any:
    """Convert `Config` trees (and tuples) back into plain dicts and lists, e.g. for YAML dumping."""
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------
# YAML reading


class _YAMLLimitError(yaml.composer.ComposerError):
    """A YAML document beyond the loader's bounds (not a syntax error)."""


class _StrictSafeLoader(yaml.SafeLoader):
    """Safe loader that rejects duplicate keys, reads `1e-4` as a float (YAML 1.2 style) and bounds
    the document: at most `max_nodes` nodes counted with aliases expanded, `MAX_DEPTH` levels of
    nesting (also with aliases expanded), no recursive aliases. The bounds are checked while the
    node graph is composed, before any Python object is constructed.
    """

    max_nodes = MAX_YAML_NODES

    def __init__(self, stream):
        super().__init__(stream)
        self.expanded_nodes = 0  # nodes so far, aliases expanded; a scalar counts per 64 characters
        self._depth = 0
        self._size: dict[yaml.Node, tuple[int, int]] = {}  # finished node -> (expanded nodes, depth)
        self._written: dict[yaml.MappingNode, list] = {}  # mapping -> its pairs as written (no merges)

    def _limit(self, problem: str, event: yaml.Event) -> "_YAMLLimitError":
        return _YAMLLimitError(None, None, problem, event.start_mark)

    def _count(self, units: int, event: yaml.Event) -> None:
        self.expanded_nodes += units
        if self.expanded_nodes > self.max_nodes:
            raise self._limit(f"more YAML nodes than the limit MAX_YAML_NODES ({MAX_YAML_NODES:,} per "
                              "load over the inherited files and the overrides, aliases expanded)", event)

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None:  # an undefined alias is left to PyYAML's own error
                if target not in self._size:
                    raise self._limit(f"alias *{event.anchor} refers to a node that contains it "
                                      "(recursive aliases are not allowed)", event)
                size, depth = self._size[target]
                if self._depth + depth > MAX_DEPTH:
                    raise self._limit(f"nesting deeper than {MAX_DEPTH} levels (aliases expanded)", event)
                self._count(size, event)
            return super().compose_node(parent, index)
        if self._depth >= MAX_DEPTH:
            raise self._limit(f"nesting deeper than {MAX_DEPTH} levels", event)
        self._depth += 1
        before = self.expanded_nodes
        if isinstance(event, yaml.ScalarEvent):
            self._count(1 + len(event.value) // _CHARS_PER_UNIT, event)
        else:
            self._count(1, event)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, yaml.MappingNode):
            self._written[node] = list(node.value)
        if isinstance(node, yaml.ScalarNode):
            depth = 1
        else:
            children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) \
                else node.value
            depth = 1 + max((self._size[c][1] for c in children), default=0)
        self._size[node] = (self.expanded_nodes - before, depth)
        return node


_MERGE_KEY = object()  # stands for `<<` keys in the duplicate check


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    # Duplicates are looked for among the keys written in this mapping, before `<<` merges are
    # flattened into it (keys it overrides from a merged mapping are not duplicates). The pairs as
    # written were saved while composing, because a mapping used as a merge source is flattened
    # in place, possibly before it is constructed itself.
    written = getattr(loader, "_written", {}).get(node, node.value)
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in written:
        key = _MERGE_KEY if key_node.tag == "tag:yaml.org,2002:merge" \
            else loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, "found unhashable key",
                key_node.start_mark) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {'<<' if key is _MERGE_KEY else repr(key)}", key_node.start_mark)
        seen[key] = key_node
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=deep)


_StrictSafeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# YAML 1.1 (PyYAML) reads `1e-4` as a string; configs mean a float.
_StrictSafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _close_matches(word: Any, candidates: Iterable[Any]) -> list[str]:
    """difflib suggestions, kept cheap: short words only, against at most 5,000 short candidates."""
    word = str(word)
    if len(word) > 64:
        return []
    short = [str(c) for c in candidates if len(str(c)) <= 64][:5000]
    return difflib.get_close_matches(word, short, n=3)


def _parse_yaml(text: str, source: str, max_nodes: int = MAX_YAML_NODES, key: str | None = None,
                prefix: str = "") -> tuple[Any, int]:
    """Parse one YAML document within the bounds; returns (data, nodes counted with aliases expanded)."""
    what = f"{prefix}YAML syntax error"
    loader = _StrictSafeLoader(text)
    loader.max_nodes = max_nodes
    try:
        return loader.get_single_data(), loader.expanded_nodes
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        if isinstance(exc, _YAMLLimitError):
            what = f"{prefix}YAML beyond the loader's bounds"
        raise ConfigError(f"{what}{where}: {problem}", file=source, key=key) from None
    except (ValueError, TypeError, OverflowError) as exc:  # from a constructor, e.g. a 5,000-digit int
        raise ConfigError(f"{prefix}YAML value cannot be read: {_clip(str(exc))}", file=source, key=key) \
            from None
    except RecursionError:  # a safety net: MAX_DEPTH keeps PyYAML's recursion well inside the limit
        raise ConfigError(f"{what}: nesting too deep", file=source, key=key) from None
    finally:
        loader.dispose()


def _file_problem(path: Path) -> str | None:
    """None if nothing is at `path`, "" for a regular file, else what is wrong with it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "is a broken symbolic link (its target does not exist)" if path.is_symlink() else None
    except NotADirectoryError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symbolic link loop"
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISDIR(st.st_mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    return ""


def _read_yaml(path: Path, max_nodes: int) -> tuple[dict, int]:
    problem = _file_problem(path)
    if problem is None:
        raise ConfigError("config file not found", file=path)
    if problem:
        raise ConfigError(f"config file {problem}", file=path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config file ({exc.strerror or exc})", file=path) from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"config file is larger than {MAX_FILE_BYTES:,} bytes (limit MAX_FILE_BYTES)",
                          file=path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file is not UTF-8 text (byte {exc.start})", file=path) from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as read_text gives
    data, nodes = _parse_yaml(text, os.fspath(path), max_nodes)
    if data is None:
        return {}, nodes
    if not isinstance(data, dict):
        raise ConfigError(f"top level must be a mapping, got {type(data).__name__}", file=path)
    return data, nodes


def load_yaml(path: str | os.PathLike) -> Any:
    """Safe-load one YAML file (within the bounds of the module docstring); empty gives an empty mapping."""
    return _read_yaml(Path(path), MAX_YAML_NODES)[0]


def config_chain(path: str | os.PathLike, root: str | os.PathLike | None = None) -> list[Path]:
    """The files merged for `path`, root-most first, the file itself last.

    `root` is the top directory whose `default.yaml` is the first one read. By default it is the
    nearest ancestor directory named `configs`; without one, the walk goes up the path as written
    (as torchpack does for a relative path), or covers only the file's own directory for an absolute
    path. A `default.yaml` (or `default.yml`) that exists but is not a readable regular file (a
    directory, a broken symbolic link, a link loop) is an error naming it, never skipped.
    """
    path = Path(path)
    problem = _file_problem(path)
    if problem is None:
        raise ConfigError("config file not found", file=path)
    if problem:
        raise ConfigError(f"config file {problem}", file=path)
    parent = path.parent
    if root is None:
        names = [p for p in [parent, *parent.parents] if p.name == "configs"]
        if names:
            root = names[0]
        elif not path.is_absolute():
            root = Path(parent.parts[0]) if parent.parts else Path(".")
        else:
            root = parent
    root = Path(root)
    dirs = [parent]
    if parent.resolve() != root.resolve():
        for p in parent.parents:
            dirs.append(p)
            if p.resolve() == root.resolve():
                break
        else:
            raise ConfigError(f"config is not inside the root directory {root}", file=path)
    chain: list[Path] = []
    for d in reversed(dirs):
        for name in DEFAULT_NAMES:
            candidate = d / name
            problem = _file_problem(candidate)
            if problem is None:
                continue
            if problem:
                raise ConfigError(f"inherited default config {problem}; {path} would inherit it "
                                  "(fix or remove it)", file=candidate)
            if candidate.resolve() != path.resolve():
                chain.append(candidate)
            break
    chain.append(path)
    return chain


# ---------------------------------------------------------------------------------------------------
# Merging


def _merge(base: Any, incoming: Any, origin: dict[tuple, str], source: str, prefix: tuple = ()) -> Any:
    """Merge `incoming` into `base` (both plain YAML trees), recording which file set each key."""
    if isinstance(incoming, dict):
        if not isinstance(base, dict):
            base = {}
        for key, value in incoming.items():
            base[key] = _merge(base.get(key), value, origin, source, prefix + (key,))
        origin.setdefault(prefix, source)
        return base
    _record(origin, prefix, incoming, source)
    return copy.deepcopy(incoming)


def _record(origin: dict[tuple, str], prefix: tuple, value: Any, source: str) -> None:
    origin[prefix] = source
    if isinstance(value, dict):
        for k, v in value.items():
            _record(origin, prefix + (k,), v, source)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _record(origin, prefix + (i,), v, source)


def _key_str(path: Sequence) -> str:
    return ".".join(str(p) for p in path) if path else "<root>"


# ---------------------------------------------------------------------------------------------------
# Overrides

_COMMAND_LINE = "<command line>"  # the `file` of errors in `key=value` string overrides
_MAPPING = "<overrides>"  # the `file` of errors in mapping overrides


def _parse_override_value(text: str, key: str, max_nodes: int = MAX_YAML_NODES) -> tuple[Any, int]:
    if not text.strip():
        return "", 0
    return _parse_yaml(text, _COMMAND_LINE, max_nodes, key=key,
                       prefix=f"cannot parse override value {_clip(text, 80)!r}: ")


def _plain_value(value: Any, key: str, depth: int, used: list[int], max_nodes: int,
                 top: str | None = None) -> Any:
    """A typed override value as a plain YAML-like tree (tuples become lists), within the bounds.

    `key` names this item (`optimizer.lr.0`), `top` the override it belongs to (`optimizer.lr`).
    """
    top = key if top is None else top
    used[0] += 1 + (len(value) // _CHARS_PER_UNIT if isinstance(value, str) else 0)
    if used[0] > max_nodes:
        raise ConfigError(f"override values have more nodes than the limit MAX_YAML_NODES "
                          f"({MAX_YAML_NODES:,} per load, shared with the config files)",
                          file=_MAPPING, key=top)
    if depth > MAX_DEPTH:
        raise ConfigError(f"override value nests deeper than {MAX_DEPTH} levels (limit MAX_DEPTH)",
                          file=_MAPPING, key=key)
    if value is None or isinstance(value, (bool, str)):
        return str(value) if isinstance(value, str) else value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not (k is None or isinstance(k, (str, int, float, bool))):
                raise ConfigError(f"mapping key {k!r} of type {type(k).__name__} is not allowed "
                                  "(use str, int, float, bool or None)", file=_MAPPING, key=key)
            out[k] = _plain_value(v, f"{key}.{k}", depth + 1, used, max_nodes, top)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain_value(v, f"{key}.{i}", depth + 1, used, max_nodes, top) for i, v in enumerate(value)]
    raise ConfigError(f"value of type {type(value).__name__} is not a config value (use None, bool, "
                      "int, float, str, and lists and mappings of them)", file=_MAPPING, key=key)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 1


def _split_key(key: str, source: str = _COMMAND_LINE) -> list[Any]:
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"malformed key {_clip(key, 80)!r}", file=source, key=_clip(key))
    parts = key.split(".")
    if len(parts) > MAX_DEPTH:
        raise ConfigError(f"key has more than {MAX_DEPTH} parts (limit MAX_DEPTH)", file=source,
                          key=_clip(key))
    return [int(p) if re.fullmatch(r"-?\d+", p) else p for p in parts]


def _override_items(overrides: Iterable[str] | Mapping[str, Any]):
    """(key, value or text, source, is_text) for each override, in order."""
    if isinstance(overrides, (str, bytes)):
        raise ConfigError(f"overrides must be an iterable of 'key=value' strings or a mapping, not the "
                          f"single string {_clip(str(overrides), 80)!r}", file=_COMMAND_LINE)
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            if not isinstance(key, str):
                raise ConfigError(f"override key {key!r} is not a string (use dotted keys such as "
                                  "'optimizer.lr')", file=_MAPPING)
            yield key, value, _MAPPING, False
        return
    for item in overrides:
        if not isinstance(item, str):
            raise ConfigError(f"override {item!r} is not a 'key.sub=value' string", file=_COMMAND_LINE)
        if "=" not in item:
            raise ConfigError(f"override {_clip(item, 80)!r} is not of the form key.sub=value",
                              file=_COMMAND_LINE)
        key, text = item.split("=", 1)
        yield key, text, _COMMAND_LINE, True


def apply_overrides(tree: dict, overrides: Iterable[str] | Mapping[str, Any], allow_new: bool = False,
                    origin: dict[tuple, str] | None = None) -> dict:
    """Apply overrides in place and return the tree.

    `overrides` is either an iterable of `key.sub=value` strings, whose values are typed by YAML
    rules, or a mapping `{"key.sub": value}` whose values are used as given (None, bool, int, float,
    str, and lists/tuples and mappings of them; numpy scalars become int/float). Keys are dotted the
    same way in both forms. Either way a value replaces the key's whole value: a mapping value
    replaces the subtree as `key={a: 1}` on the command line does (it is not merged into it), so to
    change one nested key, name that key (`{"optimizer.lr": 1e-3}`, not `{"optimizer": {"lr": ...}}`).
    A string value `${...}` is an expression in both forms.

    Integer path parts index lists (`model.heads.0.x=1`). A key path that does not exist is an error
    unless `allow_new` is true or the key starts with `+` (`+model.extra=1`); new keys may be
    created under a mapping or a `null`, never by indexing past the end of a list. Every error is a
    ConfigError naming the key (file `<command line>` for strings, `<overrides>` for a mapping).
    """
    _apply_overrides(tree, overrides, allow_new, origin, MAX_YAML_NODES)
    return tree


def _apply_overrides(tree: dict, overrides: Iterable[str] | Mapping[str, Any], allow_new: bool,
                     origin: dict[tuple, str] | None, max_nodes: int) -> int:
    """`apply_overrides` with a node budget for the values; returns the nodes they used."""
    used = [0]
    for key, value, source, is_text in _override_items(overrides):
        key = key.strip()
        add = allow_new
        if key.startswith("+"):
            key, add = key[1:], True
        parts = _split_key(key, source)
        if is_text:
            value, nodes = _parse_override_value(value, key, max_nodes - used[0])
            used[0] += nodes
            if len(parts) + _depth(value) > MAX_DEPTH + 1:
                raise ConfigError(f"key and value nest deeper than {MAX_DEPTH} levels (limit MAX_DEPTH)",
                                  file=source, key=key)
        else:
            value = _plain_value(value, key, len(parts), used, max_nodes)
        node: Any = tree
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            here = _key_str(parts[: depth + 1])
            if isinstance(node, list):
                if not isinstance(part, int) or not -len(node) <= part < len(node):
                    raise ConfigError(f"index {part!r} is out of range for a list of {len(node)}",
                                      file=source, key=here)
                if last:
                    node[part] = value
                else:
                    node = node[part]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set a key under a {type(node).__name__} value",
                                  file=source, key=here)
            if part not in node and not add:
                close = _close_matches(part, node)
                hint = f" (did you mean: {', '.join(close)})" if close else ""
                raise ConfigError(f"no such key to override{hint}; prefix the override with '+' to add it",
                                  file=source, key=here)
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        if origin is not None:
            _record(origin, tuple(parts), value, source)
    return used[0]


# ---------------------------------------------------------------------------------------------------
# Interpolation


def _is_expression(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("${") and value.endswith("}")


_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg, ast.Not: operator.not_}
_COMPARE = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge,
}
_ALLOWED_NODES = (
    ast.Constant, ast.Name, ast.Load, ast.Attribute, ast.Subscript, ast.Slice, ast.List, ast.Tuple,
    ast.BinOp, ast.UnaryOp, ast.Compare, ast.IfExp, *_BINOPS, *_UNARY, *_COMPARE,
)
_MAX_ROUNDS = 32  # a result that is an expression again is evaluated again, this many times at most
# One `%` conversion of printf-style formatting (`%%` first, so that it is not read as a width).
_FORMAT_SPEC = re.compile(r"%%|%(?:\([^)]*\))?[-#0 +]*(?P<width>\*|\d+)?(?:\.(?P<precision>\*|\d+))?")


def _units(value: Any) -> int:
    """Evaluation steps charged for handling one value (not its items)."""
    return 1 + len(value) // _CHARS_PER_UNIT if isinstance(value, str) else 1


class _Node:
    """A mapping of the config seen from inside an expression: children are resolved on access."""

    __slots__ = ("resolver", "path")

    def __init__(self, resolver: "_Resolver", path: tuple):
        self.resolver = resolver
        self.path = path

    def child(self, key: Any, expr_path: tuple) -> Any:
        raw = self.resolver.raw_at(self.path)
        if key not in raw:
            close = _close_matches(key, raw)
            hint = f" (close: {', '.join(close)})" if close else ""
            raise self.resolver.error(f"unknown key {_clip(_key_str(self.path + (key,)))!r}{hint}", expr_path)
        return self.resolver.value_at(self.path + (key,))


class _Resolver:
    """Resolves `${...}` values of one merged tree, lazily, with cycle detection.

    All work is charged to one budget of `max_steps` (see `MAX_EVAL_STEPS`); `nesting` counts the
    keys being resolved plus the expression levels being evaluated, bounded by `MAX_NESTING`.
    """

    def __init__(self, tree: dict, origin: Mapping[tuple, str], max_steps: int | None = None):
        self.tree = tree
        self.origin = origin
        self.done: dict[tuple, Any] = {}
        self.active: list[tuple] = []
        self.max_steps = MAX_EVAL_STEPS if max_steps is None else max_steps
        self.steps = 0
        self.nesting = 0

    def file_of(self, path: tuple) -> str | None:
        for n in range(len(path), -1, -1):
            if path[:n] in self.origin:
                return self.origin[path[:n]]
        return None

    def error(self, message: str, path: tuple) -> ConfigError:
        return ConfigError(message, file=self.file_of(path), key=_key_str(path))

    def charge(self, units: int, path: tuple) -> None:
        self.steps += units
        if self.steps > self.max_steps:
            raise self.error(f"evaluating the config takes more than {self.max_steps:,} steps (limit "
                             "MAX_EVAL_STEPS): expressions build values that are too large or too many",
                             path)

    def enter(self, path: tuple) -> None:
        """Count one level of nesting; the caller undoes it in a `finally` once this returned."""
        if self.nesting >= MAX_NESTING:
            raise self.error(f"references and expressions nest more than {MAX_NESTING} levels deep "
                             "(limit MAX_NESTING), e.g. a long chain of keys that refer to each other", path)
        self.nesting += 1

    def resolve_all(self, path: tuple = ()) -> Any:
        """`resolve_path` with Python's recursion limit, should it still be reached, as a ConfigError."""
        try:
            return self.resolve_path(path)
        except RecursionError:
            raise self.error("config nests too deeply to resolve (Python's recursion limit)", path) from None

    def raw_at(self, path: tuple) -> Any:
        node: Any = self.tree
        for p in path:
            node = node[p]
        return node

    def value_at(self, path: tuple) -> Any:
        """Value for expression use: mappings stay lazy, everything else is fully resolved."""
        raw = self.raw_at(path)
        if isinstance(raw, dict):
            return _Node(self, path)
        return self.resolve_path(path)

    def resolve_path(self, path: tuple) -> Any:
        if path in self.done:
            return self.done[path]
        if path in self.active:
            cycle = self.active[self.active.index(path):] + [path]
            raise self.error("interpolation cycle: " + " -> ".join(_key_str(p) for p in cycle), path)
        self.enter(path)
        self.active.append(path)
        try:
            self.charge(1, path)
            raw = self.raw_at(path)
            if isinstance(raw, dict):
                value = {k: self.resolve_path(path + (k,)) for k in raw}
            elif isinstance(raw, list):
                value = [self.resolve_path(path + (i,)) for i in range(len(raw))]
            elif _is_expression(raw):
                value = self.evaluate(raw, path)
            else:
                value = raw
        finally:
            self.active.pop()
            self.nesting -= 1
        self.done[path] = value
        return value

    def evaluate(self, text: str, path: tuple, depth: int | None = None) -> Any:
        """The value of `${...}` `text` at key `path`; `depth` is the nesting level it lands at."""
        depth = len(path) + 1 if depth is None else depth
        self.enter(path)
        try:
            for _ in range(_MAX_ROUNDS):  # results that are expressions again are evaluated again
                value = self._to_plain(self._eval_text(text[2:-1], path), path)
                if not _is_expression(value):
                    return self._resolve_nested(value, path, depth)
                text = value
        finally:
            self.nesting -= 1
        raise self.error(f"interpolation does not settle after {_MAX_ROUNDS} rounds", path)

    def _resolve_nested(self, value: Any, path: tuple, depth: int) -> Any:
        """Evaluate expressions inside a computed container (e.g. `${[a, "${b}"]}` results)."""
        if depth > MAX_DEPTH:
            raise self.error(f"value nests deeper than {MAX_DEPTH} levels (limit MAX_DEPTH)", path)
        self.charge(_units(value), path)
        if isinstance(value, dict):
            return {k: self._resolve_nested(v, path, depth + 1) for k, v in value.items()}
        if isinstance(value, list):
            return [self._resolve_nested(v, path, depth + 1) for v in value]
        if _is_expression(value):
            return self.evaluate(value, path, depth)
        return value

    def _to_plain(self, value: Any, path: tuple, depth: int = 1) -> Any:
        """A fresh plain copy (lists, dicts, scalars) of an expression value; every item is charged."""
        if isinstance(value, _Node):
            value = self.resolve_path(value.path)
        if depth > MAX_DEPTH:
            raise self.error(f"value nests deeper than {MAX_DEPTH} levels (limit MAX_DEPTH)", path)
        self.charge(_units(value), path)
        if isinstance(value, (list, tuple)):
            return [self._to_plain(v, path, depth + 1) for v in value]
        if isinstance(value, dict):
            return {k: self._to_plain(v, path, depth + 1) for k, v in value.items()}
        return value

    def _eval_text(self, source: str, path: tuple) -> Any:
        shown = _clip(source)
        if len(source) > MAX_EXPR_CHARS:
            raise self.error(f"expression ${{{shown}}} is longer than {MAX_EXPR_CHARS:,} characters "
                             "(limit MAX_EXPR_CHARS)", path)
        self.charge(1 + len(source) // _CHARS_PER_UNIT, path)
        try:
            tree = ast.parse(source.strip(), mode="eval")
        except SyntaxError as exc:
            raise self.error(f"cannot parse expression ${{{shown}}}: {exc.msg}", path) from None
        except ValueError as exc:  # e.g. a null character (a SyntaxError from Python 3.12)
            raise self.error(f"cannot parse expression ${{{shown}}}: {exc}", path) from None
        except (RecursionError, MemoryError):  # the parser's own nesting limits
            raise self.error(f"cannot parse expression ${{{shown}}}: it nests too deeply", path) from None
        # Check every node before evaluating any, so branches not taken are checked too.
        stack = [(tree.body, 1)]
        while stack:
            node, depth = stack.pop()
            if depth > MAX_EXPR_DEPTH:
                raise self.error(f"expression ${{{shown}}} nests deeper than {MAX_EXPR_DEPTH} levels "
                                 "(limit MAX_EXPR_DEPTH)", path)
            if not isinstance(node, _ALLOWED_NODES):
                raise self.error(f"expression element {type(node).__name__} is not allowed in "
                                 f"${{{shown}}} (allowed: names, keys, indexing, slicing, literals, "
                                 "lists, arithmetic)", path)
            if isinstance(node, ast.Name):
                self._check_name(node.id, path, shown)
            elif isinstance(node, ast.Attribute):
                self._check_name(node.attr, path, shown)
            self.charge(1, path)
            stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
        return self._eval(tree.body, path, shown)

    def _eval(self, node: ast.AST, path: tuple, source: str) -> Any:
        self.enter(path)
        try:
            return self._eval_node(node, path, source)
        finally:
            self.nesting -= 1

    def _eval_node(self, node: ast.AST, path: tuple, source: str) -> Any:
        ev = self._eval
        if isinstance(node, ast.Constant):
            if isinstance(node.value, (str, int, float, bool, type(None))):
                return self._checked(node.value, path, source)
        elif isinstance(node, ast.Name):
            self._check_name(node.id, path, source)
            if node.id not in self.tree:
                close = _close_matches(node.id, self.tree)
                hint = f" (close: {', '.join(close)})" if close else ""
                raise self.error(f"unknown name {node.id!r} in ${{{source}}}{hint}", path)
            return self.value_at((node.id,))
        elif isinstance(node, ast.Attribute):
            self._check_name(node.attr, path, source)
            base = ev(node.value, path, source)
            if isinstance(base, _Node):
                return base.child(node.attr, path)
            raise self.error(f"attribute access .{node.attr} is only allowed on config mappings "
                             f"in ${{{source}}}", path)
        elif isinstance(node, ast.Subscript):
            base = ev(node.value, path, source)
            index = ev(node.slice, path, source)
            if isinstance(base, _Node):
                if isinstance(index, str):
                    self._check_name(index, path, source)
                if index is not None and not isinstance(index, (str, int, float, bool)):
                    raise self.error(f"cannot index a config mapping with {type(index).__name__} "
                                     f"in ${{{source}}}", path)
                return base.child(index, path)
            if isinstance(base, (list, tuple, str)) and isinstance(index, (int, slice)) \
                    and not isinstance(index, bool):
                try:
                    item = base[index]
                except IndexError:
                    raise self.error(f"index {_clip(str(index), 40)} out of range in ${{{source}}}",
                                     path) from None
                except ValueError as exc:  # a slice step of zero
                    raise self.error(f"{exc} in ${{{source}}}", path) from None
                return self._checked(item, path, source) if isinstance(index, slice) else item
            raise self.error(f"cannot index a {type(base).__name__} with {type(index).__name__} "
                             f"in ${{{source}}}", path)
        elif isinstance(node, ast.Slice):
            parts = [None if n is None else ev(n, path, source) for n in (node.lower, node.upper, node.step)]
            if any(p is not None and (not isinstance(p, int) or isinstance(p, bool)) for p in parts):
                raise self.error(f"slice bounds must be integers in ${{{source}}}", path)
            return slice(*parts)
        elif isinstance(node, (ast.List, ast.Tuple)):
            return self._checked([self._to_plain(ev(e, path, source), path) for e in node.elts], path, source)
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left = self._to_plain(ev(node.left, path, source), path)
            right = self._to_plain(ev(node.right, path, source), path)
            allowed = (int, float, str, list)
            if not isinstance(left, allowed) or not isinstance(right, allowed):
                raise self.error(f"operator {type(node.op).__name__} on {type(left).__name__} and "
                                 f"{type(right).__name__} is not allowed in ${{{source}}}", path)
            self._check_operands(type(node.op), left, right, path, source)
            try:
                result = _BINOPS[type(node.op)](left, right)
            except (TypeError, ValueError, ZeroDivisionError, OverflowError) as exc:
                raise self.error(f"{exc} in ${{{source}}}", path) from None
            return self._checked(result, path, source)
        elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            operand = self._to_plain(ev(node.operand, path, source), path)
            if not isinstance(operand, (int, float, bool)):
                raise self.error(f"unary operator on {type(operand).__name__} in ${{{source}}}", path)
            return self._checked(_UNARY[type(node.op)](operand), path, source)
        elif isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
            left = self._to_plain(ev(node.left, path, source), path)
            for op, comp in zip(node.ops, node.comparators):
                right = self._to_plain(ev(comp, path, source), path)
                try:
                    holds = _COMPARE[type(op)](left, right)
                except TypeError:
                    raise self.error(f"cannot compare {type(left).__name__} with {type(right).__name__} "
                                     f"({type(op).__name__}) in ${{{source}}}", path) from None
                if not holds:
                    return False
                left = right
            return True
        elif isinstance(node, ast.IfExp):
            test = self._to_plain(ev(node.test, path, source), path)
            return ev(node.body, path, source) if test else ev(node.orelse, path, source)
        raise self.error(f"expression element {type(node).__name__} is not allowed in ${{{source}}} "
                         "(allowed: names, keys, indexing, slicing, literals, lists, arithmetic)", path)

    def _check_operands(self, op: type, left: Any, right: Any, path: tuple, source: str) -> None:
        """Refuse, before computing it, a binary operation whose result would exceed the bounds."""
        def refuse(what: str) -> ConfigError:
            return self.error(f"{what} in ${{{source}}}", path)

        def number(x: Any) -> bool:
            return isinstance(x, int)

        for operand in (left, right):  # e.g. a huge integer written in a YAML file
            if number(operand) and operand.bit_length() > MAX_INT_BITS:
                raise refuse(f"an integer operand of more than {MAX_INT_BITS:,} bits (limit MAX_INT_BITS)")
        if op is ast.Pow and number(left) and number(right) and right > 0 and abs(left) > 1:
            # |left| ** right has at least right * (bit_length(|left|) - 1) bits.
            if right * (abs(left).bit_length() - 1) > MAX_INT_BITS:
                raise refuse(f"the integer power would have more than {MAX_INT_BITS:,} bits "
                             "(limit MAX_INT_BITS)")
        elif op is ast.Mult and (isinstance(left, (str, list)) or isinstance(right, (str, list))):
            seq, count = (left, right) if isinstance(left, (str, list)) else (right, left)
            if number(count):
                self._check_length(type(seq), len(seq) * max(count, 0), "repetition", refuse)
        elif op is ast.Add and isinstance(left, (str, list)) and type(left) is type(right):
            self._check_length(type(left), len(left) + len(right), "concatenation", refuse)
        elif op is ast.Mod and isinstance(left, str):
            if not isinstance(right, (int, float, str)):
                raise refuse(f"string formatting with % takes one number or string, not a "
                             f"{type(right).__name__}")
            for match in _FORMAT_SPEC.finditer(left):
                for size in (match.group("width"), match.group("precision")):
                    if size and size.isdigit() and (len(size) > 6 or int(size) > _MAX_FORMAT_WIDTH):
                        raise refuse(f"a % format width or precision above {_MAX_FORMAT_WIDTH:,}")

    @staticmethod
    def _check_length(kind: type, length: int, what: str, refuse) -> None:
        limit, name, items = (MAX_STR_LEN, "MAX_STR_LEN", "characters") if kind is str \
            else (MAX_SEQ_LEN, "MAX_SEQ_LEN", "items")
        if length > limit:
            raise refuse(f"{what} would make a {kind.__name__} of {length:,} {items} (limit {name}: "
                         f"{limit:,})")

    def _checked(self, value: Any, path: tuple, source: str) -> Any:
        """`value` if it is within the bounds on computed values (charging its size), else an error."""
        if value is None or isinstance(value, (bool, float)):
            return value
        if isinstance(value, int):
            if value.bit_length() > MAX_INT_BITS:
                raise self.error(f"integer of more than {MAX_INT_BITS:,} bits (limit MAX_INT_BITS) "
                                 f"in ${{{source}}}", path)
            return value
        if isinstance(value, (str, list)):
            def refuse(what: str) -> ConfigError:
                return self.error(f"{what} in ${{{source}}}", path)
            self._check_length(type(value), len(value), "the expression", refuse)
            self.charge(_units(value) if isinstance(value, str) else 1 + len(value), path)
            return value
        raise self.error(f"a result of type {type(value).__name__} is not allowed in ${{{source}}}", path)

    def _check_name(self, name: str, path: tuple, source: str) -> None:
        if name.startswith("_"):
            raise self.error(f"name {_clip(name, 60)!r} is not allowed in ${{{source}}} (names may not "
                             "start with an underscore)", path)


def resolve(tree: dict, origin: Mapping[tuple, str] | None = None) -> dict:
    """Evaluate every `${...}` value of a merged tree and return a new plain tree (within the bounds)."""
    return _Resolver(tree, origin or {}).resolve_all()


def evaluate_expression(expression: str, tree: Mapping) -> Any:
    """Evaluate one `${...}` (or bare) expression against `tree`, with the same rules as the loader."""
    text = expression if _is_expression(expression) else "${" + expression + "}"
    resolver = _Resolver(dict(tree), {})
    try:
        return resolver.evaluate(text, ("<expression>",))
    except RecursionError:
        raise resolver.error("expression nests too deeply to evaluate (Python's recursion limit)",
                             ("<expression>",)) from None


# ---------------------------------------------------------------------------------------------------
# Public entry points


def load_config(path: str | os.PathLike, overrides: Iterable[str] | Mapping[str, Any] = (),
                allow_new_keys: bool = False, root: str | os.PathLike | None = None) -> Config:
    """Load a config with directory inheritance, apply overrides, resolve `${...}`.

    Args:
        path: the leaf YAML file, e.g. `configs/nuscenes/det/.../convfuser.yaml`.
        overrides: `key.sub=value` strings (values typed by YAML rules), or a mapping
            `{"key.sub": value}` of values already typed (`{"optimizer.lr": 1e-3,
            "model.heads.map": None}`); see `apply_overrides`.
        allow_new_keys: let overrides create keys that the files do not have.
        root: top directory of the inheritance walk (default: see `config_chain`).
    Returns:
        The resolved tree as a `Config` (a dict with attribute access).
    Raises:
        ConfigError: naming the file and key for a missing or unreadable file (an inherited
        `default.yaml` included), a YAML syntax error (with its line), an override of an unknown key
        or with a value that does not parse, an interpolation cycle, a disallowed expression, or a
        config beyond the bounds of the module docstring.
    """
    origin: dict[tuple, str] = {}
    tree: dict = {}
    nodes = 0  # MAX_YAML_NODES covers the whole chain and the override values together
    for file in config_chain(path, root):
        data, used = _read_yaml(Path(file), MAX_YAML_NODES - nodes)
        nodes += used
        tree = _merge(tree, data, origin, os.fspath(file))
    _apply_overrides(tree, overrides, allow_new_keys, origin, MAX_YAML_NODES - nodes)
    return Config(_Resolver(tree, origin).resolve_all())


def dump_config(cfg: Mapping, path: str | os.PathLike) -> None:
    """Write a (resolved) config as YAML, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(to_plain(cfg), sort_keys=False, default_flow_style=None)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
