"""The patch format: how a model answers a repair task, and how the answer is applied.

The format follows SWE-RL / Agentless so that prompts and data from those works carry
over. A response is reasoning in ``<think>`` tags, then SEARCH/REPLACE edits in
``<solution>`` tags::

    <think>
    The loop stops one element early: range(len(xs) - 1) should be range(len(xs)).
    </think>
    <solution>
    ```python
    ### pkg/stats.py
    <<<<<<< SEARCH
        for i in range(len(xs) - 1):
            total += xs[i]
    =======
        for i in range(len(xs)):
            total += xs[i]
    >>>>>>> REPLACE
    ```
    </solution>

Rules of `parse_response` (every violation raises a `PatchFormatError` subclass whose
message names the 1-based line):

1. The response is at most ``max_chars`` characters (default `MAX_RESPONSE_CHARS`).
2. After optional whitespace it starts with ``<think>``; the reasoning runs to the first
   ``</think>`` and may be empty (``require_think=False`` also accepts a response that
   starts directly with ``<solution>``). The parsed reasoning has surrounding whitespace
   stripped.
3. After ``</think>`` and optional whitespace (a newline or not) comes ``<solution>``,
   alone on the rest of its line. The solution ends at the first line that is exactly
   ``</solution>`` outside an edit block; only whitespace may follow it.
4. Inside the solution, outside fences, only blank lines are allowed. A fence opens with a
   line of three backticks and an optional language tag of letters, digits and ``_+.#-``
   (``python`` by convention; the tag is not checked further) and closes with a line of
   exactly three backticks.
5. The first line in a fence is ``### <path>``: a relative POSIX path, no ``..`` or ``.``
   or empty component, no backslash, no control character (NUL included), no drive letter,
   at most `MAX_PATH_CHARS` characters. Surrounding whitespace of the path is ignored.
6. Then one or more blocks, for that path, in this order: a line ``<<<<<<< SEARCH``, the
   lines to find, a line ``=======``, the replacement lines, a line ``>>>>>>> REPLACE``.
   Blank lines may separate blocks and the closing fence. SWE-RL (and `render_edits`)
   puts each block in its own fence; several blocks in one fence are accepted.
7. Marker lines (``<<<<<<< SEARCH``, ``=======``, ``>>>>>>> REPLACE``, fences,
   ``### path``, ``</solution>``) start at column 0; trailing spaces, tabs and carriage
   returns on them are ignored. Lines between markers are taken verbatim; they may
   contain anything (backticks, ``### ``, ``</solution>``) except a line that reads as
   one of the three edit markers.
8. There is at least one block and at most ``max_edits`` (default `MAX_EDITS`).

How `apply_edits` applies an edit (failures raise a `PatchApplyError` subclass):

- Edits apply in order, each to the result of the previous ones, on an in-memory copy.
- SEARCH matches whole, consecutive lines. An exact match is tried first. If there is
  none and ``tolerate_trailing_whitespace`` is on (the default), lines are compared with
  trailing spaces, tabs and carriage returns removed on both sides; indentation is always
  significant. The SEARCH text must match exactly once (after the fallback, if used).
- The matched lines are replaced by the REPLACE lines verbatim; the rest of the file,
  including whether it ends with a newline, is unchanged.
- An empty SEARCH section creates a new file whose content is the REPLACE section; the
  path must not exist yet. Files are never deleted (an edit can empty one).
- Paths listed in ``protected`` may not be edited or created; an entry ending in ``/``
  protects everything under that directory.

`SearchReplace` holds text as lines each ending in ``"\\n"``: an empty SEARCH is ``""``,
a SEARCH of one blank line is ``"\\n"``. The constructor appends a missing final newline
and rejects what the format cannot carry (unsafe paths, marker lines), so every
`SearchReplace` renders and parses back to itself.

Also here: `render_edits` (edits → canonical response text, for oracle answers and SFT
data), `edits_between` (two snapshots → the edits of an oracle patch) and `unified_diff`
(two snapshots → a git-style diff, for logs and the SWE-RL similarity reward).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from coderepair.protocol.errors import DecodeError, ProtocolError

MAX_RESPONSE_CHARS = 262_144
"""Default cap on a response's length: well above a 16k-token completion."""
MAX_EDITS = 64
"""Default cap on SEARCH/REPLACE blocks in one response."""
MAX_PATH_CHARS = 512
"""Longest path accepted in a ``### path`` line."""

SEARCH_MARKER = "<<<<<<< SEARCH"
DIVIDER_MARKER = "======="
REPLACE_MARKER = ">>>>>>> REPLACE"
FENCE = "```"
_EDIT_MARKERS = (SEARCH_MARKER, DIVIDER_MARKER, REPLACE_MARKER)
_MARKER_PAD = " \t\r"  # ignored at the end of marker lines (and by the tolerant match)
_FENCE_TAG = re.compile(r"[A-Za-z0-9_+.#-]*")  # no nested quantifier: linear, no backtracking
_DRIVE = re.compile(r"[A-Za-z]:")
_MAX_REPORTED = 100  # occurrences counted for an AmbiguousSearch message


# ---------------------------------------------------------------------------- errors


class PatchFormatError(DecodeError):
    """A response does not follow the patch format; ``line`` is 1-based, or None."""

    def __init__(self, message: str, line: int | None = None) -> None:
        self.line = line
        super().__init__(f"line {line}: {message}" if line is not None else message)


class TooLarge(PatchFormatError):
    """The response is longer, or has more edits, than the configured limits."""


class MissingThink(PatchFormatError):
    """No ``<think>`` at the start, or no ``</think>`` closing it."""


class MissingSolution(PatchFormatError):
    """No ``<solution>`` after the reasoning, or no ``</solution>`` closing it."""


class UnexpectedText(PatchFormatError):
    """Text where only whitespace or a marker line may stand."""


class MissingPath(PatchFormatError):
    """A fence does not start with a ``### path`` line."""


class UnsafePath(PatchFormatError):
    """A path is absolute, escapes the repository, or holds forbidden characters."""


class UnterminatedBlock(PatchFormatError):
    """A fence or SEARCH/REPLACE block is not closed before the solution ends."""


class MalformedBlock(PatchFormatError):
    """Edit markers out of order, or a marker line inside an edit's text."""


class NoEdits(PatchFormatError):
    """The solution holds no SEARCH/REPLACE block."""


class PatchApplyError(ProtocolError):
    """A well-formed patch cannot be applied to the task's files."""


class FileNotInSnapshot(PatchApplyError):
    """An edit with a non-empty SEARCH names a file that does not exist."""


class FileAlreadyExists(PatchApplyError):
    """An edit with an empty SEARCH (create a file) names a file that exists."""


class SearchNotFound(PatchApplyError):
    """The SEARCH lines do not occur in the file."""


class AmbiguousSearch(PatchApplyError):
    """The SEARCH lines occur more than once in the file."""


class ProtectedPath(PatchApplyError):
    """An edit touches a file the patch may not change (e.g. the task's tests)."""


# ---------------------------------------------------------------------------- data


def check_path(path: str, line: int | None = None) -> None:
    """Raise `UnsafePath` unless ``path`` is a canonical relative POSIX path."""
    why = _path_problem(path)
    if why is not None:
        raise UnsafePath(
            f"unsafe path {path[:80]!r}: {why}; write a path relative to the repository "
            "root with '/' separators, e.g. 'pkg/module.py'",
            line,
        )


def _path_problem(path: str) -> str | None:
    if not path:
        return "it is empty"
    if len(path) > MAX_PATH_CHARS:
        return f"it is longer than {MAX_PATH_CHARS} characters"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        return "it contains a control character (NUL, tab, ...)"
    if "\\" in path:
        return "it contains a backslash"
    if path.startswith("/"):
        return "it is absolute"
    if _DRIVE.match(path):
        return "it starts with a drive letter"
    if path != path.strip():
        return "it has leading or trailing whitespace"
    for part in path.split("/"):
        if not part:
            return "it has an empty component ('//' or a trailing '/')"
        if part in (".", ".."):
            return f"it has a {part!r} component"
    return None


def _marker_in(text: str) -> str | None:
    for line in text.split("\n"):
        stripped = line.rstrip(_MARKER_PAD)
        if stripped in _EDIT_MARKERS:
            return stripped
    return None


@dataclass(frozen=True)
class SearchReplace:
    """One edit: replace the lines ``search`` in file ``path`` by ``replace``.

    ``search`` and ``replace`` are ``""`` or lines each ending in ``"\\n"`` (a missing
    final newline is added). An empty ``search`` creates the file. Raises `UnsafePath`
    for a bad path and `MalformedBlock` for a text line that reads as an edit marker.
    """

    path: str
    search: str
    replace: str

    def __post_init__(self) -> None:
        check_path(self.path)
        for name in ("search", "replace"):
            text: str = getattr(self, name)
            if text and not text.endswith("\n"):
                text += "\n"
                object.__setattr__(self, name, text)
            marker = _marker_in(text)
            if marker is not None:
                raise MalformedBlock(
                    f"the {name} text of an edit to {self.path!r} contains a line "
                    f"{marker!r}, which the patch format reserves as a marker"
                )


@dataclass(frozen=True)
class ParsedResponse:
    """A well-formed response: the reasoning and the edits in order."""

    think: str
    edits: tuple[SearchReplace, ...]


# ---------------------------------------------------------------------------- parse


def parse_response(
    text: str,
    *,
    max_chars: int = MAX_RESPONSE_CHARS,
    max_edits: int = MAX_EDITS,
    require_think: bool = True,
) -> ParsedResponse:
    """Parse a model response by the rules in the module docstring.

    Runs in time linear in ``len(text)`` (no backtracking regular expressions).
    """
    if len(text) > max_chars:
        raise TooLarge(
            f"the response has {len(text)} characters, more than the limit of {max_chars}; "
            "shorten the reasoning or split the work"
        )
    start = len(text) - len(text.lstrip())
    think = ""
    if text.startswith("<think>", start):
        close = text.find("</think>", start)
        if close < 0:
            raise MissingThink(
                "'<think>' is never closed by '</think>'; end the reasoning with '</think>' "
                "before '<solution>'",
                _line_of(text, start),
            )
        think = text[start + len("<think>") : close].strip()
        pos = close + len("</think>")
        sol = len(text) - len(text[pos:].lstrip())
    elif require_think or not text.startswith("<solution>", start):
        first = "'<think>' (reasoning)" if require_think else "'<think>' or '<solution>'"
        raise MissingThink(
            f"the response must start with {first}, then '</think>', then '<solution>'; "
            f"it starts with {text[start : start + 30]!r}",
            _line_of(text, start),
        )
    else:
        sol = start
    if not text.startswith("<solution>", sol):
        raise MissingSolution(
            f"expected '<solution>' after the reasoning, found {text[sol : sol + 30]!r}",
            _line_of(text, sol),
        )
    first_line = _line_of(text, sol)
    lines = text[sol:].split("\n")
    if lines[0][len("<solution>") :].strip():
        raise UnexpectedText(
            "'<solution>' must stand alone on its line; put the first fence on the next line",
            first_line,
        )
    edits = _parse_solution(lines, first_line, max_edits)
    return ParsedResponse(think=think, edits=edits)


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _is(line: str, marker: str) -> bool:
    return line.rstrip(_MARKER_PAD) == marker


def _parse_solution(lines: list[str], first_line: int, max_edits: int) -> tuple[SearchReplace, ...]:
    """Walk the solution's lines (``lines[0]`` is the ``<solution>`` line) once."""
    edits: list[SearchReplace] = []
    i = 1
    n = len(lines)
    while i < n:
        line = lines[i]
        lineno = first_line + i
        if _is(line, "</solution>"):
            for k in range(i + 1, n):
                if lines[k].strip():
                    raise UnexpectedText(
                        "only whitespace may follow '</solution>'; found "
                        f"{lines[k].strip()[:40]!r}",
                        first_line + k,
                    )
            if not edits:
                raise NoEdits(
                    "the solution holds no SEARCH/REPLACE block; write at least one fenced "
                    f"block with '### path' and '{SEARCH_MARKER}'",
                    lineno,
                )
            return tuple(edits)
        if not line.strip():
            i += 1
            continue
        stripped = line.rstrip(_MARKER_PAD)
        if not (stripped.startswith(FENCE) and _FENCE_TAG.fullmatch(stripped, len(FENCE))):
            raise UnexpectedText(
                f"expected a fence ('```python') or '</solution>', found {line[:60]!r}; "
                "write no prose between edit blocks",
                lineno,
            )
        i = _parse_fence(lines, i, first_line, edits, max_edits)
    raise MissingSolution(
        "the solution is never closed by a '</solution>' line", first_line + n - 1
    )


def _parse_fence(
    lines: list[str], i: int, first_line: int, edits: list[SearchReplace], max_edits: int
) -> int:
    """Parse one fence opened at ``lines[i]``; append its edits; return the next index."""
    fence_line = first_line + i
    n = len(lines)
    i += 1
    if i >= n or not lines[i].startswith("### "):
        found = repr(lines[i][:60]) if i < n else "the end of the response"
        raise MissingPath(
            f"a fence must start with a '### path/to/file.py' line; found {found}",
            first_line + i,
        )
    path = lines[i][len("### ") :].strip()
    if not path:
        raise MissingPath(
            "the '### ' line names no file; write '### path/to/file.py'", first_line + i
        )
    check_path(path, first_line + i)
    i += 1
    blocks = 0
    while True:
        while i < n and not lines[i].strip():
            i += 1
        if i >= n:
            raise UnterminatedBlock(
                f"the fence opened at line {fence_line} is never closed by a '```' line",
                first_line + n - 1,
            )
        lineno = first_line + i
        if _is(lines[i], FENCE) and blocks:
            return i + 1
        if _is(lines[i], "</solution>"):
            raise UnterminatedBlock(
                f"the fence opened at line {fence_line} is not closed by a '```' line "
                "before '</solution>'",
                lineno,
            )
        if not _is(lines[i], SEARCH_MARKER):
            want = f"'{SEARCH_MARKER}' or '```'" if blocks else f"'{SEARCH_MARKER}'"
            raise MalformedBlock(f"expected {want}, found {lines[i][:60]!r}", lineno)
        if len(edits) >= max_edits:
            raise TooLarge(
                f"more than {max_edits} SEARCH/REPLACE blocks; merge nearby edits", lineno
            )
        i, search = _section(lines, i + 1, first_line, lineno, end=DIVIDER_MARKER, name="SEARCH")
        i, replace = _section(lines, i + 1, first_line, lineno, end=REPLACE_MARKER, name="REPLACE")
        edits.append(SearchReplace(path, search, replace))
        blocks += 1
        i += 1


def _section(
    lines: list[str], i: int, first_line: int, block_line: int, *, end: str, name: str
) -> tuple[int, str]:
    """Collect lines from ``i`` up to the ``end`` marker; return its index and the text."""
    start = i
    indented: int | None = None  # first marker-looking line with indentation, for the hint
    while i < len(lines):
        stripped = lines[i].rstrip(_MARKER_PAD)
        if stripped == end:
            return i, "".join(line + "\n" for line in lines[start:i])
        if stripped in _EDIT_MARKERS:
            raise MalformedBlock(
                f"found {stripped!r} in the {name} section of the block opened at line "
                f"{block_line}; expected {end!r} first{_indent_hint(indented)}",
                first_line + i,
            )
        if indented is None and stripped.strip() in _EDIT_MARKERS:
            indented = first_line + i
        i += 1
    raise UnterminatedBlock(
        f"the {name} section of the block opened at line {block_line} is never closed "
        f"by {end!r}{_indent_hint(indented)}",
        first_line + len(lines) - 1,
    )


def _indent_hint(line: int | None) -> str:
    if line is None:
        return ""
    return f" (line {line} looks like a marker but is indented: markers start at column 0)"


# ---------------------------------------------------------------------------- render


def render_edits(edits: Iterable[SearchReplace], think: str = "") -> str:
    """Write ``edits`` in the patch format, each block in its own fence (SWE-RL style).

    ``parse_response(render_edits(edits, think))`` gives back ``edits`` and
    ``think.strip()``. Raises ValueError for no edits or a ``think`` holding ``</think>``.
    """
    edits = tuple(edits)
    if not edits:
        raise ValueError("render_edits needs at least one edit: the format has no empty patch")
    if "</think>" in think:
        raise ValueError("think text may not contain '</think>'")
    parts = ["<think>\n", think.strip(), "\n</think>\n<solution>\n"]
    for edit in edits:
        parts += [
            f"{FENCE}python\n### {edit.path}\n{SEARCH_MARKER}\n",
            edit.search,
            f"{DIVIDER_MARKER}\n",
            edit.replace,
            f"{REPLACE_MARKER}\n{FENCE}\n",
        ]
    parts.append("</solution>\n")
    return "".join(parts)


# ---------------------------------------------------------------------------- apply


def apply_edits(
    files: Mapping[str, str],
    edits: Iterable[SearchReplace],
    *,
    protected: Collection[str] = (),
    tolerate_trailing_whitespace: bool = True,
) -> dict[str, str]:
    """Apply ``edits`` in order to a copy of ``files`` (path → text) and return it.

    ``files`` is not modified. See the module docstring for the matching rules.
    """
    result = dict(files)
    for number, edit in enumerate(edits, 1):
        where = f"edit {number} ({edit.path})"
        if _is_protected(edit.path, protected):
            raise ProtectedPath(
                f"{where}: {edit.path!r} is protected (the task's tests or fixtures); "
                "fix the code under test instead"
            )
        if not edit.search:
            if edit.path in result:
                raise FileAlreadyExists(
                    f"{where}: an empty SEARCH creates a new file, but {edit.path!r} exists; "
                    "to change it, put the lines to replace in SEARCH"
                )
            result[edit.path] = edit.replace
            continue
        if edit.path not in result:
            raise FileNotInSnapshot(
                f"{where}: no file {edit.path!r}; files present: {_listing(result)}"
            )
        result[edit.path] = _apply_one(result[edit.path], edit, where, tolerate_trailing_whitespace)
    return result


def _is_protected(path: str, protected: Collection[str]) -> bool:
    return any(path == p or (p.endswith("/") and path.startswith(p)) for p in protected)


def _listing(files: Mapping[str, str], limit: int = 20) -> str:
    names = sorted(files)
    shown = ", ".join(repr(name) for name in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return (shown + more) if names else "none"


def _split(text: str) -> tuple[list[str], bool]:
    """Lines of ``text`` without their newlines, and whether the text ends with one."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
        return lines, True
    return lines, False


def _join(lines: Sequence[str], trailing_newline: bool) -> str:
    return "".join(line + "\n" for line in lines) if trailing_newline else "\n".join(lines)


def _find_lines(haystack: Sequence[str], needle: Sequence[str]) -> list[int]:
    """Line indices where ``needle`` occurs as consecutive whole lines (capped count).

    Both sides are framed by newlines so every hit of ``str.find`` is line-aligned;
    CPython's find is linear, so adversarial inputs cannot make this quadratic beyond
    the cap on reported hits.
    """
    if len(needle) > len(haystack):
        return []  # also keeps an empty file from "containing" one blank line
    hay = "\n" + "\n".join(haystack) + "\n"
    pattern = "\n" + "\n".join(needle) + "\n"
    hits: list[int] = []
    pos = hay.find(pattern)
    line = 0
    scanned = 0
    while pos >= 0 and len(hits) < _MAX_REPORTED:
        line += hay.count("\n", scanned, pos)
        scanned = pos
        hits.append(line)
        pos = hay.find(pattern, pos + 1)
    return hits


def _apply_one(content: str, edit: SearchReplace, where: str, tolerant: bool) -> str:
    lines, trailing = _split(content)
    search = edit.search[:-1].split("\n")
    hits = _find_lines(lines, search)
    if not hits and tolerant:
        hits = _find_lines(
            [line.rstrip(_MARKER_PAD) for line in lines],
            [line.rstrip(_MARKER_PAD) for line in search],
        )
    if len(hits) > 1:
        count = f"at least {len(hits)}" if len(hits) >= _MAX_REPORTED else str(len(hits))
        at = ", ".join(str(h + 1) for h in hits[:10])
        raise AmbiguousSearch(
            f"{where}: the SEARCH text occurs {count} times (at lines {at}); add "
            "surrounding lines to SEARCH so that it matches exactly one place"
        )
    if not hits:
        hint = ""
        loose = _find_lines([line.strip() for line in lines], [line.strip() for line in search])
        if loose:
            hint = (
                f"; it matches line {loose[0] + 1} if indentation is ignored: copy the "
                "indentation exactly"
            )
        raise SearchNotFound(
            f"{where}: the SEARCH text (first line {search[0][:80]!r}, {len(search)} lines) "
            f"does not occur in {edit.path!r}{hint}"
        )
    first = hits[0]
    replace = _split(edit.replace)[0]
    return _join([*lines[:first], *replace, *lines[first + len(search) :]], trailing)


# ---------------------------------------------------------------------------- oracle


def edits_between(
    before: Mapping[str, str], after: Mapping[str, str], *, context: int = 1
) -> tuple[SearchReplace, ...]:
    """Edits that turn snapshot ``before`` into ``after``: the oracle patch of a task.

    Each run of changed lines becomes one edit with ``context`` unchanged lines around it,
    widened until its SEARCH matches exactly once where it applies, so that
    ``apply_edits(before, edits_between(before, after)) == after``. Raises ValueError
    for what the format cannot express: deleting a file, editing an empty file, adding
    or removing a file's final newline, a line that reads as an edit marker.
    """
    edits: list[SearchReplace] = []
    for path in sorted(set(before) | set(after)):
        old, new = before.get(path), after.get(path)
        if old == new:
            continue
        if new is None:
            raise ValueError(f"{path!r} is deleted, and the patch format cannot delete files")
        if old is None:
            if new and not new.endswith("\n"):
                raise ValueError(f"new file {path!r} must end with a newline")
            edits.append(_oracle_edit(path, [], _split(new)[0]))
        else:
            edits += _file_edits(path, old, new, context)
    return tuple(edits)


def _file_edits(path: str, old: str, new: str, context: int) -> list[SearchReplace]:
    cur, old_newline = _split(old)
    target, new_newline = _split(new)
    if not cur:
        raise ValueError(f"{path!r} is empty: SEARCH has nothing to match (and '' creates)")
    if target and old_newline != new_newline:
        raise ValueError(f"the patch format cannot change whether {path!r} ends with a newline")
    edits = []
    delta = 0  # how far earlier edits moved the lines below them
    matcher = difflib.SequenceMatcher(None, cur, target, autojunk=False)
    for group in matcher.get_grouped_opcodes(context):
        i1, i2, j1, j2 = group[0][1], group[-1][2], group[0][3], group[-1][4]
        lo, hi = i1 + delta, i2 + delta
        # Lines above ``lo`` are already final and lines below ``hi`` not yet edited, so
        # widening copies them unchanged into both sides of the edit.
        while lo == hi or len(_find_lines(cur, cur[lo:hi])) > 1:
            lo, hi = max(lo - 1, 0), min(hi + 1, len(cur))
        replace = [*cur[lo : i1 + delta], *target[j1:j2], *cur[i2 + delta : hi]]
        edits.append(_oracle_edit(path, cur[lo:hi], replace))
        cur[lo:hi] = replace
        delta += (j2 - j1) - (i2 - i1)
    return edits


def _oracle_edit(path: str, search: list[str], replace: list[str]) -> SearchReplace:
    try:
        return SearchReplace(path, _join(search, True), _join(replace, True))
    except PatchFormatError as err:
        raise ValueError(f"cannot express the change as a patch: {err}") from err


# ---------------------------------------------------------------------------- diff


def unified_diff(before: Mapping[str, str], after: Mapping[str, str], context: int = 3) -> str:
    """A git-style unified diff of two snapshots (path → text), files in path order.

    Created and deleted files are diffed against ``/dev/null``; a last line without a
    newline is marked as git does, so the output is unambiguous.
    """
    out: list[str] = []
    for path in sorted(set(before) | set(after)):
        old, new = before.get(path), after.get(path)
        if old == new:
            continue
        fromfile = "/dev/null" if old is None else f"a/{path}"
        tofile = "/dev/null" if new is None else f"b/{path}"
        diff = list(
            difflib.unified_diff(
                _keepends(old or ""), _keepends(new or ""), fromfile, tofile, n=context
            )
        )
        # An empty file created or deleted has no hunk, but it is still a change.
        out += diff or [f"--- {fromfile}\n", f"+++ {tofile}\n"]
    return "".join(
        line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in out
    )


def _keepends(text: str) -> list[str]:
    # str.splitlines would also split on \x0c, \x1c, \u2028...: files are split on \n only.
    lines = text.split("\n")
    last = lines.pop()
    return [line + "\n" for line in lines] + ([last] if last else [])
