"""Tests of the patch format: the strict parser, the applier, the renderer, the diff."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coderepair.protocol.errors import DecodeError, ProtocolError
from coderepair.protocol.patch import (
    AmbiguousSearch,
    FileAlreadyExists,
    FileNotInSnapshot,
    MalformedBlock,
    MissingPath,
    MissingSolution,
    MissingThink,
    NoEdits,
    ParsedResponse,
    PatchApplyError,
    PatchFormatError,
    ProtectedPath,
    SearchNotFound,
    SearchReplace,
    TooLarge,
    UnexpectedText,
    UnsafePath,
    UnterminatedBlock,
    apply_edits,
    edits_between,
    parse_response,
    render_edits,
    unified_diff,
)

VALID = """<think>
The loop stops one element early.
</think>
<solution>
```python
### pkg/stats.py
<<<<<<< SEARCH
    for i in range(len(xs) - 1):
=======
    for i in range(len(xs)):
>>>>>>> REPLACE
```

```python
### pkg/util.py
<<<<<<< SEARCH
def clamp(x, lo, hi):
    return max(hi, min(lo, x))
=======
def clamp(x, lo, hi):
    return max(lo, min(hi, x))
>>>>>>> REPLACE
```
</solution>
"""

SNAPSHOT = {
    "pkg/__init__.py": "",
    "pkg/stats.py": (
        "def total(xs):\n    t = 0\n    for i in range(len(xs) - 1):\n        t += xs[i]\n"
        "    return t\n"
    ),
    "pkg/util.py": "def clamp(x, lo, hi):\n    return max(hi, min(lo, x))\n",
    "tests/test_stats.py": (
        "from pkg.stats import total\n\ndef test_total():\n    assert total([1, 2]) == 3\n"
    ),
}


def _edit(path: str, search: str, replace: str) -> SearchReplace:
    return SearchReplace(path, search, replace)


def _response(body: str, think: str = "<think>\nr\n</think>\n") -> str:
    return f"{think}<solution>\n{body}</solution>\n"


# ---------------------------------------------------------------------------- parse


def test_parse_valid_response_gives_think_and_edits_in_order() -> None:
    parsed = parse_response(VALID)
    assert parsed.think == "The loop stops one element early."
    assert parsed.edits == (
        _edit(
            "pkg/stats.py", "    for i in range(len(xs) - 1):\n", "    for i in range(len(xs)):\n"
        ),
        _edit(
            "pkg/util.py",
            "def clamp(x, lo, hi):\n    return max(hi, min(lo, x))\n",
            "def clamp(x, lo, hi):\n    return max(lo, min(hi, x))\n",
        ),
    )


def test_parse_accepts_several_blocks_in_one_fence_and_blank_lines_between() -> None:
    body = (
        "```python\n### a.py\n<<<<<<< SEARCH\nx = 1\n=======\nx = 2\n>>>>>>> REPLACE\n\n"
        "<<<<<<< SEARCH\ny = 1\n=======\ny = 2\n>>>>>>> REPLACE\n\n```\n"
    )
    parsed = parse_response(_response(body))
    assert parsed.edits == (
        _edit("a.py", "x = 1\n", "x = 2\n"),
        _edit("a.py", "y = 1\n", "y = 2\n"),
    )


def test_parse_distinguishes_empty_search_from_one_blank_line() -> None:
    empty = "```python\n### new.py\n<<<<<<< SEARCH\n=======\nx = 1\n>>>>>>> REPLACE\n```\n"
    blank = "```python\n### a.py\n<<<<<<< SEARCH\n\n=======\n>>>>>>> REPLACE\n```\n"
    assert parse_response(_response(empty)).edits == (_edit("new.py", "", "x = 1\n"),)
    assert parse_response(_response(blank)).edits == (_edit("a.py", "\n", ""),)


def test_parse_keeps_content_verbatim_and_ignores_trailing_space_on_markers() -> None:
    body = (
        "```py  \n###   a b.py  \n<<<<<<< SEARCH \r\n  ```\n### not a path\n</solution>\n"
        " =======\n======= \t\nx  \n>>>>>>> REPLACE\r\n```\r\n"
    )
    parsed = parse_response(_response(body))
    assert parsed.edits == (
        _edit("a b.py", "  ```\n### not a path\n</solution>\n =======\n", "x  \n"),
    )


def test_parse_without_think_only_when_allowed() -> None:
    text = (
        "<solution>\n```python\n### a.py\n<<<<<<< SEARCH\nx\n=======\ny\n>>>>>>> REPLACE\n"
        "```\n</solution>"
    )
    with pytest.raises(MissingThink):
        parse_response(text)
    assert parse_response(text, require_think=False) == ParsedResponse(
        "", (_edit("a.py", "x\n", "y\n"),)
    )


@pytest.mark.parametrize(
    ("text", "error", "line", "words"),
    [
        ("no tags at all", MissingThink, 1, "must start with '<think>'"),
        ("\n\n<think>\nreasoning that never ends", MissingThink, 3, "never closed"),
        ("<think>r</think>\n\nhello", MissingSolution, 3, "expected '<solution>'"),
        (VALID.replace("</solution>\n", ""), MissingSolution, None, "never closed"),
        (VALID.replace("<solution>", "<solution> here"), UnexpectedText, 4, "alone"),
        (VALID + "\nthanks!", UnexpectedText, 26, "only whitespace"),
        (
            VALID.replace("```\n\n```python", "```\nSee also:\n```python"),
            UnexpectedText,
            13,
            "prose",
        ),
        (VALID.replace("### pkg/stats.py\n", ""), MissingPath, 6, "### path"),
        (VALID.replace("### pkg/stats.py", "### "), MissingPath, 6, "names no file"),
        (VALID.replace("pkg/stats.py", "/etc/passwd"), UnsafePath, 6, "absolute"),
        (VALID.replace("pkg/stats.py", "pkg/../../x"), UnsafePath, 6, "'..'"),
        (VALID.replace("pkg/stats.py", "pkg\\stats.py"), UnsafePath, 6, "backslash"),
        (VALID.replace("pkg/stats.py", "pkg/st\x00ats.py"), UnsafePath, 6, "control"),
        (VALID.replace("pkg/stats.py", "C:/stats.py"), UnsafePath, 6, "drive"),
        (VALID.replace("pkg/stats.py", "pkg//stats.py"), UnsafePath, 6, "empty component"),
        (VALID.replace("pkg/stats.py", "./stats.py"), UnsafePath, 6, "'.'"),
        (
            VALID.replace("=======\n    for i in range(len(xs)):\n", ""),
            MalformedBlock,
            9,
            "'======='",
        ),
        (VALID.replace("<<<<<<< SEARCH\n    for", "    for", 1), MalformedBlock, 7, "expected"),
        (
            VALID.replace(">>>>>>> REPLACE\n```\n\n", ">>>>>>> REPLACE\n\n", 1),
            MalformedBlock,
            13,
            "",
        ),
        (
            VALID.replace("\n=======\n    for", "\n  =======\n    for"),
            MalformedBlock,
            11,
            "indented",
        ),
        (
            VALID.replace(">>>>>>> REPLACE\n```\n</solution>", ">>>>>>> REPLACE\n</solution>"),
            UnterminatedBlock,
            23,
            "fence",
        ),
        (VALID[: VALID.index(">>>>>>> REPLACE")], UnterminatedBlock, 11, "never closed"),
        ("<think></think><solution>\n\n</solution>", NoEdits, 3, "no SEARCH/REPLACE"),
    ],
)
def test_parse_errors_are_typed_and_say_where(
    text: str, error: type[PatchFormatError], line: int | None, words: str
) -> None:
    with pytest.raises(error) as info:
        parse_response(text)
    assert isinstance(info.value, DecodeError)
    if line is not None:
        assert info.value.line == line
        assert str(info.value).startswith(f"line {line}: ")
    assert words in str(info.value)


def test_parse_limits_size_and_edit_count() -> None:
    with pytest.raises(TooLarge, match="characters"):
        parse_response(VALID, max_chars=len(VALID) - 1)
    assert len(parse_response(VALID, max_edits=2).edits) == 2
    with pytest.raises(TooLarge, match="more than 1 SEARCH/REPLACE") as info:
        parse_response(VALID, max_edits=1)
    assert info.value.line == 16


def test_adversarial_megabyte_inputs_finish() -> None:
    """Shapes that make backtracking parsers explode; pytest-timeout bounds the test."""
    mb = 1_000_000
    head = "<think>x</think>\n<solution>\n```python\n### a.py\n<<<<<<< SEARCH\n"
    cases = [
        "<think>" + "<" * mb,
        "<think>" + "</think" * (mb // 8),
        "<think></think>\n<solution>\n" + "```" * (mb // 3),
        "<think></think>\n<solution>\n" + "```python\n### a.py\n" * (mb // 20),
        head + "=======\n" * (mb // 8),
        head + "<<<<<<<" * (mb // 7),
        head + ("x" * 999 + "\n") * (mb // 1000),
        head + "\n" * mb,
        " " * mb + "<think>",
    ]
    for text in cases:
        with pytest.raises(PatchFormatError):
            parse_response(text, max_chars=2 * mb)
    many = "<think></think>\n<solution>\n" + (
        "```python\n### a.py\n<<<<<<< SEARCH\nx\n=======\ny\n>>>>>>> REPLACE\n```\n" * 10_000
    )
    assert (
        len(parse_response(many + "</solution>", max_chars=2 * mb, max_edits=10_000).edits)
        == 10_000
    )


# ---------------------------------------------------------------------------- edits


def test_search_replace_normalizes_final_newline_and_rejects_what_cannot_render() -> None:
    assert _edit("a.py", "x", "y") == _edit("a.py", "x\n", "y\n")
    assert _edit("a.py", "", "").search == ""
    with pytest.raises(UnsafePath):
        _edit("../a.py", "x", "y")
    with pytest.raises(MalformedBlock, match="reserves"):
        _edit("a.py", "a\n=======  \nb\n", "y")
    with pytest.raises(MalformedBlock):
        _edit("a.py", "x", ">>>>>>> REPLACE")


# ---------------------------------------------------------------------------- apply


def test_apply_on_multi_file_snapshot_changes_only_the_named_files() -> None:
    before = dict(SNAPSHOT)
    after = apply_edits(SNAPSHOT, parse_response(VALID).edits, protected={"tests/"})
    assert before == SNAPSHOT  # the input is not modified
    assert after["pkg/stats.py"] == SNAPSHOT["pkg/stats.py"].replace("len(xs) - 1", "len(xs)")
    assert after["pkg/util.py"] == "def clamp(x, lo, hi):\n    return max(lo, min(hi, x))\n"
    assert {k: v for k, v in after.items() if k.startswith(("tests", "pkg/__"))} == {
        "pkg/__init__.py": "",
        "tests/test_stats.py": SNAPSHOT["tests/test_stats.py"],
    }


def test_apply_in_order_and_create_then_edit_a_new_file() -> None:
    edits = [
        _edit("pkg/new.py", "", "A = 1\nB = 2\n"),
        _edit("pkg/new.py", "B = 2\n", "B = 3\n"),
        _edit("pkg/util.py", "    return max(hi, min(lo, x))", "    return x"),
        _edit("pkg/util.py", "    return x", "    return x  # clamped"),
    ]
    after = apply_edits(SNAPSHOT, edits)
    assert after["pkg/new.py"] == "A = 1\nB = 3\n"
    assert after["pkg/util.py"] == "def clamp(x, lo, hi):\n    return x  # clamped\n"


def test_apply_keeps_missing_final_newline_and_matches_last_line() -> None:
    after = apply_edits({"a.py": "x = 1\ny = 2"}, [_edit("a.py", "y = 2", "y = 3\nz = 4")])
    assert after == {"a.py": "x = 1\ny = 3\nz = 4"}


def test_apply_matches_whole_lines_only() -> None:
    with pytest.raises(SearchNotFound):
        apply_edits({"a.py": "x = 10\n"}, [_edit("a.py", "x = 1", "x = 2")])
    with pytest.raises(SearchNotFound):  # no phantom blank line after the final newline
        apply_edits({"a.py": "x\n"}, [_edit("a.py", "x\n\n", "y\n")])
    with pytest.raises(SearchNotFound):
        apply_edits({"a.py": ""}, [_edit("a.py", "\n", "y\n")])


def test_trailing_whitespace_fallback_is_used_only_without_an_exact_match() -> None:
    files = {"a.py": "if x:  \r\n    y = 1\t\n"}
    edit = _edit("a.py", "if x:\n    y = 1\n", "if x:\n    y = 2\n")
    assert apply_edits(files, [edit]) == {"a.py": "if x:\n    y = 2\n"}
    with pytest.raises(SearchNotFound):
        apply_edits(files, [edit], tolerate_trailing_whitespace=False)
    # The exact match wins over a looser one, so no ambiguity is reported.
    exact = {"a.py": "x = 1 \nx = 1\n"}
    assert apply_edits(exact, [_edit("a.py", "x = 1", "x = 2")]) == {"a.py": "x = 1 \nx = 2\n"}
    # Indentation is always significant; the error says where the text almost matches.
    with pytest.raises(SearchNotFound, match="matches line 2 if indentation is ignored"):
        apply_edits({"a.py": "def f():\n  return 1\n"}, [_edit("a.py", "    return 1", "")])


def test_apply_error_messages_name_the_problem() -> None:
    with pytest.raises(FileNotInSnapshot, match=r"'pkg/nope.py'.*'pkg/stats.py'"):
        apply_edits(SNAPSHOT, [_edit("pkg/nope.py", "x", "y")])
    with pytest.raises(SearchNotFound, match=r"first line 'def nope\(\):'.*'pkg/util.py'"):
        apply_edits(SNAPSHOT, [_edit("pkg/util.py", "def nope():\n    pass", "")])
    with pytest.raises(AmbiguousSearch, match=r"occurs 3 times \(at lines 1, 2, 4\)"):
        apply_edits({"a.py": "x\nx\ny\nx\n"}, [_edit("a.py", "x", "z")])
    with pytest.raises(AmbiguousSearch, match="at least 100 times"):
        apply_edits({"a.py": "x\n" * 500}, [_edit("a.py", "x", "z")])
    with pytest.raises(FileAlreadyExists, match="empty SEARCH creates a new file"):
        apply_edits(SNAPSHOT, [_edit("pkg/util.py", "", "x = 1")])
    with pytest.raises(ProtectedPath, match=r"'tests/test_stats\.py' is protected"):
        apply_edits(SNAPSHOT, [_edit("tests/test_stats.py", "", "")], protected={"tests/"})
    with pytest.raises(ProtectedPath):
        apply_edits(SNAPSHOT, [_edit("pkg/util.py", "x", "")], protected=["pkg/util.py"])
    with pytest.raises(ProtectedPath):  # creating a conftest.py under a protected directory
        apply_edits(SNAPSHOT, [_edit("tests/conftest.py", "", "x")], protected=["tests/"])
    # "tests/" protects the directory, not every path that begins with "tests".
    assert "tests_extra.py" in apply_edits(
        SNAPSHOT, [_edit("tests_extra.py", "", "")], protected=["tests/"]
    )


def test_apply_of_adversarial_sizes_finishes() -> None:
    big = "x" * 1_000_000
    with pytest.raises(SearchNotFound):
        apply_edits({"a.py": big}, [_edit("a.py", "x" * 100_000 + "y", "")])
    with pytest.raises(AmbiguousSearch):
        apply_edits({"a.py": "a\n" * 200_000}, [_edit("a.py", "a\n" * 50_000, "")])


# ---------------------------------------------------------------------------- render, diff


def test_render_is_the_canonical_swe_rl_layout() -> None:
    edits = parse_response(VALID).edits
    canonical = VALID.replace("```\n\n```python", "```\n```python")
    assert render_edits(edits, think="The loop stops one element early.") == canonical
    with pytest.raises(ValueError, match="at least one edit"):
        render_edits([])
    with pytest.raises(ValueError, match="</think>"):
        render_edits(edits, think="a</think>b")


def test_unified_diff_marks_created_files_and_missing_newlines() -> None:
    diff = unified_diff({"a.py": "x\ny", "gone.py": "z\n"}, {"a.py": "x\nw\n", "new.py": "q"})
    assert diff == (
        "--- a/a.py\n+++ b/a.py\n@@ -1,2 +1,2 @@\n x\n-y\n\\ No newline at end of file\n+w\n"
        "--- a/gone.py\n+++ /dev/null\n@@ -1 +0,0 @@\n-z\n"
        "--- /dev/null\n+++ b/new.py\n@@ -0,0 +1 @@\n+q\n\\ No newline at end of file\n"
    )
    assert unified_diff(SNAPSHOT, dict(SNAPSHOT)) == ""


def test_edits_between_builds_the_oracle_patch() -> None:
    fixed = apply_edits(SNAPSHOT, parse_response(VALID).edits)
    fixed["pkg/extra.py"] = "X = 1\n"
    edits = edits_between(SNAPSHOT, fixed, context=0)
    assert edits == (
        _edit("pkg/extra.py", "", "X = 1\n"),
        _edit("pkg/stats.py", "    for i in range(len(xs) - 1):", "    for i in range(len(xs)):"),
        _edit("pkg/util.py", "    return max(hi, min(lo, x))", "    return max(lo, min(hi, x))"),
    )
    assert apply_edits(SNAPSHOT, edits) == fixed
    # A changed line that is not unique gets the context that makes it unique.
    assert edits_between({"a.py": "x\ny\nx\n"}, {"a.py": "x\ny\nz\n"}, context=0) == (
        _edit("a.py", "y\nx\n", "y\nz\n"),
    )
    for before, after, words in [
        ({"a.py": "x\n"}, {}, "cannot delete"),
        ({"a.py": ""}, {"a.py": "x\n"}, "empty"),
        ({"a.py": "x\n"}, {"a.py": "x"}, "newline"),
        ({}, {"a.py": "x"}, "newline"),
        ({"a.py": "x\n"}, {"a.py": "=======\n"}, "marker"),
    ]:
        with pytest.raises(ValueError, match=words):
            edits_between(before, after)


# ---------------------------------------------------------------------------- properties

_MARKERS = ("<<<<<<< SEARCH", "=======", ">>>>>>> REPLACE")
_segment = st.text(
    alphabet=st.characters(exclude_categories=("Cs", "Cc"), exclude_characters="/\\"),
    min_size=1,
    max_size=8,
).filter(lambda s: s not in (".", "..") and s == s.strip() and s[1:2] != ":")
_path = st.lists(_segment, min_size=1, max_size=3).map("/".join)
_line = st.text(alphabet=st.characters(exclude_characters="\n"), max_size=30).filter(
    lambda s: s.rstrip(" \t\r") not in _MARKERS
)
_text = st.lists(_line, max_size=6).map(lambda lines: "".join(x + "\n" for x in lines))
_edits = st.lists(st.builds(SearchReplace, _path, _text, _text), min_size=1, max_size=5)


@settings(max_examples=200, deadline=None)
@given(edits=_edits, think=st.text(max_size=40).filter(lambda t: "</think>" not in t))
def test_render_then_parse_round_trips(edits: list[SearchReplace], think: str) -> None:
    parsed = parse_response(render_edits(edits, think=think))
    assert parsed.edits == tuple(edits)
    assert parsed.think == think.strip()


def _parse_or_format_error(text: str) -> ParsedResponse | None:
    try:
        return parse_response(text)
    except PatchFormatError:
        return None


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_random_text_gives_a_format_error(text: str) -> None:
    assert _parse_or_format_error(text) is None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=_edits, data=st.data())
def test_truncated_responses_are_rejected(edits: list[SearchReplace], data: st.DataObject) -> None:
    text = render_edits(edits)
    cut = data.draw(st.integers(0, text.rindex("</solution>") + len("</solution>") - 1))
    assert _parse_or_format_error(text[:cut]) is None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=_edits, data=st.data())
def test_mutated_responses_parse_or_fail_with_a_format_error(
    edits: list[SearchReplace], data: st.DataObject
) -> None:
    text = render_edits(edits)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text)))
        if data.draw(st.booleans()):
            text = text[:at] + text[at + 1 :]
        else:
            text = (
                text[:at]
                + data.draw(st.sampled_from(["\n", "`", "=", "<", ">", "#", "x", " "]))
                + text[at:]
            )
    parsed = _parse_or_format_error(text)
    if parsed is not None:
        # What parses is a faithful patch: it renders and parses to itself.
        assert parse_response(render_edits(parsed.edits)).edits == parsed.edits


_small_path = st.sampled_from(["a.py", "b.py", "pkg/c.py", "tests/t.py"])
_small_text = st.lists(st.sampled_from(["x", "y", " x", "x ", ""]), max_size=5).map(
    lambda lines: "".join(x + "\n" for x in lines)
)
_snapshot = st.dictionaries(
    _small_path, st.one_of(_small_text, _small_text.map(lambda t: t.rstrip("\n"))), max_size=4
)
_small_edits = st.lists(st.builds(SearchReplace, _small_path, _small_text, _small_text), max_size=4)


@settings(max_examples=200, deadline=None)
@given(files=_snapshot, edits=_small_edits, tolerant=st.booleans())
def test_apply_raises_only_patch_apply_errors(
    files: dict[str, str], edits: list[SearchReplace], tolerant: bool
) -> None:
    original = dict(files)
    try:
        after = apply_edits(
            files, edits, protected={"tests/"}, tolerate_trailing_whitespace=tolerant
        )
    except PatchApplyError as err:
        assert isinstance(err, ProtocolError)
        assert not isinstance(err, DecodeError)
        return
    assert files == original
    assert after.get("tests/t.py") == files.get("tests/t.py")
    assert set(files) <= set(after)
    assert set(after) - set(files) <= {e.path for e in edits if not e.search}
    # A patch that applies is reported by the diff exactly where it changed something.
    changed = {p for p in after if after[p] != files.get(p)}
    diff = unified_diff(files, after)
    assert {p for p in changed if f"b/{p}\n" in diff} == changed


@settings(max_examples=200, deadline=None)
@given(
    prefix=st.lists(st.sampled_from(["a", "b", "c"]), max_size=6),
    target=st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=3),
    suffix=st.lists(st.sampled_from(["a", "b", "c"]), max_size=6),
    replace=_small_text,
)
def test_apply_replaces_a_unique_match_in_place(
    prefix: list[str], target: list[str], suffix: list[str], replace: str
) -> None:
    lines = [*prefix, *target, *suffix]
    content = "".join(x + "\n" for x in lines)
    search = "".join(x + "\n" for x in target)
    occurrences = sum(
        lines[i : i + len(target)] == target for i in range(len(lines) - len(target) + 1)
    )
    edit = _edit("f.py", search, replace)
    if occurrences == 1:
        expected = "".join(x + "\n" for x in prefix) + replace + "".join(x + "\n" for x in suffix)
        assert apply_edits({"f.py": content}, [edit]) == {"f.py": expected}
    else:
        with pytest.raises(AmbiguousSearch, match=f"occurs {occurrences} times"):
            apply_edits({"f.py": content}, [edit])


_lines_text = st.lists(st.sampled_from(["a", "b", "c", "", " a"]), min_size=1, max_size=12).map(
    lambda lines: "".join(x + "\n" for x in lines)
)


@settings(max_examples=200, deadline=None)
@given(
    before=st.dictionaries(_small_path, _lines_text, max_size=3),
    after=st.dictionaries(_small_path, _lines_text, max_size=3),
    context=st.integers(0, 3),
)
def test_edits_between_round_trips_through_apply_and_render(
    before: dict[str, str], after: dict[str, str], context: int
) -> None:
    after = {**before, **after}  # the format cannot delete files
    edits = edits_between(before, after, context=context)
    assert apply_edits(before, edits) == after
    if edits:
        assert parse_response(render_edits(edits)).edits == edits
