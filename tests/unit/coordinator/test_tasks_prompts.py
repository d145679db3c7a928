"""Prompts: the task's text and code, and a format example the patch parser accepts."""

from __future__ import annotations

import re

from coderepair.coordinator.tasks.build import _function_task
from coderepair.coordinator.tasks.humaneval import load_problems, mutants_of
from coderepair.coordinator.tasks.prompts import MAX_OUTPUT_CHARS, render_prompt
from coderepair.coordinator.tasks.repo import load_fixtures
from coderepair.protocol.patch import apply_edits, parse_response
from coderepair.protocol.task import RepairTask


def _function_task_of(problem_id: str) -> RepairTask:
    (problem,) = load_problems([problem_id])
    mutant = mutants_of(problem, seed=0, limit=1)[0]
    return _function_task(problem, mutant)


def test_function_prompt_shows_code_and_check_but_not_the_reference() -> None:
    task = _function_task_of("HumanEval/33")  # its tests call the reference sort_third
    prompt = render_prompt(task, failing_output="judge: check#1 failed: AssertionError")
    system, user = prompt.messages
    assert system["role"] == "system" and user["role"] == "user"
    assert task.files["solution.py"] in user["content"]
    assert "def check(candidate):" in user["content"]
    assert "check#1 failed" in user["content"]
    assert task.oracle["solution.py"] not in user["content"]
    assert user["content"].count("def sort_third") == 1  # the buggy one only
    assert prompt.text.startswith(system["content"]) and user["content"] in prompt.text


def test_the_format_example_parses_and_a_model_answer_in_that_shape_applies() -> None:
    system = render_prompt(_function_task_of("HumanEval/0")).messages[0]["content"]
    example = system.split("Example:\n\n", 1)[1]
    parsed = parse_response(example)
    assert parsed.edits[0].path == "pkg/stats.py"
    # The task's own fix, written in the shown format, applies to the task's files.
    task = _function_task_of("HumanEval/0")
    assert task.mutation is not None
    bug_line = task.files["solution.py"].split("\n")[task.mutation.line - 1]
    fix_line = task.oracle["solution.py"].split("\n")[task.mutation.line - 1]
    answer = example.replace("### pkg/stats.py", "### solution.py")
    answer = re.sub(
        r"<<<<<<< SEARCH\n.*?=======\n.*?>>>>>>> REPLACE",
        f"<<<<<<< SEARCH\n{bug_line}\n=======\n{fix_line}\n>>>>>>> REPLACE",
        answer,
        flags=re.S,
    )
    fixed = apply_edits(task.files, parse_response(answer).edits)
    assert fixed == task.oracle


def test_repo_prompt_lists_files_and_failing_tests_and_cuts_long_output() -> None:
    task = load_fixtures()[0]
    user = render_prompt(task, failing_output="x" * (MAX_OUTPUT_CHARS * 3)).messages[1]["content"]
    for path in task.files:
        assert f"### {path}" in user
    for test_id in task.fail_to_pass:
        assert test_id in user
    assert task.description in user
    assert "[...]" in user and len(user) < MAX_OUTPUT_CHARS * 2 + sum(map(len, task.files.values()))
