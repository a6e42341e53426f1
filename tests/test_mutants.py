"""The mutator of tools/mutants.py on small sources (no pytest subprocess is started)."""

import ast
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))

import mutants  # noqa: E402

SOURCE = '''"""Docstring with 1 + 2 and x < y."""

import jax.numpy as jnp

__all__ = ["f"]


def f(x: float = 0.5, *, n: int = 3) -> float:
    """Another docstring: 2 * x."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n + 1}")
    y = jnp.maximum(x * 2, -x) ** 2
    print(f"y = {y / 3}")
    log("step", 7)
    return jnp.sqrt(y) + g(x, flag=True)
'''

EXPECTED = {
    ("f:8:1", "0.5", "1.0"),
    ("f:8:2", "0.5", "0.0"),
    ("f:8:3", "3", "4"),
    ("f:8:4", "3", "0"),
    ("f:12:1", "maximum", "minimum"),
    ("f:12:2", "*", "/"),
    ("f:12:3", "2", "3"),
    ("f:12:4", "2", "0"),
    ("f:12:5", "-", ""),
    ("f:12:6", "**", "*"),
    ("f:12:7", "2", "3"),
    ("f:12:8", "2", "0"),
    ("f:15:1", "jnp.sqrt(y)", "(y)"),
    ("f:15:2", "+", "-"),
    ("f:15:3", "True", "False"),
}


def test_mutants_of_a_small_source_are_the_expected_set():
    found = mutants.find_mutants(SOURCE, "f")
    assert {(m.id, m.original, m.replacement) for m in found} == EXPECTED
    # docstrings, __all__, the annotations, the validation block, the raise message, the
    # f-string and the log call are left alone
    assert not {m.line for m in found} & {1, 5, 9, 10, 11, 13, 14}


def test_each_mutant_parses_and_differs_in_one_place():
    tree = ast.dump(ast.parse(SOURCE))
    for m in mutants.find_mutants(SOURCE, "f"):
        mutated = mutants.apply(SOURCE, m)
        assert ast.dump(ast.parse(mutated)) != tree, m.id
        before, after = SOURCE.splitlines(), mutated.splitlines()
        assert len(before) == len(after)
        changed = [i + 1 for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
        assert changed == [m.line], m.id
        # the line is the original with the mutant's span, and only that, replaced
        line, (_, c0), (_, c1) = before[m.line - 1], m.start, m.end
        assert line[c0:c1] == m.original
        assert after[m.line - 1] == line[:c0] + m.replacement + line[c1:]


def test_validation_blocks_with_the_flag_and_function_scopes():
    found = mutants.find_mutants(SOURCE, "f", include_validation=True)
    assert {(m.line, m.original, m.replacement) for m in found if m.line == 10} == {
        (10, "<", "<="),
        (10, "0", "1"),
    }
    source = "A = 1\n\ndef keep():\n    return 2 - 1\n\ndef skip():\n    return 3\n"
    scoped = mutants.find_mutants(source, "s", functions=["keep"])
    assert {m.line for m in scoped} == {4}
    assert len(mutants.find_mutants(source, "s")) > len(scoped)


def test_comparisons_unicode_columns_and_class_fields():
    source = (
        "class M:\n"
        "    width: int = 64\n"
        "    def __call__(self, a):\n"
        "        b = 'é' if a <= 1 else a  # é\n"
        "        return a != b\n"
    )
    found = {(m.id, m.original, m.replacement) for m in mutants.find_mutants(source, "u")}
    assert found == {("u:4:1", "<=", "<"), ("u:4:2", "1", "2"), ("u:5:1", "!=", "==")}
    for m in mutants.find_mutants(source, "u"):
        ast.parse(mutants.apply(source, m))


def test_sample_is_reproducible_and_in_source_order():
    found = mutants.find_mutants(SOURCE, "f")
    a, b = mutants.select(found, 5, seed=1), mutants.select(found, 5, seed=1)
    assert [m.id for m in a] == [m.id for m in b] and len(a) == 5
    assert a == sorted(a, key=lambda m: (m.start, m.end))
    assert mutants.select(found, 0, seed=1) == found


@pytest.mark.parametrize("module", ["losses", "metrics", "embeddings"])
def test_library_modules_have_unique_ids_and_valid_mutants(module):
    path = mutants.module_path(mutants.ROOT, module)
    source = open(path, encoding="utf-8").read()
    found = mutants.find_mutants(source, module)
    assert found and len({m.id for m in found}) == len(found)
    for m in found:
        ast.parse(mutants.apply(source, m))


def test_survivors_are_found_again_when_their_lines_move():
    old = "def f(x):\n    return x + 1\n"
    new = "import math\n\n\ndef f(x):\n    return x + 1\n"
    (m,) = [m for m in mutants.find_mutants(old, "f") if m.kind == "operator"]
    signature = {m.id: (m.kind, *mutants.describe(old, m))}
    chosen, missing = mutants.find_by_id(new, mutants.find_mutants(new, "f"), [m.id], signature)
    assert [c.id for c in chosen] == ["f:5:1"] and missing == []
    assert mutants.find_by_id(new, mutants.find_mutants(new, "f"), ["f:9:1"]) == ([], ["f:9:1"])
