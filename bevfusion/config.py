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

Every error is a `ConfigError` that names the file and the key path.
"""
from __future__ import annotations

import ast
import copy
import difflib
import operator
import os
import re
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


class _StrictSafeLoader(yaml.SafeLoader):
    """Safe loader that rejects duplicate keys and reads `1e-4` as a float (YAML 1.2 style)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    loader.flatten_mapping(node)
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {key!r}", key_node.start_mark)
        seen[key] = key_node
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


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictSafeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"YAML syntax error{where}: {problem}", file=source) from None


def load_yaml(path: str | os.PathLike) -> Any:
    """Safe-load one YAML file; an empty file gives an empty mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file not found", file=path)
    data = _parse_yaml(path.read_text(encoding="utf-8"), os.fspath(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"top level must be a mapping, got {type(data).__name__}", file=path)
    return data


def config_chain(path: str | os.PathLike, root: str | os.PathLike | None = None) -> list[Path]:
    """The files merged for `path`, root-most first, the file itself last.

    `root` is the top directory whose `default.yaml` is the first one read. By default it is the
    nearest ancestor directory named `configs`; without one, the walk goes up the path as written
    (as torchpack does for a relative path), or covers only the file's own directory for an absolute
    path.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file not found", file=path)
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
            if candidate.is_file():
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


def _parse_override_value(text: str, key: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictSafeLoader) if text.strip() else ""  # noqa: S506
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse override value {text!r}: {exc}", file="<command line>", key=key) \
            from None


def _split_key(key: str) -> list[Any]:
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"malformed key {key!r}", file="<command line>", key=key)
    return [int(p) if re.fullmatch(r"-?\d+", p) else p for p in key.split(".")]


def apply_overrides(tree: dict, overrides: Iterable[str], allow_new: bool = False,
                    origin: dict[tuple, str] | None = None) -> dict:
    """Apply `key.sub=value` overrides in place (values typed by YAML rules) and return the tree.

    Integer path parts index lists (`model.heads.0.x=1`). A key path that does not exist is an error
    unless `allow_new` is true or the override starts with `+` (`+model.extra=1`); new keys may be
    created under a mapping or a `null`, never by indexing past the end of a list.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value", file="<command line>")
        key, text = item.split("=", 1)
        key = key.strip()
        add = allow_new
        if key.startswith("+"):
            key, add = key[1:], True
        parts = _split_key(key)
        value = _parse_override_value(text, key)
        node: Any = tree
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            here = _key_str(parts[: depth + 1])
            if isinstance(node, list):
                if not isinstance(part, int) or not -len(node) <= part < len(node):
                    raise ConfigError(f"index {part!r} is out of range for a list of {len(node)}",
                                      file="<command line>", key=here)
                if last:
                    node[part] = value
                else:
                    node = node[part]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set a key under a {type(node).__name__} value",
                                  file="<command line>", key=here)
            if part not in node and not add:
                close = difflib.get_close_matches(str(part), [str(k) for k in node], n=3)
                hint = f" (did you mean: {', '.join(close)})" if close else ""
                raise ConfigError(f"no such key to override{hint}; prefix the override with '+' to add it",
                                  file="<command line>", key=here)
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        if origin is not None:
            _record(origin, tuple(parts), value, "<command line>")
    return tree


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
_MAX_POW = 64
_ALLOWED_NODES = (
    ast.Constant, ast.Name, ast.Load, ast.Attribute, ast.Subscript, ast.Slice, ast.List, ast.Tuple,
    ast.BinOp, ast.UnaryOp, ast.Compare, ast.IfExp, *_BINOPS, *_UNARY, *_COMPARE,
)


class _Node:
    """A mapping of the config seen from inside an expression: children are resolved on access."""

    __slots__ = ("resolver", "path")

    def __init__(self, resolver: "_Resolver", path: tuple):
        self.resolver = resolver
        self.path = path

    def child(self, key: Any, expr_path: tuple) -> Any:
        raw = self.resolver.raw_at(self.path)
        if key not in raw:
            close = difflib.get_close_matches(str(key), [str(k) for k in raw], n=3)
            hint = f" (close: {', '.join(close)})" if close else ""
            raise self.resolver.error(f"unknown key {_key_str(self.path + (key,))!r}{hint}", expr_path)
        return self.resolver.value_at(self.path + (key,))


class _Resolver:
    """Resolves `${...}` values of one merged tree, lazily, with cycle detection."""

    def __init__(self, tree: dict, origin: Mapping[tuple, str]):
        self.tree = tree
        self.origin = origin
        self.done: dict[tuple, Any] = {}
        self.active: list[tuple] = []

    def file_of(self, path: tuple) -> str | None:
        for n in range(len(path), -1, -1):
            if path[:n] in self.origin:
                return self.origin[path[:n]]
        return None

    def error(self, message: str, path: tuple) -> ConfigError:
        return ConfigError(message, file=self.file_of(path), key=_key_str(path))

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
        self.active.append(path)
        try:
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
        self.done[path] = value
        return value

    def evaluate(self, text: str, path: tuple) -> Any:
        for _ in range(32):  # results that are expressions again are evaluated again
            value = self._to_plain(self._eval_text(text[2:-1], path), path)
            if not _is_expression(value):
                return self._resolve_nested(value, path)
            text = value
        raise self.error("interpolation does not settle after 32 rounds", path)

    def _resolve_nested(self, value: Any, path: tuple) -> Any:
        """Evaluate expressions inside a computed container (e.g. `${[a, "${b}"]}` results)."""
        if isinstance(value, dict):
            return {k: self._resolve_nested(v, path) for k, v in value.items()}
        if isinstance(value, list):
            return [self._resolve_nested(v, path) for v in value]
        if _is_expression(value):
            return self.evaluate(value, path)
        return value

    def _to_plain(self, value: Any, path: tuple) -> Any:
        if isinstance(value, _Node):
            return self.resolve_path(value.path)
        if isinstance(value, tuple):
            return [self._to_plain(v, path) for v in value]
        if isinstance(value, list):
            return [self._to_plain(v, path) for v in value]
        return value

    def _eval_text(self, source: str, path: tuple) -> Any:
        try:
            tree = ast.parse(source.strip(), mode="eval")
        except SyntaxError as exc:
            raise self.error(f"cannot parse expression ${{{source}}}: {exc.msg}", path) from None
        # Check every node before evaluating any, so branches not taken are checked too.
        for node in ast.walk(tree.body):
            if not isinstance(node, _ALLOWED_NODES):
                raise self.error(f"expression element {type(node).__name__} is not allowed in "
                                 f"${{{source}}} (allowed: names, keys, indexing, slicing, literals, "
                                 "lists, arithmetic)", path)
            if isinstance(node, ast.Name):
                self._check_name(node.id, path, source)
            elif isinstance(node, ast.Attribute):
                self._check_name(node.attr, path, source)
        return self._eval(tree.body, path, source)

    def _eval(self, node: ast.AST, path: tuple, source: str) -> Any:
        ev = lambda n: self._eval(n, path, source)  # noqa: E731
        if isinstance(node, ast.Constant):
            if isinstance(node.value, (str, int, float, bool, type(None))):
                return node.value
        elif isinstance(node, ast.Name):
            self._check_name(node.id, path, source)
            if node.id not in self.tree:
                close = difflib.get_close_matches(node.id, [str(k) for k in self.tree], n=3)
                hint = f" (close: {', '.join(close)})" if close else ""
                raise self.error(f"unknown name {node.id!r} in ${{{source}}}{hint}", path)
            return self.value_at((node.id,))
        elif isinstance(node, ast.Attribute):
            self._check_name(node.attr, path, source)
            base = ev(node.value)
            if isinstance(base, _Node):
                return base.child(node.attr, path)
            raise self.error(f"attribute access .{node.attr} is only allowed on config mappings "
                             f"in ${{{source}}}", path)
        elif isinstance(node, ast.Subscript):
            base = ev(node.value)
            index = ev(node.slice)
            if isinstance(base, _Node):
                if isinstance(index, str):
                    self._check_name(index, path, source)
                return base.child(index, path)
            if isinstance(base, (list, tuple, str)) and isinstance(index, (int, slice)) \
                    and not isinstance(index, bool):
                try:
                    return base[index]
                except IndexError:
                    raise self.error(f"index {index} out of range in ${{{source}}}", path) from None
            raise self.error(f"cannot index a {type(base).__name__} with {type(index).__name__} "
                             f"in ${{{source}}}", path)
        elif isinstance(node, ast.Slice):
            parts = [None if n is None else ev(n) for n in (node.lower, node.upper, node.step)]
            if any(p is not None and (not isinstance(p, int) or isinstance(p, bool)) for p in parts):
                raise self.error(f"slice bounds must be integers in ${{{source}}}", path)
            return slice(*parts)
        elif isinstance(node, (ast.List, ast.Tuple)):
            return [self._to_plain(ev(e), path) for e in node.elts]
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = self._to_plain(ev(node.left), path), self._to_plain(ev(node.right), path)
            allowed = (int, float, str, list)
            if not isinstance(left, allowed) or not isinstance(right, allowed):
                raise self.error(f"operator {type(node.op).__name__} on {type(left).__name__} and "
                                 f"{type(right).__name__} is not allowed in ${{{source}}}", path)
            if isinstance(node.op, ast.Pow) and isinstance(right, (int, float)) and abs(right) > _MAX_POW:
                raise self.error(f"exponent too large in ${{{source}}}", path)
            if isinstance(node.op, ast.Mult) and (isinstance(left, (str, list)) or isinstance(right, (str, list))):
                count = right if isinstance(left, (str, list)) else left
                if isinstance(count, int) and count > 10_000:
                    raise self.error(f"repetition too large in ${{{source}}}", path)
            try:
                return _BINOPS[type(node.op)](left, right)
            except (TypeError, ZeroDivisionError) as exc:
                raise self.error(f"{exc} in ${{{source}}}", path) from None
        elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            operand = self._to_plain(ev(node.operand), path)
            if not isinstance(operand, (int, float, bool)):
                raise self.error(f"unary operator on {type(operand).__name__} in ${{{source}}}", path)
            return _UNARY[type(node.op)](operand)
        elif isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
            left = self._to_plain(ev(node.left), path)
            for op, comp in zip(node.ops, node.comparators):
                right = self._to_plain(ev(comp), path)
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        elif isinstance(node, ast.IfExp):
            return ev(node.body) if self._to_plain(ev(node.test), path) else ev(node.orelse)
        raise self.error(f"expression element {type(node).__name__} is not allowed in ${{{source}}} "
                         "(allowed: names, keys, indexing, slicing, literals, lists, arithmetic)", path)

    def _check_name(self, name: str, path: tuple, source: str) -> None:
        if name.startswith("_"):
            raise self.error(f"name {name!r} is not allowed in ${{{source}}} (names may not start "
                             "with an underscore)", path)


def resolve(tree: dict, origin: Mapping[tuple, str] | None = None) -> dict:
    """Evaluate every `${...}` value of a merged tree and return a new plain tree."""
    return _Resolver(tree, origin or {}).resolve_path(())


def evaluate_expression(expression: str, tree: Mapping) -> Any:
    """Evaluate one `${...}` (or bare) expression against `tree`, with the same rules as the loader."""
    text = expression if _is_expression(expression) else "${" + expression + "}"
    resolver = _Resolver(dict(tree), {})
    return resolver.evaluate(text, ("<expression>",))


# ---------------------------------------------------------------------------------------------------
# Public entry points


def load_config(path: str | os.PathLike, overrides: Iterable[str] = (), allow_new_keys: bool = False,
                root: str | os.PathLike | None = None) -> Config:
    """Load a config with directory inheritance, apply overrides, resolve `${...}`.

    Args:
        path: the leaf YAML file, e.g. `configs/nuscenes/det/.../convfuser.yaml`.
        overrides: `key.sub=value` strings (values typed by YAML rules); see `apply_overrides`.
        allow_new_keys: let overrides create keys that the files do not have.
        root: top directory of the inheritance walk (default: see `config_chain`).
    Returns:
        The resolved tree as a `Config` (a dict with attribute access).
    Raises:
        ConfigError: naming the file and key for a missing file, a YAML syntax error (with its line),
        an override of an unknown key, an interpolation cycle or a disallowed expression.
    """
    origin: dict[tuple, str] = {}
    tree: dict = {}
    for file in config_chain(path, root):
        tree = _merge(tree, load_yaml(file), origin, os.fspath(file))
    apply_overrides(tree, overrides, allow_new=allow_new_keys, origin=origin)
    return Config(_Resolver(tree, origin).resolve_path(()))


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
