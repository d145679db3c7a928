"""AST mutation of HumanEval solutions: every operator, determinism, deduplication."""

from __future__ import annotations

import ast
from collections import Counter

import pytest

from coderepair.coordinator.tasks.humaneval import (
    OPERATORS,
    HumanEvalProblem,
    MutationError,
    load_problems,
    mutants_of,
    normalize,
    oracle_of,
)

# One function holding every construct an operator targets, so each operator has sites.
SAMPLE = HumanEvalProblem(
    problem_id="Sample/0",
    prompt=(
        "def helper(x):\n"
        "    return x < 0\n"
        "\n"
        "\n"
        "def sample(xs: list[int], limit: int) -> str:\n"
        '    """Say whether the prefix sum of xs passes limit."""\n'
    ),
    canonical_solution=(
        "    total = 0\n"
        "    found = False\n"
        "    for i in range(1, len(xs)):\n"
        "        total += xs[i - 1] * 2\n"
        "        if total > limit and not found:\n"
        "            found = True\n"
        "    best = max(total, limit)\n"
        "    while best > 100:\n"
        "        best = best // 2\n"
        "    if found or best == limit:\n"
        "        return 'Yes'\n"
        "    return 'No' if xs[:2] else total\n"
    ),
    test="def check(candidate):\n    assert candidate([1, 2], 0) == 'Yes'\n",
    entry_point="sample",
)


def _entry(tree: ast.Module, name: str) -> ast.FunctionDef:
    return next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)


def test_every_operator_makes_valid_distinct_programs() -> None:
    mutants = mutants_of(SAMPLE, seed=0, limit=10_000)
    oracle = oracle_of(SAMPLE)
    by_operator = Counter(m.operator for m in mutants)
    assert set(by_operator) == set(OPERATORS), f"operators without a mutant: {by_operator}"
    oracle_tree = ast.parse(oracle)
    for mutant in mutants:
        tree = ast.parse(mutant.source)  # valid Python
        assert normalize(mutant.source) != normalize(oracle)
        # Only the entry point changes; the prompt's helper is never mutated.
        assert ast.dump(_entry(tree, "helper")) == ast.dump(_entry(oracle_tree, "helper"))
        assert ast.get_docstring(_entry(tree, "sample")) == ast.get_docstring(
            _entry(oracle_tree, "sample")
        )
        # The recorded line is where the buggy file first differs from the oracle.
        bug_lines, good_lines = mutant.source.split("\n"), oracle.split("\n")
        line = mutant.line
        assert bug_lines[: line - 1] == good_lines[: line - 1]
        assert (
            line > len(bug_lines)
            or line > len(good_lines)
            or (bug_lines[line - 1] != good_lines[line - 1])
        )


@pytest.mark.parametrize(
    ("operator", "expected_change"),
    [
        ("comparison_swap", ("total > limit", "total >= limit")),
        ("arithmetic_swap", ("xs[i - 1] * 2", "xs[i - 1] + 2")),
        ("boolean_swap", ("total > limit and (not found)", "total > limit or not found")),
        ("off_by_one", ("range(1, len(xs))", "range(1, len(xs) - 1)")),
        ("wrong_constant", ("best > 100", "best > 101")),
        ("swapped_arguments", ("max(total, limit)", "max(limit, total)")),
        ("dropped_statement", ("        best = best // 2\n", "        pass\n")),
        ("wrong_return", ("return 'No' if xs[:2] else total", "return xs")),
        ("negated_condition", ("if found or best == limit", "if not (found or best == limit)")),
    ],
)
def test_operator_makes_the_expected_change(
    operator: str, expected_change: tuple[str, str]
) -> None:
    before, after = expected_change
    oracle = oracle_of(SAMPLE)
    assert before in oracle
    sources = [m.source for m in mutants_of(SAMPLE, seed=0, limit=10_000) if m.operator == operator]
    assert any(s == oracle.replace(before, after, 1) for s in sources), sources[:3]


def test_same_seed_same_mutants_and_other_seed_other_order() -> None:
    problems = load_problems([f"HumanEval/{i}" for i in range(0, 160, 16)])
    first = [mutants_of(p, seed=7, limit=12) for p in problems]
    again = [mutants_of(p, seed=7, limit=12) for p in problems]
    other = [mutants_of(p, seed=8, limit=12) for p in problems]
    assert first == again
    assert first != other


def test_mutants_are_deduplicated_by_normalized_source() -> None:
    # Both operands are the same name: swapping them, or negating twice, gives nothing new.
    twin = HumanEvalProblem(
        problem_id="Sample/twin",
        prompt="def twin(a, b):\n",
        canonical_solution="    x = a - a\n    y = a - a\n    return x + y + b\n",
        test="def check(candidate):\n    assert candidate(1, 2) == 2\n",
        entry_point="twin",
    )
    mutants = mutants_of(twin, seed=0, limit=10_000)
    keys = [normalize(m.source) for m in mutants]
    assert len(keys) == len(set(keys))
    assert normalize(oracle_of(twin)) not in keys
    # 'x = a - a' and 'y = a - a' mutated alike give different programs, so both stay.
    assert sum("x = a + a" in k for k in keys) == 1
    assert sum("y = a + a" in k for k in keys) == 1


def test_limit_caps_and_spreads_over_operators() -> None:
    mutants = mutants_of(SAMPLE, seed=3, limit=len(OPERATORS))
    assert len(mutants) == len(OPERATORS)
    assert {m.operator for m in mutants} == set(OPERATORS)


def test_all_humaneval_problems_load_and_mutate() -> None:
    problems = load_problems()
    assert len(problems) == 164
    total = sum(len(mutants_of(p, seed=0, limit=16)) for p in problems)
    assert total >= 1_500  # room above the 1,000 verified tasks the corpus needs


def test_unknown_problem_and_unmutatable_module_are_typed_errors() -> None:
    with pytest.raises(KeyError, match="HumanEval/999"):
        load_problems(["HumanEval/999"])
    broken = HumanEvalProblem("X/1", "def f(:\n", "    pass\n", "", "f")
    with pytest.raises(MutationError, match="does not parse"):
        mutants_of(broken, seed=0, limit=1)
    missing = HumanEvalProblem("X/2", "def f():\n", "    return 1\n", "", "g")
    with pytest.raises(MutationError, match="no top-level function 'g'"):
        mutants_of(missing, seed=0, limit=1)
