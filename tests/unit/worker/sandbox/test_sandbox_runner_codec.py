"""The runner's wire formats: the judge/candidate value codec and the length-prefixed frames.

These decoders sit on the trust boundary (the candidate process writes what the judge
decodes), so every input either decodes to plain builtins or raises the runner's own
typed error. The runner is stdlib-only and runs here unchanged, outside any sandbox.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coderepair.worker.sandbox import runner

plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()
    | st.binary(),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=5) | st.integers(), inner, max_size=4)
        | st.sets(st.integers() | st.text(max_size=5), max_size=4)
        | st.frozensets(st.integers(), max_size=4)
    ),
    max_leaves=20,
)


def _same(a: object, b: object) -> bool:
    """Equality that treats nan as equal to itself and checks exact builtin types."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@settings(max_examples=200, deadline=None)
@given(plain)
def test_plain_values_round_trip_as_exact_builtins(value: object) -> None:
    wire = json.loads(json.dumps(runner.encode_value(value)))
    assert _same(runner.decode_value(wire), value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=15,
)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_arbitrary_json_decodes_or_raises_codec_error(tagged: object) -> None:
    try:
        value = runner.decode_value(tagged)
    except runner.CodecError:
        return
    # Whatever decodes is made only of the allowed builtin types.
    runner.encode_value(value)


@settings(max_examples=200, deadline=None)
@given(plain)
def test_truncated_encodings_never_escape_the_codec_error(value: object) -> None:
    text = json.dumps(runner.encode_value(value))
    for cut in range(0, len(text), max(1, len(text) // 8)):
        try:
            tagged = json.loads(text[:cut])
        except ValueError:
            continue
        with contextlib.suppress(runner.CodecError):
            runner.decode_value(tagged)


def test_objects_with_lying_equality_cannot_be_encoded() -> None:
    class AlwaysEqual:
        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = object.__hash__

    with pytest.raises(runner.CodecError, match="AlwaysEqual cannot cross"):
        runner.encode_value([1, AlwaysEqual()])


def test_int_subclasses_decode_as_plain_ints() -> None:
    class Sneaky(int):
        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = int.__hash__

    decoded = runner.decode_value(runner.encode_value(Sneaky(3)))
    assert type(decoded) is int
    assert decoded == 3
    assert decoded != 4


@pytest.mark.parametrize(
    "tagged",
    [
        ["i", 5],  # ints travel as decimal strings only
        ["f", "1.5; import os"],
        ["y", "not base64!"],
        ["d", [[["l", []], ["N"]]]],  # unhashable key
        ["S", [["l", []]]],
        ["x", []],
        ["N", 1],
        [],
        "N",
    ],
)
def test_malformed_values_are_refused(tagged: object) -> None:
    with pytest.raises(runner.CodecError):
        runner.decode_value(tagged)


def test_nesting_beyond_the_limit_is_refused_not_recursed() -> None:
    deep: list[object] = ["N"]
    for _ in range(runner.MAX_DEPTH + 5):
        deep = ["l", [deep]]
    with pytest.raises(runner.CodecError, match="nested deeper"):
        runner.decode_value(deep)


def _pipe_with(data: bytes) -> int:
    read_fd, write_fd = os.pipe()
    os.write(write_fd, data)
    os.close(write_fd)
    return read_fd


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_give_a_frame_error_or_a_frame(data: bytes) -> None:
    fd = _pipe_with(data)
    try:
        while True:
            frame = runner.read_frame(fd)
            if frame is None:
                break
            assert isinstance(frame, dict)
    except runner.FrameError:
        pass
    finally:
        os.close(fd)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=5), json_values, max_size=4), st.data())
def test_truncated_frames_raise_frame_error(obj: dict[str, object], data: st.DataObject) -> None:
    body = json.dumps(obj).encode()
    whole = struct.pack(">I", len(body)) + body
    cut = data.draw(st.integers(1, len(whole) - 1))
    fd = _pipe_with(whole[:cut])
    try:
        with pytest.raises(runner.FrameError):
            runner.read_frame(fd)
    finally:
        os.close(fd)


def test_frames_round_trip_and_oversized_frames_are_refused() -> None:
    read_fd, write_fd = os.pipe()
    runner.write_frame(write_fd, {"a": [1, "ü"]})
    os.write(write_fd, struct.pack(">I", 1 << 30))
    os.close(write_fd)
    try:
        assert runner.read_frame(read_fd) == {"a": [1, "ü"]}
        with pytest.raises(runner.FrameError, match="exceeds"):
            runner.read_frame(read_fd)
    finally:
        os.close(read_fd)


def test_check_is_split_into_one_test_per_candidate_statement() -> None:
    source = (
        "import math\n"
        "def check(candidate):\n"
        "    assert True\n"
        "    x = 3\n"
        "    assert candidate(x) == 4\n"
        "    for i in range(3):\n"
        "        assert candidate(i) > i\n"
        "    assert helper(1) == 2\n"
    )
    _tree, count, free = runner.plan_check(source)
    assert count == 3  # `assert True` and `x = 3` are set-up, not tests
    assert free == {"helper"}


@pytest.mark.parametrize(
    "source",
    [
        "def other(candidate):\n    pass\n",
        "def check():\n    pass\n",
        "def check(a, b):\n    pass\n",
    ],
)
def test_tests_without_a_single_argument_check_are_refused(source: str) -> None:
    with pytest.raises(runner.JobError, match="check"):
        runner.plan_check(source)
