"""Bounds of the config loader: hostile or broken configs end in a ConfigError, fast and small.

Each attack runs in one child process (a fresh interpreter, so its peak RSS means something and a
regression that hangs is killed by the timeout instead of hanging the test run). The child loads the
attacks one after another and prints one JSON line each: the error, its file and key, the seconds it
took and the process's peak RSS so far. Peak RSS only grows, so "peak after attack k minus the peak
before the first attack" bounds the memory of attack k and of every attack before it.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bevfusion.config as config_module
from bevfusion.config import (
    MAX_DEPTH,
    MAX_EXPR_CHARS,
    MAX_INT_BITS,
    MAX_SEQ_LEN,
    MAX_STR_LEN,
    MAX_YAML_NODES,
    ConfigError,
    evaluate_expression,
    load_config,
    resolve,
)

REPO = Path(__file__).resolve().parents[1]
SECONDS = 5.0  # per attack, generous for a loaded 2-core CI machine (the slowest takes about 1 s here)
MEGABYTES = 200


def _chain(n: int, first: str, template: str) -> str:
    """`k0: first`, then `k{i}: template` with `{p}` standing for the previous key."""
    lines = [f"k0: {first}"]
    lines += [f"k{i}: " + template.replace("{p}", f"k{i - 1}") for i in range(1, n)]
    return "\n".join(lines) + "\n"


def _laughs(levels: int = 9, width: int = 10) -> str:
    lines = ["l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def _laughs_mapping(levels: int = 9, width: int = 10) -> str:
    lines = ["m0: &m0 {" + ", ".join(f"k{j}: lol" for j in range(width)) + "}"]
    lines += [f"m{i}: &m{i} {{" + ", ".join(f"k{j}: *m{i - 1}" for j in range(width)) + "}"
              for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def _x(expr: str, extra: str = "") -> str:
    return f"{extra}x: ${{{expr}}}\n"


# name -> (files under the tmp dir, the key the error must name or None, a fragment of the message)
ATTACKS: dict[str, tuple[dict[str, str], str | None, str]] = {}


def _attack(name: str, text: str, key: str | None, fragment: str, **more_files: str) -> None:
    files = {"configs/x.yaml": text, **{k.replace("__", "/") + ".yaml": v for k, v in more_files.items()}}
    ATTACKS[name] = (files, key, fragment)


# Integers and floats.
_attack("pow_tower", _x("2 ** 2 ** 2 ** 2 ** 2"), "x", "MAX_INT_BITS")
_attack("pow_chain", _x("(((10 ** 64) ** 64) ** 64) ** 64"), "x", "MAX_INT_BITS")
_attack("pow_big_base", _x("(10 ** 100) ** 10 ** 6"), "x", "MAX_INT_BITS")
_attack("pow_keys", _chain(12, "10", "${{p} ** 4}"), None, "MAX_INT_BITS")
_attack("mult_chain", _x("(10 ** 300 * 10 ** 300) * 10 ** 300"), "x", "MAX_INT_BITS")
_attack("int_literal", _x("9" * 1000), "x", "MAX_INT_BITS")
_attack("float_pow_overflow", _x("(10.0 ** 60) ** 60"), "x", "out of range")
_attack("float_of_huge_exponent", _x("2.0 ** (2 ** 1000)"), "x", "out of range")
_attack("int_to_float_overflow", _x("(2 ** 1023 + (2 ** 1023 - 1)) / 1"), "x", "too large")
_attack("complex_result", _x("(-8) ** 0.5"), "x", "complex")
_attack("zero_negative_power", _x("0 ** -1"), "x", "zero")
# Strings and lists.
_attack("str_repeat", _x("'a' * 10 ** 9"), "x", "MAX_STR_LEN")
_attack("str_repeat_count_first", _x("10 ** 9 * 'a'"), "x", "MAX_STR_LEN")
_attack("list_repeat", _x("[0] * 10 ** 8"), "x", "MAX_SEQ_LEN")
_attack("str_repeat_chain", _x("(('a' * 10000) * 10000) * 10000"), "x", "MAX_STR_LEN")
_attack("list_repeat_chain", _x("(([0] * 10000) * 10000) * 10000"), "x", "MAX_SEQ_LEN")
_attack("matrix_bomb", _x("[[[0] * 1000] * 1000] * 1000"), "x", "MAX_EVAL_STEPS")
_attack("str_doubling_keys", _chain(45, "xxxxxxxx", "${{p} + {p}}"), None, "MAX_STR_LEN")
_attack("list_doubling_keys", _chain(45, "[0, 0, 0, 0]", "${{p} + {p}}"), None, "MAX_SEQ_LEN")
_attack("list_reference_bomb",
        _chain(12, "[0, 0, 0, 0, 0, 0, 0, 0, 0, 0]", "${[" + ", ".join(["{p}"] * 10) + "]}"),
        None, "MAX_EVAL_STEPS")
_attack("mapping_reference_bomb",
        _chain(12, "{a: 0, b: 0, c: 0, d: 0, e: 0, f: 0, g: 0, h: 0, i: 0, j: 0}",
               "{" + ", ".join(f'{c}: "${{{{p}}}}"' for c in "abcdefghij") + "}"), None, "MAX_EVAL_STEPS")
_attack("big_slices_repeated",
        _x("[s[::-1], s[::1], s[-10 ** 300:10 ** 300]] * 30000", "s: ${[0] * 100000}\n"), "x", "MAX_EVAL_STEPS")
_attack("slice_step_zero", _x("[1, 2][::0]"), "x", "zero")
# printf-style formatting.
_attack("percent_width", _x("'%0999999999d' % 1"), "x", "width or precision")
_attack("percent_precision", _x("'%.999999999f' % 1.0"), "x", "width or precision")
_attack("percent_list", _x("'%s' % ([0] * 100000)"), "x", "one number or string")
_attack("percent_many", _x("('%s' * 30000) % 5"), "x", "not enough arguments")
_attack("percent_repr_keys", _chain(40, "a\\b", "${'%r' % {p}}"), None, "MAX_STR_LEN")  # repr doubles \\
# Comparisons.
_attack("compare_huge_lists", _x("[" + ", ".join(["a == b", "a < b", "a >= b"] * 10) + "]",
                                 "a: ${[0] * 30000}\nb: ${[0] * 30000}\n"), "x", "MAX_EVAL_STEPS")
_attack("compare_types", _x("[1] < 'a'"), "x", "cannot compare")
# The expression text and its syntax tree.
_attack("deep_list_literal", _x("[" * 40 + "0" + "]" * 40), "x", "MAX_EXPR_DEPTH")
_attack("deep_sum", _x("+".join(["1"] * 2000)), "x", "nest")
_attack("deep_unary", _x("-" * 4000 + "1"), "x", "nest")
_attack("deep_power", _x("**".join(["1"] * 1300)), "x", "nest")
_attack("long_expression", _x("+".join(["a"] * 3000), "a: 1\n"), "x", "MAX_EXPR_CHARS")
_attack("null_character", 'x: "${1\\0}"\n', "x", "null")
_attack("unhashable_index", _x("m[[1]]", "m: {a: 1}\n"), "x", "cannot index a config mapping")
_attack("huge_yaml_int_operand", _x("h * h * h * h", "h: 0x" + "f" * 200000 + "\n"), "x", "integer operand")
# Across keys: nesting, chains, total work.
_attack("value_nesting_keys", _chain(3000, "0", "${[{p}]}"), None, "MAX_DEPTH")
_attack("reference_chain", "".join(f"k{i}: ${{k{i + 1}}}\n" for i in range(5000)) + "k5000: 1\n",
        None, "MAX_NESTING")
_attack("many_keys_bounded_work", "s: ${[0] * 5000}\n" + "".join(f"k{i}: ${{s + s}}\n" for i in range(9000)),
        None, "MAX_EVAL_STEPS")
# YAML.
_attack("yaml_laughs", _laughs(), None, "MAX_YAML_NODES")
_attack("yaml_laughs_mapping", _laughs_mapping(), None, "MAX_YAML_NODES")
_attack("yaml_long_scalar_aliases", "s: &s " + "x" * 60000 + "\nl: [" + ", ".join(["*s"] * 100) + "]\n",
        None, "MAX_YAML_NODES")
_attack("yaml_deep", "x: " + "[" * 20000 + "]" * 20000 + "\n", None, "nesting deeper")
_attack("yaml_deep_through_aliases",
        "a: &a " + "[" * 30 + "0" + "]" * 30 + "\nb: " + "[" * 30 + "*a" + "]" * 30 + "\n",
        None, "aliases expanded")
_attack("yaml_recursive_list", "x: &a [*a]\n", None, "recursive")
_attack("yaml_recursive_mapping", "x: &a {y: *a}\n", None, "recursive")
_attack("yaml_big_file", "# " + "x" * (1 << 20) + "\n", None, "MAX_FILE_BYTES")
_attack("yaml_many_nodes", "x: [" + ", ".join(["1"] * 30000) + "]\n", None, "MAX_YAML_NODES")
_attack("yaml_nodes_over_the_chain", "y: [" + ", ".join(["1"] * 12000) + "]\n", None, "MAX_YAML_NODES",
        configs__default="x: [" + ", ".join(["1"] * 12000) + "]\n")


def _child(root: str) -> None:
    """Run in the child process: load every attack under `root`, one JSON line each."""
    kb = 1 if sys.platform != "darwin" else 1 / 1024
    load_config(REPO / "tests/fixtures/configs/nuscenes/det/transfusion/camera+lidar/convfuser.yaml")  # warm-up
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kb
    for name in sorted(os.listdir(root)):
        leaf = Path(root) / name / "configs" / "x.yaml"
        start = time.perf_counter()
        try:
            load_config(leaf)
            result = {"error": None}
        except ConfigError as exc:
            result = {"error": "ConfigError", "file": exc.file, "key": exc.key, "message": str(exc)}
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            result = {"error": type(exc).__name__, "message": str(exc)[:300]}
        result["seconds"] = time.perf_counter() - start
        result["rss_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kb - base) / 1024
        result["leaf"] = str(leaf)
        print(json.dumps({name: result}), flush=True)


@pytest.fixture(scope="module")
def attack_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("attacks")
    for name, (files, _, _) in ATTACKS.items():
        for rel, text in files.items():
            path = root / name / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    try:
        run = subprocess.run([sys.executable, __file__, "--child", str(root)], capture_output=True, text=True,
                             timeout=SECONDS * len(ATTACKS), env=env)
        out, err = run.stdout, run.stderr
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = "killed by the timeout"
    results = {}
    for line in out.splitlines():
        results.update(json.loads(line))
    return results, err


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_ends_fast_in_a_config_error(attack_results, name):
    results, err = attack_results
    assert name in results, f"no result (still running, or the child died): {err[-2000:]}"
    got = results[name]
    _, key, fragment = ATTACKS[name]
    assert got["error"] == "ConfigError", got
    assert got["file"] == got["leaf"], got  # every attack sits in the leaf file
    if key is not None:
        assert got["key"] == key, got
    assert fragment in got["message"], got
    assert got["seconds"] < SECONDS, got
    assert got["rss_mb"] < MEGABYTES, got


def test_alias_bomb_fails_before_any_object_is_built(tmp_path, monkeypatch):
    leaf = tmp_path / "configs" / "x.yaml"
    leaf.parent.mkdir()
    leaf.write_text(_laughs())
    built = []
    original = config_module._StrictSafeLoader.construct_document
    monkeypatch.setattr(config_module._StrictSafeLoader, "construct_document",
                        lambda self, node: built.append(node) or original(self, node))
    with pytest.raises(ConfigError, match="MAX_YAML_NODES") as info:
        load_config(leaf)
    assert info.value.file == str(leaf) and "line 5" in str(info.value)  # l4 is the first over the limit
    assert built == []


@pytest.mark.parametrize("text,message", [
    ("x: " + "9" * 5000 + "\n", "4300 digits"), ("x: 2020-13-45\n", "month must be"),
])
def test_yaml_values_python_cannot_build(tmp_path, text, message):
    leaf = tmp_path / "configs" / "x.yaml"
    leaf.parent.mkdir()
    leaf.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(leaf)
    assert info.value.file == str(leaf)


def _frames() -> int:
    frame, count = sys._getframe(), 0
    while frame is not None:
        frame, count = frame.f_back, count + 1
    return count


def test_pythons_recursion_limit_is_still_a_config_error():
    # MAX_NESTING keeps the resolver well inside the default limit; a caller already deep in its
    # stack (here: a limit only 60 frames above this one) still gets a ConfigError, not a crash.
    tree = {f"k{i}": f"${{k{i + 1}}}" for i in range(60)}
    tree["k60"] = 1
    assert resolve(dict(tree))["k0"] == 1
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(_frames() + 60)
    try:
        with pytest.raises(ConfigError, match="recursion limit"):
            resolve(dict(tree))
        with pytest.raises(ConfigError, match="recursion limit"):
            evaluate_expression("k0", tree)
    finally:
        sys.setrecursionlimit(old)


class TestLegitimateUse:
    def test_merge_keys_and_small_aliases_still_work(self, tmp_path):
        leaf = tmp_path / "configs" / "x.yaml"
        leaf.parent.mkdir()
        leaf.write_text("base: &base {a: 1, b: [1, 2]}\nderived:\n  <<: *base\n  b: 3\n"
                        "more: {<<: [*base, {c: 4}]}\nlist: [*base, *base]\n")
        cfg = load_config(leaf)
        assert cfg.derived == {"a": 1, "b": 3}
        assert cfg.more == {"a": 1, "b": [1, 2], "c": 4}
        assert cfg.list == [{"a": 1, "b": [1, 2]}] * 2

    @pytest.mark.parametrize("expr", [
        "2 ** -(2 ** 1000)", "1e308 * 10", "-1e308 * 10", "(-2) ** 1023", "2 ** 64 * 3 // 7 % 1000",
        "[1, 2, 3][-10 ** 300:10 ** 300]", "'ab'[::-1] * 3", "'%5.2f|' % 3.14159", "'%-4d|' % 7",
        "'<%s>' % 'ab'", "'%d%%' % 50",
        "10 ** 300 / 10 ** 299", "(10 ** 300) ** -1", "2.5 ** 100", "0.5 ** 5000",
    ])
    def test_bounded_expressions_agree_with_python(self, expr):
        # Python itself is the oracle, on trusted test expressions only.
        assert evaluate_expression(expr, {}) == eval(expr, {"__builtins__": {}})  # noqa: S307

    def test_values_at_the_bounds(self):
        at = {
            f"'a' * {MAX_STR_LEN}": MAX_STR_LEN, f"[0] * {MAX_SEQ_LEN}": MAX_SEQ_LEN,
            f"2 ** {MAX_INT_BITS - 1}": MAX_INT_BITS, f"-(2 ** {MAX_INT_BITS - 1})": MAX_INT_BITS,
        }
        for expr, size in at.items():
            value = evaluate_expression(expr, {})
            assert (len(value) if not isinstance(value, int) else value.bit_length()) == size
        for expr in [f"'a' * {MAX_STR_LEN + 1}", f"[0] * {MAX_SEQ_LEN + 1}", f"2 ** {MAX_INT_BITS}",
                     f"'a' * {MAX_STR_LEN} + 'b'", f"[0] * {MAX_SEQ_LEN} + [1]",
                     f"2 ** {MAX_INT_BITS - 1} * 2"]:
            with pytest.raises(ConfigError):
                evaluate_expression(expr, {})
        text = "+".join(["1"] * (MAX_EXPR_CHARS // 2))  # 4,095 characters, a left-deep tree
        with pytest.raises(ConfigError, match="nest"):
            evaluate_expression(text, {})
        text = "[" + ", ".join(["1"] * ((MAX_EXPR_CHARS - 2) // 3)) + "]"  # wide, not deep
        assert len(text) <= MAX_EXPR_CHARS
        assert evaluate_expression(text, {}) == [1] * ((MAX_EXPR_CHARS - 2) // 3)
        with pytest.raises(ConfigError, match="MAX_EXPR_CHARS"):
            evaluate_expression(text + " + [1]", {})

    def test_yaml_depth_bound(self, tmp_path):
        leaf = tmp_path / "configs" / "x.yaml"
        leaf.parent.mkdir()
        n = MAX_DEPTH - 2  # root mapping, the list levels, the scalar inside
        leaf.write_text("x: " + "[" * n + "0" + "]" * n + "\n")
        value = load_config(leaf).x
        for _ in range(n):
            value = value[0]
        assert value == 0
        leaf.write_text("x: " + "[" * (n + 1) + "0" + "]" * (n + 1) + "\n")
        with pytest.raises(ConfigError, match="MAX_DEPTH|nesting deeper"):
            load_config(leaf)

    def test_yaml_node_bound(self, tmp_path):
        leaf = tmp_path / "configs" / "x.yaml"
        leaf.parent.mkdir()
        count = MAX_YAML_NODES - 10  # the root mapping, the key and the list take three
        leaf.write_text("x: [" + ", ".join(["1"] * count) + "]\n")
        assert len(load_config(leaf).x) == count
        leaf.write_text("x: [" + ", ".join(["1"] * MAX_YAML_NODES) + "]\n")
        with pytest.raises(ConfigError, match="MAX_YAML_NODES"):
            load_config(leaf)

    def test_every_config_loads_with_a_twentieth_of_the_budgets(self, monkeypatch):
        # Real configs sit far inside the bounds; this keeps the headroom claimed in the docstring honest.
        monkeypatch.setattr(config_module, "MAX_EVAL_STEPS", config_module.MAX_EVAL_STEPS // 20)
        monkeypatch.setattr(config_module, "MAX_YAML_NODES", config_module.MAX_YAML_NODES // 5)
        paths = sorted((REPO / "configs").rglob("*.yaml"))
        assert paths
        for path in paths:
            assert load_config(path).seed == 0


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    _child(sys.argv[2])
