"""A repair task rendered for a chat model, asking for the protocol's patch format.

The prompt holds the problem text, every patchable file with its path, what the tests
check (the ``check`` function of a HumanEval task, the failing test ids of a repository
task) and, when the caller has it, the output of the failing run. The expected answer
format is shown by an example made with `render_edits`, so the prompt always matches
what `parse_response` accepts.

Nothing secret goes into a prompt: for HumanEval tasks the trusted test module also
holds the reference solution (for ``check``'s helpers), so only its ``check`` function
is shown.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

from coderepair.coordinator.tasks.humaneval import TESTS_PATH
from coderepair.protocol.patch import SearchReplace, render_edits
from coderepair.protocol.task import RepairTask

MAX_OUTPUT_CHARS = 4_000
"""Failing test output beyond this is cut from the front (the end holds the assertion)."""

SYSTEM_PROMPT = """\
You are an expert Python programmer. You are given a program with a bug and a \
description of what it should do. Find the bug and fix it with the smallest change.

Answer in exactly this format: your reasoning inside <think> ... </think>, then the \
edits inside <solution> ... </solution>. Each edit is a fenced block that starts with \
'### <path>' and holds one SEARCH/REPLACE block. SEARCH must copy consecutive whole \
lines of the file exactly (indentation included) and match exactly one place; REPLACE \
holds the new lines. Do not edit test files. Example:

{example}"""

_EXAMPLE = render_edits(
    [
        SearchReplace(
            path="pkg/stats.py",
            search="    for i in range(len(xs) - 1):\n        total += xs[i]\n",
            replace="    for i in range(len(xs)):\n        total += xs[i]\n",
        )
    ],
    think="The loop stops one element early: range(len(xs) - 1) should be range(len(xs)).",
)


@dataclass(frozen=True)
class RenderedPrompt:
    """A task as chat messages (for chat templates) and as one plain text (for the rest)."""

    messages: tuple[dict[str, str], ...]
    """``{"role": "system"|"user", "content": ...}`` dicts, the shape chat templates take."""
    text: str
    """The same content as a single completion prompt, ending where the answer starts."""


def render_prompt(task: RepairTask, failing_output: str | None = None) -> RenderedPrompt:
    """The prompt for ``task``; ``failing_output`` is the log of running the buggy code."""
    system = SYSTEM_PROMPT.format(example=_EXAMPLE.rstrip("\n"))
    user = _user_message(task, failing_output)
    messages = ({"role": "system", "content": system}, {"role": "user", "content": user})
    text = f"{system}\n\n{user}\n\nAnswer:\n"
    return RenderedPrompt(messages=messages, text=text)


def _user_message(task: RepairTask, failing_output: str | None) -> str:
    parts = ["## Problem", task.description.strip() or "Fix the bug so that the tests pass."]
    parts.append("## Code")
    for path in sorted(task.files):
        parts.append(f"### {path}\n```python\n{_fenced(task.files[path])}```")
    parts.append("## Tests")
    if task.kind == "function":
        parts.append(
            f"`check(candidate)` is called with `candidate` = `{task.entry_point}`:\n"
            f"```python\n{_fenced(_check_source(task))}```"
        )
    else:
        failing = "\n".join(f"- {test_id}" for test_id in task.fail_to_pass)
        parts.append(
            f"These tests fail and must pass after your fix (`{' '.join(task.test_command)}`):\n"
            f"{failing}\nThe other tests must keep passing. Test files are read-only: "
            + ", ".join(sorted(task.tests))
        )
    if failing_output:
        output = failing_output
        if len(output) > MAX_OUTPUT_CHARS:
            output = "[...]\n" + output[-MAX_OUTPUT_CHARS:]
        parts.append(f"## Output of the failing tests\n```\n{_fenced(output)}```")
    parts.append(
        "Fix the bug. Answer with <think> ... </think> and then <solution> ... </solution>."
    )
    return "\n\n".join(parts)


def _fenced(text: str) -> str:
    """Text ready to sit between fences: ends with a newline, holds no fence line."""
    text = text.replace("\n```", "\n` ``")
    return text if text.endswith("\n") else text + "\n"


def _check_source(task: RepairTask) -> str:
    """The ``check`` function of a HumanEval task's trusted tests (not the reference)."""
    module = task.tests.get(TESTS_PATH) or next(iter(task.tests.values()))
    try:
        tree = ast.parse(module)
    except SyntaxError:
        return "# (the tests could not be shown)\n"
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "check":
            return (ast.get_source_segment(module, node) or ast.unparse(node)) + "\n"
    return "# (no check function found)\n"
