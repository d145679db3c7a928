"""The dashboard server's request-head parser: every malformed head is a typed
`BadRequestError` with the status to answer, never another exception."""

from __future__ import annotations

from http import HTTPStatus

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coderepair.coordinator.dashboard.config import DashboardConfig
from coderepair.coordinator.dashboard.http import (
    MAX_HEAD_BYTES,
    BadRequestError,
    RequestHead,
    parse_request_head,
)

GOOD = b"GET /api/stats?run=r1 HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n"


def test_a_valid_head_is_parsed() -> None:
    head = parse_request_head(GOOD)
    assert (head.method, head.path, head.query) == ("GET", "/api/stats", {"run": ["r1"]})
    assert head.headers == {"host": "127.0.0.1", "accept": "*/*"}
    assert head.run_id() == "r1"


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET / HTTP/1.1\r\n", HTTPStatus.BAD_REQUEST),  # not terminated
        (b"GET /\r\n\r\n", HTTPStatus.BAD_REQUEST),  # HTTP/0.9
        (b"GET / HTTP/2.0\r\n\r\n", HTTPStatus.HTTP_VERSION_NOT_SUPPORTED),
        (b"GET http://x/ HTTP/1.1\r\n\r\n", HTTPStatus.BAD_REQUEST),  # absolute form
        (b"G(T / HTTP/1.1\r\n\r\n", HTTPStatus.BAD_REQUEST),
        (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", HTTPStatus.BAD_REQUEST),
        (b"GET /\xff HTTP/1.1\r\n\r\n", HTTPStatus.BAD_REQUEST),
        (b"GET /?run=%ff HTTP/1.1\r\n\r\n", HTTPStatus.BAD_REQUEST),
        (b"GET /?run HTTP/1.1\r\n\r\n", HTTPStatus.BAD_REQUEST),
        (b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\n\r\n", HTTPStatus.REQUEST_URI_TOO_LONG),
        (
            b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n",
            HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
        ),
        (
            b"GET / HTTP/1.1\r\nX: " + b"y" * MAX_HEAD_BYTES + b"\r\n\r\n",
            HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
        ),
    ],
)
def test_malformed_heads_get_their_status(raw: bytes, status: HTTPStatus) -> None:
    with pytest.raises(BadRequestError) as caught:
        parse_request_head(raw)
    assert caught.value.status == status


@pytest.mark.parametrize("query", ["run=a&run=b", "run=", "run=" + "x" * 65])
def test_bad_run_parameters_are_refused(query: str) -> None:
    head = parse_request_head(f"GET /?{query} HTTP/1.1\r\n\r\n".encode())
    with pytest.raises(BadRequestError, match=r"\?run=ID"):
        head.run_id()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_are_a_typed_error_or_a_head(raw: bytes) -> None:
    try:
        head = parse_request_head(raw)
    except BadRequestError as exc:
        assert isinstance(exc.status, HTTPStatus)
        return
    assert isinstance(head, RequestHead) and head.path.startswith("/")


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=len(GOOD) - 1))
def test_truncated_heads_are_refused(cut: int) -> None:
    with pytest.raises(BadRequestError):
        parse_request_head(GOOD[:cut])


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_random_text_targets_never_escape_the_typed_error(target: str) -> None:
    raw = f"GET /{target} HTTP/1.1\r\n\r\n".encode(errors="surrogatepass")
    try:
        head = parse_request_head(raw)
        head.run_id()
    except BadRequestError:
        pass


@pytest.mark.parametrize(
    ("fields", "hint"),
    [
        ({"host": "localhost"}, "not an IP address"),
        ({"port": 70000}, "less than or equal to 65535"),
        ({"refresh_s": 0.1}, "greater than or equal to 0.5"),
        ({"colour": "blue"}, "Extra inputs are not permitted"),
    ],
)
def test_config_errors_say_what_to_change(fields: dict[str, object], hint: str) -> None:
    with pytest.raises(ValueError, match=hint):
        DashboardConfig.model_validate(fields)
